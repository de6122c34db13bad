#!/usr/bin/env bash
# Boots Debian's cloud kernel through kiln-vmm and checks it end to end.
#
# On a host without hardware virtualization (vmx/svm not in /proc/cpuinfo, e.g. kvm_pvm), kiln-vmm
# runs inside an OUTER VM: QEMU TCG with -cpu EPYC emulates AMD SVM, and Debian's kvm_amd gives a
# nested /dev/kvm there (see /work/shared/notes/nested-kvm.md). On a host with vmx/svm, kiln-vmm
# runs directly on the host with the same inner kernel, initramfs and disk.
#
# Every step prints a KILN-* marker on the console; the summary at the end checks them and the
# file the guest wrote is read back from the ext4 image with debugfs (no mounts).
#
# Usage: tests/nested/run.sh [options]
#   --kiln-vmm PATH     use this (static) kiln-vmm instead of building one
#   --keep WORKDIR      build everything in WORKDIR and keep it (default: a temp dir, removed)
#   --inner-vmm kiln|qemu
#                       kiln (default): boot the inner guest with kiln-vmm;
#                       qemu: boot the inner guest with host QEMU TCG -M microvm,acpi=on
#                       (validates the inner initramfs + disk independently of kiln-vmm)
#   --outer-check       only boot the outer VM and check that /dev/kvm (nested SVM) appears
#   --kiln-run          instead of the inner busybox guest, test `kiln run --backend vmm`: warm a
#                       KILN_ROOT on the host (`kiln run --backend qemu --rm kiln/default true`),
#                       then in the outer VM (or on a host with vmx/svm, directly) run
#                       `kiln run --backend vmm --rm kiln/default echo hi` (stdout hi, exit 0) and
#                       `... sh -c 'exit 7'` (exit 7) and, with --network bridge, `sh -c 'ip
#                       -4 addr show eth0; ip route; ping -c 1 -W 5 10.88.0.1'` (eth0 10.88.x.y/16,
#                       default via 10.88.0.1, ping answered, no kiln-* tap left) through
#                       tests/nested/kiln-run.sh
#   --kiln PATH         --kiln-run: use this (static) kiln instead of building one
#   --kiln-root DIR     --kiln-run: use (and warm) this KILN_ROOT (default: WORKDIR/kiln-root)
#   --nested | --direct force the outer VM, or running kiln-vmm on the host (default: auto)
#   --outer-disk blockdev|copy
#                       nested mode: give kiln-vmm the outer VM's /dev/vda (default), or a
#                       regular-file copy of it on the outer tmpfs that is copied back afterwards
#   --inner-cmdline STR replace the inner kernel command line (default:
#                       "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noprobe"); e.g. drop
#                       "quiet" and add "loglevel=8" to see the inner kernel's whole boot log
#   --vcpus N           inner guest vCPUs (default 1)
#   --mem-mib N         inner guest memory in MiB (default 256)
#   --timeout SECONDS   wall-clock limit for the VM run (default 240)
#   -h | --help
#
# Environment: KILN_KERNEL (inner+outer bzImage), KILN_MODULES_DIR, KILN_BUSYBOX override the
# auto-detected Debian files.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

KILN_VMM=""
KILN_BIN=""
KILN_RUN=0
KILN_ROOT_DIR=""
KEEP=""
INNER_VMM=kiln
OUTER_CHECK=0
OUTER_DISK=blockdev
MODE=auto
VCPUS=1
MEM_MIB=256
TIMEOUT=240
INNER_ARGS="console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noprobe"
OUTER_ARGS="console=ttyS0 panic=-1 quiet"

die() {
    echo "run.sh: error: $*" >&2
    exit 2
}
log() { echo "run.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --kiln-vmm) KILN_VMM=${2:?--kiln-vmm needs a path}; shift 2 ;;
        --keep) KEEP=${2:?--keep needs a directory}; shift 2 ;;
        --inner-vmm) INNER_VMM=${2:?--inner-vmm needs kiln or qemu}; shift 2 ;;
        --outer-check) OUTER_CHECK=1; shift ;;
        --kiln-run) KILN_RUN=1; shift ;;
        --kiln) KILN_BIN=${2:?--kiln needs a path}; shift 2 ;;
        --kiln-root) KILN_ROOT_DIR=${2:?--kiln-root needs a directory}; shift 2 ;;
        --nested) MODE=nested; shift ;;
        --direct) MODE=direct; shift ;;
        --outer-disk) OUTER_DISK=${2:?--outer-disk needs blockdev or copy}; shift 2 ;;
        --inner-cmdline) INNER_ARGS=${2:?--inner-cmdline needs a string}; shift 2 ;;
        --vcpus) VCPUS=${2:?--vcpus needs a number}; shift 2 ;;
        --mem-mib) MEM_MIB=${2:?--mem-mib needs a number}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $INNER_VMM == kiln || $INNER_VMM == qemu ]] || die "--inner-vmm must be kiln or qemu"
