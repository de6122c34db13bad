#!/bin/busybox sh
# /init of the initramfs kiln generates for a guest kernel (crates/kiln-kernel).
#
# Loads the kernel modules listed in /etc/kiln/modules (dependencies first), waits for the root
# disk, mounts it, moves /dev /proc /sys into it and switch_roots to the image's init. Every
# step prints a "kiln-initramfs:" line on the console. On failure it says why and powers the
# VM off with `reboot -f` (kiln-vmm guests boot with reboot=k: the reset ends the VM).
#
# Kernel command line:
#   root=DEV           root disk (/dev/vda by default; LABEL=... and UUID=... work too)
#   rootfstype=TYPE    its filesystem (ext4 by default)
#   rootflags=OPTS     extra mount options
#   ro | rw            mount read-only or read-write (rw by default)
#   kiln.init=PATH     the program to run as PID 1 in the root filesystem (default /sbin/init,
#                      falling back to /bin/sh); init=PATH is honoured too
#   kiln.rootwait=SECS how long to wait for the root disk (default 30)
#   MODULE.PARAM=VALUE passed to insmod of MODULE, as modprobe would
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /run /tmp /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
set -f

say() { echo "kiln-initramfs: $*"; }
fail() {
    say "FATAL: $*"
    say "powering off"
    sync
    reboot -f
    # reboot -f does not return; if it does, init exiting panics the kernel (panic=N reboots).
    sleep 5
    exit 1
}

grep -q '^proc /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc || fail "cannot mount /proc"
grep -q '^sysfs /sys ' /proc/mounts || mount -t sysfs sysfs /sys || fail "cannot mount /sys"
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

cmdline=$(cat /proc/cmdline)
root=/dev/vda
rootfstype=ext4
rootflags=
mode=rw
init=
rootwait=30
for arg in $cmdline; do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        rootflags=*) rootflags=${arg#rootflags=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        kiln.init=*) init=${arg#kiln.init=} ;;
        init=*) [ -n "$init" ] || init=${arg#init=} ;;
        kiln.rootwait=*) rootwait=${arg#kiln.rootwait=} ;;
    esac
done
case "$rootwait" in '' | *[!0-9]*) rootwait=30 ;; esac

release=$(cat /etc/kiln/release 2>/dev/null)
say "started: kernel $(uname -r), root=$root ($rootfstype, $mode)"

count=0
if [ -s /etc/kiln/modules ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        name=${m##*/}
        name=${name%.ko}
        name=$(echo "$name" | tr - _)
        params=
        for arg in $cmdline; do
            case "$arg" in
                "$name".*=*) params="$params ${arg#"$name".}" ;;
            esac
        done
        # shellcheck disable=SC2086 # params are separate words on purpose
        if out=$(insmod "/lib/modules/$release/$m" $params 2>&1); then
            count=$((count + 1))
        else
            say "WARNING: insmod $name failed: $out"
        fi
    done </etc/kiln/modules
fi
say "loaded $count modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

case "$root" in
    LABEL=* | UUID=* | /dev/*) ;;
    *) fail "unsupported root=$root (use /dev/NAME, LABEL=... or UUID=...)" ;;
esac
ticks=$((rootwait * 10))
i=0
dev=
while :; do
    case "$root" in
        LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    if [ "$i" -ge "$ticks" ]; then
        fail "root disk $root did not appear within ${rootwait}s (block devices: $(ls /sys/class/block | tr '\n' ' '))"
    fi
    usleep 100000
    i=$((i + 1))
done
say "root disk $dev is ready"

opts=$mode
[ -n "$rootflags" ] && opts="$opts,$rootflags"
if ! out=$(mount -t "$rootfstype" -o "$opts" "$dev" /newroot 2>&1); then
    fail "cannot mount $dev ($rootfstype, $opts): $out"
fi
say "mounted $dev on / ($rootfstype, $opts)"

exists() { [ -e "/newroot$1" ] || [ -L "/newroot$1" ]; }
if [ -n "$init" ]; then
    exists "$init" || fail "init $init (kiln.init=) does not exist in the root filesystem"
elif exists /sbin/init; then
    init=/sbin/init
elif exists /bin/sh; then
    say "no /sbin/init in the root filesystem, falling back to /bin/sh"
    init=/bin/sh
else
    fail "the root filesystem has neither /sbin/init nor /bin/sh (set kiln.init=PATH)"
fi

for d in dev proc sys; do
    if [ -d "/newroot/$d" ] || mkdir -p "/newroot/$d" 2>/dev/null; then
        mount --move "/$d" "/newroot/$d" || fail "cannot move /$d into the root filesystem"
    else
        say "WARNING: no /$d in the read-only root filesystem; leaving it unmounted there"
        umount -l "/$d" 2>/dev/null
    fi
done

say "switching to the root filesystem, running $init"
exec switch_root /newroot "$init" "$@"
fail "switch_root failed"
