#!/bin/sh
# `kiln run --backend vmm` end to end (tests/nested/run.sh --kiln-run): runs in the outer VM (as
# /kiln-run.sh, under busybox sh, from outer-init.sh) or on a host with vmx/svm (under sh).
# Needs KILN (the kiln binary), KILN_ROOT (warmed: default kernel, initramfs, default image disk)
# and KILN_VMM in the environment. Prints KILN-RUN-* markers; run.sh checks them.
up() { cut -d' ' -f1 /proc/uptime; }
out=${TMPDIR:-/tmp}/kiln-run.$$
mkdir -p "$out"

# run_case NAME CMD...: one `kiln run --backend vmm --rm kiln/default CMD...`
run_case() {
    name=$1
    shift
    echo "KILN-RUN-START $name uptime=$(up)"
    timeout "${KILN_RUN_TIMEOUT:-180}" "$KILN" run --backend vmm --network none --rm kiln/default "$@" \
        </dev/null >"$out/$name.out" 2>"$out/$name.err"
    rc=$?
    echo "KILN-RUN-END $name rc=$rc uptime=$(up)"
    sed "s/^/KILN-RUN-STDOUT $name: /" "$out/$name.out"
    sed "s/^/KILN-RUN-STDERR $name: /" "$out/$name.err"
    echo "KILN-RUN-RC $name $rc"
}

echo "KILN-RUN-ENV kiln=$KILN kiln_vmm=$KILN_VMM kiln_root=$KILN_ROOT"
run_case echo echo hi
run_case exit7 sh -c 'exit 7'

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
    for d in "$KILN_ROOT"/vms/*; do
        [ -d "$d" ] || continue
        echo "KILN-RUN-DIAG-DIR $d: $(ls "$d" | tr '\n' ' ')"
        for f in "$d"/vmm.json "$d"/hypervisor.log; do
            [ -f "$f" ] && sed "s|^|KILN-RUN-DIAG $(basename "$f"): |" "$f"
        done
    done
    "$KILN" logs --console kiln-diag 2>&1 | tail -n 150 | sed 's/^/KILN-RUN-DIAG-CONSOLE: /'
    "$KILN" rm -f kiln-diag >/dev/null 2>&1
fi
rm -rf "$out"
echo "KILN-RUN-DONE uptime=$(up)"