[[ $OUTER_DISK == blockdev || $OUTER_DISK == copy ]] || die "--outer-disk must be blockdev or copy"
[[ $INNER_ARGS != *'"'* && $INNER_ARGS != *'\'* ]] || die "--inner-cmdline must not contain \" or \\"
[[ $VCPUS =~ ^[0-9]+$ && $MEM_MIB =~ ^[0-9]+$ ]] || die "--vcpus and --mem-mib take numbers"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

if [[ $MODE == auto ]]; then
    if grep -q -w -E 'vmx|svm' /proc/cpuinfo; then MODE=direct; else MODE=nested; fi
fi
if [[ $INNER_VMM == qemu ]]; then
    MODE=host-qemu
    [[ $OUTER_CHECK == 0 ]] || die "--outer-check and --inner-vmm qemu exclude each other"
fi
if [[ $OUTER_CHECK == 1 ]]; then
    MODE=outer-check
fi
if [[ $KILN_RUN == 1 ]]; then
    [[ $MODE == nested || $MODE == direct ]] ||
        die "--kiln-run excludes --outer-check and --inner-vmm qemu"
    MODE=kiln-run-$MODE
fi

# ---------------------------------------------------------------- prerequisites
need() { # need COMMAND APT-PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2' (apt-get install $2)"
}
need cpio cpio
need gzip gzip
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need timeout coreutils
need ldd libc-bin
if [[ $MODE != direct && $MODE != kiln-run-direct ]]; then
    need qemu-system-x86_64 qemu-system-x86
fi
# kiln-run: the --network bridge case. Nested: ip and nft (with their libraries) go into the
# outer VM. Direct: it runs on the host (kiln0 bridge, nftables table `ip kiln`) if it can.
KILN_RUN_BRIDGE=1
if [[ $MODE == kiln-run-nested ]]; then
    need ip iproute2
    need nft nftables
elif [[ $MODE == kiln-run-direct ]]; then
    why=""
    [[ $(id -u) == 0 ]] || why="not root"
    command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || why="${why:+$why, }no ip (iproute2)"
    command -v nft >/dev/null 2>&1 || [[ -x /usr/sbin/nft ]] || why="${why:+$why, }no nft (nftables)"
    [[ -c /dev/net/tun ]] || why="${why:+$why, }no /dev/net/tun"
    if [[ -n $why ]]; then
        KILN_RUN_BRIDGE=0
        log "kiln-run-direct: skipping the --network bridge case ($why)"
    fi
fi

BUSYBOX=${KILN_BUSYBOX:-}
if [[ -z $BUSYBOX ]]; then
    for b in /bin/busybox /usr/bin/busybox; do
        [[ -x $b ]] && { BUSYBOX=$b; break; }
    done
fi
[[ -n $BUSYBOX && -x $BUSYBOX ]] || die "busybox not found: install the Debian package 'busybox-static'"
is_static() { # is_static BINARY: static or static-pie
    local out
    out=$(ldd "$1" 2>&1 || true)
    [[ $out == *"statically linked"* || $out == *"not a dynamic executable"* ]]
}
if ! is_static "$BUSYBOX"; then
    die "$BUSYBOX is dynamically linked: install the Debian package 'busybox-static' (not 'busybox')"
fi

KERNEL=${KILN_KERNEL:-}
if [[ -z $KERNEL ]]; then
    KERNEL=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $KERNEL ]] || die "no /boot/vmlinuz-*-cloud-amd64: install the Debian package 'linux-image-cloud-amd64'"
