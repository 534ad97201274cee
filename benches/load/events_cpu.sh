#!/usr/bin/env bash
# CPU per request of the event path, by thread, over a fixed number of requests: robust on a
# busy machine where req/s is not. POST of a 300-byte JSON body (as events.sh) through ficus
# with no rule and with a matching rule in `durability: async` and `sync`, a file sink.
#
#   bash benches/load/events_cpu.sh              # REQUESTS=200000 CONNS=64 ROUNDS=2
#   CASES="none async" PERF=1 bash benches/load/events_cpu.sh   # + perf record per case
#   STAT=1 bash benches/load/events_cpu.sh        # + syscalls per request (perf stat)
#
# For each case, after a warm-up of WARMUP requests (200000: past a new outbox's first 64 MiB
# segment, so that the writer writes into recycled segments as a sidecar does for the rest
# of its life; see events.sh), it reads utime+stime of ficus's threads
# (/proc/PID/task/*/stat) before and after REQUESTS requests and prints µs per request:
# total, the tokio worker (proxy, event tap, dispatcher, sink), the outbox writer thread
# (`ficus-outbox`), the blocking pool (the other tokio threads: reads, fsyncs,
# cursor commits), the main thread; plus the CPU time of kernel threads (jbd2, kworkers:
# journal commits that fsyncs cause) and context switches per request. With PERF=1 a
# `perf record -e cpu-clock` (PERF_CALLGRAPH="--call-graph dwarf" for stacks) of ficus over the measured requests is left in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

REQUESTS=${REQUESTS:-200000}
WARMUP=${WARMUP:-200000}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
CASES=${CASES:-none async sync}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
PERF=${PERF:-0}
OUT_DIR=${OUT_DIR:-/tmp/ficus-events-cpu}
# With STAT=1: syscalls and context switches per request (perf stat, tracepoints).
STAT_EVENTS=${STAT_EVENTS:-context-switches,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_futex,syscalls:sys_enter_openat,syscalls:sys_enter_rename,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_close,syscalls:sys_enter_statx,syscalls:sys_enter_mkdir}
TARGET=${CARGO_TARGET_DIR:-target}

# shellcheck source=benches/load/common.sh
source benches/load/common.sh
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[[ -x $OHA ]] || { log "oha is needed (cargo install oha --locked)"; exit 1; }

if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building release"
    cargo build --release --bin ficus --example bench_upstream >&2
fi
FICUS_BIN=${FICUS_BIN:-$TARGET/release/ficus}
UPSTREAM_BIN=$TARGET/release/examples/bench_upstream
mkdir -p "$OUT_DIR"

bench_tmp ficus-events-cpu
start_upstream "$SERVER_CPU"
write_body

load() {
    local port=$1 n=$2
    taskset -c "$LOADGEN_CPU" "$OHA" --no-tui --output-format json -n "$n" -c "$CONNS" -m POST \
        -H 'content-type: application/json' -D "$TMP/body.json" "http://127.0.0.1:$port/orders" >"$TMP/oha.json"
}

# Waits until ficus used no CPU for 0.5 s (at most 60 s).
wait_idle() {
    local last now
    last=$(awk '{print $14+$15}' "/proc/$1/stat")
    for _ in $(seq 1 120); do
        sleep 0.5
        now=$(awk '{print $14+$15}' "/proc/$1/stat")
        [[ $now == "$last" ]] && return 0
        last=$now
    done
}

