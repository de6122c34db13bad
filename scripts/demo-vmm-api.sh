#!/usr/bin/env bash
# kiln-vmm on its own: boot the default test guest through kiln-vmm's
# Firecracker-compatible API, exactly as a Firecracker client would, with curl.
set -euo pipefail
cd "$(dirname "$0")/.."
vmm=$(scripts/build-static.sh kiln-vmm)/kiln-vmm
cargo build --release -q -p test-guests
guest=$(target/release/test-guest-path hello)
dir=$(mktemp -d)
sock="$dir/api.sock"
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

"$vmm" --api-sock "$sock" --id demo &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.01; done

api() { # METHOD PATH [JSON]
    local out code
    out=$(curl -sS --unix-socket "$sock" -X "$1" "http://localhost$2" \
        ${3:+-H 'Content-Type: application/json' -d "$3"} -w '\n%{http_code}')
    code=${out##*$'\n'}
    echo "  $1 $2 -> $code ${out%$'\n'*}" >&2
    [[ $code == 2* ]]
}
echo "kiln-vmm demo: configuring over the API" >&2
api GET /
api PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 128}'
api PUT /boot-source "{\"kernel_image_path\": \"$guest\", \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off\"}"
echo "kiln-vmm demo: starting the microVM; its serial output follows" >&2
api PUT /actions '{"action_type": "InstanceStart"}' 2>/dev/null
status=0
wait "$pid" || status=$?
pid=
echo "kiln-vmm demo: the guest reset the machine; kiln-vmm exited with status $status" >&2
exit "$status"
