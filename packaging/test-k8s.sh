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
GW=packaging/kubernetes-gateway
# kubectl's own kustomize renders both (kubectl 1.27+; an older one, e.g. Debian's
# 1.20, has a kustomize that predates `labels:`: then the files are checked one by one).
KUSTOMIZE=0
if command -v kubectl >/dev/null 2>&1; then
  minor="$(kubectl version --client -o json 2>/dev/null | python3 -c 'import json,sys,re; print(re.sub(r"\D","",json.load(sys.stdin)["clientVersion"]["minor"]) or 0)' || echo 0)"
  ((minor >= 27)) && KUSTOMIZE=1
fi
if ((KUSTOMIZE)); then
  kubectl kustomize "$K8S" >"$WORK/rendered.yaml" || fail "kubectl kustomize failed"
  echo "test-k8s: kustomize rendered $(grep -c '^kind:' "$WORK/rendered.yaml") resources"
  FILES=("$WORK/rendered.yaml")
  kubectl kustomize "$GW" >"$WORK/gateway.yaml" || fail "kubectl kustomize $GW failed"
  echo "test-k8s: the gateway overlay rendered $(grep -c '^kind:' "$WORK/gateway.yaml") resources"
  GW_FILES=("$WORK/gateway.yaml")
else
  echo "test-k8s: no kubectl 1.27+ (kustomize); validating the resource files one by one"
  FILES=()
  for f in "$K8S"/*.yaml; do [[ "$(basename "$f")" == kustomization.yaml ]] || FILES+=("$f"); done
  GW_FILES=()
  for f in "$GW"/*.yaml; do
    case "$(basename "$f")" in kustomization.yaml|deployment-patch.yaml) ;; *) GW_FILES+=("$f") ;; esac
  done
fi
for v in 1.30.0 1.33.0; do
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${FILES[@]}" || fail "schema validation against $v"
done
echo "test-k8s: manifests valid (strict) for Kubernetes 1.30 and 1.33"

# The gateway overlay and its examples: Gateway API objects against the schemas of
# Gateway API v1.5.1 (generated from the gateway-api crate: $GW/schemas), the others
# strictly against Kubernetes' own; the RBAC is exactly the contract's rights.
"$VENV/bin/python" - "$WORK" "$GW/schemas" "${GW_FILES[@]}" "$GW"/examples/*.yaml <<'PY' || fail "gateway overlay"
import json, sys, yaml, jsonschema
work, schemas, files = sys.argv[1], sys.argv[2], sys.argv[3:]
gw = {k: json.load(open(f"{schemas}/{k}.json")) for k in ["GatewayClass", "Gateway", "HTTPRoute", "ReferenceGrant"]}
core, n_gw, rbac = [], 0, {}
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        if not doc:
            continue
        group = doc["apiVersion"].rsplit("/", 1)[0] if "/" in doc["apiVersion"] else ""
        if group == "gateway.networking.k8s.io":
            s = gw[doc["kind"]]
            assert doc["apiVersion"] in (f"{s['group']}/{s['version']}", f"{s['group']}/v1beta1"), doc["apiVersion"]
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
            jsonschema.validate(body, s["schema"])
            n_gw += 1
        else:
            core.append(doc)
        if doc["kind"] in ("ClusterRole", "Role"):
            rbac[doc["kind"]] = {(g, r): sorted(rule["verbs"]) for rule in doc["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
with open(f"{work}/gateway-core.yaml", "w") as out:
    yaml.safe_dump_all(core, out)
read = ["get", "list", "watch"]
write = ["patch", "update"]
want = {("gateway.networking.k8s.io", r): read for r in ["gatewayclasses", "gateways", "httproutes", "referencegrants"]}
want |= {("gateway.networking.k8s.io", f"{r}/status"): write for r in ["gatewayclasses", "gateways", "httproutes"]}
want |= {("networking.k8s.io", r): read for r in ["ingresses", "ingressclasses"]}
want |= {("networking.k8s.io", "ingresses/status"): write}
want |= {("", r): read for r in ["services", "secrets", "namespaces"]}
want |= {("discovery.k8s.io", "endpointslices"): read}
assert rbac.get("ClusterRole") == want, f"ClusterRole: {rbac.get('ClusterRole')} != {want}"
assert rbac.get("Role") == {("coordination.k8s.io", "leases"): ["create", "get", "update"]}, rbac.get("Role")
print(f"test-k8s: {n_gw} Gateway API objects valid against the v1.5.1 schemas; RBAC is the contract's")
PY
for v in 1.30.0 1.33.0; do
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$WORK/gateway-core.yaml" || fail "gateway overlay: schema validation against $v"
done
"$BIN" check -c "$GW/portier.toml" --objects "${GW_FILES[@]}" "$GW/examples" || fail "portier check --objects on the gateway overlay and its examples"

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