fi
[[ -f $KERNEL ]] || die "kernel $KERNEL does not exist"
[[ -r $KERNEL ]] || die "kernel $KERNEL is not readable by $(id -un) (Debian installs it mode 0600): run 'sudo chmod 0644 $KERNEL' or run as root"
KVER=$(basename "$KERNEL"); KVER=${KVER#vmlinuz-}
MODDIR=${KILN_MODULES_DIR:-/lib/modules/$KVER}
[[ -f $MODDIR/modules.dep ]] || die "$MODDIR/modules.dep missing: install the Debian package 'linux-image-$KVER' (or linux-image-cloud-amd64)"
if [[ $MODE == nested || $MODE == outer-check || $MODE == kiln-run-nested ]]; then
    grep -q '^CONFIG_KVM_AMD=m' "/boot/config-$KVER" 2>/dev/null ||
        log "warning: /boot/config-$KVER does not say CONFIG_KVM_AMD=m; continuing"
fi

# ---------------------------------------------------------------- work dir and cleanup
if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP"
    WORK=$(cd "$KEEP" && pwd)
    rm -rf "$WORK/inner-root" "$WORK/outer-root" "$WORK/disk-root" "$WORK/console.fifo"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-nested.XXXXXX")
fi
RUN_PID=""
STAMP_PID=""
# The tap kiln-vmm attaches the guest's eth0 to: made by the outer init in the outer VM, or on
# the host (and removed again) in direct mode.
TAP=tap0
HOST_TAP=""
cleanup() {
    local rc=$?
    if [[ -n $HOST_TAP ]]; then ip link del "$HOST_TAP" 2>/dev/null || true; fi
    if [[ -n $RUN_PID ]] && kill -0 "$RUN_PID" 2>/dev/null; then
        # timeout(1) leads its own process group: this stops it and the VM it runs.
        kill -TERM -- "-$RUN_PID" 2>/dev/null || kill -TERM "$RUN_PID" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$RUN_PID" 2>/dev/null || true
    fi
    if [[ -f $WORK/qemu.pid ]]; then
        local qp
        qp=$(cat "$WORK/qemu.pid" 2>/dev/null || true)
        [[ -n $qp ]] && kill -KILL "$qp" 2>/dev/null || true
    fi
    if [[ -n $STAMP_PID ]]; then kill "$STAMP_PID" 2>/dev/null || true; fi
    if [[ -z $KEEP ]]; then
        rm -rf "$WORK"
    else
        rm -rf "$WORK/inner-root" "$WORK/outer-root" "$WORK/disk-root" "$WORK/console.fifo"
        log "kept work dir $WORK (console.log, console.ts, stderr.log, images)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "KILN-MODE $MODE"
echo "KILN-KERNEL $KERNEL"
log "work dir: $WORK"

# ---------------------------------------------------------------- kiln-vmm
if [[ $MODE == nested || $MODE == direct ]]; then
    if [[ -z $KILN_VMM ]]; then
        need cargo "cargo (rustup)"
        log "building static kiln-vmm (target/static)"
        dir=$("$REPO/scripts/build-static.sh" kiln-vmm) || die "cargo build of static kiln-vmm failed"
        KILN_VMM=$dir/kiln-vmm
    fi
    [[ -x $KILN_VMM ]] || die "kiln-vmm binary $KILN_VMM missing or not executable"
    if [[ $MODE == nested ]] && ! is_static "$KILN_VMM"; then
        die "$KILN_VMM is dynamically linked; the outer initramfs needs a static one (RUSTFLAGS='-C target-feature=+crt-static')"
    fi
    echo "KILN-VMM-BINARY $KILN_VMM"
fi
if [[ $MODE == kiln-run-* ]]; then
    if [[ -z $KILN_BIN || -z $KILN_VMM ]]; then
        need cargo "cargo (rustup)"
        log "building static kiln and kiln-vmm (target/static)"
        dir=$("$REPO/scripts/build-static.sh" kiln kiln-vmm) || die "cargo build of static kiln/kiln-vmm failed"
        [[ -n $KILN_BIN ]] || KILN_BIN=$dir/kiln
        [[ -n $KILN_VMM ]] || KILN_VMM=$dir/kiln-vmm
    fi
    [[ -x $KILN_BIN ]] || die "kiln binary $KILN_BIN missing or not executable"
    [[ -x $KILN_VMM ]] || die "kiln-vmm binary $KILN_VMM missing or not executable"
    if [[ $MODE == kiln-run-nested ]]; then
        is_static "$KILN_BIN" || die "$KILN_BIN is dynamically linked; the outer initramfs needs a static one (scripts/build-static.sh kiln)"
        is_static "$KILN_VMM" || die "$KILN_VMM is dynamically linked; the outer initramfs needs a static one (scripts/build-static.sh kiln-vmm)"
    fi
    echo "KILN-BINARY $KILN_BIN"
    echo "KILN-VMM-BINARY $KILN_VMM"
fi

# ---------------------------------------------------------------- modules
# resolve_modules NAME... -> relative module paths (as in modules.dep) in load order, deps first.
declare -A MOD_SEEN=()
MOD_ORDER=()
mod_path() {
    local pat=${1//[-_]/[-_]}
    grep -m1 -o -E "^([^:]*/)?${pat}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | sed 's/:$//'
}
mod_add() { # mod_add RELPATH
    local rel=$1 deps d
    [[ -n ${MOD_SEEN[$rel]:-} ]] && return 0
    deps=$(grep -m1 "^$rel:" "$MODDIR/modules.dep" | cut -d: -f2-)
    # modules.dep lists the full dependency closure, users first: load it back to front.
    local -a arr=()
    read -r -a arr <<<"$deps" || true
    local i
    for ((i = ${#arr[@]} - 1; i >= 0; i--)); do
        d=${arr[$i]}
        mod_add "$d"
    done
    MOD_SEEN[$rel]=1
    MOD_ORDER+=("$rel")
}
resolve_modules() {
    MOD_SEEN=()
    MOD_ORDER=()
    local name rel
    for name in "$@"; do
        if grep -q -E "/${name//[-_]/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            continue # built into this kernel
        fi
        rel=$(mod_path "$name") || die "module $name not found in $MODDIR/modules.dep"
        mod_add "$rel"
    done
}
# install_modules ROOT: copies MOD_ORDER into ROOT/lib/modules (decompressed) + ROOT/modules.list
install_modules() {
    local root=$1 rel src base
    mkdir -p "$root/lib/modules"
    : >"$root/modules.list"
    for rel in "${MOD_ORDER[@]}"; do
        src=$MODDIR/$rel
        base=$(basename "$rel"); base=${base%%.ko*}.ko
        case "$rel" in
            *.ko) cp "$src" "$root/lib/modules/$base" ;;
            *.ko.xz) need xz xz-utils; xz -dc "$src" >"$root/lib/modules/$base" ;;
            *.ko.zst) need zstd zstd; zstd -q -dc "$src" >"$root/lib/modules/$base" ;;
            *.ko.gz) gzip -dc "$src" >"$root/lib/modules/$base" ;;
            *) die "unknown module format: $rel" ;;
        esac
        echo "$base" >>"$root/modules.list"
    done
}
copy_with_libs() { # copy_with_libs ROOT BINARY DEST [PACKAGE]: BINARY at ROOT/DEST plus what ldd lists
    local root=$1 bin=$2 dest=$3 package=${4:-e2fsprogs} lib
    [[ -x $bin ]] || die "$bin not found: install the Debian package '$package'"
    mkdir -p "$root/$(dirname "$dest")"
    cp -L "$bin" "$root/$dest"
    for lib in $(ldd "$bin" | grep -o -E '/[^ ]+'); do
        mkdir -p "$root/$(dirname "$lib")"
        cp -L "$lib" "$root/$lib"
    done
}
make_cpio() { # make_cpio ROOT OUT.gz
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$2"
}
busybox_root() { # busybox_root ROOT INIT-SCRIPT
    mkdir -p "$1/bin" "$1/sbin" "$1/dev" "$1/proc" "$1/sys" "$1/mnt" "$1/tmp"
    cp "$BUSYBOX" "$1/bin/busybox"
    ln -s busybox "$1/bin/sh"
    cp "$2" "$1/init"
    chmod 0755 "$1/init"
}

# ---------------------------------------------------------------- kiln-run: warmed KILN_ROOT
if [[ $MODE == kiln-run-* ]]; then
    KILN_ROOT_DIR=${KILN_ROOT_DIR:-$WORK/kiln-root}
    mkdir -p "$KILN_ROOT_DIR"
    KILN_ROOT_DIR=$(cd "$KILN_ROOT_DIR" && pwd)
    echo "KILN-ROOT $KILN_ROOT_DIR"
    # nested: QEMU TCG on the host; direct: the vmm backend itself (no QEMU needed there).
    warm_backend=qemu
    [[ $MODE == kiln-run-direct ]] && warm_backend=vmm
    log "warming $KILN_ROOT_DIR: kiln run --backend $warm_backend --rm kiln/default true"
    t_warm=$EPOCHREALTIME
    KILN_ROOT=$KILN_ROOT_DIR KILN_VMM=$KILN_VMM timeout -k 5 "$TIMEOUT" \
        "$KILN_BIN" run --backend "$warm_backend" --rm kiln/default true </dev/null >&2 ||
        die "warming the KILN_ROOT failed: KILN_ROOT=$KILN_ROOT_DIR $KILN_BIN run --backend $warm_backend --rm kiln/default true"
    echo "KILN-ROOT-WARM ok backend=$warm_backend secs=$(awk -v a="$t_warm" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
fi

# ---------------------------------------------------------------- inner initramfs
if [[ $MODE != kiln-run-* ]]; then
NONCE="kiln-host-$(date +%s)-$$-$RANDOM"
echo "KILN-HOST-NONCE $NONCE"
INNER_ROOT=$WORK/inner-root
rm -rf "$INNER_ROOT"
busybox_root "$INNER_ROOT" "$HERE/inner-init.sh"
resolve_modules virtio_ring virtio virtio_mmio virtio_blk virtio_net
install_modules "$INNER_ROOT"
echo "KILN-INNER-MODULE-ORDER $(tr '\n' ' ' <"$INNER_ROOT/modules.list")"
make_cpio "$INNER_ROOT" "$WORK/inner-initrd.img"

# ---------------------------------------------------------------- ext4 disk (no mounts)
DISK_ROOT=$WORK/disk-root
rm -rf "$DISK_ROOT" "$WORK/disk.ext4"
mkdir -p "$DISK_ROOT"
echo "$NONCE" >"$DISK_ROOT/from-host.txt"
truncate -s 32M "$WORK/disk.ext4"
mkfs.ext4 -q -F -L kiln-disk -d "$DISK_ROOT" "$WORK/disk.ext4" ||
    die "mkfs.ext4 -d failed (needs e2fsprogs >= 1.43)"
fi

# ---------------------------------------------------------------- outer initramfs
if [[ $MODE == nested || $MODE == outer-check || $MODE == kiln-run-nested ]]; then
    OUTER_ROOT=$WORK/outer-root
    rm -rf "$OUTER_ROOT"
    busybox_root "$OUTER_ROOT" "$HERE/outer-init.sh"
    # kiln-run: --network bridge also needs the kiln0 bridge (bridge, with stp and llc) and
    # nftables NAT (nf_tables, nft_chain_nat, nft_masq, with nf_nat and nf_conntrack).
    net_modules=()
    [[ $MODE == kiln-run-nested ]] && net_modules=(bridge nf_tables nft_chain_nat nft_masq)
    resolve_modules irqbypass kvm kvm_amd virtio_ring virtio virtio_pci_legacy_dev \
        virtio_pci_modern_dev virtio_pci virtio_blk tun "${net_modules[@]}"
    install_modules "$OUTER_ROOT"
    if [[ $MODE == outer-check ]]; then
        echo check >"$OUTER_ROOT/mode"
    elif [[ $MODE == kiln-run-nested ]]; then
        echo kiln-run >"$OUTER_ROOT/mode"
        cp "$KILN_BIN" "$OUTER_ROOT/kiln"
        cp "$KILN_VMM" "$OUTER_ROOT/kiln-vmm"
        chmod 0755 "$OUTER_ROOT/kiln" "$OUTER_ROOT/kiln-vmm"
        cp "$HERE/kiln-run.sh" "$OUTER_ROOT/kiln-run.sh"
        # kiln grows each VM's copy of the cached image disk with resize2fs (dynamically
        # linked): copy it with its libraries and loader, at the paths ldd names.
        copy_with_libs "$OUTER_ROOT" "$(command -v resize2fs || echo /usr/sbin/resize2fs)" /usr/sbin/resize2fs
        # --network bridge: kiln runs iproute2's ip and nftables' nft (outer-init.sh puts
        # /usr/sbin before busybox's applets in PATH).
        copy_with_libs "$OUTER_ROOT" "$(command -v ip || echo /usr/sbin/ip)" /usr/sbin/ip iproute2
        copy_with_libs "$OUTER_ROOT" "$(command -v nft || echo /usr/sbin/nft)" /usr/sbin/nft nftables
        # The warmed KILN_ROOT (kernel, initramfs, image, disk cache), without VM directories.
        mkdir -p "$OUTER_ROOT/kiln-root"
        (cd "$KILN_ROOT_DIR" && tar --exclude=./vms -cf - .) | tar -xf - -C "$OUTER_ROOT/kiln-root"
        echo "KILN-ROOT-COPIED $(du -sh --apparent-size "$OUTER_ROOT/kiln-root" | cut -f1) into the outer initramfs"
    else
        echo kiln >"$OUTER_ROOT/mode"
        echo "$OUTER_DISK" >"$OUTER_ROOT/disk-mode"
        mkdir -p "$OUTER_ROOT/inner"
        cp "$KILN_VMM" "$OUTER_ROOT/kiln-vmm"
        chmod 0755 "$OUTER_ROOT/kiln-vmm"
        cp "$KERNEL" "$OUTER_ROOT/inner/vmlinuz"
        cp "$WORK/inner-initrd.img" "$OUTER_ROOT/inner/initrd.img"
        cat >"$OUTER_ROOT/vm.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "/inner/vmlinuz",
    "initrd_path": "/inner/initrd.img",
    "boot_args": "$INNER_ARGS"
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "path_on_host": "/dev/vda",
      "is_root_device": false,
      "is_read_only": false
    }
  ],
  "network-interfaces": [
    { "iface_id": "eth0", "host_dev_name": "$TAP", "guest_mac": "06:00:AC:10:00:02" }
  ],
  "mmds-config": { "version": "V2", "network_interfaces": ["eth0"] },
  "machine-config": { "vcpu_count": $VCPUS, "mem_size_mib": $MEM_MIB }
}
EOF
        echo "{\"kiln\": {\"nonce\": \"$NONCE\"}}" >"$OUTER_ROOT/metadata.json"
    fi
    make_cpio "$OUTER_ROOT" "$WORK/outer-initrd.img"
