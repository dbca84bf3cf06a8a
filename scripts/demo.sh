#!/usr/bin/env bash
# The main job: saida on its embedded defaults (SMTP on 127.0.0.1:2525, durable spool, admin
# endpoint on 127.0.0.1:8025) plus one route that sends every domain to a local saida-sink,
# loaded by saida-blast on loopback. Live progress, then a throughput and latency table.
#
#   ./scripts/demo.sh              # 20,000 x 2 KB messages over 1000 domains (about a minute)
#   ./scripts/demo.sh --full       # 200,000 messages
#   ./scripts/demo.sh --spool-demo # the spool crash demo instead (kill -9, recover, check)
set -euo pipefail
cd "$(dirname "$0")/.."

count=20000
case "${1:-}" in
--full) count=200000 ;;
--spool-demo)
    shift
    cargo build --release --locked -p saida
    exec ./target/release/saida demo "$@"
    ;;
"" | --quick) ;;
*)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac

cargo build --release --locked -p saida -p saida-tools
bin=./target/release
work=var/demo
rm -rf "$work" && mkdir -p "$work"
for port in 2525 2600 8025 9101; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port on 127.0.0.1 is in use; stop what listens there first" >&2
        exit 1
    fi
done

cat >"$work/saida.toml" <<EOF
# Embedded defaults, with the spool and logs under $work and every domain routed to the sink.
[spool]
dir = "$work/spool"
[delivery]
log_dir = "$work/log"
[[route]]
domain = "*"
hosts = ["127.0.0.1:2600"]
EOF

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin/saida-sink" --listen 127.0.0.1:2600 --stats "$work/sink.json" --metrics 127.0.0.1:9101 \
    >"$work/sink.out" &
pids+=($!)
"$bin/saida" run --config "$work/saida.toml" 2>"$work/saida.log" &
pids+=($!)
for _ in $(seq 200); do
    grep -q "saida running" "$work/saida.log" 2>/dev/null && break
    sleep 0.05
done
grep -q "saida running" "$work/saida.log" || { cat "$work/saida.log"; exit 1; }

echo "saida on 127.0.0.1:2525 (log: $work/saida.log, delivery log: $work/log/)"
echo "sink on 127.0.0.1:2600, its counters at http://127.0.0.1:9101/metrics"
echo "queue while it runs: $bin/saida queue --config $work/saida.toml summary"
echo
echo "injecting $count x 2 KB messages over 50 connections into saida..."
t0=$(date +%s.%N)
"$bin/saida-blast" --target 127.0.0.1:2525 --count "$count" --connections 50 --size 2048 \
    --domains 1000 --json >"$work/blast.json"

field() { grep -o "\"$2\":[0-9.]*" "$1" | head -1 | cut -d: -f2; }
echo "waiting for delivery to the sink..."
start=$(date +%s)
while :; do
    got=$(field "$work/sink.json" recipients 2>/dev/null || echo 0)
    printf '\r  delivered %s of %s ' "${got:-0}" "$count"
    [ "${got:-0}" -ge "$count" ] && break
    if [ $(($(date +%s) - start)) -gt 120 ]; then
        echo; echo "delivery did not finish within 120 s; see $work/saida.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo
lat() { grep -o "\"latency_ms\":{[^}]*}" "$1" | grep -o "\"$2\":[0-9.]*" | cut -d: -f2; }
first=$(grep -o '"seconds":[0-9.]*' "$work/blast.json" | cut -d: -f2)
inject=$(field "$work/blast.json" msgs_per_s)
last_us=$(field "$work/sink.json" last_message_unix_us)
e2e=$(awk -v n="$count" -v t0="$t0" -v t1="$last_us" 'BEGIN { printf "%.0f", n / (t1 / 1e6 - t0) }')
echo
printf '%-34s %s\n' "messages" "$count"
printf '%-34s %.0f msgs/s\n' "injection (SMTP in, durable 250)" "$inject"
printf '%-34s p50 %s ms, p99 %s ms\n' "ack latency (end of data -> 250)" \
    "$(lat "$work/blast.json" p50)" "$(lat "$work/blast.json" p99)"
printf '%-34s p50 %s ms, p99 %s ms, max %s ms\n' "end to end (sent -> delivered)" \
    "$(lat "$work/sink.json" p50)" "$(lat "$work/sink.json" p99)" "$(lat "$work/sink.json" max)"
printf '%-34s %.0f msgs/s\n' "end to end (SMTP in -> delivered)" "$e2e"
printf '%-34s %s s\n' "injection time" "$first"
echo
echo "delivery log lines: $(cat "$work"/log/*.jsonl | wc -l) (outcomes: \
$(cat "$work"/log/*.jsonl | grep -c '"outcome":"delivered"') delivered)"
echo "stopping (SIGTERM)..."
