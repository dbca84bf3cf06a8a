#!/usr/bin/env bash
# Postfix as the peer of saida's benchmarks: `start PORT` installs Postfix if needed (Debian
# package, "No configuration") and runs smtpd on 127.0.0.1:PORT, tuned and fair:
# - fsync on (Postfix fsyncs each queue file before its 250, the promise saida makes);
# - relaying for 127.0.0.0/8, no local delivery, no DNS, no header/body checks or milters;
# - enough smtpd processes for 500 connections;
# - without RELAY: defer_transports = smtp, accepted mail stays queued, so only acceptance is
#   measured (the injection benchmark);
# - with RELAY (`start PORT 127.0.0.2:2600`): a tuned relay of everything to that host, as in
#   ../shared/PLATFORM-NOTES.md: connection cache on, 50 connections to it, no DNS.
# `stop` stops Postfix and empties its queue. Only for benchmarks: it rewrites /etc/postfix.
set -euo pipefail
cmd=${1:?start PORT [RELAY] | stop}
port=${2:-2526}
relay=${3:-}

case "$cmd" in
start)
    if ! command -v postfix >/dev/null; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
    fi
    postfix stop >/dev/null 2>&1 || true
    [ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
    postconf -e \
        "compatibility_level = 3.6" \
        "myhostname = postfix.bench.test" \
        "maillog_file = /var/log/postfix.log" \
        "inet_interfaces = loopback-only" \
        "inet_protocols = ipv4" \
        "mynetworks = 127.0.0.0/8" \
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
        "mydestination =" "relay_domains =" "local_recipient_maps =" \
        "alias_maps =" "alias_database =" \
        "smtp_dns_support_level = disabled" \
        "default_process_limit = 600" \
        "smtpd_client_connection_count_limit = 0" \
        "smtpd_client_connection_rate_limit = 0" \
        "message_size_limit = 52428800"
    if [ -n "$relay" ]; then
        postconf -e \
            "defer_transports =" \
            "relayhost = [${relay%:*}]:${relay##*:}" \
            "smtp_connection_cache_destinations = \$relayhost" \
            "smtp_connection_cache_on_demand = yes" \
            "initial_destination_concurrency = 20" \
            "default_destination_concurrency_limit = 50" \
            "smtp_destination_concurrency_limit = 50" \
            "smtp_tls_security_level = none"
    else
        postconf -e "defer_transports = smtp" "relayhost ="
    fi
    # One smtpd on the benchmark port; the default port-25 service is left out.
    sed -i '/^smtp      inet/d;/^127\.0\.0\.1:[0-9]* *inet/d' /etc/postfix/master.cf
    echo "127.0.0.1:$port inet n - n - - smtpd" >> /etc/postfix/master.cf
    postfix check
    postfix start >/dev/null 2>&1
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && exit 0
        sleep 0.1
    done
    echo "postfix did not listen on $port" >&2
    exit 1
    ;;
stop)
    postfix stop >/dev/null 2>&1 || true
    postsuper -d ALL >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 start PORT | stop" >&2
    exit 2
    ;;
esac