fi

if [[ $MODE == direct ]]; then
    need ip iproute2
    TAP="kiln$$"
    ip tuntap add dev "$TAP" mode tap || die "cannot create tap $TAP (root and /dev/net/tun needed)"
    HOST_TAP=$TAP
    ip addr add 172.16.0.1/24 dev "$TAP"
    ip link set "$TAP" up
    cat >"$WORK/vm.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "$KERNEL",
    "initrd_path": "$WORK/inner-initrd.img",
    "boot_args": "$INNER_ARGS"
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "path_on_host": "$WORK/disk.ext4",
      "is_root_device": false,
      "is_read_only": false
    }
  ],
  "network-interfaces": [
    { "iface_id": "eth0", "host_dev_name": "$TAP", "guest_mac": "06:00:AC:10:00:02" }
  ],
  "mmds-config": { "version": "V2", "network_interfaces": ["eth0"] },
  "machine-config": { "vcpu_count": $VCPUS, "mem_size_mib": $MEM_MIB }
}
EOF
    echo "{\"kiln\": {\"nonce\": \"$NONCE\"}}" >"$WORK/metadata.json"
fi

# ---------------------------------------------------------------- run
# stamp: console -> stdout, console.log (raw lines) and console.ts ("<epoch seconds> <line>").
stamp() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        while [[ $line == *$'\r' ]]; do line=${line%$'\r'}; done
        printf '%s\n' "$line" >>"$WORK/console.log"
        printf '%s %s\n' "$EPOCHREALTIME" "$line" >>"$WORK/console.ts"
        printf '%s\n' "$line"
    done
}
# run_vm CMD...: runs CMD under timeout with its output stamped; sets VM_RC.
VM_RC=0
run_vm() {
    rm -f "$WORK/console.fifo" "$WORK/qemu.pid"
    mkfifo "$WORK/console.fifo"
    stamp <"$WORK/console.fifo" &
    STAMP_PID=$!
    timeout -k 5 "$TIMEOUT" "$@" </dev/null >"$WORK/console.fifo" 2>"$WORK/stderr.log" &
    RUN_PID=$!
    VM_RC=0
    wait "$RUN_PID" || VM_RC=$?
    RUN_PID=""
    wait "$STAMP_PID" || true
    STAMP_PID=""
}
: >"$WORK/console.log"
: >"$WORK/console.ts"
T_START=$EPOCHREALTIME
printf '%s %s\n' "$T_START" "KILN-HOST-START" >>"$WORK/console.ts"

