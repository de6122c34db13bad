#!/bin/sh
# `kiln run --backend vmm` end to end (tests/nested/run.sh --kiln-run): runs in the outer VM (as
# /kiln-run.sh, under busybox sh, from outer-init.sh) or on a host with vmx/svm (under sh).
# Needs KILN (the kiln binary), KILN_ROOT (warmed: default kernel, initramfs, default image disk)
# and KILN_VMM in the environment. KILN_RUN_BRIDGE=0 skips the --network bridge case (it needs
# root, iproute2's ip, nftables' nft, /dev/net/tun and the bridge/nftables kernel modules).
# Prints KILN-RUN-* markers; run.sh checks them.
up() { cut -d' ' -f1 /proc/uptime; }
out=${TMPDIR:-/tmp}/kiln-run.$$
mkdir -p "$out"
GATEWAY=10.88.0.1
NET_CMD="ip -4 addr show eth0; ip route; ping -c 1 -W 5 $GATEWAY"

# run_case NAME NETWORK CMD...: one `kiln run --backend vmm --network NETWORK --rm kiln/default CMD...`
run_case() {
    name=$1
    net=$2
    shift 2
    echo "KILN-RUN-START $name uptime=$(up)"
    timeout "${KILN_RUN_TIMEOUT:-180}" "$KILN" run --backend vmm --network "$net" --rm kiln/default "$@" \
        </dev/null >"$out/$name.out" 2>"$out/$name.err"
    rc=$?
    echo "KILN-RUN-END $name rc=$rc uptime=$(up)"
    sed "s/^/KILN-RUN-STDOUT $name: /" "$out/$name.out"
    sed "s/^/KILN-RUN-STDERR $name: /" "$out/$name.err"
    echo "KILN-RUN-RC $name $rc"
}

# iproute2's ip where there is one (busybox sh runs its own ip applet for a bare `ip`).
IP=ip
for p in /usr/sbin/ip /sbin/ip /usr/bin/ip /bin/ip; do
    [ -x "$p" ] && ! "$p" -V 2>&1 | grep -q BusyBox && { IP=$p; break; }
done
# The kiln-* tap devices that exist now (kiln's per-VM taps on the kiln0 bridge).
taps() { $IP -o link 2>/dev/null | grep -o -E ' kiln-[^:@ ]+' | tr -d ' ' | tr '\n' ' '; }

