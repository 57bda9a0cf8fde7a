#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable where requests/s
# on this VM drift by ±10 % between runs, so small gains (one pingora patch) can be
# measured. Each MODE runs one proxy under callgrind in front of an nginx upstream
# answering 1 KiB: HTTP/1.1 keep-alive GETs from 8 connections, counters zeroed after a
# 3 s warm-up and dumped after the measured load (start-up and shutdown not counted).
#   portier      portier, one tenant, access log off
#   bare         proxy/examples/bare_pingora (pingora alone, portier's settings)
#   cluster-off  portier, a tenant with an interactive limit far above the load
#   cluster-on   the same with [cluster] on a local Redis (every request takes the limiter)
#   h2           portier, HTTP/2 over TLS (8 connections x 10 streams, a self-signed
#                certificate); the rest as for `portier`
# Usage: benches/callgrind.sh [--seconds N] [--keep DIR] MODE...   (default: portier bare)
# Needs valgrind, nginx (and redis-server for cluster-on); build first:
#   cargo build --release -p portier -p portier-bench --example bare_pingora
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=20; keep=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    *) echo "callgrind: unknown option $1" >&2; exit 2 ;;
  esac
done
modes=("$@"); [[ ${#modes[@]} -gt 0 ]] || modes=(portier bare)
bin=${PORTIER_BIN:-$PWD/target/release/portier}
bare=$PWD/target/release/examples/bare_pingora
bench=$PWD/target/release/portier-bench
for cmd in valgrind callgrind_control nginx; do
  command -v "$cmd" >/dev/null || { echo "callgrind: $cmd is missing (apt-get install valgrind nginx)" >&2; exit 1; }
done
[[ -x $bin && -x $bench ]] || { echo "build first: cargo build --release -p portier -p portier-bench --example bare_pingora" >&2; exit 1; }

dir=$(mktemp -d /tmp/portier-cg.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source benches/lib.sh

up=$(free_port)
mkdir -p "$dir/nginx/logs"
cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; error_log $dir/nginx/error.log; pid $dir/nginx/nginx.pid;
events {}
http { access_log off; server { listen 127.0.0.1:$up; location / { return 200 "$(head -c 1024 /dev/zero | tr '\0' x)"; } } }
EOF
nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" & pids+=($!)
wait_port "$up"
redis_port=""
if printf '%s\n' "${modes[@]}" | grep -qx cluster-on; then
  command -v redis-server >/dev/null || { echo "callgrind: redis-server is missing" >&2; exit 1; }
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null & pids+=($!)
  wait_port "$redis_port"
fi

for mode in "${modes[@]}"; do
  http=$(free_port); admin=$(free_port)
  extra=""; cluster=""
  case $mode in
    portier) ;;
    h2) mkdir -p "$dir/certs"
      openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=acme.test \
        -addext subjectAltName=DNS:acme.test -keyout "$dir/certs/acme.test.key" \
        -out "$dir/certs/acme.test.crt" >/dev/null 2>&1
      tls_port=$(free_port)
      cluster=$'[tls]\ncerts = "'"$dir/certs"$'"\n' ;;
    cluster-off) extra='interactive = { rate = "100000/s", burst = 10000 }' ;;
    cluster-on) extra='interactive = { rate = "100000/s", burst = 10000 }'
      cluster=$'[cluster]\nredis = "redis://127.0.0.1:'"$redis_port"$'/0"\n' ;;
    bare) [[ -x $bare ]] || { echo "callgrind: build the bare_pingora example first" >&2; exit 1; } ;;
    *) echo "callgrind: unknown mode $mode" >&2; exit 2 ;;
  esac
  if [[ $mode == bare ]]; then
    cmd=("$bare" "127.0.0.1:$http" "127.0.0.1:$up")
  else
    cat > "$dir/$mode.toml" <<EOF
[listen]
http = "127.0.0.1:$http"
$([[ $mode == h2 ]] && echo "https = \"127.0.0.1:$tls_port\"")
admin = "127.0.0.1:$admin"
threads = 1
[log]
access = false
$cluster
[pools.odoo]
http = ["127.0.0.1:$up"]
[tenants.acme]
hosts = ["acme.test"]
pool = "odoo"
$extra
EOF
    cmd=("$bin" run -c "$dir/$mode.toml")
  fi
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$mode.%p" "${cmd[@]}" 2>"$dir/$mode.log" &
  vg=$!; pids+=($vg)
  wait_port "$http"
  [[ $mode == h2 ]] && wait_port "$tls_port"
  if [[ $mode == cluster-on ]]; then
    for _ in $(seq 1 100); do curl -s "127.0.0.1:$admin/status" | grep -q '"redis":"up"' && break; sleep 0.2; done
  fi
  load=("$bench" load --addr "127.0.0.1:$http" --host acme.test --path /web/dataset/call_kw/res.partner/read --conns 8)
  [[ $mode == h2 ]] && load=("$bench" load --addr "127.0.0.1:$tls_port" --host acme.test --path /web/dataset/call_kw/res.partner/read --conns 8 --h2 --streams 10)
  "${load[@]}" --seconds 3 >/dev/null 2>&1
  callgrind_control -z "$vg" >/dev/null 2>&1
  "${load[@]}" --seconds "$seconds" --out "$dir/load.$mode.json" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  sleep 1
  kill -KILL "$vg"; wait "$vg" 2>/dev/null || true
  # The dump taken after the load (the one with the highest part number) holds the
  # measured window; its "summary:" line is the instruction count.
  dump=$(ls -1 "$dir"/cg.$mode.*.* 2>/dev/null | sort -t. -k4 -n | tail -1)
  ir=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
  reqs=$(python3 -c "import json; d=json.load(open('$dir/load.$mode.json')); print(d.get('requests') or d['stats']['requests'])")
  [[ -n $keep ]] && { mkdir -p "$keep"; cp "$dump" "$keep/callgrind.$mode.out"; }
  printf '%-12s %14s instructions / %7s requests = %8.0f per request\n' "$mode" "$ir" "$reqs" "$(python3 -c "print($ir/$reqs)")"
done