case $MODE in
    nested | outer-check)
        log "booting the outer VM (QEMU TCG, -cpu EPYC, timeout ${TIMEOUT}s)"
        run_vm qemu-system-x86_64 -accel tcg -cpu EPYC -M pc -m 2048 -smp 1 \
            -nographic -no-reboot -nic none -pidfile "$WORK/qemu.pid" \
            -kernel "$KERNEL" -initrd "$WORK/outer-initrd.img" -append "$OUTER_ARGS" \
            -drive "file=$WORK/disk.ext4,format=raw,if=virtio,cache=writeback"
        ;;
    kiln-run-nested)
        log "booting the outer VM for kiln run --backend vmm (QEMU TCG, -cpu EPYC, timeout ${TIMEOUT}s)"
        run_vm qemu-system-x86_64 -accel tcg -cpu EPYC -M pc -m 3072 -smp 1 \
            -nographic -no-reboot -nic none -pidfile "$WORK/qemu.pid" \
            -kernel "$KERNEL" -initrd "$WORK/outer-initrd.img" -append "$OUTER_ARGS"
        ;;
    kiln-run-direct)
        log "running kiln run --backend vmm on the host (timeout ${TIMEOUT}s)"
        run_vm env KILN="$KILN_BIN" KILN_VMM="$KILN_VMM" KILN_ROOT="$KILN_ROOT_DIR" \
            KILN_RUN_TIMEOUT="$TIMEOUT" KILN_RUN_BRIDGE="$KILN_RUN_BRIDGE" sh "$HERE/kiln-run.sh"
        ;;
    direct)
        log "running kiln-vmm on the host (timeout ${TIMEOUT}s)"
        printf '%s %s\n' "$EPOCHREALTIME" "KILN-VMM-START (host)" >>"$WORK/console.ts"
        echo "KILN-VMM-START (host)" >>"$WORK/console.log"
        run_vm "$KILN_VMM" --no-api --config-file "$WORK/vm.json" --metadata "$WORK/metadata.json"
        echo "KILN-VMM-EXIT $VM_RC (host)"
        printf '%s %s\n' "$EPOCHREALTIME" "KILN-VMM-EXIT $VM_RC (host)" >>"$WORK/console.ts"
        echo "KILN-VMM-EXIT $VM_RC (host)" >>"$WORK/console.log"
        ;;
    host-qemu)
        log "booting the inner guest with host QEMU TCG -M microvm,acpi=on (timeout ${TIMEOUT}s)"
        printf '%s %s\n' "$EPOCHREALTIME" "KILN-VMM-START (qemu microvm)" >>"$WORK/console.ts"
        # microvm has no HPET/PM timer: under TCG the guest's PIT calibration of the TSC often
        # fails and the boot hangs, so give it the TSC frequency (TCG's TSC is the host's).
        # microvm has no i8042 either: add one so reboot=k ends QEMU (-no-reboot).
        mhz=$(awk -F: '/^cpu MHz/ { printf "%d", $2; exit }' /proc/cpuinfo)
        run_vm qemu-system-x86_64 -accel tcg -M microvm,acpi=on,rtc=on -cpu max -m "$MEM_MIB" -smp "$VCPUS" \
            -nographic -no-reboot -nic none -pidfile "$WORK/qemu.pid" \
            -kernel "$KERNEL" -initrd "$WORK/inner-initrd.img" \
            -append "$INNER_ARGS tsc_early_khz=$((${mhz:-2000} * 1000))" \
            -drive "id=disk0,file=$WORK/disk.ext4,format=raw,if=none,cache=writeback" \
            -device virtio-blk-device,drive=disk0 -device i8042
        echo "KILN-VMM-EXIT $VM_RC (qemu microvm)"
        printf '%s %s\n' "$EPOCHREALTIME" "KILN-VMM-EXIT $VM_RC (qemu microvm)" >>"$WORK/console.ts"
        echo "KILN-VMM-EXIT $VM_RC (qemu microvm)" >>"$WORK/console.log"
        ;;
