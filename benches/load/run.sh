#!/usr/bin/env bash
# Awk programs are passed in single quotes on purpose.
# shellcheck disable=SC2016
# Side-by-side load benchmark: the bench upstream alone ("direct"), ficus in front of it, and
# nginx in front of it, in interleaved rounds. See benches/README.md.
#
#   benches/load/run.sh                      # defaults: ROUNDS=3 DURATION=8
#   DURATION=10 ROUNDS=5 benches/load/run.sh
#
# The load generator runs on one core (LOADGEN_CPU), the upstream and the proxy under test
# share the other (SERVER_CPU), so the proxy's CPU cost per request decides its throughput.
# Both proxies get one worker: nginx `worker_processes 1`, ficus TOKIO_WORKER_THREADS=1.
#
# Settings (environment):
#   ROUNDS=3          interleaved rounds; the table shows medians over them
#   DURATION=8        seconds of each saturation run (GET and POST)
#   RATE_DURATION=    seconds of each fixed-rate run (default: DURATION)
#   RATE=5000         requests/s of the fixed-rate latency run
#   CONNS=50          connections of the saturation runs
#   RATE_CONNS=50     connections of the fixed-rate run
#   POST_BYTES=300    request body size of the POST run
#   WARMUP=2          seconds of unmeasured load per target before the first round
#   PORT_BASE=18080   upstream; ficus +1, ficus admin +2, nginx +3
#   LOADGEN_CPU=0 SERVER_CPU=1
#   SAT_TOOL=oha      load generator of the saturation runs: oha or wrk (the fixed-rate run
#                     always uses oha: wrk cannot hold a fixed rate)
#   NGINX_FORWARD_HEADERS=1  nginx sets X-Forwarded-For/-Proto/-Host and Via like ficus does
#                     (0: nginx's bare proxy_pass, as most published nginx figures use)
#   SKIP_BUILD=1      use the binaries already in the target dir
#   WAIT_IDLE=0       before each run, wait up to this many seconds for the machine to be idle
#                     (a shared machine: someone else's build on the server core skews results)
#   RETRIES=0         repeat a run up to this many times when other processes used more than
#                     3% of the server core during it
#   KEEP=1            keep the temporary dir (configs, logs, raw results)
#   RESULTS_OUT=FILE  also copy the per-round results (TSV) there
#   CARGO_TARGET_DIR  honoured, as by cargo
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
RATE_DURATION=${RATE_DURATION:-$DURATION}
RATE=${RATE:-5000}
CONNS=${CONNS:-50}
RATE_CONNS=${RATE_CONNS:-50}
POST_BYTES=${POST_BYTES:-300}
WARMUP=${WARMUP:-2}
PORT_BASE=${PORT_BASE:-18080}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
SAT_TOOL=${SAT_TOOL:-oha}
NGINX_FORWARD_HEADERS=${NGINX_FORWARD_HEADERS:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP=${KEEP:-0}
WAIT_IDLE=${WAIT_IDLE:-0}
RETRIES=${RETRIES:-0}

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

int_in() { # NAME VALUE MIN MAX
    [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
    (($2 >= $3 && $2 <= $4)) || die "$1 must be between $3 and $4, got $2"
}
int_in ROUNDS "$ROUNDS" 1 20
int_in DURATION "$DURATION" 1 300
int_in RATE_DURATION "$RATE_DURATION" 1 300
int_in RATE "$RATE" 1 1000000
int_in CONNS "$CONNS" 1 10000
int_in RATE_CONNS "$RATE_CONNS" 1 10000
int_in POST_BYTES "$POST_BYTES" 1 10000000
int_in WARMUP "$WARMUP" 0 60
int_in PORT_BASE "$PORT_BASE" 1024 65000
int_in WAIT_IDLE "$WAIT_IDLE" 0 3600
int_in RETRIES "$RETRIES" 0 5
[[ $SAT_TOOL == oha || $SAT_TOOL == wrk ]] || die "SAT_TOOL must be oha or wrk"

# ---------------------------------------------------------------------------------------------
# Tools

apt_install() { # PACKAGE...
    command -v apt-get >/dev/null || die "missing $*, and no apt-get to install it"
    log "installing $* (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || apt_install nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
command -v jq >/dev/null || apt_install jq
command -v taskset >/dev/null || apt_install util-linux
command -v timeout >/dev/null || apt_install coreutils
command -v curl >/dev/null || apt_install curl
command -v pgrep >/dev/null || apt_install procps
if [[ $SAT_TOOL == wrk ]]; then command -v wrk >/dev/null || apt_install wrk; fi
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
if [[ ! -x $OHA ]]; then
    log "installing oha (cargo install oha --locked; takes a few minutes)"
    cargo install oha --locked >&2
fi
[[ -x $OHA ]] || die "oha not found after install"

NCPU=$(nproc)
if ((NCPU < 2)); then
    log "warning: only $NCPU CPU; load generator and servers share it, figures are not comparable"
    LOADGEN_CPU=0 SERVER_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Build

cd "$ROOT"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
if [[ $SKIP_BUILD != 1 ]]; then
    log "building ficus and the bench upstream (release) into $TARGET_DIR"
    cargo build --release --bin ficus --example bench_upstream >&2
fi
# What was built: the commit, "-dirty" when tracked files differ from it.
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then COMMIT="$COMMIT-dirty"; fi
FICUS_BIN=$TARGET_DIR/release/ficus
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench_upstream
[[ -x $FICUS_BIN && -x $UPSTREAM_BIN ]] || die "binaries missing in $TARGET_DIR/release"

# ---------------------------------------------------------------------------------------------
# Processes, cleanup

TMP=$(mktemp -d /tmp/ficus-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [[ $KEEP == 1 || $rc != 0 ]]; then
        echo "run.sh: temporary files kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # PORT PID NAME

    for _ in $(seq 100); do
        port_open "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited at start; see $TMP/$3.log"
        sleep 0.1
    done
    die "$3 did not listen on 127.0.0.1:$1 within 10 s; see $TMP/$3.log"
}

cpu_ticks() { # PID... : utime+stime summed, in clock ticks
    local total=0 pid stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat") || die "process $pid is gone"
        stat=${stat##*) }
        # shellcheck disable=SC2086
        set -- $stat
        # After the command name: state ppid ... utime is field 12, stime 13.
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

cpu_busy() { # CPU : "busy total" clock ticks of one CPU since boot, from /proc/stat
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}

rss_kib() { # PID... : VmRSS summed
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
        total=$((total + v))
    done
    echo "$total"
}

pss_kib() { # PID... : Pss summed (shared pages split between the processes)
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

UP_PORT=$PORT_BASE
FICUS_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
NGINX_PORT=$((PORT_BASE + 3))
for p in $UP_PORT $FICUS_PORT $ADMIN_PORT $NGINX_PORT; do
    port_open "$p" && die "port $p is already in use (set PORT_BASE)"
done

# Upstream
taskset -c "$SERVER_CPU" "$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_port "$UP_PORT" "$UP_PID" upstream

# ficus
cat >"$TMP/ficus.yaml" <<EOF
listen:
  address: 127.0.0.1:$FICUS_PORT
admin:
  address: 127.0.0.1:$ADMIN_PORT
upstreams:
  monolith:
    url: http://127.0.0.1:$UP_PORT
log:
  format: json
  level: warn
  access: false
EOF
TOKIO_WORKER_THREADS=1 taskset -c "$SERVER_CPU" "$FICUS_BIN" run -c "$TMP/ficus.yaml" \
    >"$TMP/ficus.log" 2>&1 &
FICUS_PID=$!
PIDS+=("$FICUS_PID")
wait_port "$FICUS_PORT" "$FICUS_PID" ficus

# nginx
mkdir -p "$TMP/nginx/logs"
if [[ $NGINX_FORWARD_HEADERS == 1 ]]; then
    NGINX_HEADERS='
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Via "1.1 nginx";
            proxy_set_header Host $host;'
else
    NGINX_HEADERS=''
fi
cat >"$TMP/nginx/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # ficus and hyper keep a connection for any number of requests; so does nginx here
    # (its default closes client and upstream connections every 1000 requests).
    keepalive_requests 1000000;
    upstream monolith {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://monolith;
            proxy_http_version 1.1;
            proxy_set_header Connection "";$NGINX_HEADERS
        }
    }
}
EOF
taskset -c "$SERVER_CPU" "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT" "$NGINX_PID" nginx
NGINX_WORKERS=""
for _ in $(seq 50); do
    NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ' || true)
    [[ -n $NGINX_WORKERS ]] && break
    sleep 0.1
done
[[ -n $NGINX_WORKERS ]] || die "no nginx worker found under $NGINX_PID"
# shellcheck disable=SC2206
NGINX_ALL=($NGINX_PID $NGINX_WORKERS)

sleep 0.5
FICUS_RSS_IDLE=$(rss_kib "$FICUS_PID")
NGINX_RSS_IDLE=$(rss_kib "${NGINX_ALL[@]}")
NGINX_PSS_IDLE=$(pss_kib "${NGINX_ALL[@]}")
UP_RSS_IDLE=$(rss_kib "$UP_PID")

url_of() {
    case $1 in
    direct) echo "http://127.0.0.1:$UP_PORT/" ;;
    ficus) echo "http://127.0.0.1:$FICUS_PORT/" ;;
    nginx) echo "http://127.0.0.1:$NGINX_PORT/" ;;
    esac
}
proxy_pids() {
    case $1 in
    direct) echo "" ;;
    ficus) echo "$FICUS_PID" ;;
    nginx) echo "${NGINX_ALL[*]}" ;;
    esac
}

