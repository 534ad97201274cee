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

log() { printf '%s\n' "$*" >&2; }
command -v valgrind >/dev/null || { log "valgrind is needed"; exit 1; }

if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building release"
    cargo build --release --bin ficus --example bench_upstream >&2
fi
FICUS_BIN=${FICUS_BIN:-$TARGET/release/ficus}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/release/examples/bench_upstream}
mkdir -p "$OUT_DIR"

TMP=$(mktemp -d /tmp/ficus-events-cg.XXXXXX)
cleanup() {
    for p in $(cat "$TMP/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() {
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    log "port $1 did not open"; exit 1
}

UP_PORT=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
echo $! >>"$TMP/pids"
wait_port "$UP_PORT"

BODY=$(python3 -c '
import json
d = {"id": "ord-0001", "customer_id": "c-42", "items": [{"sku": "s-%d" % i, "qty": 1} for i in range(9)], "note": ""}
d["note"] = "x" * (300 - len(json.dumps(d)))
print(json.dumps(d))')
printf '%s' "$BODY" >"$TMP/body.json"

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
    mkdir -p "$TMP/$name"
    {
        printf 'listen: { address: "127.0.0.1:%s" }\nadmin: { address: "127.0.0.1:%s" }\n' "$port" "$admin"
        printf 'upstreams:\n  monolith: { url: "http://127.0.0.1:%s" }\n' "$UP_PORT"
        printf 'log: { format: json, level: warn, access: false }\n'
        if [[ $case != none ]]; then
            printf 'events:\n  rules:\n    - name: accepted\n      match: { method: POST, path: "/orders" }\n      type: shop.order.accepted\n      subject: "{request.body.id}"\n'
            printf 'sinks:\n  audit: { type: file, path: "%s/events.jsonl" }\n' "$TMP/$name"
            printf 'outbox:\n  dir: "%s/outbox"\n  durability: %s\n  max_bytes: 4GiB\n' "$TMP/$name" "$case"
        fi
    } >"$TMP/$name/ficus.yaml"
    out="$OUT_DIR/callgrind.out.$case"
    rm -f "$out"*
    TOKIO_WORKER_THREADS=1 taskset -c "${SERVER_CPU:-1}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$FICUS_BIN" run -c "$TMP/$name/ficus.yaml" >"$TMP/$name/log" 2>&1 &
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
