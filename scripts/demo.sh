#!/usr/bin/env bash
# kiln's main job on its embedded default: `kiln run` boots the offline default image (built
# from Debian's busybox-static, no registry needed) as a microVM with Debian's cloud kernel and
# kiln's guest agent, runs a command in it, and gives back its output and exit code.
#
# The backend is picked automatically: kiln-vmm where /dev/kvm has hardware virtualization,
# QEMU with TCG elsewhere (kiln says which and why).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/build-static.sh kiln kiln-vmm)
kiln="$bin/kiln"
echo "kiln demo: kiln run --rm kiln/default ..." >&2
"$kiln" run --rm kiln/default sh -c \
    'echo "hello from $(hostname), a kiln microVM running Linux $(uname -r)"; exit 3' || status=$?
echo "kiln demo: the VM exited with the command's status ${status:-0} and was removed" >&2
echo "kiln demo: kiln ps -a" >&2
"$kiln" ps -a
