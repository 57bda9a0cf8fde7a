#!/usr/bin/env bash
# Instructions per request of portier with [cluster] off and on, counted by valgrind's
# callgrind: repeatable where requests/s on this VM drift by ±10 % between runs.
# One portier under callgrind per mode, a tenant with an interactive limit far above
# the load (every request goes through the limiter, none is refused), an nginx
# upstream answering 1 KiB, Redis for "on". Counters are zeroed after a warm-up and
# dumped after the measured load, so start-up and shutdown are not counted.
# Usage: benches/callgrind-cluster.sh [SECONDS]   (needs valgrind, nginx, redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
bin=${PORTIER_BIN:-$PWD/target/release/portier}
bench=$PWD/target/release/portier-bench
for cmd in valgrind callgrind_control nginx redis-server; do
  command -v "$cmd" >/dev/null || { echo "callgrind-cluster: $cmd is missing" >&2; exit 1; }
done
[[ -x $bin && -x $bench ]] || { echo "build first: cargo build --release -p portier -p portier-bench" >&2; exit 1; }

dir=$(mktemp -d /tmp/portier-cg.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

up=$(free_port); redis_port=$(free_port)
mkdir -p "$dir/nginx/logs"
cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; error_log $dir/nginx/error.log; pid $dir/nginx/nginx.pid;
events {}
http { access_log off; server { listen 127.0.0.1:$up; location / { return 200 "$(head -c 1024 /dev/zero | tr '\0' x)"; } } }
EOF
nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" & pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null & pids+=($!)
wait_port "$up"; wait_port "$redis_port"

for mode in off on; do
  http=$(free_port); admin=$(free_port)
  cluster=""
  [[ $mode == on ]] && cluster=$'[cluster]\nredis = "redis://127.0.0.1:'"$redis_port"$'/0"\n'
  cat > "$dir/$mode.toml" <<EOF
[listen]
http = "127.0.0.1:$http"
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
interactive = { rate = "100000/s", burst = 10000 }
EOF
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$mode.%p" "$bin" run -c "$dir/$mode.toml" 2>"$dir/$mode.log" &
  vg=$!; pids+=($vg)
  wait_port "$admin"; wait_port "$http"
  if [[ $mode == on ]]; then
    for _ in $(seq 1 100); do curl -s "127.0.0.1:$admin/status" | grep -q '"redis":"up"' && break; sleep 0.2; done
  fi
  "$bench" load --addr "127.0.0.1:$http" --host acme.test --path /web/dataset/call_kw/res.partner/read --conns 8 --seconds 3 >/dev/null 2>&1
  callgrind_control -z "$vg" >/dev/null 2>&1
  "$bench" load --addr "127.0.0.1:$http" --host acme.test --path /web/dataset/call_kw/res.partner/read --conns 8 --seconds "$seconds" --out "$dir/load.$mode.json" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  sleep 1
  kill -TERM "$vg"; wait "$vg" 2>/dev/null || true
  # The dump taken after the load (the one with the highest part number) holds the
  # measured window; its "summary:" line is the instruction count.
  dump=$(ls -1 "$dir"/cg.$mode.*.* 2>/dev/null | sort -t. -k4 -n | tail -1)
  ir=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
  reqs=$(python3 -c "import json,sys; d=json.load(open('$dir/load.$mode.json')); print(d.get('requests') or d['stats']['requests'])")
  echo "$mode $ir $reqs" >> "$dir/results"
  printf '[cluster] %-3s %14s instructions / %7s requests = %8.0f per request\n' "$mode" "$ir" "$reqs" "$(python3 -c "print($ir/$reqs)")"
done
python3 - "$dir/results" <<'EOF'
import sys
r = {m: int(i) / int(n) for m, i, n in (l.split() for l in open(sys.argv[1]))}
print(f"on / off: {r['on'] / r['off']:.4f}x instructions per request")
EOF
