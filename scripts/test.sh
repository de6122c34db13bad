#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests
# (test guests under real KVM exits, the API, and Debian's kernel booted through kiln-vmm
# inside a nested-KVM VM).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
if ! cargo test --workspace; then
    echo "test.sh: tests failed" >&2
    exit 1
fi
echo "test.sh: all tests passed"