# Smoke: every target answers both requests with 200 and the expected body.
POST_PREFIX='{"order":{"customer":"c-1042","items":[{"sku":"SKU-001000","qty":2}]},"note":"'
POST_PAD=$((POST_BYTES - ${#POST_PREFIX} - 2))
if ((POST_PAD < 0)); then POST_PREFIX='"'; POST_PAD=$((POST_BYTES - 2)); fi
{
    printf '%s' "$POST_PREFIX"
    head -c "$POST_PAD" /dev/zero | tr '\0' x
    printf '"}'
} >"$TMP/post.body"
[[ $(stat -c %s "$TMP/post.body") == "$POST_BYTES" ]] || die "POST body is not $POST_BYTES bytes"
for t in direct ficus nginx; do
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 5 "$(url_of $t)")
    [[ $got == "200 1024" ]] || die "$t: GET answered '$got', expected '200 1024'"
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'content-type: application/json' \
        --data-binary "@$TMP/post.body" "$(url_of $t)")
    [[ $got == 200 ]] || die "$t: POST answered '$got'"
done

# ---------------------------------------------------------------------------------------------
# Load runs

# One run; prints "requests errors rps p50_ms p99_ms" (p50/p99 empty for wrk).
load() { # KIND(get|post|rate) TARGET SECONDS
    local kind=$1 url
    url=$(url_of "$2")
    local secs=$3 out="$TMP/out.$$"
    local limit=$((secs + 30))
    if [[ $kind != rate && $SAT_TOOL == wrk ]]; then
        local script=""
        if [[ $kind == post ]]; then
            script="$TMP/post.lua"
            {
                echo 'wrk.method = "POST"'
                echo 'wrk.headers["Content-Type"] = "application/json"'
                printf 'wrk.body = [[%s]]\n' "$(cat "$TMP/post.body")"
            } >"$script"
        fi
        timeout "$limit" taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"${secs}s" \
            ${script:+-s "$script"} "$url" >"$out"
        awk '
            / requests in / { n = $1 }
            /Non-2xx or 3xx responses:/ { e += $NF }
            /Socket errors:/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
            /^Requests\/sec:/ { r = $2 }
            END { printf "%d %d %.1f - -\n", n - e, e, r }' "$out"
        return
    fi
    local args=(--no-tui --output-format json --worker-threads 1 -t 10s -z "${secs}s")
    case $kind in
    get) args+=(-c "$CONNS") ;;
    post) args+=(-c "$CONNS" -m POST -T application/json -D "$TMP/post.body") ;;
    rate) args+=(-c "$RATE_CONNS" -q "$RATE" --latency-correction) ;;
    esac
    timeout "$limit" taskset -c "$LOADGEN_CPU" "$OHA" "${args[@]}" "$url" >"$out"
    jq -r '
        def total(f): [.[]? | to_entries[] | select(f) | .value] | add // 0;
        ([.statusCodeDistribution] | total(.key | test("^2"))) as $ok
        | (([.statusCodeDistribution] | total(.key | test("^2") | not))
           + ([.errorDistribution] | total(.key != "aborted due to deadline"))) as $err
        | "\($ok) \($err) \($ok / .summary.total) \(.latencyPercentiles.p50 * 1000) \(.latencyPercentiles.p99 * 1000)"
    ' "$out"
}

