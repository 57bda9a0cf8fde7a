#!/usr/bin/env bash
# TLS audit: runs Debian's testssl.sh against a portier started here on 127.0.0.1
# (https with a certificate from a CA generated for the run, HSTS on) and fails on
# any finding rated MEDIUM or worse. Prints a summary of every finding by severity.
# Usage: tests/tls-audit.sh [path/to/portier]   (default: target/debug/portier)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${PORTIER_BIN:-target/debug/portier}}"
[[ -x "$BIN" ]] || { echo "tls-audit: $BIN not found; build it first" >&2; exit 2; }

if ! command -v testssl >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends testssl.sh bsdextrautils >/dev/null
fi

WORK="$(mktemp -d /tmp/portier-tls-audit.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); HTTPS=$(free_port); ADMIN=$(free_port); UP=$(free_port)

# A CA and a server certificate for portier.test (ECDSA P-256), shaped like one from a
# public CA: 90 days, with CRL and OCSP URIs (testssl does not fetch them here).
mkdir -p "$WORK/certs" "$WORK/www"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=portier audit CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=portier.test" \
  -keyout "$WORK/certs/site.key" -out "$WORK/site.csr" 2>/dev/null
cat >"$WORK/ext.cnf" <<'EXT'
subjectAltName=DNS:portier.test
basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=serverAuth
crlDistributionPoints=URI:http://ca.portier.test/crl.pem
authorityInfoAccess=OCSP;URI:http://ocsp.portier.test/
EXT
openssl x509 -req -in "$WORK/site.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 90 -extfile "$WORK/ext.cnf" -out "$WORK/leaf.pem" 2>/dev/null
cat "$WORK/leaf.pem" "$WORK/ca.pem" >"$WORK/certs/site.crt"

# An upstream answering 200. testssl's "security_headers" check rates the
# application's own response headers (X-Frame-Options, X-Content-Type-Options), which
# portier passes through untouched: this page sends the two an Odoo page sends.
echo "<html><body>ok</body></html>" >"$WORK/www/index.html"
python3 - "$UP" "$WORK/www" >/dev/null 2>&1 <<'PY' &
import functools, http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "SAMEORIGIN")
        super().end_headers()
    def log_message(self, *a):
        pass
handler = functools.partial(H, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
PY
PIDS+=($!)

cat >"$WORK/portier.toml" <<TOML
[listen]
http = "127.0.0.1:$HTTP"
https = "127.0.0.1:$HTTPS"
admin = "127.0.0.1:$ADMIN"
threads = 1
[log]
access = false
[tls]
certs = "$WORK/certs"
default = "site"
redirect_http = true
hsts = "max-age=31536000"
[pools.p]
http = ["127.0.0.1:$UP"]
[tenants.site]
hosts = ["portier.test"]
pool = "p"
TOML
"$BIN" run -c "$WORK/portier.toml" 2>"$WORK/portier.log" &
PIDS+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { cat "$WORK/portier.log"; exit 1; }

echo "tls-audit: testssl against https://portier.test:$HTTPS (127.0.0.1)"
timeout 600 testssl --quiet --color 0 --warnings off --openssl-timeout 5 \
  --ip 127.0.0.1 --add-ca "$WORK/ca.pem" --jsonfile "$WORK/testssl.json" \
  "https://portier.test:$HTTPS/" >"$WORK/testssl.txt" 2>&1 || true
[[ -s "$WORK/testssl.json" ]] || { echo "tls-audit: testssl produced no results"; tail -40 "$WORK/testssl.txt"; exit 1; }

python3 - "$WORK/testssl.json" <<'PY'
import json, sys, collections
findings = json.load(open(sys.argv[1]))
by = collections.Counter(f.get("severity", "?") for f in findings)
print("tls-audit summary:", ", ".join(f"{k} {v}" for k, v in sorted(by.items())))
bad = [f for f in findings if f.get("severity") in ("MEDIUM", "HIGH", "CRITICAL")]
for f in bad:
    print(f"  {f['severity']}: {f['id']}: {f.get('finding')}")
for f in findings:
    if f.get("severity") == "LOW":
        print(f"  (low) {f['id']}: {f.get('finding')}")
if bad:
    print(f"tls-audit: FAILED, {len(bad)} finding(s) rated MEDIUM or worse")
    sys.exit(1)
print("tls-audit: ok, no finding rated MEDIUM or worse")
PY
