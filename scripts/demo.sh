#!/usr/bin/env bash
# Builds portier and runs its demo: the proxy on 127.0.0.1:8080 in front of two
# simulated Odoo workers, with a self-test and curl lines to try. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p portier
exec target/release/portier demo "$@"
