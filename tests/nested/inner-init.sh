#!/bin/busybox sh
# /init of the INNER guest (booted by kiln-vmm, or by QEMU microvm in --inner-vmm qemu mode).
# Prints KILN-INNER-* markers on the serial console; tests/nested/run.sh checks them.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

up() { cut -d' ' -f1 /proc/uptime; }
finish() {
    echo "KILN-INNER-REBOOT uptime=$(up)"
    sync
    reboot -f
    # reboot -f should not return; if it does, exiting init panics and panic=1 reboots.
    sleep 5
    exit 1
}
fail() {
    echo "KILN-INNER-FAIL $*"
    echo "--- inner dmesg (tail) ---"
    dmesg | tail -n 40
    echo "--- end inner dmesg ---"
    finish
}

echo "KILN-INNER-INIT uptime=$(up) kernel=$(uname -r) cpus=$(nproc) mem_kib=$(awk '/^MemTotal/ { print $2 }' /proc/meminfo)"

for m in $(cat /modules.list); do
    name=$(basename "$m" .ko)
    if out=$(insmod "/lib/modules/$m" 2>&1); then
        echo "KILN-INNER-MODULE-OK $name"
    else
        echo "KILN-INNER-MODULE-FAIL $name: $out"
    fi
done
echo "KILN-INNER-MODULES-LOADED $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

# Wait for the ACPI-described virtio-mmio disk.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do
    usleep 100000
    i=$((i + 1))
done

for d in /sys/bus/platform/devices/LNRO0005:*; do
    [ -e "$d" ] || continue
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "KILN-INNER-ACPI-DEV $(basename "$d") driver=$drv"
done
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "KILN-INNER-VIRTIO-DEV $(basename "$d") device=$(cat "$d/device") driver=$drv"
done
dmesg | grep -i -E 'virtio|vda' | sed 's/^/KILN-INNER-DMESG /'

if [ ! -b /dev/vda ]; then
    echo "KILN-INNER-DISK-MISSING after 30 s"
    echo "--- /sys/bus/platform/devices ---"
    ls /sys/bus/platform/devices
    fail "no /dev/vda"
fi
echo "KILN-INNER-DISK-FOUND /dev/vda sectors=$(cat /sys/block/vda/size) uptime=$(up)"

mount -t ext4 /dev/vda /mnt || fail "mount -t ext4 /dev/vda failed"
echo "KILN-INNER-MOUNTED"
[ -f /mnt/from-host.txt ] || fail "/from-host.txt missing on disk"
fromhost=$(cat /mnt/from-host.txt)
echo "KILN-INNER-FROM-HOST: $fromhost"
echo "kiln-guest-wrote: $fromhost" > /mnt/from-guest.txt || fail "write /from-guest.txt failed"
sync
umount /mnt || fail "umount failed"
echo "KILN-INNER-DONE uptime=$(up)"

# virtio-net: the tap's far side is 172.16.0.1; the metadata service answers at
# 169.254.169.254 inside the VMM (V2: session token first).
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 172.16.0.2/24 dev eth0
    echo "KILN-INNER-NET-UP mac=$(cat /sys/class/net/eth0/address)"
    if ping -c 1 -W 5 172.16.0.1 >/dev/null 2>&1; then
        echo "KILN-INNER-PING-OK"
    else
        echo "KILN-INNER-PING-FAIL"
    fi
    ip route add 169.254.169.254/32 dev eth0
    token=$(printf 'PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' |
        nc -w 5 169.254.169.254 80 | tail -n 1)
    echo "KILN-INNER-MMDS-TOKEN length=${#token}"
    nonce=$(printf 'GET /kiln/nonce HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token: %s\r\nConnection: close\r\n\r\n' "$token" |
        nc -w 5 169.254.169.254 80 | tail -n 1)
    echo "KILN-INNER-MMDS-NONCE: $nonce"
    status=$(printf 'GET /kiln/nonce HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n' |
        nc -w 5 169.254.169.254 80 | head -n 1 | tr -d '\r')
    echo "KILN-INNER-MMDS-NO-TOKEN: $status"
else
    echo "KILN-INNER-NET-MISSING (no eth0)"
fi
# Interrupt counts (serial, virtio, timers): diagnostics for the VMM's interrupt routing.
sed -n '2,$p' /proc/interrupts | awk '$2 != 0 { $1 = $1; print "KILN-INNER-IRQ " $0 }'
finish
