#!/usr/bin/env bash
# Runs every test of saida, exactly as CI does (.ci/run calls this script and nothing else).
# Tests use real files, real processes and a real tmpfs mount, so they run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (Rust 1.85 or newer)" >&2
    exit 1
fi

# Real peers used by the tests: swaks (with TLS support), Python's smtplib, dnsmasq as the
# DNS server on loopback for MX resolution, and promtool for the metrics exposition.
need=()
command -v swaks >/dev/null || need+=(swaks)
perl -MNet::SSLeay -MIO::Socket::SSL -e 1 2>/dev/null || need+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v python3 >/dev/null || need+=(python3)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
# promtool (Debian package prometheus) checks the /metrics exposition.
command -v promtool >/dev/null || need+=(prometheus)
# openssl makes the RSA DKIM keys of the signing tests (ring signs with RSA but cannot make keys).
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing test dependencies: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests in tests/ run the built binaries, so build them first.
cargo build --workspace --bins --locked

# Short fuzz runs of the spool decoders and the SMTP parsers (longer runs: docs/operations.md).
# cargo-fuzz needs a nightly compiler feature; RUSTC_BOOTSTRAP=1 enables it on stable.
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
mkdir -p target
# fuzz DIR TARGET WHAT: 20 seconds of TARGET in DIR, on its committed corpus.
fuzz() {
    local log="$PWD/target/fuzz-$2.log"
    if ! (cd "$1" &&
          RUSTC_BOOTSTRAP=1 cargo fuzz run "$2" "corpus/$2" -- -max_total_time=20 >"$log" 2>&1); then
        tail -40 "$log" >&2
        echo "fuzzing $3 failed; crash inputs are in $1/artifacts/" >&2
        exit 1
    fi
    echo "fuzz $2: $(grep -E '^Done [0-9]+ runs' "$log" | tail -1)"
}
fuzz spool-format/fuzz decode "the spool decoders"
fuzz smtp-proto/fuzz smtp "the SMTP parsers (commands, lines, content, replies)"

# The spool's fault simulation, bounded (SAIDA_FAULT_SECS, default 20 s), with its seeds and
# totals printed (docs/operations.md says how to run it longer or replay a seed).
fault_log="$PWD/target/fault-simulation.log"
if ! cargo test -p spool --test fault_simulation --locked -- --nocapture >"$fault_log" 2>&1; then
    grep -E -A3 'panicked' "$fault_log" >&2
    echo "the fault simulation failed (full output: $fault_log); replay with the seed above" >&2
    exit 1
fi
grep -E '^fault simulation: [0-9]+ seeds' "$fault_log"

# Last, so that the test runner's summary closes the output.
cargo test --workspace --locked --no-fail-fast -- \
    --skip acknowledged_mail_survives_random_faults_and_crashes