RESULTS=$TMP/results.tsv
printf 'round\tkind\ttarget\trequests\terrors\trps\tp50_ms\tp99_ms\tproxy_cpu_s\tupstream_cpu_s\tsrv_busy%%\tgen_busy%%\tforeign_cpu_s\n' >"$RESULTS"
FOREIGN_RUNS=0

measure() { # ROUND KIND TARGET
    local round=$1 kind=$2 target=$3 secs=$DURATION
    [[ $kind == rate ]] && secs=$RATE_DURATION
    local pids p0 p1 u0 u1 res sb0 st0 gb0 gt0 sb1 st1 gb1 gt1
    pids=$(proxy_pids "$target")
    # shellcheck disable=SC2086
    p0=$([[ -n $pids ]] && cpu_ticks $pids || echo 0)
    u0=$(cpu_ticks "$UP_PID")
    read -r sb0 st0 <<<"$(cpu_busy "$SERVER_CPU")"
    read -r gb0 gt0 <<<"$(cpu_busy "$LOADGEN_CPU")"
    res=$(load "$kind" "$target" "$secs")
    read -r sb1 st1 <<<"$(cpu_busy "$SERVER_CPU")"
    read -r gb1 gt1 <<<"$(cpu_busy "$LOADGEN_CPU")"
    # shellcheck disable=SC2086
    p1=$([[ -n $pids ]] && cpu_ticks $pids || echo 0)
    u1=$(cpu_ticks "$UP_PID")
    read -r n err rps p50 p99 <<<"$res"
    p50=$(awk -v x="$p50" 'BEGIN { if (x == "-") print x; else printf "%.3f", x }')
    p99=$(awk -v x="$p99" 'BEGIN { if (x == "-") print x; else printf "%.3f", x }')
    local pcpu ucpu
    pcpu=$(awk -v a="$p0" -v b="$p1" -v t="$CLK_TCK" -v has="${pids:+1}" \
        'BEGIN { if (has) printf "%.2f", (b - a) / t; else printf "-" }')
    ucpu=$(awk -v a="$u0" -v b="$u1" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
    # Busy share of both cores, and CPU time on the server core used by anything but the
    # upstream and the proxy (another build, say): that would make the run unfair.
    local srv gen foreign
    srv=$(awk -v b="$((sb1 - sb0))" -v t="$((st1 - st0))" 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
    gen=$(awk -v b="$((gb1 - gb0))" -v t="$((gt1 - gt0))" 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
    foreign=$(awk -v b="$((sb1 - sb0))" -v p="$((p1 - p0))" -v u="$((u1 - u0))" -v t="$CLK_TCK" \
        'BEGIN { f = (b - p - u) / t; printf "%.2f", (f > 0 ? f : 0) }')
    ROW=$(printf '%s\t%s\t%s\t%s\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$round" "$kind" "$target" \
        "$n" "$err" "$rps" "$p50" "$p99" "$pcpu" "$ucpu" "$srv" "$gen" "$foreign")
    log "round $round $kind $target: $(printf '%.0f' "$rps") req/s, p50 ${p50} ms, p99 ${p99} ms, proxy CPU ${pcpu} s, upstream CPU ${ucpu} s, CPU$SERVER_CPU ${srv}% CPU$LOADGEN_CPU ${gen}%, errors $err"
    DISTURBED=0
    if awk -v f="$foreign" -v s="$secs" 'BEGIN { exit !(f > 0.03 * s) }'; then
        log "warning: $target $kind: other processes used ${foreign} s of CPU $SERVER_CPU during the run; figures are disturbed"
        DISTURBED=1
    fi
    if ((err * 1000 > n + 1)); then
        log "warning: $target $kind: $err errors or non-2xx answers out of $n"
    fi
    sleep 0.5
}

# Waits (at most WAIT_IDLE seconds) until the machine is under 5% busy: our servers are idle
# between runs, so anything above that is someone else's work.
wait_idle() {
    ((WAIT_IDLE > 0)) || return 0
    local deadline=$((SECONDS + WAIT_IDLE)) b0 t0 b1 t1 busy=0 said=0
    while ((SECONDS < deadline)); do
        read -r b0 t0 <<<"$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)"
        sleep 1
        read -r b1 t1 <<<"$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)"
        busy=$((t1 > t0 ? 100 * (b1 - b0) / (t1 - t0) : 0))
        ((busy < 5)) && return 0
        ((said)) || log "machine ${busy}% busy with other work; waiting up to ${WAIT_IDLE} s"
        said=1
    done
    log "warning: still ${busy}% busy after ${WAIT_IDLE} s; measuring anyway"
}

# One measurement, repeated (up to RETRIES times) when other processes disturbed it.
measure_retry() { # ROUND KIND TARGET
    local attempt
    for attempt in $(seq $((RETRIES + 1))); do
        wait_idle
        measure "$@"
        ((DISTURBED)) || break
        ((attempt <= RETRIES)) && log "repeating $3 $2 (attempt $((attempt + 1)) of $((RETRIES + 1)))"
    done
    ((DISTURBED)) && FOREIGN_RUNS=$((FOREIGN_RUNS + 1))
    echo "$ROW" >>"$RESULTS"
}

log "ficus $FICUS_PID, nginx ${NGINX_ALL[*]}, upstream $UP_PID on CPU $SERVER_CPU; load on CPU $LOADGEN_CPU"
wait_idle
read -r b0 t0 <<<"$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)"
sleep 1
read -r b1 t1 <<<"$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)"
IDLE_BUSY=$(awk -v b="$((b1 - b0))" -v t="$((t1 - t0))" 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
if ((IDLE_BUSY > 10)); then
    log "warning: the machine is ${IDLE_BUSY}% busy before any load; close other work for fair figures"
fi
if ((WARMUP > 0)); then
    for t in direct ficus nginx; do
        load get "$t" "$WARMUP" >/dev/null
        load post "$t" "$WARMUP" >/dev/null
    done
fi
for r in $(seq "$ROUNDS"); do
    for kind in get post rate; do
        for t in direct ficus nginx; do
            measure_retry "$r" "$kind" "$t"
        done
    done
done

FICUS_RSS_LOAD=$(rss_kib "$FICUS_PID")
NGINX_RSS_LOAD=$(rss_kib "${NGINX_ALL[@]}")
NGINX_PSS_LOAD=$(pss_kib "${NGINX_ALL[@]}")
UP_RSS_LOAD=$(rss_kib "$UP_PID")
if [[ -n ${RESULTS_OUT:-} ]]; then cp "$RESULTS" "$RESULTS_OUT"; fi

# ---------------------------------------------------------------------------------------------
# Report: medians over rounds

median() { # values on stdin
    sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
col() { # KIND TARGET EXPR -> median over rounds of an awk expression on the row
    awk -F'\t' -v k="$1" -v t="$2" "NR > 1 && \$2 == k && \$3 == t { print $3 }" "$RESULTS" | median
}
# Per-request CPU in µs of each run, as fields: $4 requests, $9 proxy CPU s, $10 upstream CPU s.
PROXY_US='($9 == "-" ? "nan" : $9 * 1e6 / $4)'
UP_US='$10 * 1e6 / $4'

f0() { awk -v x="$1" 'BEGIN { if (x == "nan") print "-"; else printf "%.0f", x }'; }
f1() { awk -v x="$1" 'BEGIN { if (x == "nan") print "-"; else printf "%.1f", x }'; }
f2() { awk -v x="$1" 'BEGIN { if (x == "nan") print "-"; else printf "%.2f", x }'; }
f3() { awk -v x="$1" 'BEGIN { if (x == "nan") print "-"; else printf "%.3f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
diff3() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)

echo
echo "== ficus load benchmark: $(date -u '+%Y-%m-%d %H:%M UTC') =="
echo "machine: $NCPU CPUs, $CPU_MODEL, kernel $(uname -r)"
echo "ficus $COMMIT; $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); $("$OHA" --version)$([[ $SAT_TOOL == wrk ]] && echo "; $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)")"
echo "load on CPU $LOADGEN_CPU; upstream + proxy on CPU $SERVER_CPU; ficus TOKIO_WORKER_THREADS=1, nginx worker_processes 1"
echo "rounds $ROUNDS; saturation ${DURATION}s x $CONNS connections ($SAT_TOOL); fixed rate $RATE req/s x ${RATE_DURATION}s x $RATE_CONNS connections (oha, latency-corrected)"
echo "nginx forwarding headers: $([[ $NGINX_FORWARD_HEADERS == 1 ]] && echo 'X-Forwarded-For/-Proto/-Host, Via (as ficus)' || echo 'none (bare proxy_pass)')"
echo "medians over rounds"
echo

printf '%-28s %10s %10s %10s %12s %12s\n' "" direct ficus nginx ficus/direct ficus/nginx
for kind in get post; do
    label="GET 1 KiB"
    [[ $kind == post ]] && label="POST ${POST_BYTES} B"
    d=$(col "$kind" direct '$6')
    fi_=$(col "$kind" ficus '$6')
    ng=$(col "$kind" nginx '$6')
    printf '%-28s %10s %10s %10s %12s %12s\n' "$label req/s" "$(f0 "$d")" "$(f0 "$fi_")" "$(f0 "$ng")" \
        "$(ratio "$fi_" "$d")" "$(ratio "$fi_" "$ng")"
    fc=$(col "$kind" ficus "$PROXY_US")
    nc=$(col "$kind" nginx "$PROXY_US")
    printf '%-28s %10s %10s %10s %12s %12s\n' "  proxy CPU us/request" - "$(f2 "$fc")" "$(f2 "$nc")" - \
        "$(ratio "$fc" "$nc")"
    printf '%-28s %10s %10s %10s\n' "  proxy CPU s/100k requests" - \
        "$(f2 "$(awk -v x="$fc" 'BEGIN { print x / 10 }')")" "$(f2 "$(awk -v x="$nc" 'BEGIN { print x / 10 }')")"
    printf '%-28s %10s %10s %10s\n' "  upstream CPU us/request" "$(f2 "$(col "$kind" direct "$UP_US")")" \
        "$(f2 "$(col "$kind" ficus "$UP_US")")" "$(f2 "$(col "$kind" nginx "$UP_US")")"
    printf '%-28s %10s %10s %10s\n' "  busy % load core/server" \
        "$(f0 "$(col "$kind" direct '$12')")/$(f0 "$(col "$kind" direct '$11')")" \
        "$(f0 "$(col "$kind" ficus '$12')")/$(f0 "$(col "$kind" ficus '$11')")" \
        "$(f0 "$(col "$kind" nginx '$12')")/$(f0 "$(col "$kind" nginx '$11')")"
done
echo
d50=$(col rate direct '$7')
f50=$(col rate ficus '$7')
n50=$(col rate nginx '$7')
d99=$(col rate direct '$8')
f99=$(col rate ficus '$8')
n99=$(col rate nginx '$8')
printf '%-28s %10s %10s %10s\n' "GET at $RATE req/s: req/s" "$(f0 "$(col rate direct '$6')")" \
    "$(f0 "$(col rate ficus '$6')")" "$(f0 "$(col rate nginx '$6')")"
printf '%-28s %10s %10s %10s\n' "  p50 ms" "$(f3 "$d50")" "$(f3 "$f50")" "$(f3 "$n50")"
printf '%-28s %10s %10s %10s\n' "  p99 ms" "$(f3 "$d99")" "$(f3 "$f99")" "$(f3 "$n99")"
printf '%-28s %10s %10s %10s\n' "  added p50 ms (vs direct)" - "$(diff3 "$f50" "$d50")" "$(diff3 "$n50" "$d50")"
printf '%-28s %10s %10s %10s\n' "  added p99 ms (vs direct)" - "$(diff3 "$f99" "$d99")" "$(diff3 "$n99" "$d99")"
printf '%-28s %10s %10s %10s\n' "  proxy CPU us/request" - "$(f2 "$(col rate ficus "$PROXY_US")")" \
    "$(f2 "$(col rate nginx "$PROXY_US")")"
echo
printf '%-28s %10s %10s %10s\n' "RSS MiB idle (after start)" "$(mib "$UP_RSS_IDLE")" "$(mib "$FICUS_RSS_IDLE")" "$(mib "$NGINX_RSS_IDLE")"
printf '%-28s %10s %10s %10s\n' "RSS MiB after load" "$(mib "$UP_RSS_LOAD")" "$(mib "$FICUS_RSS_LOAD")" "$(mib "$NGINX_RSS_LOAD")"
printf '%-28s %10s %10s %10s\n' "  nginx PSS MiB idle / load" "" "" "$(mib "$NGINX_PSS_IDLE")/$(mib "$NGINX_PSS_LOAD")"
echo "(direct column: the upstream itself; nginx RSS sums master and worker, PSS splits their shared pages)"
echo "CPU busy before load: ${IDLE_BUSY}%; runs disturbed by other processes on CPU $SERVER_CPU (kept after retries): $FOREIGN_RUNS"
echo
echo "per-round results ($RESULTS):"
column -t -s $'\t' "$RESULTS" 2>/dev/null || cat "$RESULTS"
