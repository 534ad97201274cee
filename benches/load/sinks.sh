#!/usr/bin/env bash
# Events/s each sink delivers from a full outbox to its broker on this machine, at two batch
# sizes, beside the broker's own tool where one is installed (examples/sink_bench.rs says how).
#
#   bash benches/load/sinks.sh                          # 50000 events, batches 10 and 1000, every sink
#   bash benches/load/sinks.sh --sinks redis,kafka --batches 1,1000 --events 20000
#
# Arguments go to the example. Before measuring, waits (polling every 30 s, WAIT_IDLE seconds
# at most, 1200 by default) until no other load benchmark runs (oha, events.sh, run.sh,
# perf record) and the machine's other work (builds, tests) takes under IDLE_BUSY percent of
# all CPUs over 5 s (default 25), then runs anyway with a loud line if it is still busy. The
# table's `other CPU` column says, per measurement, how much the rest of the machine used
# (100% = one core). The brokers come from
# their binaries: nats-server, redis-server (+ redis-benchmark), rabbitmq-server, tansu; a
# missing one skips its sink loudly. Output (table on stdout, progress on stderr) is also
# kept in $OUT (default /tmp/ficus-sinks-bench.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."

WAIT_IDLE=${WAIT_IDLE:-1200}
OUT=${OUT:-/tmp/ficus-sinks-bench.txt}
TARGET=${CARGO_TARGET_DIR:-target}

log() { printf '%s\n' "$*" >&2; }

log "building release (CARGO_TARGET_DIR=$TARGET)"
cargo build --release --example sink_bench >&2

IDLE_BUSY=${IDLE_BUSY:-25}
benchmarks() { pgrep -fa 'oha|events\.sh|events_cpu\.sh|run\.sh|perf record' | grep -v -e pgrep -e sinks.sh || true; }
# Busy share of all CPUs over 5 s, in percent (from /proc/stat: all but idle and iowait).
cpu_busy() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    sleep 5
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%d", 100 * busy / (busy + idle) }'
}
waited=0
while (( waited < WAIT_IDLE )); do
    running=$(benchmarks)
    if [[ -z $running ]]; then
        busy=$(cpu_busy)
        (( busy < IDLE_BUSY )) && break
        log "machine ${busy}% busy (want < ${IDLE_BUSY}%); waiting (${waited}s of ${WAIT_IDLE}s)"
    else
        log "another load benchmark runs; waiting (${waited}s of ${WAIT_IDLE}s):"
        printf '%s\n' "$running" | cut -c1-120 >&2
    fi
    sleep 30
    waited=$((waited + 30))
done
if [[ -n $(benchmarks) ]] || (( $(cpu_busy) >= IDLE_BUSY )); then
    log "################################################################"
    log "MEASURING ON A BUSY MACHINE (another load benchmark or builds): figures are disturbed"
    log "################################################################"
fi
{
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), ficus $(git rev-parse --short HEAD 2>/dev/null || echo "${FICUS_REV:-?}"), waited ${waited}s for quiet, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    "$TARGET/release/examples/sink_bench" "$@"
} | tee "$OUT"
