#!/usr/bin/env bash
# Latency side by side at the same offered load. bench.sh's wrk runs are closed loops
# at saturation: each of the 64 connections sends its next request when the last is
# answered, so the mean latency is 64 / throughput (Little's law) and a proxy's p99
# there mostly restates its requests/s. An operator runs a proxy below its capacity;
# this harness asks what latency each proxy adds there: HTTP/1.1 keep-alive, 64
# connections (h2load --h1), every connection sending at a fixed rate whatever the
# answers, at a few total rates below the slowest target's capacity; p50/p90/p99/p99.9
# from h2load's per-request log, and the proxy's CPU share during each step.
# Proxies, upstream and load are started with ../shared/peers' own helpers and target
# scripts (proxy on CPU 1, load and upstream on CPU 0, as in bench.sh).
# Usage: benches/latency.sh [--rates "5120 10240 15360"] [--seconds 10] [--out F.json]
#                           target...          (e.g. nginx haproxy portier)
# Needs the peers installed (shared/peers/install.sh) and h2load; PORTIER_BIN names
# portier's binary. 127.0.0.1 only; every process started is ended by its group.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
peers=${PEERS_DIR_OVERRIDE:-$here/../../shared/peers}
[[ -f $peers/lib/common.sh ]] || { echo "latency: $peers/lib/common.sh not found (shared/ beside the repository)" >&2; exit 1; }
export PORTIER_BIN=${PORTIER_BIN:-$here/../target/release/portier}
rates="5120 10240 15360"; seconds=10; out=""; conns=64
targets=()
while (($#)); do
  case $1 in
    --rates) rates=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --*) echo "latency: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || { sed -n '12,13p' "$0" | sed 's/^# //' >&2; exit 2; }
# shellcheck source=/dev/null
source "$peers/lib/common.sh"
for tool in h2load curl taskset setsid openssl; do
  command -v "$tool" >/dev/null || die "$tool not found: run $peers/install.sh"
done
for r in $rates; do ((r % conns == 0)) || die "rate $r is not a multiple of $conns connections"; done

make_run_dir
trap cleanup EXIT
trap 'exit 130' INT TERM
gen_cert
start_upstream 0
hz=$(getconf CLK_TCK)
rows="$RUN_DIR/rows"; : >"$rows"

for t in "${targets[@]}"; do
  log "== $t"
  start_target "$t" 1 1 || { log "$t did not start; skipped"; stop_group "$TARGET_PID"; continue; }
  pid=$TARGET_PID
  # The host goes in the URL (h2load's -H 'Host: …' hangs at the end of an --h1 run).
  url="http://a.test:$LISTEN_PORT/"; to="--connect-to=127.0.0.1:$LISTEN_PORT"
  # Warm-up (connections, caches), as bench.sh does.
  taskset -c 0 h2load --h1 -c "$conns" -t 1 -D 2 "$to" "$url" >/dev/null 2>&1 || true
  for r in $rates; do
    logf="$RUN_DIR/$t-$r.tsv"
    c0=$(tree_cpu_ticks "$pid"); s0=$EPOCHREALTIME
    taskset -c 0 timeout $((seconds + 30)) h2load --h1 -c "$conns" -t 1 --rps $((r / conns)) \
      -D "$seconds" "$to" --log-file="$logf" "$url" >"$RUN_DIR/$t-$r.txt" 2>&1 || true
    c1=$(tree_cpu_ticks "$pid"); s1=$EPOCHREALTIME
    cpu=$(python3 -c "print(round(100*($c1-$c0)/$hz/($s1-$s0), 1))")
    # h2load's log: start time (µs), status, duration (µs), one request a line.
    python3 - "$logf" "$t" "$r" "$cpu" "$seconds" >>"$rows" <<'EOF'
import sys, json
path, target, rate, cpu, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
d, bad = [], 0
for line in open(path):
    f = line.split()
    if len(f) < 3:
        continue
    if f[1] != "200":
        bad += 1
    d.append(int(f[2]))
d.sort()
q = lambda p: round(d[min(len(d) - 1, int(p * len(d)))] / 1000, 3) if d else None
print(json.dumps({"target": target, "rate": rate, "done_per_s": round(len(d) / secs), "non200": bad,
                  "cpu_pct": cpu, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999)}))
EOF
    log "$t @ $r req/s: $(tail -1 "$rows")"
  done
  stop_group "$pid"
done

python3 - "$rows" "$out" <<'EOF'
import sys, json
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = {r["rate"]: r for r in rows if r["target"] == "nginx"}
print("%-9s %7s %9s %6s %8s %8s %8s %8s %11s" % ("target", "rate", "done/s", "cpu%", "p50 ms", "p90 ms", "p99 ms", "p99.9", "p99/nginx"))
for r in rows:
    n = ref.get(r["rate"])
    ratio = "%.2f" % (r["p99_ms"] / n["p99_ms"]) if n and r["p99_ms"] and n["p99_ms"] else "-"
    print("%-9s %7d %9d %6.1f %8.3f %8.3f %8.3f %8.3f %11s" % (r["target"], r["rate"], r["done_per_s"], r["cpu_pct"],
          r["p50_ms"] or 0, r["p90_ms"] or 0, r["p99_ms"] or 0, r["p999_ms"] or 0, ratio))
if sys.argv[2]:
    json.dump({"rows": rows}, open(sys.argv[2], "w"), indent=1)
EOF
