#!/usr/bin/env bash
# A/B of two portier builds on this noisy VM: both run at once, pinned to the same CPU,
# and get the same HTTP/1.1 keep-alive load (wrk, 64 connections) in turns of a few
# seconds, so that drift of the machine's speed (steal time, neighbours) hits both
# alike. Reports, per build, requests/s and the CPU time it used per request (its
# utime+stime over the turn, from /proc), the median of the turns, and B/A.
# With --h2 the load is HTTP/2 over TLS instead, as the compare's phase: h2load, 64
# connections of 10 streams each, to portier's HTTPS listener (a self-signed a.test).
# Usage: benches/ab.sh [--h2] [--turns 6] [--seconds 5] A_BINARY B_BINARY
# Needs wrk (h2load and openssl with --h2) and nginx (the upstream: 1 KiB answers, as in
# bench.sh). 127.0.0.1 only; every process started here is ended by its PID on exit.
set -euo pipefail
turns=6; seconds=5; h2=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --turns) turns=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --h2) h2=1; shift ;;
    *) echo "ab: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -eq 2 ]] || { echo "usage: benches/ab.sh [--h2] [--turns N] [--seconds S] A_BINARY B_BINARY" >&2; exit 2; }
bins=("$1" "$2")
tools=(wrk nginx taskset)
((h2)) && tools+=(h2load openssl)
for cmd in "${tools[@]}"; do
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
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$up; location / { return 200 "$(head -c 1024 /dev/zero | tr '\0' x)"; } } }
EOF
taskset -c 0 nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" & pids+=($!)
wait_port "$up"

if ((h2)); then
  mkdir -p "$dir/certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=a.test -addext subjectAltName=DNS:a.test \
    -keyout "$dir/certs/a.key" -out "$dir/certs/a.crt" 2>/dev/null
fi
ports=()
for i in 0 1; do
  http=$(free_port); admin=$(free_port)
  if ((h2)); then
    https=$(free_port); ports+=("$https")
    one_tenant_config "$http" "$admin" "$up" "https = \"127.0.0.1:$https\"" "$dir/certs" a > "$dir/p$i.toml"
  else
    ports+=("$http")
    one_tenant_config "$http" "$admin" "$up" > "$dir/p$i.toml"
  fi
  taskset -c 1 "${bins[$i]}" run -c "$dir/p$i.toml" 2>"$dir/p$i.log" & pids+=($!)
  wait_port "${ports[$i]}"
done
ppid=("${pids[1]}" "${pids[2]}")
hz=$(getconf CLK_TCK)

# load PORT SECONDS: one turn of the load; prints "requests/s requests".
load() {
  local out
  if ((h2)); then
    out=$(taskset -c 0 timeout $(($2 + 10)) h2load -t1 -c64 -m10 -D "$2" \
      --connect-to="127.0.0.1:$1" "https://a.test:$1/")
    grep -q ' 0 failed, 0 errored' <<<"$out" && grep -q ' 0 4xx, 0 5xx' <<<"$out" ||
      { echo "ab: h2load saw failures: $(grep -E '^(requests|status codes):' <<<"$out")" >&2; return 1; }
    awk '/^finished in/ {gsub(",", "", $4); rps=$4} /^requests:/ {ok=$8} END {print rps, ok}' <<<"$out"
  else
    out=$(taskset -c 0 timeout $(($2 + 10)) wrk -t1 -c64 -d"$2s" -H 'Host: a.test' "http://127.0.0.1:$1/")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [[ -z $non2xx ]] || { echo "ab: answered $non2xx non-2xx" >&2; return 1; }
    awk '/^Requests\/sec/ {rps=$2} /requests in/ {n=$1} END {print rps, n}' <<<"$out"
  fi
}

# A warm-up turn each, then the measured turns, A and B in turn.
for i in 0 1; do load "${ports[$i]}" 2 >/dev/null; done
for t in $(seq 1 "$turns"); do
  for i in 0 1; do
    c0=$(cpu_ticks "${ppid[$i]}")
    res=$(load "${ports[$i]}" "$seconds") || { echo "ab: the turn of ${bins[$i]} failed" >&2; exit 1; }
    read -r rps reqs <<<"$res"
    c1=$(cpu_ticks "${ppid[$i]}")
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
