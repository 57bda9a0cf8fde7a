#!/usr/bin/env bash
# Runs the upstream Gateway API conformance suite (kubernetes-sigs/gateway-api,
# conformance/) against a real cluster where portier runs as the controller of the
# GatewayClass `portier` (kubectl apply -k packaging/kubernetes-gateway), for the
# features portier supports.
#
# Needs: kubectl pointing at that cluster (the suite creates namespaces, Gateways,
# HTTPRoutes and echo backends there), Go 1.24+, git and network access to GitHub.
# It cannot run on portier's build machine or in CI (no cluster, no network beyond the
# package registries); run it by hand on a test cluster.
#
# Usage: scripts/gateway-conformance.sh [REPORT.yaml]
#   GATEWAY_API_VERSION (default v1.5.1, the version the manifests are checked against)
set -euo pipefail
VERSION="${GATEWAY_API_VERSION:-v1.5.1}"
REPORT="$(realpath -m "${1:-gateway-conformance-report.yaml}")"
for cmd in kubectl go git; do
  command -v "$cmd" >/dev/null || { echo "gateway-conformance: $cmd is needed" >&2; exit 2; }
done
kubectl get gatewayclass portier >/dev/null || {
  echo "gateway-conformance: no GatewayClass portier in the cluster (kubectl apply -k packaging/kubernetes-gateway)" >&2
  exit 2
}
PORTIER_VERSION="$(git -C "$(dirname "$0")" describe --always 2>/dev/null || echo dev)"
WORK="$(mktemp -d /tmp/gateway-conformance.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
git clone --quiet --depth 1 --branch "$VERSION" https://github.com/kubernetes-sigs/gateway-api "$WORK/gateway-api"
cd "$WORK/gateway-api"

# Tests of what portier refuses by design (README, "In Kubernetes": a route is a
# tenant; header, query and method matches, weights and filters other than the https
# redirect are not accepted; every route needs a rule for `/`). They would fail, so they
# are skipped and named here rather than hidden.
SKIP=(
  HTTPRouteHeaderMatching            # header matches
  HTTPRouteQueryParamMatching        # query parameter matches
  HTTPRouteMethodMatching            # method matches
  HTTPRouteMatching                  # mixes header and path matches in one route
  HTTPRouteMatchingAcrossRoutes      # several routes sharing a host (one host, one tenant)
  HTTPRouteExactPathMatching         # routes without a rule for `/`
  HTTPRouteWeight                    # weights
  HTTPRouteRequestHeaderModifier     # filters
  HTTPRouteResponseHeaderModifier
  HTTPRouteRequestMirror
  HTTPRouteRequestMultipleMirrors
  HTTPRouteRewritePath
  HTTPRouteRewriteHost
  HTTPRouteRedirectHostAndStatus
  HTTPRouteRedirectPath
  HTTPRouteRedirectPort
  HTTPRouteRedirectPortAndScheme
)
skip="$(IFS=,; echo "${SKIP[*]}")"
go test ./conformance -run TestConformance -v -timeout 60m -args \
  --gateway-class=portier \
  --supported-features=Gateway,HTTPRoute,ReferenceGrant \
  --skip-tests="$skip" \
  --cleanup-base-resources=true \
  --report-output="$REPORT" \
  --organization=portier --project=portier --url=https://github.com/portier/portier \
  --version="$PORTIER_VERSION" \
  --contact=maintainers
echo "gateway-conformance: report in $REPORT"
