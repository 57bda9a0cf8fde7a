#!/usr/bin/env bash
# The first TLS handshakes after start-up: for each portier binary given, RUNS times:
# start it with an https listener (a self-signed RSA-2048 certificate), time how long
# until the port accepts, then three handshakes in a row (curl's time_appconnect).
# Prints the medians. A first handshake far slower than the next ones is work done
# lazily on a proxy thread at the first TLS connection (e.g. seeding the random
# generator), which stalls every other connection of that thread.
# Usage: benches/first-handshake.sh [--runs 5] BINARY...
# 127.0.0.1 only; each portier started is ended by its PID.
set -euo pipefail
runs=5
[[ ${1:-} == --runs ]] && { runs=$2; shift 2; }
[[ $# -ge 1 ]] || { echo "usage: benches/first-handshake.sh [--runs N] BINARY..." >&2; exit 2; }
# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
dir=$(mktemp -d /tmp/portier-fh.XXXXXX)
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
mkdir -p "$dir/certs"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=a.test" -addext "subjectAltName=DNS:a.test" \
  -keyout "$dir/certs/a.test.key" -out "$dir/certs/a.test.crt" >/dev/null 2>&1
now() { date +%s.%N; }

for bin in "$@"; do
  : >"$dir/times"
  for _ in $(seq 1 "$runs"); do
    http=$(free_port); https=$(free_port); admin=$(free_port)
    one_tenant_config "$http" "$admin" "$(free_port)" "https = \"127.0.0.1:$https\"" "$dir/certs" a.test >"$dir/p.toml"
    t0=$(now)
    "$bin" run -c "$dir/p.toml" 2>"$dir/log" & pid=$!
    for _ in $(seq 1 1000); do (exec 3<>"/dev/tcp/127.0.0.1/$https") 2>/dev/null && break; sleep 0.005; done
    t1=$(now)
    hs=()
    for _ in 1 2 3; do
      hs+=("$(curl -sk -o /dev/null -w '%{time_appconnect}' --resolve "a.test:$https:127.0.0.1" "https://a.test:$https/")")
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    echo "$(python3 -c "print($t1 - $t0)") ${hs[*]}" >>"$dir/times"
  done
  python3 - "$bin" "$dir/times" <<'PY'
import sys, statistics
rows = [list(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows) * 1000
print("%s: listening after %.0f ms; handshakes 1st %.1f ms, 2nd %.1f ms, 3rd %.1f ms (medians of %d starts)"
      % (sys.argv[1], med(0), med(1), med(2), med(3), len(rows)))
PY
done