# dump_vm_dirs PREFIX: vmm.json and hypervisor.log (kiln-vmm's stderr) of every VM directory.
dump_vm_dirs() {
    for d in "$KILN_ROOT"/vms/*; do
        [ -d "$d" ] || continue
        echo "$1-DIR $d: $(ls "$d" | tr '\n' ' ')"
        for f in "$d"/vmm.json "$d"/hypervisor.log; do
            [ -f "$f" ] && sed "s|^|$1 $(basename "$f"): |" "$f"
        done
    done
}

# net_counters PREFIX: packet counters and state of kiln0 and the kiln-* taps.
net_counters() {
    for n in /sys/class/net/kiln*; do
        [ -d "$n" ] || continue
        echo "$1 counters $(basename "$n"): rx_packets=$(cat "$n/statistics/rx_packets" 2>/dev/null)" \
            "tx_packets=$(cat "$n/statistics/tx_packets" 2>/dev/null) rx_dropped=$(cat "$n/statistics/rx_dropped" 2>/dev/null)" \
            "tx_dropped=$(cat "$n/statistics/tx_dropped" 2>/dev/null) operstate=$(cat "$n/operstate" 2>/dev/null)"
    done
}
# net_state PREFIX: the host side of the bridge network (bridge, its address, taps, counters).
net_state() {
    $IP -d link show dev kiln0 2>&1 | sed "s/^/$1 link: /"
    $IP -o -4 addr show dev kiln0 2>&1 | sed "s/^/$1 addr: /"
    for t in $(taps); do
        $IP -d link show dev "$t" 2>&1 | sed "s/^/$1 tap: /"
    done
    net_counters "$1"
}

echo "KILN-RUN-ENV kiln=$KILN kiln_vmm=$KILN_VMM kiln_root=$KILN_ROOT"
run_case echo none echo hi
run_case exit7 none sh -c 'exit 7'

# Leftovers: --rm must leave no VM directory behind.
left=$(ls "$KILN_ROOT/vms" 2>/dev/null | tr '\n' ' ')
echo "KILN-RUN-LEFTOVER-VMS [${left% }]"

# On failure, keep one VM (no --rm) to show the inner console and kiln-vmm's stderr.
if ! grep -q -x hi "$out/echo.out" 2>/dev/null; then
    echo "KILN-RUN-DIAG start uptime=$(up)"
    timeout "${KILN_RUN_TIMEOUT:-180}" "$KILN" run --backend vmm --network none --name kiln-diag kiln/default echo hi \
        </dev/null >"$out/diag.out" 2>"$out/diag.err"
    echo "KILN-RUN-DIAG rc=$? uptime=$(up)"
    sed 's/^/KILN-RUN-DIAG-STDERR: /' "$out/diag.err"
    dump_vm_dirs KILN-RUN-DIAG
    "$KILN" logs --console kiln-diag 2>&1 | tail -n 150 | sed 's/^/KILN-RUN-DIAG-CONSOLE: /'
    "$KILN" rm -f kiln-diag >/dev/null 2>&1
fi

# --network bridge: kiln's kiln0 bridge, a tap per VM and virtio-net with the guest's own
# driver; the guest shows its address and routes and pings the gateway (kiln0, this side).
if [ "${KILN_RUN_BRIDGE:-1}" = 1 ]; then
    echo "KILN-RUN-BRIDGE-PRE tun=$([ -c /dev/net/tun ] && echo yes || echo no)" \
        "ip=$IP ($($IP -V 2>&1 | head -n1)) nft=$(command -v nft) ($(nft -v 2>&1 | head -n1))" \
        "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null) taps=[$(taps)]"
    # While the VM runs: its tap, seen on the bridge (proves the leftover check sees taps).
    (
        while [ ! -f "$out/bridge.done" ]; do
            $IP -o link 2>/dev/null | grep -E ' kiln-[^:@ ]+' >>"$out/taps-seen"
            sleep 0.1
        done
    ) &
    poller=$!
    run_case bridge bridge sh -c "$NET_CMD"
    touch "$out/bridge.done"
    wait "$poller"
    seen=$(grep -o -E ' kiln-[^:@ ]+' "$out/taps-seen" 2>/dev/null | tr -d ' ' | sort -u | tr '\n' ' ')
    master=$(grep -q 'master kiln0' "$out/taps-seen" 2>/dev/null && echo kiln0 || echo none)
    echo "KILN-RUN-TAPS-SEEN [${seen% }] master=$master"
    left=$(taps)
    echo "KILN-RUN-TAPS-LEFT [${left% }]"
    echo "KILN-RUN-BRIDGE-POST ip_forward=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null)"
    net_state KILN-RUN-BRIDGE-HOST
    nft list table ip kiln 2>&1 | sed 's/^/KILN-RUN-BRIDGE-HOST nft: /'
    left=$(ls "$KILN_ROOT/vms" 2>/dev/null | tr '\n' ' ')
    echo "KILN-RUN-LEFTOVER-VMS-BRIDGE [${left% }]"
    # On failure, once more without --rm; while it runs, the tap and its counters.
    if ! grep -q ', 0% packet loss' "$out/bridge.out" 2>/dev/null; then
        echo "KILN-RUN-NETDIAG start uptime=$(up)"
        timeout "${KILN_RUN_TIMEOUT:-180}" "$KILN" run --backend vmm --network bridge --name kiln-netdiag \
            kiln/default sh -c "$NET_CMD; ping -c 3 -W 2 $GATEWAY; cat /proc/net/dev; ip neigh; sleep 2" \
            </dev/null >"$out/netdiag.out" 2>"$out/netdiag.err" &
        pid=$!
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 600 ]; do
            [ -n "$(taps)" ] && break
            sleep 0.2
            i=$((i + 1))
        done
        net_state "KILN-RUN-NETDIAG-HOST uptime=$(up)"
        while kill -0 "$pid" 2>/dev/null; do
            sleep 2
            net_counters "KILN-RUN-NETDIAG-HOST uptime=$(up)"
        done
        wait "$pid"
        echo "KILN-RUN-NETDIAG rc=$? uptime=$(up)"
        sed 's/^/KILN-RUN-NETDIAG-STDOUT: /' "$out/netdiag.out"
        sed 's/^/KILN-RUN-NETDIAG-STDERR: /' "$out/netdiag.err"
        dump_vm_dirs KILN-RUN-NETDIAG
        "$KILN" logs --console kiln-netdiag 2>&1 | tail -n 150 | sed 's/^/KILN-RUN-NETDIAG-CONSOLE: /'
        "$KILN" rm -f kiln-netdiag >/dev/null 2>&1
        dmesg | tail -n 30 | sed 's/^/KILN-RUN-NETDIAG-DMESG: /'
    fi
else
    echo "KILN-RUN-BRIDGE-SKIPPED (KILN_RUN_BRIDGE=${KILN_RUN_BRIDGE})"
fi
rm -rf "$out"
echo "KILN-RUN-DONE uptime=$(up)"
