#!/usr/bin/env bash
# Offline checks of the deployment files:
# - the kustomize base renders (kubectl kustomize, when kubectl is installed) and every
#   resource validates strictly against the Kubernetes schemas (PyPI kubernetes-validate,
#   schemas bundled: no cluster, no network);
# - the cluster config (packaging/kubernetes/portier.toml) passes `portier check`;
# - the Grafana dashboard queries only metrics the contract names, and covers the
#   panels the packaging issue asks for;
# - the Dockerfile runs `portier run` as a non-root user.
# Usage: packaging/test-k8s.sh [path/to/portier]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${PORTIER_BIN:-target/debug/portier}}"
[[ -x "$BIN" ]] || { echo "test-k8s: $BIN not found; build it first" >&2; exit 2; }
fail() { echo "test-k8s: FAIL: $*" >&2; exit 1; }
WORK="$(mktemp -d /tmp/portier-k8s.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

VENV="${PORTIER_TOOLS:-/tmp/portier-tools}/kv"
if [[ ! -x "$VENV/bin/kubernetes-validate" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet kubernetes-validate==1.37.0
fi

K8S=packaging/kubernetes
if command -v kubectl >/dev/null 2>&1; then
  kubectl kustomize "$K8S" >"$WORK/rendered.yaml" || fail "kubectl kustomize failed"
  echo "test-k8s: kustomize rendered $(grep -c '^kind:' "$WORK/rendered.yaml") resources"
  FILES=("$WORK/rendered.yaml")
else
  echo "test-k8s: kubectl not installed; validating the resource files one by one"
  FILES=()
  for f in "$K8S"/*.yaml; do [[ "$(basename "$f")" == kustomization.yaml ]] || FILES+=("$f"); done
fi
for v in 1.30.0 1.33.0; do
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${FILES[@]}" || fail "schema validation against $v"
done
echo "test-k8s: manifests valid (strict) for Kubernetes 1.30 and 1.33"

# The cluster config with a certificate where the Secret would project it.
mkdir -p "$WORK/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 -subj "/CN=erp.example.com" \
  -addext "subjectAltName=DNS:*.erp.example.com" -keyout "$WORK/certs/default.key" -out "$WORK/certs/default.crt" 2>/dev/null
sed "s#/etc/portier/certs#$WORK/certs#" "$K8S/portier.toml" >"$WORK/portier.toml"
"$BIN" check -c "$WORK/portier.toml" || fail "the cluster config does not pass portier check"

python3 - packaging/grafana/portier.json <<'PY' || fail "dashboard"
import json, re, sys
d = json.load(open(sys.argv[1]))
contract = {"portier_requests_total", "portier_request_duration_seconds", "portier_rate_limited_total",
            "portier_backend_up", "portier_breaker_open", "portier_upstream_inflight",
            "portier_connections_open", "portier_config_reloads_total", "portier_cert_expiry_seconds",
            # revision 2
            "portier_queue_depth", "portier_queue_wait_seconds", "portier_backend_busy",
            "portier_queue_refused_total", "portier_upstream_retries_total", "portier_spooled_bytes_total",
            "portier_cache_requests_total", "portier_login_limited_total", "portier_acme_orders_total",
            "portier_cluster_redis_up", "portier_connections_refused_total"}
exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"portier_[a-z_]+", e)}
unknown = used - contract
assert not unknown, f"unknown metrics {unknown}"
for needed in ["portier_requests_total", "portier_request_duration_seconds", "portier_rate_limited_total",
               "portier_backend_up", "portier_breaker_open", "portier_config_reloads_total"]:
    assert needed in used, f"no panel uses {needed}"
assert any("code=~\"5..\"" in e for e in exprs), "no error-rate panel"
assert any("histogram_quantile(0.99" in e for e in exprs), "no p99 panel"
print(f"test-k8s: dashboard has {len(d['panels'])} panels over {len(used)} contract metrics")
PY

grep -q '^USER 65532' packaging/container/Dockerfile || fail "Dockerfile: not a non-root USER"
grep -q '^ENTRYPOINT \["/usr/local/bin/portier", "run"\]' packaging/container/Dockerfile || fail "Dockerfile: entrypoint"
echo "test-k8s: ok"
