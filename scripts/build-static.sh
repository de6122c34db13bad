#!/usr/bin/env bash
# Builds kiln's shipped binaries as static executables (glibc, crt-static) and prints the
# directory they are in. Everything that ships or benchmarks a binary uses this one recipe.
#   scripts/build-static.sh [PACKAGE...]     (default: kiln-vmm)
# KILN_STATIC_PROFILE picks the Cargo profile: `release` (default: what ships and what the
# benchmarks measure) or `static-test` (no LTO, parallel codegen: what the tests use, several
# times faster to build).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("${@:-kiln-vmm}")
profile=${KILN_STATIC_PROFILE:-release}
args=()
for p in "${packages[@]}"; do args+=(-p "$p"); done
CARGO_TARGET_DIR="$PWD/target/static" \
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --profile "$profile" -q --target x86_64-unknown-linux-gnu "${args[@]}" >&2
echo "$PWD/target/static/x86_64-unknown-linux-gnu/$profile"
