#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, build, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# A clean clone gains nothing from the incremental cache but its disk use (gigabytes).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Say up front how much disk the build has: a full run needs ~3.5 GB under target/.
echo "test: disk free for target/: $(df -h --output=avail . | tail -1 | tr -d ' ')"

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "test: rustfmt is not installed; skipping the format check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets -- -D warnings
else
  echo "test: clippy is not installed; skipping lints" >&2
fi

# The pingora patch series (vendor/PATCHES.md) re-applies onto the pristine crates and
# gives exactly vendor/.
scripts/vendor-patches.sh

# The end-to-end tests run the real binary: build it first.
cargo build -p portier
cargo test --workspace --no-fail-fast

# TLS audit with testssl.sh against a live portier (fails on MEDIUM or worse).
tests/tls-audit.sh target/debug/portier

# Deployment files: Kubernetes manifests (offline schema validation), the cluster
# config, the Grafana dashboard; then the Debian package (build, install, purge).
packaging/test-k8s.sh target/debug/portier
packaging/test-deb.sh
