#!/usr/bin/env bash
# Builds kiln's shipped binaries as static executables (glibc, crt-static) and prints the
# directory they are in. Everything that ships or benchmarks a binary uses this one recipe.
#   scripts/build-static.sh [PACKAGE...]     (default: kiln-vmm)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("${@:-kiln-vmm}")
args=()
for p in "${packages[@]}"; do args+=(-p "$p"); done
CARGO_TARGET_DIR="$PWD/target/static" \
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --release -q --target x86_64-unknown-linux-gnu "${args[@]}" >&2
echo "$PWD/target/static/x86_64-unknown-linux-gnu/release"
