#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test portier.
# Idempotent: only missing packages are installed. Usage: scripts/setup.sh [--bench]
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd cmake || need+=(cmake)          # pingora-core builds libz-ng with cmake
have_cmd cc || need+=(build-essential)
have_cmd curl || need+=(curl)
have_cmd python3 || need+=(python3)
have_cmd openssl || need+=(openssl)         # test certificates (RSA keys)
have_cmd pgrep || need+=(procps)            # packaging test
have_cmd adduser || need+=(adduser)         # the Debian package's postinst
have_cmd taskset || need+=(util-linux)      # benches pin CPUs
have_cmd redis-server || need+=(redis-server)  # cluster mode's tests start their own Redis
have_cmd pebble || need+=(pebble)              # ACME tests: Let's Encrypt's test server (+ challtestsrv)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)   # kubernetes-validate
have_cmd chromium || need+=(chromium)          # the dashboard's browser test (headless, no download of its own)
have_cmd kubectl || need+=(kubernetes-client)  # kubectl checks the Kubernetes API stand-in (get, watch)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! have_cmd cargo; then
  echo "setup: cargo not found; install a Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi
echo "setup: ok ($(cargo --version), $(cmake --version | head -1))"
