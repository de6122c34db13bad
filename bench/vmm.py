#!/usr/bin/env python3
"""kiln-vmm vs QEMU microvm, measured side by side in the same run.

Usage: bench/vmm.py [--runs N] [--seq N] [--kiln PATH] [--qemu PATH] [--json FILE] [-v]

Both monitors boot the same tiny PVH guest (bench/guest/first-byte.S, built here with gcc/ld):
it writes one byte to COM1 and resets through the i8042 (or halts forever, for the memory
measurement). Runs of the two monitors are interleaved, alternating which goes first, so that
the noise of the machine falls on both. See bench/README.md for what each figure means.

Python 3 standard library only. Exit status: 0 when the measurements ran (targets missed or
not), 1 when they could not run (missing tool, build failure, a VMM that does not boot).
"""

import argparse
import atexit
import datetime
import errno
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
GUEST_SRC = os.path.join(BENCH_DIR, "guest", "first-byte.S")
GUEST_LDS = os.path.join(BENCH_DIR, "guest", "first-byte.ld")

MEM_MIB = 128
TIMEOUT = 10.0  # seconds for any single step before the run counts as failed

# Targets for kiln-vmm (medians). Reported as PASS/MISS; a miss does not fail the script.
TARGET_API_MS = 3.0
TARGET_START_MS = 1.0
TARGET_OVERHEAD_MIB = 2.0

# QEMU microvm, as small as it goes while still booting the guest: no option ROMs, RTC, ACPI,
# PIT or PIC (the guest needs none of them), and an i8042 added (microvm has none) so that the
# guest's reset ends QEMU (-no-reboot), as it ends kiln-vmm. --qemu-machine overrides -M.
QEMU_MACHINE = "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off"
QEMU_BASE = [
    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", str(MEM_MIB),
    "-serial", "stdio", "-device", "i8042",
]

VERBOSE = False
WORK = None          # temporary directory, removed on exit
LIVE = {}            # pid -> Popen of every monitor still running, killed on exit


def log(msg):
    if VERBOSE:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"bench/vmm.py: {msg}", file=sys.stderr)
    sys.exit(1)


def now():
    return time.perf_counter_ns()


def ms(ns):
    return ns / 1e6


# ----------------------------------------------------------------------------------------------
# Clean-up: every monitor we start is killed, the work directory (sockets, guests) removed.

def cleanup():
    for pid, proc in list(LIVE.items()):
        if proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:
                pass
        LIVE.pop(pid, None)
    if WORK and os.path.isdir(WORK):
        shutil.rmtree(WORK, ignore_errors=True)


def on_signal(signum, _frame):
    cleanup()
    os._exit(128 + signum)


# ----------------------------------------------------------------------------------------------
# Set-up: tools, kiln-vmm binary, the guest.

def find_qemu(path):
    qemu = path or shutil.which("qemu-system-x86_64")
    if not qemu or not os.access(qemu, os.X_OK):
        die("qemu-system-x86_64 not found: install Debian's package qemu-system-x86 "
            "(apt-get install qemu-system-x86), or pass --qemu PATH")
    return qemu


def find_kiln(path):
    if path:
        if not os.access(path, os.X_OK):
            die(f"--kiln {path}: not an executable")
        return path
    # The static release build, as shipped (scripts/build-static.sh).
    if not shutil.which("cargo"):
        die("cargo is not on PATH (needed to build kiln-vmm)")
    print("building static kiln-vmm (scripts/build-static.sh)", file=sys.stderr, flush=True)
    out = subprocess.run([os.path.join(REPO, "scripts", "build-static.sh"), "kiln-vmm"],
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        die("scripts/build-static.sh kiln-vmm failed")
    binary = os.path.join(out.stdout.strip(), "kiln-vmm")
    if not os.access(binary, os.X_OK):
        die(f"{binary} was not built")
    # Work on a private copy, so that a rebuild by someone else during the run cannot swap the
    # binary between two measurements.
    copy = os.path.join(WORK, "kiln-vmm")
    shutil.copy2(binary, copy)
    return copy


def build_guests():
    for tool in ("gcc", "ld"):
        if not shutil.which(tool):
            die(f"{tool} not found (apt-get install gcc binutils)")
    guests = {}
    variants = {"exit": [], "spin": ["-DSPIN"]}
    for name, defs in variants.items():
        obj = os.path.join(WORK, f"first-byte-{name}.o")
        elf = os.path.join(WORK, f"first-byte-{name}.elf")
        subprocess.run(["gcc", "-c", *defs, "-o", obj, GUEST_SRC], check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "--no-warn-rwx-segments", "-T", GUEST_LDS,
                        "-o", elf, obj], check=True)
        guests[name] = elf
    return guests


