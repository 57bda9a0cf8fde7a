#!/usr/bin/env bash
# A/B of two portier builds on this noisy VM: both run at once, pinned to the same CPU,
# and get the same HTTP/1.1 keep-alive load (wrk, 64 connections) in turns of a few
# seconds, so that drift of the machine's speed (steal time, neighbours) hits both
# alike. Reports, per build, requests/s and the CPU time it used per request (its
# utime+stime over the turn, from /proc), the median of the turns, and B/A.
# Usage: benches/ab.sh [--turns 6] [--seconds 5] A_BINARY B_BINARY
# Needs wrk and nginx (the upstream: 1 KiB answers, as in bench.sh). 127.0.0.1 only;
# every process started here is ended by its PID on exit.
set -euo pipefail
turns=6; seconds=5
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --turns) turns=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "ab: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -eq 2 ]] || { echo "usage: benches/ab.sh [--turns N] [--seconds S] A_BINARY B_BINARY" >&2; exit 2; }
bins=("$1" "$2")
for cmd in wrk nginx taskset; do
  command -v "$cmd" >/dev/null || { echo "ab: $cmd is missing" >&2; exit 1; }
done
dir=$(mktemp -d /tmp/portier-ab.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

up=$(free_port)
mkdir -p "$dir/nginx/logs"
cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; error_log $dir/nginx/error.log; pid $dir/nginx/nginx.pid;
events {}
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$up; location / { return 200 "$(head -c 1024 /dev/zero | tr '\0' x)"; } } }
EOF
taskset -c 0 nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" & pids+=($!)
wait_port "$up"

ports=()
for i in 0 1; do
  http=$(free_port); admin=$(free_port); ports+=("$http")
  one_tenant_config "$http" "$admin" "$up" > "$dir/p$i.toml"
  taskset -c 1 "${bins[$i]}" run -c "$dir/p$i.toml" 2>"$dir/p$i.log" & pids+=($!)
  wait_port "$http"
done
ppid=("${pids[1]}" "${pids[2]}")
hz=$(getconf CLK_TCK)

# A warm-up turn each, then the measured turns, A and B in turn.
for i in 0 1; do taskset -c 0 wrk -t1 -c64 -d2s -H 'Host: a.test' "http://127.0.0.1:${ports[$i]}/" >/dev/null; done
for t in $(seq 1 "$turns"); do
  for i in 0 1; do
    c0=$(cpu_ticks "${ppid[$i]}")
    out=$(taskset -c 0 timeout $((seconds + 10)) wrk -t1 -c64 -d"${seconds}s" -H 'Host: a.test' "http://127.0.0.1:${ports[$i]}/")
    c1=$(cpu_ticks "${ppid[$i]}")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [[ -z $non2xx ]] || { echo "ab: ${bins[$i]} answered $non2xx non-2xx" >&2; exit 1; }
    us=$(python3 -c "print(round(($c1-$c0)/$hz*1e6/$reqs, 2))")
    echo "$t $i $rps $us" >> "$dir/turns"
    printf 'turn %d %s: %9.0f req/s, %6.2f us CPU per request\n' "$t" "$([[ $i == 0 ]] && echo A || echo B)" "$rps" "$us"
  done
done
python3 - "$dir/turns" "${bins[0]}" "${bins[1]}" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for i in ("0", "1"):
    rps = [float(r[2]) for r in rows if r[1] == i]
    us = [float(r[3]) for r in rows if r[1] == i]
    med[i] = (statistics.median(rps), statistics.median(us))
    print(f"{'AB'[int(i)]} {sys.argv[2 + int(i)]}: median {med[i][0]:.0f} req/s, {med[i][1]:.2f} us CPU per request")
print(f"B/A: {med['1'][0] / med['0'][0]:.3f}x requests/s, {med['1'][1] / med['0'][1]:.3f}x CPU per request")
EOF
