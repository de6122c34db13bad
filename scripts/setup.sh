#!/usr/bin/env bash
# Installs every system package kiln's build, demo and tests need (Debian bookworm, as root).
set -euo pipefail
packages=(
    build-essential       # gcc/ld for the test guests
    curl jq               # the demo drives the API like a Firecracker user would
    qemu-system-x86       # outer VM for the real-Linux test (TCG + nested SVM), bench baseline
    linux-image-cloud-amd64  # the Debian cloud kernel booted through kiln-vmm
    busybox-static cpio   # initramfs for the real-Linux test
    e2fsprogs             # mkfs.ext4 -d and debugfs: disk images without mounting
    socat
    iproute2              # network namespaces and taps for the virtio-net tests
    nftables              # nft: kiln's NAT table for --network bridge
    docker-registry apache2-utils  # a real OCI registry (htpasswd -B for its auth) for kiln-image's tests
    openssl               # keys and signed tokens for the registry's bearer-token auth test
    skopeo umoci          # the baseline of bench/images.py
)
if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (apt-get install)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
