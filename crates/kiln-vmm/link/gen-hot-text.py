#!/usr/bin/env python3
"""Regenerates crates/kiln-vmm/link/hot-text.ld: the functions kiln-vmm runs to boot a VM.

Why: on this host's kernels the file pages of the binary's code are mapped 64 KiB at a time
(fault-around over 64 KiB page-cache folios), so the code that is resident is every 64 KiB block
that holds at least one function the VMM runs. In the default layout those functions are spread
over the whole 1.8 MiB text (glibc's start-up code and IFUNC resolvers alone touch every block of
libc), so all of it was resident. The linker script this writes puts the functions that a boot
runs together at the start of the text; the rest of the binary is only faulted in when used.

How: the static release binary is linked with a map (KILN_VMM_LINK_MAP, honoured by build.rs),
run under `valgrind --tool=callgrind` through the two paths bench/vmm.py measures (API: configure,
InstanceStart, guest byte — dumped there — then SIGTERM; config file: boot, guest reset), and
every function callgrind saw is turned into a pattern on its input section name with the hash left out (Rust's legacy
`17h<hash>E` suffix, v0 crate disambiguators, LLVM's `.NNN` suffixes), so the list stays valid
across rebuilds and small code changes; glibc functions are matched by archive member. Valgrind
reports a CPU without AVX-512, so glibc's string functions would be the AVX2 variants; the IFUNC
choices of the real CPU are read from a native run (the IRELATIVE slots after start-up) and put
first, the valgrind ones after everything else this CPU runs. Then the device paths of a VM
with a drive and vsock (the `blk` and `vsock` test guests under callgrind), after the boot
path, so that a bare boot does not touch them. Last, native fix-up rounds: link with the
script, record the native run's instruction page faults with perf, and add every function that
faulted outside the hot section (paths that depend on thread timing, which valgrind's
serialised threads rarely take), until none does.

Needs valgrind (Debian package `valgrind`), perf for the fix-up rounds (`linux-perf`), gcc
and ld (the bench guest), /dev/kvm.
Usage: crates/kiln-vmm/link/gen-hot-text.py [--out PATH]
"""

import argparse
import bisect
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

