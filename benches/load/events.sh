#!/usr/bin/env bash
# The event path and the routing layer under load, in one run: POST of a 300-byte JSON body
# through ficus with no rule, with a matching rule in `durability: async`, and in
# `durability: sync` (plus the fdatasync latency F of the outbox's disk measured in the same
# run); and with 50 routes configured, the request matching the last one, a split of one
# upstream listed twice (so the upstream's cost is unchanged).
#
#   bash benches/load/events.sh            # DURATION=10 CONNS=64 ROUNDS=2 by default
#
# Each case is measured after WARMUP requests (200000 by default; the same for every case), so
# that the outbox is in the state it keeps for a sidecar's whole life: its first segment (64
# MiB, about 194k of these events) grows as it is written, and only once a sink has passed a
# segment is there one to recycle (src/outbox/spare.rs). WARMUP=0 measures a new outbox.
#
# Targets (issue 3): async keeps >= 90% of the no-rule throughput; sync reaches >= 80% of
# min(no-rule, CONNS/F) and adds at most 1.5 F to p50. The p50 target is judged at a fixed
# RATE below saturation (5000 req/s, as issue 2's latency target): at saturation a closed
# loop's p50 is CONNS / throughput (Little's law), so there it only restates the throughput
# target; the saturated p50 is printed too. Pinning as in run.sh: the load generator on
# CPU 0, upstream and ficus on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
RATE=${RATE:-5000}
WARMUP=${WARMUP:-200000}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
TARGET=${CARGO_TARGET_DIR:-target}

# shellcheck source=benches/load/common.sh
source benches/load/common.sh
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
if [[ ! -x $OHA ]]; then
    log "installing oha (cargo install oha --locked)"
    cargo install oha --locked >&2
fi
command -v python3 >/dev/null || { log "python3 is needed to parse oha's JSON"; exit 1; }

log "building release"
cargo build --release --bin ficus --example bench_upstream >&2
FICUS_BIN=$TARGET/release/ficus
UPSTREAM_BIN=$TARGET/release/examples/bench_upstream

bench_tmp ficus-events-bench
start_upstream "$SERVER_CPU"

# F: fdatasync latency of 4 KiB appends in the outbox's directory, p50 and p99 in ms.
measure_fsync() {
    python3 - "$TMP" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
lat = []
for _ in range(300):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append(time.perf_counter() - t)
os.close(fd); os.unlink(path)
lat.sort()
print(f"{lat[len(lat)//2]*1000:.3f} {lat[int(len(lat)*0.99)]*1000:.3f}")
PY
}

write_body

# oha at saturation, or at $2 requests/s in all: prints "req/s p50_ms p99_ms ok other".
run_load() {
    local port=$1 rate=()
    [[ -n ${2:-} ]] && rate=(-q "$2")
    timeout $((DURATION + 20)) taskset -c "$LOADGEN_CPU" "$OHA" --no-tui --output-format json \
        -z "${DURATION}s" -c "$CONNS" "${rate[@]}" -m POST -H 'content-type: application/json' \
        -D "$TMP/body.json" "http://127.0.0.1:$port/orders" >"$TMP/oha.json"
    python3 - "$TMP/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
print(f'{s["requestsPerSec"]:.0f} {p.get("p50", 0)*1000:.3f} {p.get("p99", 0)*1000:.3f} {ok} {bad}')
PY
}

declare -A RPS P50 P99 CPU RP50
read -r F50 F99 < <(measure_fsync)
log "fdatasync: p50 ${F50} ms, p99 ${F99} ms"
for round in $(seq 1 "$ROUNDS"); do
    for case in none routed async sync; do
        read -r port pid < <(start_ficus "$case-$round" "$case")
        if ((WARMUP > 0)); then
            taskset -c "$LOADGEN_CPU" "$OHA" --no-tui --output-format json -n "$WARMUP" -c "$CONNS" -m POST \
                -H 'content-type: application/json' -D "$TMP/body.json" "http://127.0.0.1:$port/orders" >/dev/null
        fi
        t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
        read -r rps p50 p99 ok bad < <(run_load "$port")
        # CPU per answer: utime+stime of ficus (all its threads: proxy, outbox writer,
        # dispatcher and sink) over the run; robust where req/s is not (a busy machine).
        t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
        cpu=$(python3 -c "print(f'{($t1 - $t0) * 1e6 / $(getconf CLK_TCK) / max($ok, 1):.2f}')")
        if [[ $case != routed ]]; then
            read -r _ rp50 _ rok rbad < <(run_load "$port" "$RATE")
            log "round $round $case at $RATE req/s: p50 $rp50 ms ($rok ok, $rbad other)"
            RP50[$case]="${RP50[$case]:-} $rp50"
        fi
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        log "round $round $case: $rps req/s, p50 $p50 ms, p99 $p99 ms, ficus CPU $cpu us/request ($ok ok, $bad other)"
        RPS[$case]="${RPS[$case]:-} $rps"; P50[$case]="${P50[$case]:-} $p50"; P99[$case]="${P99[$case]:-} $p99"
        CPU[$case]="${CPU[$case]:-} $cpu"
    done
