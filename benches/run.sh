#!/usr/bin/env bash
# Builds portier and the bench harness (release) and runs a scenario, with the load
# generator and simulated workers pinned to CPU 0 and portier to CPU 1 — the same
# split as ../shared/peers. Usage: benches/run.sh SCENARIO [options...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p portier -p portier-bench
export PORTIER_BIN="$PWD/target/release/portier"
if command -v taskset >/dev/null; then
  exec taskset -c 0 target/release/portier-bench "$@"
fi
exec target/release/portier-bench "$@"
