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
InstanceStart, guest byte, SIGTERM; config file: boot, guest reset), and every function callgrind
saw is turned into a pattern on its input section name with the hash left out (Rust's legacy
`17h<hash>E` suffix, v0 crate disambiguators, LLVM's `.NNN` suffixes), so the list stays valid
across rebuilds and small code changes; glibc functions are matched by archive member. Valgrind
reports a CPU without AVX-512, so glibc's string functions would be the AVX2 variants; the IFUNC
choices of the real CPU are read from a native run (the IRELATIVE slots after start-up) and put
first, the valgrind ones after them.

Needs valgrind (Debian package `valgrind`), gcc and ld (the bench guest), /dev/kvm.
Usage: crates/kiln-vmm/link/gen-hot-text.py [--out PATH]
"""

import argparse
import bisect
import importlib.util
import os
import re
import shutil
import signal
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


def callgrind(binary, guests, config, work):
    """Function names (mangled) callgrind sees on the API path and the config-file path."""
    names = []
    for i, mode in enumerate(("api", "file")):
        out = os.path.join(work, f"callgrind.{mode}")
        vg = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}",
              binary]
        if mode == "api":
            proc = api_boot(vg, guests["spin"], os.path.join(work, "vg.sock"), 120)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        else:
            subprocess.run(vg + ["--config-file", config, "--no-api"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        with open(out) as f:
            for line in f:
                m = re.match(r"^c?fn=\(\d+\) (.+)$", line)
                if m:
                    names.append(m.group(1).split("'")[0])
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "hot-text.ld"))
    args = ap.parse_args()
    for tool in ("valgrind", "readelf", "nm"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    work = tempfile.mkdtemp(prefix="kiln-hot-", dir="/tmp")
    bench.WORK = work
    try:
        map_path = os.path.join(work, "kiln-vmm.map")
        built = build(map_path)
        binary = os.path.join(work, "kiln-vmm")
        shutil.copy2(built, binary)
        guests = bench.build_guests()
        config = bench.Kiln(binary, {"exit": guests["exit"]}).config["exit"]

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

        native = [section_of(a) for a in ifunc_choices(binary, guests["spin"], work)]
        names = callgrind(binary, guests, config, work) + ALWAYS
        # String-function variants valgrind's CPU picked but this one does not: kept (another
        # CPU may pick them) but after everything this CPU runs.
        other_cpu = set(section_of(symbols[n]) for n in names
                        if n in symbols and IFUNC_VARIANT.match(n)) - set(native)
        seen = set(section_of(symbols[n]) for n in names if n in symbols)
        # Functions without a symbol valgrind can name (crtbegin's frame_dummy and friends,
        # run from .init_array) come as addresses.
        seen |= set(section_of(int(n, 16)) for n in names if re.fullmatch(r"0x[0-9a-f]+", n))
        hot = [s for s in native if s] + sorted(s for s in seen - other_cpu if s)
        tail = sorted(s for s in other_cpu if s)
        # The exact names first: with the hashes of this build they match only the functions
        # that ran. The hash-free patterns after them catch the same functions once the hashes
        # change (and other instances of the same generic function, hence last).
        ordered, done = [], set()
        for exact, group in ((True, hot), (True, tail), (False, hot)):
            for sec in group:
                pat = pattern(sec[2], sec[3], exact)
                if pat not in done:
                    done.add(pat)
                    ordered.append((pat, sec[1] if exact else 0))
        total = sum(size for _, size in ordered)
        with open(args.out, "w") as f:
            f.write("/* Generated by crates/kiln-vmm/link/gen-hot-text.py: the functions a VM boot\n"
                    "   runs, kept together at the start of the text so that fault-around maps\n"
                    "   few 64 KiB blocks of the binary. Regenerate after large changes. */\n")
            f.write("SECTIONS\n{\n  .text.kiln_hot : {\n")
            for pat, _ in ordered:
                f.write(f"    {pat}\n")
            f.write("  }\n}\nINSERT BEFORE .text;\n")
            # glibc's IFUNC call stubs (every memcpy and strlen goes through them) are a
            # section of their own after the text; put them just before the hot functions.
            f.write("SECTIONS\n{\n  .iplt : { *(.iplt) }\n}\nINSERT BEFORE .text.kiln_hot;\n")
        print(f"{args.out}: {len(ordered)} patterns, {total} bytes of code when generated",
              file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