done
read -r F50b F99b < <(measure_fsync)

python3 - "$RATE" "${RP50[none]}" "${RP50[async]}" "${RP50[sync]}" "$CONNS" "$F50" "$F50b" "${RPS[none]}" "${RPS[async]}" "${RPS[sync]}" "${P50[none]}" "${P50[async]}" "${P50[sync]}" "${P99[none]}" "${P99[async]}" "${P99[sync]}" "${RPS[routed]}" "${P50[routed]}" "${P99[routed]}" "${CPU[none]}" "${CPU[async]}" "${CPU[sync]}" "${CPU[routed]}" <<'PY'
import statistics as st, sys
rate = int(sys.argv[1])
rp50 = {k: st.median([float(x) for x in v.split()]) for k, v in zip(["none", "async", "sync"], sys.argv[2:5])}
a = sys.argv[5:]
conns = int(a[0]); F = (float(a[1]) + float(a[2])) / 2
nums = lambda s: [float(x) for x in s.split()]
keys = ["none", "async", "sync"]
rps = {k: st.median(nums(v)) for k, v in zip(keys, a[3:6])}
p50 = {k: st.median(nums(v)) for k, v in zip(keys, a[6:9])}
p99 = {k: st.median(nums(v)) for k, v in zip(keys, a[9:12])}
rps["routed"], p50["routed"], p99["routed"] = (st.median(nums(v)) for v in a[12:15])
cpu = {k: st.median(nums(v)) for k, v in zip(["none", "async", "sync", "routed"], a[15:19])}
bound = conns / (F / 1000)
print(f"POST 300 B, {conns} connections, medians; fdatasync F (p50) = {F:.3f} ms, C/F = {bound:.0f}/s")
print(f"{'case':<8}{'req/s':>10}{'vs none':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'+ vs none':>10}")
for k in ["none", "routed", "async", "sync"]:
    print(f"{k:<8}{rps[k]:>10.0f}{rps[k]/rps['none']*100:>8.1f}%{p50[k]:>9.3f}{p99[k]:>9.3f}{cpu[k]:>12.2f}{cpu[k]-cpu['none']:>+10.2f}")
t_async = rps["async"] >= 0.9 * rps["none"]
need = 0.8 * min(rps["none"], bound)
t_sync = rps["sync"] >= need
t_p50 = rp50["sync"] - rp50["none"] <= 1.5 * F
print(f"50 routes + split cost < 5% of throughput: {'met' if rps['routed'] >= 0.95 * rps['none'] else 'MISSED'} ({(1 - rps['routed']/rps['none'])*100:.1f}% lower)")
print(f"async >= 90% of none: {'met' if t_async else 'MISSED'} ({rps['async']/rps['none']*100:.1f}%)")
print(f"sync >= 80% of min(none, C/F) = {need:.0f}/s: {'met' if t_sync else 'MISSED'} ({rps['sync']:.0f}/s)")
print(f"p50 at {rate} req/s: none {rp50['none']:.3f} ms, async {rp50['async']:.3f} ms, sync {rp50['sync']:.3f} ms")
print(f"sync adds <= 1.5 F = {1.5*F:.3f} ms to p50 at {rate} req/s: {'met' if t_p50 else 'MISSED'} (+{rp50['sync']-rp50['none']:.3f} ms; at saturation +{p50['sync']-p50['none']:.3f} ms)")
PY
