#!/usr/bin/env bash
# portier's patch series on pingora and rustls (vendor/PATCHES.md): re-applies
# vendor/patches/*.patch, in order, onto the pristine crates and compares the result with
# vendor/.
#
#   scripts/vendor-patches.sh            check: the series re-applies cleanly and gives
#                                        exactly vendor/ (CI runs this)
#   scripts/vendor-patches.sh DIR        also leave the pristine crates with the series
#                                        applied in DIR/vendor (to rebase onto a new pingora:
#                                        put the new pristine crates there and apply there)
#
# The pristine crates come from cargo's registry cache (NAME-VERSION.crate, present after
# any `cargo fetch` of that exact version), else from the commit that vendored each crate
# unmodified (listed below and in vendor/PATCHES.md); only when a shallow clone has
# neither does cargo fetch them from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.9.1
# crate -> the commit that copied it into vendor/ unmodified
declare -A PRISTINE=(
  [pingora-core]=57d5bb9059fe0ecc5d0949e256774b012e02afb9
  [pingora-proxy]=f9491a2b4ab66445d120fa9144d016962327b56d
  [pingora-pool]=ffacf2298cd2540d27a2e2b8f401be6c06c8c970
  [pingora-http]=ec5dcdc7fc125a387bdde6a9e3280fed97a3f46f
  [pingora-timeout]=3323748e5fe38d8c8410c55cc5d57f2a455a0254
  [rustls]=8922caca7f23961cb6fa09576576efecae876eca
)
# crate -> its version, where it is not pingora's
declare -A VERSIONS=([rustls]=0.23.46)
version_of() { echo "${VERSIONS[$1]:-$VERSION}"; }

out=${1:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/vendor"

registry_crate() {
  ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$1-$(version_of "$1").crate" 2>/dev/null | head -n 1 || true
}

# A shallow clone on a machine whose cargo cache never held the pristine crates has
# neither source: as a last resort, cargo fetches them into its cache from the registry
# (the only download this script can make, and only then).
missing=()
for crate in "${!PRISTINE[@]}"; do
  if [[ -z "$(registry_crate "$crate")" ]] && ! git cat-file -e "${PRISTINE[$crate]}^{commit}" 2>/dev/null; then
    missing+=("$crate")
  fi
done
if ((${#missing[@]})); then
  echo "vendor-patches: ${missing[*]} (pingora $VERSION, rustls ${VERSIONS[rustls]}) in neither cargo's cache nor this clone's history; fetching them into cargo's cache"
  fetch=$(mktemp -d)
  mkdir -p "$fetch/src" && echo 'fn main() {}' >"$fetch/src/main.rs"
  { printf '[package]\nname = "pristine"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n'
    for crate in "${missing[@]}"; do printf '%s = "=%s"\n' "$crate" "$(version_of "$crate")"; done; } >"$fetch/Cargo.toml"
  (cd "$fetch" && cargo fetch -q) || true
  rm -rf "$fetch"
fi

for crate in "${!PRISTINE[@]}"; do
  cached=$(registry_crate "$crate")
  if [[ -n "$cached" ]]; then
    tar -xzf "$cached" -C "$work/vendor"
    mv "$work/vendor/$crate-$(version_of "$crate")" "$work/vendor/$crate"
    from="registry cache"
  elif git cat-file -e "${PRISTINE[$crate]}^{commit}" 2>/dev/null; then
    git archive "${PRISTINE[$crate]}" "vendor/$crate" | tar -x -C "$work"
    from="commit ${PRISTINE[$crate]:0:10}"
  else
    echo "vendor-patches: no pristine $crate $(version_of "$crate"): neither in cargo's registry cache nor commit ${PRISTINE[$crate]} (a shallow clone?)" >&2
    exit 1
  fi
  echo "vendor-patches: pristine $crate $(version_of "$crate") from $from"
done

n=0
for p in vendor/patches/[0-9][0-9][0-9][0-9]-*.patch; do
  if ! (cd "$work" && git apply --whitespace=nowarn "$OLDPWD/$p"); then
    echo "vendor-patches: $p does not apply onto the pristine crates plus the patches before it" >&2
    exit 1
  fi
  n=$((n + 1))
done

# cargo's extraction marker is not part of a crate
status=0
for crate in "${!PRISTINE[@]}"; do
  if ! diff -r -q -x .cargo-ok "$work/vendor/$crate" "vendor/$crate"; then
    status=1
  fi
done
if ((status)); then
  echo "vendor-patches: vendor/ differs from the pristine crates plus the $n patches (above): a change to vendor/ needs its patch file" >&2
  exit 1
fi
echo "vendor-patches: ok: $n patches re-apply onto pingora $VERSION and rustls ${VERSIONS[rustls]} and give vendor/ exactly"

if [[ -n "$out" ]]; then
  mkdir -p "$out"
  cp -a "$work/vendor" "$out/"
  echo "vendor-patches: the patched crates are in $out/vendor"
fi
