#!/usr/bin/env bash
# Instructions per request of the event path, counted by callgrind: repeatable on a busy
# machine where CPU time is not (the only noise is how requests and events fall into batches).
# Same requests and config as events_cpu.sh (POST of a 300-byte JSON body, one rule with
# `subject: "{request.body.id}"`, a file sink), ficus under `valgrind --tool=callgrind` with
# collection off during WARMUP requests, then on for REQUESTS requests and until ficus is idle
# (the dispatcher's sends and cursor commit included); instructions of all ficus threads / REQUESTS.
#
#   bash benches/load/events_callgrind.sh                      # CASES="none async sync"
#   FICUS_BIN=/path/to/other/ficus NO_BUILD=1 bash benches/load/events_callgrind.sh
#
# The callgrind.out files stay in OUT_DIR for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/../.."

REQUESTS=${REQUESTS:-4000}
WARMUP=${WARMUP:-1000}
CONNS=${CONNS:-16}
CASES=${CASES:-none async sync}
OUT_DIR=${OUT_DIR:-/tmp/ficus-events-callgrind}
TARGET=${CARGO_TARGET_DIR:-target}

# shellcheck source=benches/load/common.sh
source benches/load/common.sh
command -v valgrind >/dev/null || { log "valgrind is needed"; exit 1; }

if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building release"
    cargo build --release --bin ficus --example bench_upstream >&2
fi
FICUS_BIN=${FICUS_BIN:-$TARGET/release/ficus}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/release/examples/bench_upstream}
mkdir -p "$OUT_DIR"

bench_tmp ficus-events-cg
# ficus starts slowly under valgrind.
WAIT_PORT_SECONDS=60
start_upstream
write_body

# CONNS keep-alive connections sending $2 requests in all. Speed does not matter under
# valgrind (ficus is the bottleneck), so Python's http.client does, and oha is not needed.
load() {
    python3 - "$1" "$2" "$CONNS" "$TMP/body.json" <<'PY'
import http.client, sys, threading
port, n, conns, body = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), open(sys.argv[4], "rb").read()
failed = []
def run(count):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(count):
        c.request("POST", "/orders", body, {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status >= 300:
            failed.append(r.status)
threads = [threading.Thread(target=run, args=(n // conns + (i < n % conns),)) for i in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit(f"{len(failed)} requests failed: {failed[:5]}")
PY
}

# Waits until the process used no CPU for 1 s.
wait_idle() {
    local last now
    last=$(awk '{print $14+$15}' "/proc/$1/stat")
    for _ in $(seq 1 120); do
        sleep 1
        now=$(awk '{print $14+$15}' "/proc/$1/stat")
        [[ $now == "$last" ]] && return 0
        last=$now
    done
}

printf '%-6s %12s %14s\n' case requests "instr/request"
for case in $CASES; do
    name=$case
    port=$(free_port); admin=$(free_port)
    write_ficus_config "$TMP/$name" "$port" "$admin" "$case"
    out="$OUT_DIR/callgrind.out.$case"
    rm -f "$out"*
    TOKIO_WORKER_THREADS=1 taskset -c "${SERVER_CPU:-1}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$FICUS_BIN" run -c "$(ficus_config "$TMP/$name")" >"$TMP/$name/log" 2>&1 &
    pid=$!
    echo "$pid" >>"$TMP/pids"
    wait_port "$port"
    load "$port" "$WARMUP"
    wait_idle "$pid"
    callgrind_control -i on "$pid" >/dev/null
    load "$port" "$REQUESTS"
    wait_idle "$pid"
    callgrind_control -d "$pid" >/dev/null
    callgrind_control -i off "$pid" >/dev/null
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    # The dump made on request; the one at exit holds what ran after it (shutdown).
    dump=$(ls "$out".* 2>/dev/null | head -1)
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    lines=$(wc -l <"$TMP/$name/events.jsonl" 2>/dev/null || echo 0)
    printf '%-6s %12s %14.0f   events in file: %s\n' "$case" "$REQUESTS" "$(echo "$total / $REQUESTS" | bc -l)" "$lines" 
done