spec = importlib.util.spec_from_file_location("bench_vmm", os.path.join(REPO, "bench", "vmm.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def build(map_path):
    env = dict(os.environ, KILN_VMM_LINK_MAP=map_path)
    out = subprocess.run([os.path.join(REPO, "scripts", "build-static.sh"), "kiln-vmm"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return os.path.join(out.stdout.strip(), "kiln-vmm")


def api_boot(argv, guest, sock, timeout):
    """Runs argv (kiln-vmm, possibly under valgrind) through the API path, then SIGTERM."""
    proc = subprocess.Popen(argv + ["--api-sock", sock], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = bench.now() + int(timeout * 1e9)
        s = bench.connect_when_ready(sock, proc, deadline)
        api = bench.Http(s)
        api.call("GET", "/", None, deadline)
        api.call("PUT", "/boot-source", {"kernel_image_path": guest,
                                         "boot_args": "console=ttyS0"}, deadline)
        api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": bench.MEM_MIB},
                 deadline)
        api.send("PUT", "/actions", {"action_type": "InstanceStart"})
        bench.first_byte(proc, deadline)
        status, text = api.reply(deadline)
        if status != 204:
            raise SystemExit(f"InstanceStart: HTTP {status} {text!r}")
        time.sleep(0.3)
        s.close()
        return proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def ifunc_choices(binary, guest, work):
    """Symbols the IRELATIVE slots point to once kiln-vmm runs natively on this CPU."""
    relocs = subprocess.run(["readelf", "-rW", binary], stdout=subprocess.PIPE, text=True,
                            check=True).stdout
    slots = [int(line.split()[0], 16) for line in relocs.splitlines()
             if "R_X86_64_IRELATIVE" in line]
    sock = os.path.join(work, "native.sock")
    proc = api_boot([binary], guest, sock, 10)
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            base = min(int(line.split("-")[0], 16) for line in f if binary in line)
        values = []
        with open(f"/proc/{proc.pid}/mem", "rb") as mem:
            for slot in slots:
                mem.seek(base + slot)
                values.append(int.from_bytes(mem.read(8), "little") - base)
    finally:
        proc.kill()
        proc.wait()
    return values


def valgrind(binary, out):
    return ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}",
            binary]


def names_in(out):
    names = []
    with open(out) as f:
        for line in f:
            m = re.match(r"^c?fn=\(\d+\) (.+)$", line)
            if m:
                names.append(m.group(1).split("'")[0])
    return names


def callgrind(binary, guests, config, work):
    """Function names (mangled) callgrind sees: (the API path up to the guest's byte, the rest
    of that run (SIGTERM, exit) and the config-file path (boot, guest reset, exit))."""
    out = os.path.join(work, "callgrind.api")
    proc = api_boot(valgrind(binary, out), guests["spin"], os.path.join(work, "vg.sock"), 120)
    # Dump what ran so far (into `out`.1); the final dump then holds only the way out.
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    boot = names_in(f"{out}.1")
    rest = names_in(out)
    out = os.path.join(work, "callgrind.file")
    subprocess.run(valgrind(binary, out) + ["--config-file", config, "--no-api"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    rest += names_in(out)
    return boot, rest


def test_guest(name):
    out = subprocess.run(["cargo", "run", "-q", "-p", "test-guests", "--bin", "test-guest-path",
                          name], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return out.stdout.strip()


def callgrind_devices(binary, work):
    """Function names of the device paths a `kiln run` VM uses, from test guests: the `blk`
    guest on a drive (writes, flush, reads) and the `vsock` guest connecting to a host
    listener (one line each way)."""
    boot = "console=ttyS0 reboot=k panic=1 pci=off"
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    uds = os.path.join(work, "v.sock")
    runs = {
        "blk": {"boot-source": {"kernel_image_path": test_guest("blk"), "boot_args": boot},
                "drives": [{"drive_id": "data", "path_on_host": disk, "is_root_device": False,
                            "is_read_only": False, "cache_type": "Writeback"}],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}},
        "vsock": {"boot-source": {"kernel_image_path": test_guest("vsock"),
                                  "boot_args": f"{boot} kiln.mode=connect kiln.port=5200 "
                                               f"kiln.text=1 kiln.recv=6"},
                  "vsock": {"guest_cid": 3, "uds_path": uds},
                  "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}},
    }
    names = []
    for name, vm in runs.items():
        config = os.path.join(work, f"{name}.json")
        with open(config, "w") as f:
            json.dump(vm, f)
        listener = None
        if name == "vsock":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(f"{uds}_5200")
            listener.listen(1)
        out = os.path.join(work, f"callgrind.{name}")
        proc = subprocess.Popen(valgrind(binary, out) + ["--config-file", config, "--no-api"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        if listener:
            listener.settimeout(120)
            conn, _ = listener.accept()
            conn.settimeout(120)
            conn.recv(4096)
            conn.sendall(b"hello\n")
            conn.close()
            listener.close()
        text, _ = proc.communicate(timeout=180)
        # What each guest prints when its device did everything asked of it.
        success = {"blk": b"match=yes", "vsock": b"finished=1 "}[name]
        if proc.returncode != 0 or success not in text:
            sys.exit(f"the {name} guest did not run cleanly under valgrind (exit "
                     f"{proc.returncode}):\n{text.decode(errors='replace')}")
        names += names_in(out)
    return names


# Functions the valgrind runs miss but a native start runs (seen in `perf record -e
# page-faults -d` of the native binary): the ELF entry point and glibc's static start-up.
ALWAYS = ["_start", "_dl_new_object", "_dl_add_to_namespace_list", "_dl_setup_hash"]

# glibc's multiarch string functions (the targets of its IFUNC resolvers).
IFUNC_VARIANT = re.compile(r"^__\w+_(sse2|ssse3|sse4|sse42|avx|avx2|avx512|evex|erms|rtm|movbe)")

MAP_LINE = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+( +)(\S.*)$")


def input_sections(map_path):
    """(start, size, file, section) of every input section of the output section .text."""
    sections = []
    in_text = False
    with open(map_path) as f:
        for line in f:
            m = MAP_LINE.match(line)
            if not m:
                continue
            indent, rest = len(m.group(3)), m.group(4)
            if indent == 1:  # output section
                in_text = rest.startswith(".text")
                continue
            if not in_text or indent != 9:
                continue
            fm = re.match(r"^(.*):\((.*)\)$", rest)
            if fm:
                sections.append((int(m.group(1), 16), int(m.group(2), 16), fm.group(1),
                                 fm.group(2)))
    sections.sort()
    return sections


def pattern(file, section, exact=False):
    """A linker-script input section description matching this section in later builds (with
    `exact`, only in a build with the same symbol hashes)."""
    if ".rcgu.o" in file:
        name = section
        if exact:
            return f"*({name})"
        name = re.sub(r"17h[0-9a-f]{16}E", "17h*", name)        # legacy mangling hash
        name = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", name)          # v0 crate disambiguators
        name = re.sub(r"\.\d+$", "*", name)                      # LLVM local suffixes
        return f"*({name})"
    m = re.match(r"^.*/([^/]+\.a)\(([^)]+)\)$", file)
    if m:
        return f"*{m.group(1)}:{m.group(2)}({section})"
    return f"*{os.path.basename(file)}({section})"


def load_layout(binary, map_path):
    """Symbols (name -> address), input sections of the text, and a lookup by address."""
    symbols = {}
    nm = subprocess.run(["nm", "--defined-only", binary], stdout=subprocess.PIPE,
                        text=True, check=True).stdout
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwWiI":
            symbols.setdefault(parts[2], int(parts[0], 16))
    sections = input_sections(map_path)
    starts = [s[0] for s in sections]

    def section_of(addr):
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and sections[i][0] <= addr < sections[i][0] + max(sections[i][1], 1):
            return sections[i]
        return None

    return symbols, section_of


def output_range(binary, name):
    """(start, end) of an output section of the binary."""
    out = subprocess.run(["readelf", "-SW", binary], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    for line in out.splitlines():
        m = re.match(r"^\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m and m.group(1) == name:
            return int(m.group(2), 16), int(m.group(2), 16) + int(m.group(3), 16)
    return None


def native_faults(binary, guest, work, runs=3):
    """Addresses (ELF virtual) of the instructions whose fetch faulted in native runs of the
    API path, recorded with `perf record -e page-faults -d`. Native runs take paths valgrind's
    serialised threads rarely take (a thread that really blocks on a channel, say)."""
    addrs = set()
    for i in range(runs):
        data = os.path.join(work, f"perf.{i}.data")
        perf = ["perf", "record", "-q", "-e", "page-faults", "-c", "1", "-d", "-o", data, "--"]
        proc = api_boot(perf + [binary], guest, os.path.join(work, f"perf{i}.sock"), 10)
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                child = int(f.read().split()[0])
            with open(f"/proc/{child}/maps") as f:
                base = min(int(line.split("-")[0], 16) for line in f if binary in line)
            os.kill(child, signal.SIGTERM)
            proc.wait(timeout=10)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,addr"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == parts[1]:
                addrs.add(int(parts[0], 16) - base)
    return addrs


def write_script(path, groups):
    """Writes the linker script: `groups` is a list of (exact, sections)."""
    ordered, done = [], set()
    for exact, group in groups:
        for sec in group:
            pat = pattern(sec[2], sec[3], exact)
            if pat not in done:
                done.add(pat)
                ordered.append(pat)
    with open(path, "w") as f:
        f.write("/* Generated by crates/kiln-vmm/link/gen-hot-text.py: the functions a VM boot\n"
                "   runs, kept together at the start of the text so that fault-around maps\n"
                "   few 64 KiB blocks of the binary. Regenerate after large changes. */\n")
        f.write("SECTIONS\n{\n  .text.kiln_hot : {\n")
        for pat in ordered:
            f.write(f"    {pat}\n")
        f.write("  }\n}\nINSERT BEFORE .text;\n")
        # glibc's IFUNC call stubs (every memcpy and strlen goes through them) are a section
        # of their own after the text; put them just before the hot functions.
        f.write("SECTIONS\n{\n  .iplt : { *(.iplt) }\n}\nINSERT BEFORE .text.kiln_hot;\n")
    return len(ordered)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "hot-text.ld"))
    ap.add_argument("--rounds", type=int, default=4,
                    help="native fix-up rounds (perf), 0 to skip them (default 4)")
    args = ap.parse_args()
    for tool in ("valgrind", "readelf", "nm"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if args.rounds and not shutil.which("perf"):
        print("perf not found: no native fix-up rounds", file=sys.stderr)
        args.rounds = 0
    work = tempfile.mkdtemp(prefix="kiln-hot-", dir="/tmp")
    bench.WORK = work
    try:
        map_path = os.path.join(work, "kiln-vmm.map")
        binary = os.path.join(work, "kiln-vmm")
        shutil.copy2(build(map_path), binary)
        guests = bench.build_guests()
        config = bench.Kiln(binary, {"exit": guests["exit"]}).config["exit"]
        symbols, section_of = load_layout(binary, map_path)

        native = [section_of(a) for a in ifunc_choices(binary, guests["spin"], work)]
        native = [s for s in native if s]
        boot_names, rest_names = callgrind(binary, guests, config, work)
        boot_names += ALWAYS
        names = boot_names + rest_names

        def sections_of(names):
            found = set(section_of(symbols[n]) for n in names if n in symbols)
            # Functions without a symbol valgrind can name (crtbegin's frame_dummy and
            # friends, run from .init_array) come as addresses.
            found |= set(section_of(int(n, 16)) for n in names
                         if re.fullmatch(r"0x[0-9a-f]+", n))
            return found - {None}

        # String-function variants valgrind's CPU picked but this one does not: kept (another
        # CPU may pick them) but after everything this CPU runs.
        other_cpu = sections_of([n for n in names if IFUNC_VARIANT.match(n)]) - set(native)
        hot = native + sorted(sections_of(boot_names) - other_cpu - set(native))
        # Then the way out (SIGTERM, guest reset) and the config-file start: a running VM
        # has not run them yet.
        seen = set(hot) | other_cpu
        later = sorted(sections_of(rest_names) - seen)
        seen |= set(later)
        # Device paths after those: a VM with drives and vsock runs them too, a bare boot (the
        # benchmark) does not, so they must not sit between its functions.
        devices = sorted(sections_of(callgrind_devices(binary, work)) - seen)
        tail = sorted(other_cpu)

        def groups():
            # The exact names first: with the hashes of this build they match only the
            # functions that ran. The hash-free patterns after them catch the same functions
            # once the hashes change (and other instances of the same generic function, hence
            # last).
            return [(True, hot), (True, later), (True, devices), (True, tail), (False, hot),
                    (False, later), (False, devices)]

        count = write_script(args.out, groups())
        # Native fix-up: link with the script, run natively, and move every function whose
        # first instruction fetch still faulted outside the hot section into it.
        for round_no in range(args.rounds):
            shutil.copy2(build(map_path), binary)
            symbols, section_of = load_layout(binary, map_path)
            ranges = [r for r in (output_range(binary, ".text.kiln_hot"),
                                  output_range(binary, ".iplt")) if r]
            misses = set()
            for addr in native_faults(binary, guests["spin"], work):
                if any(lo <= addr < hi for lo, hi in ranges):
                    continue
                sec = section_of(addr)
                if sec:
                    misses.add(sec)
            print(f"native round {round_no + 1}: {len(misses)} function(s) ran outside the "
                  f"hot section: {[m[3][:60] for m in sorted(misses)]}", file=sys.stderr)
            if not misses:
                break
            hot += sorted(misses)
            count = write_script(args.out, groups())
        size = lambda group: sum(sec[1] for sec in group)
        print(f"{args.out}: {count} patterns; code when generated: boot path {size(hot)}, "
              f"exit and config file {size(later)}, devices {size(devices)}, other CPUs' "
              f"variants {size(tail)} bytes",
              file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