# Thread times (ticks) of ficus and of the kernel's threads, and CPU totals: one JSON line.
snapshot() {
    python3 - "$1" <<'PY'
import json, os, sys
pid = sys.argv[1]
def stat(path):
    with open(path) as f:
        s = f.read()
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # utime + stime
def status_ctx(path):
    v = n = 0
    with open(path) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"): v = int(line.split()[1])
            if line.startswith("nonvoluntary_ctxt_switches"): n = int(line.split()[1])
    return v, n
threads = {}
ctx = [0, 0]
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        threads[tid] = [comm, stat(f"/proc/{pid}/task/{tid}/stat")]
        v, n = status_ctx(f"/proc/{pid}/task/{tid}/status")
        ctx[0] += v; ctx[1] += n
    except FileNotFoundError:
        pass
kernel = 0
for p in os.listdir("/proc"):
    if not p.isdigit(): continue
    try:
        comm = open(f"/proc/{p}/comm").read().strip()
        if comm.startswith(("jbd2", "kworker", "ksoftirqd")):
            kernel += stat(f"/proc/{p}/stat")
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
total = stat(f"/proc/{pid}/stat")
print(json.dumps({"total": total, "threads": threads, "ctx": ctx, "kernel": kernel}))
PY
}

report() {
    python3 - "$1" "$2" "$3" "$4" "$5" <<'PY'
import json, sys
case, before, after, n, oha = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
hz = 100.0
us = lambda ticks: ticks / hz * 1e6 / n
d = json.load(open(oha))
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
tb, ta = before["threads"], after["threads"]
# The runtime's one worker is the busiest tokio thread; the others are the blocking pool.
tokio = [(t - tb.get(tid, [c, 0])[1], tid) for tid, (c, t) in ta.items() if c.startswith("tokio-r")]
worker = max(tokio)[1] if tokio else None
cls = {"worker": 0, "outbox": 0, "blocking": 0, "main": 0}
for tid, (comm, t) in ta.items():
    dt = t - tb.get(tid, [comm, 0])[1]
    if tid == worker: cls["worker"] += dt
    elif comm == "ficus-outbox": cls["outbox"] += dt
    elif comm.startswith("tokio-r"): cls["blocking"] += dt
    else: cls["main"] += dt
total = after["total"] - before["total"]
# Threads that ended during the run (idle blocking threads) count as blocking.
cls["blocking"] += total - sum(cls.values())
ctx = (after["ctx"][0] - before["ctx"][0] + after["ctx"][1] - before["ctx"][1]) / n
kernel = after["kernel"] - before["kernel"]
print(f"{case:<6} {us(total):7.2f} us/req  worker {us(cls['worker']):6.2f}  outbox {us(cls['outbox']):5.2f}  "
      f"blocking {us(cls['blocking']):5.2f}  main {us(cls['main']):4.2f}  kthreads {us(kernel):5.2f}  "
      f"ctxsw/req {ctx:5.2f}  req/s {d['summary']['requestsPerSec']:.0f}  p50 {d['latencyPercentiles']['p50']*1000:.3f} ms  ok {ok}/{n}")
PY
}

for round in $(seq 1 "$ROUNDS"); do
    for case in $CASES; do
        read -r port pid < <(start_ficus "$case-$round" "$case")
        load "$port" "$WARMUP"
        before=$(snapshot "$pid")
        if [[ ${STAT:-0} == 1 ]]; then
            perf stat -x, -o "$OUT_DIR/stat-$case-$round.csv" -e "$STAT_EVENTS" -p "$pid" 2>/dev/null &
            stat_pid=$!
            sleep 0.3
        fi
        if [[ $PERF == 1 ]]; then
            perf record -e cpu-clock -F 2000 ${PERF_CALLGRAPH:-} -p "$pid" -o "$OUT_DIR/perf-$case-$round.data" 2>/dev/null &
            perf_pid=$!
            sleep 0.5
        fi
        load "$port" "$REQUESTS"
        # The sink may lag behind the responses (async): count its work until ficus is idle.
        wait_idle "$pid"
        after=$(snapshot "$pid")
        if [[ $PERF == 1 ]]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
        if [[ ${STAT:-0} == 1 ]]; then
            kill -INT "$stat_pid"; wait "$stat_pid" || true
            awk -F, -v n="$REQUESTS" '$1 ~ /^[0-9]+$/ { printf "    %-40s %8.3f per request\n", $3, $1 / n }' "$OUT_DIR/stat-$case-$round.csv"
        fi
        report "$case" "$before" "$after" "$REQUESTS" "$TMP/oha.json"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    done
done
