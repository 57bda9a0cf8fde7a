#!/usr/bin/env bash
# Bounded fuzzing with the property tests (stable Rust: cargo-fuzz needs nightly):
# the config loader, host index, path normalisation and class rules
# (config/tests/properties.rs), the framing checks and the pieces of the header
# rewrite (proxy/src/forward.rs, `props`), and the seeded request-framing mutations
# against a live portier (tests/tests/framing.rs). Each runs with many more cases than
# in CI, for at most SECONDS (default 300) each. Not part of scripts/test.sh.
#
# A failure prints proptest's minimal failing input; proptest stores its seed under
# the crate's proptest-regressions/ directory, where every later run (CI included)
# replays it first: commit that file with the fix, and the crash is a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-300}
CASES=${PORTIER_FUZZ_CASES:-200000}
export PORTIER_FUZZ_CASES=$CASES
bash scripts/setup.sh >/dev/null
run() {
  echo "fuzz: $* (at most ${SECONDS_EACH}s, $CASES cases per property)"
  if timeout "$SECONDS_EACH" "$@"; then echo "fuzz: ok"; else
    rc=$?
    if [[ $rc -eq 124 ]]; then echo "fuzz: time budget reached without a failure"; else exit $rc; fi
  fi
}
# Debug builds (shared with the test suite); FUZZ_RELEASE=1 for optimised ones.
profile=(); bin=debug
if [[ "${FUZZ_RELEASE:-0}" == 1 ]]; then profile=(--release); bin=release; fi
echo "fuzz: building"
cargo build -q "${profile[@]}" -p portier
cargo test -q "${profile[@]}" --no-run -p portier-config --test properties 2>/dev/null
cargo test -q "${profile[@]}" --no-run -p portier 2>/dev/null
cargo test -q "${profile[@]}" --no-run -p portier-tests --test framing 2>/dev/null
run cargo test -q "${profile[@]}" -p portier-config --test properties
run cargo test -q "${profile[@]}" -p portier props
PORTIER_BIN="$PWD/target/$bin/portier" run cargo test -q "${profile[@]}" -p portier-tests --test framing
