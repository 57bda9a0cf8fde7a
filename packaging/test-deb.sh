#!/usr/bin/env bash
# Builds portier's Debian package, installs it on this machine with dpkg -i, checks
# what it installed (binary, unit, conffile, certs directory, system user, that
# `portier check` passes on the shipped config, that no service was started, the
# unit's systemd-analyze verify/security), then purges it. Needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

if dpkg -s portier >/dev/null 2>&1; then
  fail "a portier package is already installed here; not touching it"
fi
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet
cargo build --release -p portier
cargo deb -p portier --no-build --output target/debian/portier.deb >/dev/null
DEB=target/debian/portier.deb
echo "test-deb: built $DEB ($(du -h "$DEB" | cut -f1))"

purge() { $SUDO dpkg --purge portier >/dev/null 2>&1 || true; }
trap purge EXIT
$SUDO dpkg -i "$DEB"

[[ -x /usr/bin/portier ]] || fail "no /usr/bin/portier"
[[ "$(/usr/bin/portier --version)" == "portier 0.1.0" ]] || fail "version: $(/usr/bin/portier --version)"
[[ -f /lib/systemd/system/portier.service ]] || fail "no unit"
[[ -f /lib/systemd/system/portier.socket ]] || fail "no socket unit"
[[ -f /usr/share/doc/portier/configuration.md ]] || fail "no configuration reference in /usr/share/doc/portier"
grep -qx 'ListenStream=0.0.0.0:80' /lib/systemd/system/portier.socket || fail "the socket unit does not listen where the shipped config does"
grep -q '^http *= "0.0.0.0:80"' /etc/portier/portier.toml 2>/dev/null || $SUDO grep -q '^http *= "0.0.0.0:80"' /etc/portier/portier.toml || fail "the shipped config's http listener changed: update portier.socket"
[[ -f /etc/portier/portier.toml ]] || fail "no /etc/portier/portier.toml"
[[ "$(stat -c '%a %U %G' /etc/portier/portier.toml)" == "640 root portier" ]] || fail "config mode/owner: $(stat -c '%a %U %G' /etc/portier/portier.toml)"
[[ "$(stat -c '%a %U %G' /etc/portier/certs)" == "750 root portier" ]] || fail "certs dir: $(stat -c '%a %U %G' /etc/portier/certs)"
dpkg-query --control-show portier conffiles | grep -qx /etc/portier/portier.toml || fail "portier.toml is not a conffile"
getent passwd portier | grep -q ':/usr/sbin/nologin$' || fail "no system user portier with nologin"
/usr/bin/portier check -c /etc/portier/portier.toml || fail "portier check fails on the shipped config"
# The service user can read its configuration.
$SUDO runuser -u portier -- /usr/bin/portier check -c /etc/portier/portier.toml >/dev/null || fail "portier cannot read its config"
# Installing started nothing.
if pgrep -u portier -x portier >/dev/null; then fail "a portier process was started by the install"; fi

if command -v systemd-analyze >/dev/null 2>&1; then
  out=$(systemd-analyze verify /lib/systemd/system/portier.socket /lib/systemd/system/portier.service 2>&1 || true)
  [[ -z "$out" ]] || fail "systemd-analyze verify: $out"
  score=$(systemd-analyze security --offline=yes /lib/systemd/system/portier.service 2>/dev/null | sed -n 's/.*Overall exposure level for portier.service: \([0-9.]*\).*/\1/p')
  echo "test-deb: systemd-analyze security exposure $score"
  python3 -c "import sys; sys.exit(0 if float('$score') < 2.0 else 1)" || fail "exposure $score is not below 2.0"
else
  echo "test-deb: systemd-analyze not available; unit checks skipped"
fi

$SUDO dpkg --purge portier >/dev/null
[[ ! -e /usr/bin/portier ]] || fail "binary left after purge"
[[ ! -e /lib/systemd/system/portier.service ]] || fail "unit left after purge"
[[ ! -e /lib/systemd/system/portier.socket ]] || fail "socket unit left after purge"
[[ ! -e /etc/portier/portier.toml ]] || fail "config left after purge"
echo "test-deb: ok (installed, checked, purged)"