esac
T_END=$EPOCHREALTIME

# ---------------------------------------------------------------- checks and summary
FAILS=0
echo "==================== kiln nested boot summary ($MODE) ===================="
if [[ $VM_RC == 124 || $VM_RC == 137 ]]; then
    echo "KILN-CHECK FAIL timeout: the VM run hit the ${TIMEOUT}s limit"
    FAILS=$((FAILS + 1))
elif [[ $MODE != direct && $MODE != kiln-run-direct && $VM_RC != 0 ]]; then
    echo "KILN-CHECK FAIL qemu exited with status $VM_RC (stderr: $WORK/stderr.log)"
    FAILS=$((FAILS + 1))
fi
check() { # check REGEX DESCRIPTION
    if grep -q -E -- "$1" "$WORK/console.log"; then
        echo "KILN-CHECK ok   $2"
    else
        echo "KILN-CHECK FAIL $2 (no line matching '$1')"
        FAILS=$((FAILS + 1))
    fi
}
# first_ts REGEX -> epoch seconds of the first console line matching
first_ts() { grep -E -m1 -- "^[0-9.]+ .*$1" "$WORK/console.ts" | cut -d' ' -f1 || true; }

if [[ $MODE == nested || $MODE == outer-check || $MODE == kiln-run-nested ]]; then
    check 'KILN-OUTER-INIT' "outer VM reached /init"
    check 'KILN-OUTER-KVM-READY' "outer VM has /dev/kvm (nested SVM via kvm_amd)"
    check 'KILN-OUTER-DMESG.*Nested Virtualization enabled' "kvm_amd says Nested Virtualization enabled"
