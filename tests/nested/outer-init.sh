#!/bin/busybox sh
# /init of the OUTER VM (QEMU TCG, -cpu EPYC): loads kvm_amd for nested SVM, then runs kiln-vmm.
# Prints KILN-OUTER-* / KILN-VMM-* markers on the serial console; tests/nested/run.sh checks them.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

up() { cut -d' ' -f1 /proc/uptime; }
off() {
    sync
    echo "KILN-OUTER-POWEROFF uptime=$(up)"
    poweroff -f
    sleep 5
    exit 1
}

echo "KILN-OUTER-INIT uptime=$(up)"
mode=$(cat /mode)

for m in $(cat /modules.list); do
    name=$(basename "$m" .ko)
    if ! out=$(insmod "/lib/modules/$m" 2>&1); then
        echo "KILN-OUTER-MODULE-FAIL $name: $out"
    fi
done
dmesg | grep -i -E 'nested|svm|kvm:' | sed 's/^/KILN-OUTER-DMESG /'

if [ -c /dev/kvm ]; then
    echo "KILN-OUTER-KVM-READY uptime=$(up)"
else
    echo "KILN-OUTER-KVM-MISSING: /dev/kvm did not appear (is svm in the outer CPU? dmesg above)"
    grep -o -w -E 'svm|vmx' /proc/cpuinfo | head -n1 | sed 's/^/KILN-OUTER-CPUFLAG /'
    off
fi

if [ "$mode" = check ]; then
    echo "KILN-OUTER-CHECK-DONE"
    off
fi

if [ "$mode" = kiln-run ]; then
    # `kiln run --backend vmm` (run.sh --kiln-run): kiln, kiln-vmm, a warmed KILN_ROOT and
    # resize2fs, iproute2's ip and nftables' nft (with their libraries) are in this initramfs;
    # the tun, bridge and nftables modules are loaded above. /usr/sbin first: kiln runs the
    # real ip and nft there, not busybox's ip applet.
    echo "KILN-OUTER-NET tun=$([ -c /dev/net/tun ] && echo yes || echo no)" \
        "modules=$(cut -d' ' -f1 /proc/modules | grep -x -E 'tun|bridge|nf_tables|nft_chain_nat|nft_masq' | sort | tr '\n' ',')"
    ip link set lo up 2>/dev/null
    PATH=/usr/sbin:/usr/bin:/sbin:/bin KILN=/kiln KILN_VMM=/kiln-vmm KILN_ROOT=/kiln-root \
        /bin/sh /kiln-run.sh
    off
fi

i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do
    usleep 100000
    i=$((i + 1))
done
if [ ! -b /dev/vda ]; then
    echo "KILN-OUTER-DISK-MISSING: no /dev/vda in the outer VM"
    off
fi
echo "KILN-OUTER-DISK-READY /dev/vda"

vmjson=/vm.json
if [ "$(cat /disk-mode 2>/dev/null)" = copy ]; then
    # Work-around mode: hand kiln-vmm a regular file (copy of /dev/vda on the outer tmpfs) and
    # copy it back afterwards, for VMMs that cannot use a block device as a backing file.
    dd if=/dev/vda of=/tmp/disk.img bs=1M 2>/dev/null || { echo "KILN-OUTER-FAIL copy of /dev/vda"; off; }
    sed 's#"/dev/vda"#"/tmp/disk.img"#' /vm.json >/tmp/vm.json
    vmjson=/tmp/vm.json
    echo "KILN-OUTER-DISK-MODE copy (/dev/vda -> /tmp/disk.img)"
fi

# The tap behind the inner guest's eth0; the outer side answers its pings.
if tunctl -t tap0 >/dev/null 2>&1 && ip link set tap0 up && ip addr add 172.16.0.1/24 dev tap0; then
    echo "KILN-OUTER-TAP-READY tap0 172.16.0.1/24"
else
    echo "KILN-OUTER-TAP-FAIL (tun module loaded? $(grep -c '^tun ' /proc/modules))"
fi

echo "KILN-VMM-START uptime=$(up)"
/kiln-vmm --no-api --config-file "$vmjson" --metadata /metadata.json
rc=$?
echo "KILN-VMM-EXIT $rc uptime=$(up)"
if [ "$vmjson" = /tmp/vm.json ]; then
    dd if=/tmp/disk.img of=/dev/vda bs=1M conv=fsync 2>/dev/null || echo "KILN-OUTER-FAIL copy back to /dev/vda"
fi
blockdev --flushbufs /dev/vda 2>/dev/null
off