# ----------------------------------------------------------------------------------------------
# Small clients: HTTP/1.1 over the Unix socket (keep-alive), QMP.

class Failed(Exception):
    pass


def connect_when_ready(path, proc, deadline):
    """Polls connect() every 100 us until the socket accepts; returns the connected socket."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as e:
            s.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
        if proc.poll() is not None:
            raise Failed(f"monitor exited with {proc.returncode} before its socket was ready")
        if now() > deadline:
            raise Failed("socket not ready in time")
        time.sleep(0.0001)


def recv_until(sock, buf, pred, deadline):
    while not pred(buf):
        left = (deadline - now()) / 1e9
        if left <= 0:
            raise Failed("no reply in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise Failed("connection closed")
        buf += chunk
    return buf


class Http:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, method, path, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)

    def reply(self, deadline):
        self.buf = recv_until(self.sock, self.buf, lambda b: b"\r\n\r\n" in b, deadline)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        rest = recv_until(self.sock, rest, lambda b: len(b) >= length, deadline)
        self.buf = rest[length:]
        return status, rest[:length]

    def call(self, method, path, body, deadline, ok=(200, 204)):
        self.send(method, path, body)
        status, text = self.reply(deadline)
        if status not in ok:
            raise Failed(f"{method} {path}: HTTP {status} {text[:200]!r}")
        return text


class Qmp:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def message(self, deadline):
        """Next JSON message that is not an asynchronous event."""
        while True:
            self.buf = recv_until(self.sock, self.buf, lambda b: b"\n" in b, deadline)
            line, _, self.buf = self.buf.partition(b"\n")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def send(self, command):
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")

    def call(self, command, deadline):
        self.send(command)
        msg = self.message(deadline)
        if "return" not in msg:
            raise Failed(f"QMP {command}: {msg}")
        return msg


# ----------------------------------------------------------------------------------------------
# Monitors.

def spawn(argv, tag):
    err = open(os.path.join(WORK, f"{tag}.stderr"), "ab")
    t0 = now()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                            close_fds=True)
    LIVE[proc.pid] = proc
    err.close()
    return proc, t0


def first_byte(proc, deadline):
    """Blocks until the guest's first serial byte arrives on the monitor's stdout."""
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        left = (deadline - now()) / 1e6
        if left <= 0:
            raise Failed("no serial byte in time")
        if poller.poll(left):
            data = os.read(fd, 1)
            t = now()
            if not data:
                raise Failed(f"serial closed without output (exit {proc.wait()})")
            return t


def finish(proc, deadline, expect_exit=True):
    if expect_exit:
        try:
            rc = proc.wait(timeout=max(0.001, (deadline - now()) / 1e9))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            LIVE.pop(proc.pid, None)
            raise Failed("monitor did not exit after the guest's reset")
    else:
        proc.kill()
        rc = proc.wait()
    LIVE.pop(proc.pid, None)
    proc.stdout.close()
    if expect_exit and rc != 0:
        raise Failed(f"monitor exited with status {rc}")


def kill(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    LIVE.pop(proc.pid, None)
    if proc.stdout:
        proc.stdout.close()


class Kiln:
    name = "kiln-vmm"

    def __init__(self, binary, guests):
        self.binary = binary
        self.guests = guests
        self.sock = os.path.join(WORK, "kiln.sock")
        self.config = {}
        for variant, elf in guests.items():
            path = os.path.join(WORK, f"kiln-{variant}.json")
            with open(path, "w") as f:
                json.dump({"boot-source": {"kernel_image_path": elf,
                                           "boot_args": "console=ttyS0"},
                           "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB}}, f)
            self.config[variant] = path

    def api_run(self, variant="exit", keep=False, settle=0.0):
        """Spawn, API ready, configure, [settle], InstanceStart, first byte -> timestamps."""
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        proc, t0 = spawn([self.binary, "--api-sock", self.sock], "kiln")
        try:
            deadline = t0 + int(TIMEOUT * 1e9)
            s = connect_when_ready(self.sock, proc, deadline)
            t_conn = now()
            api = Http(s)
            api.call("GET", "/", None, deadline)
            t_reply = now()
            api.call("PUT", "/boot-source", {"kernel_image_path": self.guests[variant],
                                             "boot_args": "console=ttyS0"}, deadline)
            api.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
                     deadline)
            time.sleep(settle)
            t_start = now()
            api.send("PUT", "/actions", {"action_type": "InstanceStart"})
            t_byte = first_byte(proc, deadline)
            status, text = api.reply(deadline)
            if status != 204:
                raise Failed(f"InstanceStart: HTTP {status} {text[:200]!r}")
            s.close()
            times = dict(t0=t0, conn=t_conn, reply=t_reply, start=t_start, byte=t_byte)
            if keep:
                return proc, times
            finish(proc, deadline)
            times["exit"] = now()
            return times
        except BaseException:
            kill(proc)
            raise

    def file_run(self, variant="exit"):
        proc, t0 = spawn([self.binary, "--config-file", self.config[variant], "--no-api"],
                         "kiln")
        try:
            deadline = t0 + int(TIMEOUT * 1e9)
            t_byte = first_byte(proc, deadline)
            finish(proc, deadline)
            return dict(t0=t0, byte=t_byte, exit=now())
        except BaseException:
            kill(proc)
            raise


class Qemu:
    name = "QEMU"

    def __init__(self, binary, guests):
        self.binary = binary
        self.guests = guests
        self.sock = os.path.join(WORK, "qmp.sock")
        self.machine = QEMU_MACHINE

    def argv(self, variant, qmp):
        argv = [self.binary, "-M", self.machine, *QEMU_BASE, "-kernel", self.guests[variant]]
        if qmp:
            argv += ["-S", "-qmp", f"unix:{self.sock},server=on,wait=off"]
        return argv

    def api_run(self, variant="exit", keep=False, settle=0.0):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        proc, t0 = spawn(self.argv(variant, qmp=True), "qemu")
        try:
            deadline = t0 + int(TIMEOUT * 1e9)
            s = connect_when_ready(self.sock, proc, deadline)
            t_conn = now()
            qmp = Qmp(s)
            greeting = qmp.message(deadline)
            if "QMP" not in greeting:
                raise Failed(f"unexpected QMP greeting {greeting}")
            t_reply = now()
            qmp.call("qmp_capabilities", deadline)
            time.sleep(settle)
            t_start = now()
            qmp.send("cont")
            t_byte = first_byte(proc, deadline)
            msg = qmp.message(deadline)
            if "return" not in msg:
                raise Failed(f"QMP cont: {msg}")
            times = dict(t0=t0, conn=t_conn, reply=t_reply, start=t_start, byte=t_byte)
            if keep:
                times["qmp"] = s
                return proc, times
            s.close()
            finish(proc, deadline)
            times["exit"] = now()
            return times
        except BaseException:
            kill(proc)
            raise

    def refuses_arch_capabilities(self):
        """True if the last QEMU run aborted because KVM refused MSR 0x10a."""
        try:
            with open(os.path.join(WORK, "qemu.stderr"), errors="replace") as f:
                return "failed to set MSR 0x10a" in f.read()
        except OSError:
            return False

    def file_run(self, variant="exit"):
        proc, t0 = spawn(self.argv(variant, qmp=False), "qemu")
        try:
            deadline = t0 + int(TIMEOUT * 1e9)
            t_byte = first_byte(proc, deadline)
            finish(proc, deadline)
            return dict(t0=t0, byte=t_byte, exit=now())
        except BaseException:
            kill(proc)
            raise


# ----------------------------------------------------------------------------------------------
# Memory: RSS of the monitor minus the guest RAM mapping's resident pages.

MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


def smaps_kib(pid):
    """Returns (totals, guest): kB figures from smaps_rollup, and of the guest RAM mapping."""
    totals = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                totals[k] = int(v.split()[0])
    maps = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = MAPPING.match(line)
            if m:
                cur = {"name": m.group(3).strip(),
                       "bytes": int(m.group(2), 16) - int(m.group(1), 16)}
                maps.append(cur)
                continue
            k, _, v = line.partition(":")
            if cur is not None and v.strip().endswith("kB"):
                cur[k] = int(v.split()[0])
    # The guest RAM: an anonymous (or memfd) mapping of 128 MiB; monitors may round it up a
    # little for alignment and guard pages. The largest resident one of that size wins.
    lo, hi = MEM_MIB << 20, (MEM_MIB + 8) << 20
    guest = [m for m in maps
             if lo <= m["bytes"] <= hi
             and (m["name"] == "" or m["name"].startswith("[anon") or "memfd" in m["name"])]
    if not guest:
        raise Failed(f"no {MEM_MIB} MiB anonymous mapping in /proc/{pid}/smaps")
    guest.sort(key=lambda m: m.get("Rss", 0), reverse=True)
    return totals, guest[0]


def memory_run(vmm):
    proc, times = vmm.api_run("spin", keep=True)
    try:
        time.sleep(0.1)  # let the monitor settle after the guest's first byte
        if proc.poll() is not None:
            raise Failed(f"monitor exited ({proc.returncode}) while the guest should spin")
        totals, guest = smaps_kib(proc.pid)
        rss, anon, pss = totals["Rss"], totals["Anonymous"], totals["Pss"]
        g_rss, g_anon = guest.get("Rss", 0), guest.get("Anonymous", 0)
        log(f"guest mapping: {guest['bytes'] >> 20} MiB {guest['name'] or '[anon]'}, "
            f"Rss {g_rss} kB")
        return dict(rss=rss / 1024, guest=g_rss / 1024, overhead=(rss - g_rss) / 1024,
                    anon_overhead=(anon - g_anon) / 1024, file=(rss - anon) / 1024,
                    pss_overhead=(pss - guest.get("Pss", 0)) / 1024)
    finally:
        if "qmp" in times:
            times["qmp"].close()
        kill(proc)


# ----------------------------------------------------------------------------------------------
# Report.

def summary(values):
    if not values:
        return None
    return (min(values), statistics.median(values), max(values))


def fmt(s, unit):
    if s is None:
        return "n/a"
    digits = 1 if unit == "ms" and s[1] >= 10 else 2
    return f"{s[0]:.{digits}f} / {s[1]:.{digits}f} / {s[2]:.{digits}f} {unit}"


def verdict(s, target, higher_is_better=False):
    if s is None:
        return "n/a"
    ok = s[1] >= target if higher_is_better else s[1] <= target
    return "PASS" if ok else "MISS"


def main():
    global VERBOSE, WORK
    ap = argparse.ArgumentParser(description="kiln-vmm vs QEMU microvm, side by side")
    ap.add_argument("--runs", type=int, default=20, help="runs per measure and monitor (20)")
    ap.add_argument("--seq", type=int, default=20,
                    help="VMs per sequential-creation batch (20)")
    ap.add_argument("--kiln", help="kiln-vmm binary (default: the static build of scripts/build-static.sh, "
                                   "built if missing)")
    ap.add_argument("--qemu", help="qemu-system-x86_64 binary (default: from PATH)")
    ap.add_argument("--qemu-machine", default=QEMU_MACHINE,
                    help=f"QEMU -M value (default {QEMU_MACHINE})")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds the client idles before InstanceStart/cont in measure 2b "
                         "(0.2)")
    ap.add_argument("--json", help="also write the raw figures to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose
    if args.runs < 1 or args.seq < 1:
        die("--runs and --seq must be at least 1")

    atexit.register(cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is not accessible")
    WORK = tempfile.mkdtemp(prefix="kiln-bench-", dir="/tmp")  # short paths for sockets
    qemu_bin = find_qemu(args.qemu)
    kiln_bin = find_kiln(args.kiln)
    guests = build_guests()
    kiln, qemu = Kiln(kiln_bin, guests), Qemu(qemu_bin, guests)
    qemu.machine = args.qemu_machine
    load_before = os.getloadavg()
    vmms = [kiln, qemu]

    # Smoke test: both boot the guest and exit on its reset.
    for vmm in vmms:
        try:
            try:
                vmm.file_run()
            except Failed:
                if vmm is not qemu or not qemu.refuses_arch_capabilities():
                    raise
                # Some kvm hosts (seen on AMD EPYC with kvm_pvm) list IA32_ARCH_CAPABILITIES
                # (MSR 0x10a) for `-cpu host` but refuse QEMU's write of it, and QEMU aborts.
                # The guest does not care; drop that one feature and say so in the header.
                QEMU_BASE[QEMU_BASE.index("-cpu") + 1] = "host,-arch-capabilities"
                print("QEMU: this host's KVM refuses MSR 0x10a for -cpu host; using "
                      "-cpu host,-arch-capabilities", file=sys.stderr, flush=True)
                vmm.file_run()
            vmm.api_run()
        except Failed as e:
            die(f"{vmm.name} does not boot the guest: {e} "
                f"(stderr in {WORK}/{'kiln' if vmm is kiln else 'qemu'}.stderr)")

    raw = {v.name: {"conn": [], "reply": [], "start": [], "whole": [], "settled": [],
                    "rss": [], "guest": [], "overhead": [], "anon_overhead": [], "file": [],
                    "pss_overhead": []} for v in vmms}
    failures = {v.name: [] for v in vmms}

    def record_failure(vmm, what, e):
        failures[vmm.name].append(f"{what}: {e}")
        log(f"{vmm.name} {what} failed: {e}")

    print(f"measuring: {args.runs} runs each of API boot, settled start and memory, "
          f"{args.seq}-VM sequential batches ...", file=sys.stderr, flush=True)
    # Harness floor: spawn -> first output byte of a trivial dynamically linked C program
    # (coreutils printf), read the same way as the guests' serial output.
    floor = []
    printf_bin = shutil.which("printf") or "/usr/bin/printf"
    for i in range(args.runs):
        proc, t0 = spawn([printf_bin, "K"], "floor")
        try:
            floor.append(ms(first_byte(proc, t0 + int(TIMEOUT * 1e9)) - t0))
        except Failed as e:
            log(f"floor run failed: {e}")
        kill(proc)
    # 1-3: spawn -> API ready -> configure -> start -> first serial byte -> reset.
    for i in range(args.runs):
        for vmm in (vmms if i % 2 == 0 else vmms[::-1]):
            try:
                t = vmm.api_run()
            except Failed as e:
                record_failure(vmm, f"API run {i}", e)
                continue
            r = raw[vmm.name]
            r["conn"].append(ms(t["conn"] - t["t0"]))
            r["reply"].append(ms(t["reply"] - t["t0"]))
            r["start"].append(ms(t["byte"] - t["start"]))
            r["whole"].append(ms(t["byte"] - t["t0"]))
            log(f"{vmm.name}: ready {r['conn'][-1]:.2f} ms, start->byte {r['start'][-1]:.2f} ms,"
                f" spawn->byte {r['whole'][-1]:.2f} ms")
    # 2b: the same start, but the client idles --settle seconds before it (a client that has
    # more to configure, or a VM started from a pool): the monitor's set-up is off the path.
    for i in range(args.runs):
        for vmm in (vmms if i % 2 == 0 else vmms[::-1]):
            try:
                t = vmm.api_run(settle=args.settle)
            except Failed as e:
                record_failure(vmm, f"settled run {i}", e)
                continue
            raw[vmm.name]["settled"].append(ms(t["byte"] - t["start"]))
            log(f"{vmm.name}: settled start->byte {raw[vmm.name]['settled'][-1]:.2f} ms")
    # 4: memory of a booted, halted guest.
    for i in range(args.runs):
        for vmm in (vmms if i % 2 == 0 else vmms[::-1]):
            try:
                m = memory_run(vmm)
            except Failed as e:
                record_failure(vmm, f"memory run {i}", e)
                continue
            for k, v in m.items():
                raw[vmm.name][k].append(v)
            log(f"{vmm.name}: rss {m['rss']:.2f} MiB guest {m['guest']:.2f} MiB "
                f"overhead {m['overhead']:.2f} MiB")
    # 5: sequential creations, spawn -> first byte -> exit, one after another.
    seq = {}
    modes = [("api", kiln, "api_run"), ("api", qemu, "api_run"),
             ("file", kiln, "file_run"), ("file", qemu, "file_run")]
    for mode, vmm, method in modes:
        lat = []
        fails = 0
        t_begin = now()
        for i in range(args.seq):
            try:
                t = getattr(vmm, method)()
                lat.append(ms(t["exit"] - t["t0"]))
            except Failed as e:
                fails += 1
                record_failure(vmm, f"sequential {mode} {i}", e)
        elapsed = (now() - t_begin) / 1e9
        seq[(mode, vmm.name)] = dict(rate=len(lat) / elapsed, lat=lat, fails=fails)
        log(f"{vmm.name} {mode}: {len(lat)} VMs in {elapsed:.3f} s")

    # ------------------------------------------------------------------------------------------
    K, Q = raw[kiln.name], raw[qemu.name]
    rows = []

    def row(label, key, unit, target=None, tlabel=""):
        ks, qs = summary(K[key]), summary(Q[key])
        ratio = f"{ks[1] / qs[1]:.2f}x" if ks and qs and qs[1] else "n/a"
        rows.append((label, fmt(ks, unit), fmt(qs, unit), ratio,
                     tlabel, verdict(ks, target) if target is not None else ""))

    row("1. spawn -> API socket connect() ok", "conn", "ms", TARGET_API_MS,
        f"<= {TARGET_API_MS:g} ms")
    row("1b. spawn -> first API reply", "reply", "ms")
    row("2. InstanceStart/cont -> 1st serial byte", "start", "ms", TARGET_START_MS,
        f"<= {TARGET_START_MS:g} ms")
    row(f"2b. same, client idle {args.settle:g} s before start", "settled", "ms",
        TARGET_START_MS, f"<= {TARGET_START_MS:g} ms")
    row("3. spawn -> 1st serial byte (API)", "whole", "ms")
    row("4. RSS, booted 128 MiB guest", "rss", "MiB")
    row("4. guest RAM resident (subtracted)", "guest", "MiB")
    row("4. VMM overhead (RSS - guest)", "overhead", "MiB", TARGET_OVERHEAD_MIB,
        f"<= {TARGET_OVERHEAD_MIB:g} MiB")
    row("4. of which anonymous", "anon_overhead", "MiB")
    row("4. of which file-backed", "file", "MiB")
    row("4. overhead by PSS (shared pages split)", "pss_overhead", "MiB")
    for mode, label in (("api", "5. sequential VMs/s, API (QEMU: QMP cont)"),
                        ("file", "5. sequential VMs/s, --config-file --no-api (QEMU: cmdline)")):
        k, q = seq[(mode, kiln.name)], seq[(mode, qemu.name)]
        rows.append((label, f"{k['rate']:.1f} VMs/s", f"{q['rate']:.1f} VMs/s",
                     f"{k['rate'] / q['rate']:.2f}x" if q["rate"] else "n/a", "", ""))
        rows.append(("   per VM, spawn -> exit", fmt(summary(k["lat"]), "ms"),
                     fmt(summary(q["lat"]), "ms"), "", "", ""))

    head = ("measure (min / median / max)", "kiln-vmm", "QEMU microvm", "kiln/QEMU",
            "target (kiln)", "")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    qver = subprocess.run([qemu_bin, "--version"], capture_output=True, text=True).stdout
    print(f"\nkiln-vmm vs QEMU microvm, {stamp}, {platform.node()}, {os.cpu_count()} CPUs "
          f"({cpu}), kernel {platform.release()}")
    print(f"{args.runs} runs per measure (interleaved), {args.seq} VMs per sequential batch, "
          f"1 vCPU, {MEM_MIB} MiB; {qver.splitlines()[0] if qver else 'QEMU ?'}")
    load_after = os.getloadavg()
    print(f"QEMU: -M {qemu.machine} {' '.join(QEMU_BASE)}")
    print(f"harness floor (spawn -> first output byte of `{printf_bin} K`): "
          f"{fmt(summary(floor), 'ms')}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"(other work on the host adds noise to both columns alike)")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, f in failures.items():
        if f:
            print(f"\n{name}: {len(f)} failed runs, first: {f[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": stamp, "host": platform.node(), "runs": args.runs,
                       "raw": raw, "floor": floor, "sequential": {f"{m}/{n}": v for (m, n), v in seq.items()},
                       "failures": failures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