fi
if [[ $MODE == nested ]]; then
    check 'KILN-OUTER-DISK-READY' "outer VM sees the ext4 disk as /dev/vda"
    check 'KILN-VMM-START' "kiln-vmm started in the outer VM"
fi
if [[ $MODE == kiln-run-* ]]; then
    check '^KILN-RUN-END echo rc=' "kiln run --backend vmm ... echo hi finished"
    check '^KILN-RUN-RC echo 0$' "kiln run --backend vmm --rm kiln/default echo hi exited 0"
    if [[ $(grep '^KILN-RUN-STDOUT echo: ' "$WORK/console.log" | sed 's/^KILN-RUN-STDOUT echo: //') == hi ]]; then
        echo "KILN-CHECK ok   kiln run --backend vmm ... echo hi printed exactly 'hi' on stdout"
    else
        echo "KILN-CHECK FAIL kiln run --backend vmm ... echo hi: stdout is not exactly 'hi' (KILN-RUN-STDOUT echo lines)"
        FAILS=$((FAILS + 1))
    fi
    check '^KILN-RUN-RC exit7 7$' "kiln run --backend vmm --rm kiln/default sh -c 'exit 7' exited 7"
    check '^KILN-RUN-LEFTOVER-VMS \[\]$' "--rm left no VM directory in KILN_ROOT/vms"
    if [[ $KILN_RUN_BRIDGE == 1 ]]; then
        # --network bridge: what the guest printed (ip -4 addr show eth0; ip route; ping).
        bridge_out=$(grep '^KILN-RUN-STDOUT bridge: ' "$WORK/console.log" | sed 's/^KILN-RUN-STDOUT bridge: //' || true)
        # kiln's own message (prerequisites, bridge/tap/nft set-up) if it failed.
        bridge_err=$(grep '^KILN-RUN-STDERR bridge: ' "$WORK/console.log" | sed 's/^KILN-RUN-STDERR bridge: //' |
            head -n 5 | tr '\n' ' ' | sed 's/ *$//' || true)
        bridge_check() { # bridge_check REGEX DESCRIPTION: REGEX in the guest's output
            if grep -q -E -- "$1" <<<"$bridge_out"; then
                echo "KILN-CHECK ok   $2"
            else
                echo "KILN-CHECK FAIL $2 (guest stdout has no line matching '$1'; kiln stderr: ${bridge_err:-none})"
                FAILS=$((FAILS + 1))
            fi
        }
        check '^KILN-RUN-END bridge rc=' "kiln run --backend vmm --network bridge ... finished"
        rc_line=$(grep -m1 '^KILN-RUN-RC bridge ' "$WORK/console.log" || true)
        if [[ $rc_line == "KILN-RUN-RC bridge 0" ]]; then
            echo "KILN-CHECK ok   kiln run --backend vmm --network bridge --rm kiln/default sh -c '...; ping ...' exited 0"
        else
            echo "KILN-CHECK FAIL kiln run --backend vmm --network bridge exited ${rc_line#KILN-RUN-RC bridge } (kiln stderr: ${bridge_err:-none})"
            FAILS=$((FAILS + 1))
        fi
        bridge_check 'inet 10\.88\.[0-9]+\.[0-9]+/16 .*eth0' "guest eth0 (virtio-net) has a 10.88.x.y/16 address"
        bridge_check '^default via 10\.88\.0\.1 dev eth0' "guest default route is via 10.88.0.1 (kiln0)"
        bridge_check ', 0% packet loss' "guest pinged the gateway 10.88.0.1 (the kiln0 bridge in the outer VM)"
        check '^KILN-RUN-TAPS-SEEN \[kiln-[0-9a-z]+\] master=kiln0$' "kiln put the VM's kiln-* tap on the kiln0 bridge while it ran"
        check '^KILN-RUN-TAPS-LEFT \[\]$' "--network bridge --rm left no kiln-* tap (ip -o link)"
        check '^KILN-RUN-LEFTOVER-VMS-BRIDGE \[\]$' "--network bridge --rm left no VM directory in KILN_ROOT/vms"
    else
        echo "KILN-CHECK skip --network bridge case (KILN_RUN_BRIDGE=0: see run.sh's log)"
    fi
    check '^KILN-RUN-DONE' "the kiln run script finished"
