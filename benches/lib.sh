# Shell helpers shared by the bench scripts (sourced; 127.0.0.1 only).

# A TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 60 s for 127.0.0.1:$1 to accept a connection.
wait_port() { for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# one_tenant_config HTTP_PORT ADMIN_PORT UPSTREAM [EXTRA_LISTEN [TLS_CERTS_DIR TLS_DEFAULT]]:
# prints a portier config with one thread, no access log and tenant a.test on pool odoo
# (one HTTP worker at 127.0.0.1:UPSTREAM); EXTRA_LISTEN is added to [listen] (e.g. an
# https line), and with a certificate directory a [tls] section.
one_tenant_config() {
  cat <<EOF
[listen]
http = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
${4:-}
threads = 1
[log]
access = false
$([[ -n ${5:-} ]] && printf '[tls]\ncerts = "%s"\ndefault = "%s"\n' "$5" "$6")
[pools.odoo]
http = ["127.0.0.1:$3"]
[tenants.a]
hosts = ["a.test"]
pool = "odoo"
EOF
}
