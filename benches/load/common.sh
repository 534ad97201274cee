# Shared by events.sh, events_cpu.sh and events_callgrind.sh (sourced, not run): the temporary
# directory and its clean-up, ports, the bench upstream, the request body and the ficus config
# of each case, so that the three measure exactly the same thing.

log() { printf '%s\n' "$*" >&2; }

# Makes $TMP (prefix $1) and removes it, with every process listed in $TMP/pids, on exit.
bench_tmp() {
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    trap bench_cleanup EXIT
}
bench_cleanup() {
    local p
    for p in $(cat "$TMP/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# Waits up to WAIT_PORT_SECONDS (10; ficus under valgrind needs more) for a listener on $1.
wait_port() {
    local tries=$((${WAIT_PORT_SECONDS:-10} * 20))
    for _ in $(seq 1 "$tries"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "port $1 did not open"; exit 1
}

# Starts $UPSTREAM_BIN on a free port, on CPU $1 when given; sets UP_PORT.
start_upstream() {
    UP_PORT=$(free_port)
    if [[ -n ${1:-} ]]; then
        taskset -c "$1" "$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
    else
        "$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
    fi
    echo $! >>"$TMP/pids"
    wait_port "$UP_PORT"
}

# $TMP/body.json: a valid JSON document of exactly 300 bytes (`note` pads it). Before
# 2026-11-27 19:10 the body was cut at 300 bytes, so it did not parse and `{request.body.id}`
# read null.
write_body() {
    python3 -c '
import json
d = {"id": "ord-0001", "customer_id": "c-42", "items": [{"sku": "s-%d" % i, "qty": 1} for i in range(9)], "note": ""}
d["note"] = "x" * (300 - len(json.dumps(d)))
print(json.dumps(d), end="")' >"$TMP/body.json"
}

# The config of one case in directory $1, listening on $2 (admin $3): `none` (no rule),
# `routed` (no rule; 49 routes and a sticky split that matches POST /orders, the last route),
# or `async`/`sync` (one rule on POST /orders with a file sink, that durability).
# The config goes in its own directory, $1/config (see ficus_config), as a ConfigMap is
# mounted: ficus watches the config's directory, and a file sink written beside it would
# wake that watch on every batch (~450 instructions an event in the watcher's thread, 2026-11-28).
write_ficus_config() {
    local dir=$1 port=$2 admin=$3 case=$4
    mkdir -p "$dir/config"
    {
        printf 'listen: { address: "127.0.0.1:%s" }\nadmin: { address: "127.0.0.1:%s" }\n' "$port" "$admin"
        printf 'upstreams:\n  monolith: { url: "http://127.0.0.1:%s" }\n' "$UP_PORT"
        printf 'log: { format: json, level: warn, access: false }\n'
        case $case in
        none) ;;
        routed)
            printf 'routes:\n'
            for i in $(seq 0 48); do
                printf '  - name: r%s\n    match: { path: "/api/v1/resource%s/{id}" }\n    upstream: monolith\n' "$i" "$i"
            done
            printf '  - name: orders\n    match: { path: "/orders" }\n    split: [{ upstream: monolith, weight: 90 }, { upstream: monolith, weight: 10 }]\n    sticky: { header: x-user-id }\n'
            ;;
        async | sync)
            printf 'events:\n  rules:\n    - name: accepted\n      match: { method: POST, path: "/orders" }\n      type: shop.order.accepted\n      subject: "{request.body.id}"\n'
            printf 'sinks:\n  audit: { type: file, path: "%s/events.jsonl" }\n' "$dir"
            printf 'outbox:\n  dir: "%s/outbox"\n  durability: %s\n  max_bytes: 4GiB\n' "$dir" "$case"
            ;;
        *) log "unknown case $case"; exit 1 ;;
        esac
    } >"$(ficus_config "$dir")"
}

# The config file written by write_ficus_config for directory $1.
ficus_config() {
    printf '%s/config/ficus.yaml' "$1"
}

# Starts ficus for case $2 in $TMP/$1 on CPU $SERVER_CPU; prints "PORT PID".
start_ficus() {
    local name=$1 case=$2 port admin pid
    port=$(free_port); admin=$(free_port)
    write_ficus_config "$TMP/$name" "$port" "$admin" "$case"
    TOKIO_WORKER_THREADS=1 taskset -c "$SERVER_CPU" "$FICUS_BIN" run -c "$(ficus_config "$TMP/$name")" >"$TMP/$name/log" 2>&1 &
    pid=$!
    echo "$pid" >>"$TMP/pids"
    wait_port "$port"
    echo "$port $pid"
}