fi
if [[ $MODE != outer-check && $MODE != kiln-run-* ]]; then
    check 'KILN-INNER-INIT' "inner kernel reached the initramfs /init"
    check 'KILN-INNER-MODULE-OK virtio_mmio$' "inner guest loaded virtio_mmio"
    check 'KILN-INNER-MODULE-OK virtio_blk$' "inner guest loaded virtio_blk"
    check 'KILN-INNER-ACPI-DEV LNRO0005:[0-9a-fA-F]+ driver=virtio-mmio' "virtio-mmio device found through ACPI (LNRO0005) and bound"
    check 'KILN-INNER-VIRTIO-DEV virtio[0-9]+ device=0x0002 driver=virtio_blk' "virtio-blk device bound to virtio_blk"
    check 'KILN-INNER-DISK-FOUND /dev/vda' "inner guest has /dev/vda"
    check "KILN-INNER-FROM-HOST: $NONCE" "inner guest read /from-host.txt ($NONCE)"
    check 'KILN-INNER-DONE' "inner guest wrote /from-guest.txt and unmounted"
    if [[ $MODE != host-qemu ]]; then
        check 'KILN-INNER-NET-UP mac=06:00:ac:10:00:02' "inner guest has eth0 (virtio-net) with the configured MAC"
        check 'KILN-INNER-PING-OK' "inner guest pinged the host side of the tap over virtio-net"
        check "KILN-INNER-MMDS-NONCE: $NONCE" "inner guest read the metadata service with a V2 session token"
        check 'KILN-INNER-MMDS-NO-TOKEN: HTTP/1.1 401' "metadata service refused a V1-style request (no token) under V2"
    fi
    if [[ $MODE == host-qemu ]]; then
        check 'KILN-VMM-EXIT 0( |$)' "QEMU exited 0 after the guest reset"
    else
        check 'KILN-VMM-EXIT 0( |$)' "kiln-vmm exited 0 after the guest's i8042 reset"
    fi
    # The file the guest wrote, read straight from the image (no mounts).
    FROM_GUEST=$(debugfs -R 'cat /from-guest.txt' "$WORK/disk.ext4" 2>/dev/null || true)
    if [[ $FROM_GUEST == "kiln-guest-wrote: $NONCE" ]]; then
        echo "KILN-HOST-FROM-GUEST-OK $FROM_GUEST"
        echo "KILN-CHECK ok   host read /from-guest.txt from the image with debugfs"
    else
        echo "KILN-HOST-FROM-GUEST-BAD '${FROM_GUEST}'"
        echo "KILN-CHECK FAIL host read /from-guest.txt with debugfs: expected 'kiln-guest-wrote: $NONCE'"
        FAILS=$((FAILS + 1))
    fi
    if grep -q 'KILN-INNER-FAIL' "$WORK/console.log"; then
        echo "KILN-CHECK FAIL inner init reported: $(grep -m1 'KILN-INNER-FAIL' "$WORK/console.log")"
        FAILS=$((FAILS + 1))
    fi
fi

# Timings (information only).
secs() { # secs FROM TO
    [[ -n $1 && -n $2 ]] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }' || echo "n/a"
}
t_outer=$(first_ts 'KILN-OUTER-INIT')
t_kvm=$(first_ts 'KILN-OUTER-KVM-READY')
t_vmm=$(first_ts 'KILN-VMM-START')
t_inner=$(first_ts 'KILN-INNER-INIT')
t_done=$(first_ts 'KILN-INNER-DONE')
t_exit=$(first_ts 'KILN-VMM-EXIT')
# The inner kernel's own uptime at /init: inner_boot_s minus this is VMM set-up + decompression.
inner_up=$(grep -m1 -o -E 'KILN-INNER-INIT uptime=[0-9.]+' "$WORK/console.log" | cut -d= -f2 || true)
if [[ $MODE == kiln-run-* ]]; then
    # kiln run durations, from the /proc/uptime stamps of the KILN-RUN-START/END lines.
    run_secs() { # run_secs CASE
        local a b
        a=$(grep -m1 -o -E "^KILN-RUN-START $1 uptime=[0-9.]+" "$WORK/console.log" | cut -d= -f2 || true)
        b=$(grep -m1 -o -E "^KILN-RUN-END $1 rc=[0-9]+ uptime=[0-9.]+" "$WORK/console.log" | sed 's/.*uptime=//' || true)
        secs "$a" "$b"
    }
    echo "KILN-RUN-TIMING total_s=$(secs "$T_START" "$T_END") outer_boot_s=$(secs "$T_START" "$t_outer")" \
        "kvm_ready_s=$(secs "$T_START" "$t_kvm") run_echo_s=$(run_secs echo) run_exit7_s=$(run_secs exit7)" \
        "run_bridge_s=$(run_secs bridge)"
else
    echo "KILN-TIMING total_s=$(secs "$T_START" "$T_END") outer_boot_s=$(secs "$T_START" "$t_outer")" \
        "kvm_ready_s=$(secs "$T_START" "$t_kvm") inner_boot_s=$(secs "$t_vmm" "$t_inner")" \
        "inner_kernel_uptime_at_init_s=${inner_up:-n/a}" \
        "inner_init_to_done_s=$(secs "$t_inner" "$t_done") vmm_total_s=$(secs "$t_vmm" "$t_exit")"
fi
if [[ -s $WORK/stderr.log ]]; then
    echo "--- stderr of the VM process (filtered) ---"
    grep -v "TCG doesn't support requested feature" "$WORK/stderr.log" | tail -n 30 || true
fi
if [[ $FAILS -gt 0 ]]; then
    if [[ -n $KEEP ]]; then
        echo "KILN-NESTED-RESULT FAIL ($FAILS check(s) failed; console log: $WORK/console.log)"
    else
        echo "KILN-NESTED-RESULT FAIL ($FAILS check(s) failed; console above; rerun with --keep DIR to keep the logs and images)"
    fi
    exit 1
fi
echo "KILN-NESTED-RESULT PASS"
