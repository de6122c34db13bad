#!/usr/bin/env python3
"""virtio-blk and vsock throughput of kiln-vmm, in MB/s of wall time and MB per host CPU second,
with QEMU microvm side by side for virtio-blk.

Usage: bench/devices.py [--size MiB] [--runs N] [--req KiB] [--depth D] [--modes cpl0,user]
                        [--only blk,vsock] [--kiln PATH] [--qemu PATH | --no-qemu]
                        [--json FILE] [-v]

Test guests (crates/test-guests: blk-bench, vsock-bench) move --size MiB through the device:
virtio-blk sequential writes then reads of a file in the work directory (on the local disk),
vsock guest -> host and host -> guest over one stream to this script's Unix sockets. Each
measure runs twice: with the guest's loop in kernel mode (CPL0, as the test guests normally
run: on this host's kvm_pvm that code is emulated one instruction at a time) and in user mode
(ring 3, run natively; see crates/test-guests/guests/usermode.h). The CPU of the VMM
process (all threads, vCPU included) is read from /proc before and after the transfer.

QEMU baseline (virtio-blk only): `blk-bench-pvh` is the same guest code with a PVH entry stub
(crates/test-guests/guests/pvh_entry.S), which QEMU's `-kernel` boots; QEMU microvm runs it
with one virtio-blk-device (virtio-mmio version 2: -global virtio-mmio.force-legacy=false) on
the same disk file, same request size, depth, size and guest modes, interleaved with the
kiln-vmm runs. The guest finds the device from the `virtio_mmio.device=` that microvm adds to
the command line with acpi=off. Every write run stamps each request's data with a per-run mark
(kiln.mark=) that the script checks in the file afterwards; every read run must find the last
mark in the guest's buffers. vsock stays kiln-vmm only: QEMU's vsock is vhost-vsock, and these
hosts have no /dev/vhost-vsock.

Python 3 standard library only. Exit status: 0 when the measurements ran, 1 when they could
not run (missing tool, build failure, a VM that does not boot).
"""

import argparse
import atexit
import datetime
import glob
import json
import os
import platform
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

MEM_MIB = 128
GUEST_CID = 3
VSOCK_PORT = 5600
TIMEOUT = 600.0  # seconds for one run (a CPL0 guest checking 64 MiB of vsock data is slow)
# vsock sizes: 64 KiB packets both ways, a 1 MiB receive window in the guest.
VSOCK_ARGS = "kiln.rxbuf=65580 kiln.rxbufs=16 kiln.txpkt=65536 kiln.bufalloc=1048576"
PATTERN_PERIOD = 65521  # VS_PAT_LEN in vsock_drv.h
HZ = os.sysconf("SC_CLK_TCK")

VERBOSE = False
WORK = None  # temporary directory, removed on exit
LIVE = {}    # pid -> Popen of every VMM still running, killed on exit

# QEMU microvm as bench/vmm.py runs it (no option ROMs, RTC, PIT, PIC; ACPI off, which also
# makes microvm put `virtio_mmio.device=` on the command line), an i8042 for the guest's reset
# (with -no-reboot it ends QEMU), and modern virtio-mmio (the guests speak version 2 only).
QEMU_MACHINE = "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off"
QEMU_CPU = ["host"]  # becomes host,-arch-capabilities where KVM refuses MSR 0x10a
QEMU_DRIVE = "format=raw,if=none,id=bench"


def log(msg):
    if VERBOSE:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"bench/devices.py: {msg}", file=sys.stderr)
    sys.exit(1)


class Failed(Exception):
    pass


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
# Set-up: the static kiln-vmm and the two test guests.

def find_kiln(path):
    if path:
        if not os.access(path, os.X_OK):
            die(f"--kiln {path}: not an executable")
        return path
    if not shutil.which("cargo"):
        die("cargo is not on PATH (needed to build kiln-vmm and the test guests)")
    print("building static kiln-vmm (scripts/build-static.sh)", file=sys.stderr, flush=True)
    out = subprocess.run([os.path.join(REPO, "scripts", "build-static.sh"), "kiln-vmm"],
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        die("scripts/build-static.sh kiln-vmm failed")
    binary = os.path.join(out.stdout.strip(), "kiln-vmm")
    if not os.access(binary, os.X_OK):
        die(f"{binary} was not built")
    copy = os.path.join(WORK, "kiln-vmm")  # private copy: a rebuild during the run changes nothing
    shutil.copy2(binary, copy)
    return copy


def build_guests():
    """Builds crates/test-guests and copies blk-bench, blk-bench-pvh and vsock-bench into the
    work dir."""
    print("building the test guests (cargo build -p test-guests)", file=sys.stderr, flush=True)
    out = subprocess.run(["cargo", "build", "-p", "test-guests", "--message-format=json"],
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    out_dir = None
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "build-script-executed" and "test-guests" in msg["package_id"]:
            out_dir = msg["out_dir"]
    if out.returncode != 0 or not out_dir:
        die("cargo build -p test-guests failed")
    guests = {}
    for name in ("blk-bench", "blk-bench-pvh", "vsock-bench"):
        src = os.path.join(out_dir, "guests", name)
        if not os.path.exists(src):
            die(f"{src} was not built")
        guests[name] = os.path.join(WORK, name)
        shutil.copy2(src, guests[name])
    return guests


def find_qemu(path):
    qemu = path or shutil.which("qemu-system-x86_64")
    if not qemu or not os.access(qemu, os.X_OK):
        return None
    return qemu


# ----------------------------------------------------------------------------------------------
# A VMM run: spawn from a config file, watch the serial output, read its CPU time.

def cpu_sample(pid):
    """CPU of process `pid` so far: schedstat run time of all its threads (ns precision) and
    utime / stime / guest_time of /proc/PID/stat (clock ticks), all in seconds."""
    run_ns = vcpu_ns = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{task}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        run_ns += ns
        # kiln-vmm names its vCPU threads vcpu0, vcpu1, ...; QEMU "CPU 0/KVM", ...
        if comm.startswith("vcpu") or (comm.startswith("CPU ") and comm.endswith("/KVM")):
            vcpu_ns += ns
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, guest_time 43.
    utime, stime, gtime = int(fields[11]), int(fields[12]), int(fields[40])
    return dict(run=run_ns / 1e9, vmm=(run_ns - vcpu_ns) / 1e9, user=utime / HZ,
                sys=stime / HZ, guest=gtime / HZ)


def cpu_delta(a, b):
    return {k: b[k] - a[k] for k in a}


class Vm:
    def __init__(self, kiln, config, tag, argv=None):
        """kiln-vmm with `config` as its config file, or `argv` as it is (QEMU)."""
        if argv is None:
            path = os.path.join(WORK, f"{tag}.json")
            with open(path, "w") as f:
                json.dump(config, f)
            argv = [kiln, "--config-file", path, "--no-api"]
        self.err_path = os.path.join(WORK, f"{tag}.stderr")
        err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=err, close_fds=True)
        err.close()
        LIVE[self.proc.pid] = self.proc
        self.out = b""
        self.deadline = time.monotonic() + TIMEOUT

    def read_some(self, timeout):
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not r:
            return False
        data = os.read(fd, 65536)
        if not data:
            raise Failed(f"the VMM ended (status {self.proc.wait()}) without the expected "
                         f"output; serial:\n{self.text()[-2000:]}\nstderr:\n{self.stderr()}")
        self.out += data
        return True

    def wait_for(self, needle, start=0):
        """Waits until `needle` (bytes) is in the output at or after `start`; its offset."""
        while True:
            at = self.out.find(needle, start)
            if at >= 0:
                return at
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"no {needle!r} in time; serial:\n{self.text()[-2000:]}")
            self.read_some(min(left, 1.0))

    def line_at(self, at):
        """The complete line that starts at offset `at` (waits for its end)."""
        end = self.wait_for(b"\n", at)
        return self.out[at:end].decode("latin-1").rstrip("\r")

    def text(self):
        return self.out.decode("latin-1").replace("\r", "")

    def stderr(self):
        try:
            with open(self.err_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def finish(self):
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        if rc != 0:
            raise Failed(f"the VMM ended with status {rc}; stderr:\n{self.stderr()}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        LIVE.pop(self.proc.pid, None)
        self.proc.stdout.close()


def field(line, key):
    for word in line.split():
        if word.startswith(key + "="):
            return word[len(key) + 1:]
    return None


def base_config(guest, args):
    return {"boot-source": {"kernel_image_path": guest,
                            "boot_args": f"console=ttyS0 {args}"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB}}


# ----------------------------------------------------------------------------------------------
# virtio-blk

def qemu_argv(qemu, guest, disk, cmdline):
    # debug-threads=on names the vCPU threads ("CPU 0/KVM"), which cpu_sample() tells apart.
    return [qemu, "-name", "kiln-bench,debug-threads=on",
            "-M", QEMU_MACHINE, "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-accel", "kvm", "-cpu", QEMU_CPU[0], "-smp", "1", "-m", str(MEM_MIB),
            "-serial", "stdio", "-device", "i8042",
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"file={disk},{QEMU_DRIVE}", "-device", "virtio-blk-device,drive=bench",
            "-kernel", guest, "-append", cmdline]


def qemu_refused_msr(vm):
    """True if QEMU aborted because this host's KVM refuses its write of MSR 0x10a."""
    return vm.proc.poll() is not None and "failed to set MSR 0x10a" in vm.stderr()


def mark_check(disk, size, req, mark):
    """How many of the req-sized chunks of disk[0:size] start with the guest's write mark."""
    want = b"blkbench" + mark.to_bytes(8, "little")
    good = 0
    with open(disk, "rb") as f:
        for off in range(0, size - size % req, req):
            f.seek(off)
            good += f.read(16) == want
    return good, size // req


def blk_run(vmm, guest, disk, op, size, req, depth, user, mark):
    """One blk-bench run in `vmm` ("kiln", path) or ("qemu", path). `mark`: nonzero, the
    guest's kiln.mark=; a write must leave it in every chunk of the file, a read must find it
    (the last write's) in the guest's buffers."""
    args = (f"kiln.op={op} kiln.bytes={size} kiln.req={req} kiln.depth={depth} "
            f"kiln.user={1 if user else 0} kiln.mark={mark}")
    kind, binary = vmm
    if kind == "kiln":
        config = base_config(guest, args)
        config["drives"] = [{"drive_id": "bench", "path_on_host": disk,
                             "is_root_device": False, "is_read_only": False}]
        vm = Vm(binary, config, "blk")
    else:
        vm = Vm(None, None, "qemu-blk",
                argv=qemu_argv(binary, guest, disk, f"console=ttyS0 {args}"))
    try:
        if kind == "qemu" and QEMU_CPU[0] == "host":
            try:
                vm.wait_for(b"blkbench: ready")
            except Failed:
                if not qemu_refused_msr(vm):
                    raise
                vm.kill()
                # Some hosts' KVM lists IA32_ARCH_CAPABILITIES for -cpu host but refuses
                # QEMU's write of it (QEMU aborts); bench/vmm.py does the same.
                QEMU_CPU[0] = "host,-arch-capabilities"
                print("QEMU: this host's KVM refuses MSR 0x10a for -cpu host; using "
                      "-cpu host,-arch-capabilities", file=sys.stderr, flush=True)
                vm = Vm(None, None, "qemu-blk",
                        argv=qemu_argv(binary, guest, disk, f"console=ttyS0 {args}"))
        ready = vm.line_at(vm.wait_for(b"blkbench: ready "))
        at = vm.wait_for(b"blkbench: start round=0\r\n")
        t0, c0 = time.perf_counter(), cpu_sample(vm.proc.pid)
        at = vm.wait_for(b"blkbench: end", at)
        t1, c1 = time.perf_counter(), cpu_sample(vm.proc.pid)
        line = vm.line_at(vm.wait_for(b"blkbench: round=0 op=", at))
        mark_line = vm.line_at(vm.wait_for(b"blkbench: round=0 mark=", at))
        vm.wait_for(b"blkbench: done", at)
        vm.finish()
    finally:
        vm.kill()
    errors = int(field(line, "errors") or -1)
    if errors != 0:
        raise Failed(f"the guest reported errors: {line}")
    if field(line, "cpl") != ("3" if user else "0"):
        raise Failed(f"the guest ran at the wrong privilege level: {line}")
    moved = int(field(line, "bytes"))
    if moved != size - size % req:
        raise Failed(f"the guest moved {moved} bytes, not {size - size % req}: {line}")
    if op == "write":
        good, chunks = mark_check(disk, size, req, mark)
        if good != chunks:
            raise Failed(f"only {good} of {chunks} chunks of the file carry the write's mark")
    else:
        want = min(depth, size // req)
        if field(mark_line, "marked") != str(want):
            raise Failed(f"the guest's buffers do not hold the written mark: {mark_line}")
    return dict(wall=t1 - t0, cpu=cpu_delta(c0, c1), guest_s=int(field(line, "us")) / 1e6,
                bytes=moved, features=field(ready, "features"))


# ----------------------------------------------------------------------------------------------
# vsock

def pattern_block(seed):
    """VS_PAT_LEN bytes of the guest's xorshift32 pattern (vs_pattern_fill)."""
    x = seed or 1
    out = bytearray()
    while len(out) < PATTERN_PERIOD:
        x ^= (x << 13) & 0xffffffff
        x ^= x >> 17
        x ^= (x << 5) & 0xffffffff
        out += x.to_bytes(4, "little")
    return bytes(out[:PATTERN_PERIOD])


def seed_to_host(port):
    return ((port * 2654435761) & 0xffffffff) ^ 0x746f6873


def seed_to_guest(port):
    return ((port * 2654435761) & 0xffffffff) ^ 0x67756573


def vsock_run(kiln, guest, direction, size, user, to_guest_data, to_host_block, verify):
    uds = os.path.join(WORK, "v.sock")
    listen_path = f"{uds}_{VSOCK_PORT}"
    for p in (uds, listen_path):
        if os.path.exists(p):
            os.unlink(p)
    what = f"kiln.send={size}" if direction == "g2h" else f"kiln.recv={size}"
    args = (f"kiln.mode=connect kiln.port={VSOCK_PORT} {what} {VSOCK_ARGS} "
            f"kiln.timeout={int(TIMEOUT)} kiln.user={1 if user else 0}")
    config = base_config(guest, args)
    config["vsock"] = {"guest_cid": GUEST_CID, "uds_path": uds}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(1)
    vm = Vm(kiln, config, "vsock")
    conn = None
    try:
        listener.settimeout(60)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise Failed(f"the guest did not connect; serial:\n{vm.text()[-2000:]}")
        t0, c0 = time.perf_counter(), cpu_sample(vm.proc.pid)
        conn.settimeout(TIMEOUT)
        received = 0
        bad = 0
        if direction == "h2g":
            conn.sendall(to_guest_data)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        doubled = to_host_block * 2
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            if direction == "g2h":
                # Check against the pattern, a block period at a time: everything with
                # --verify, else the first 256 bytes of each read (a full check costs this
                # process about as much CPU as the transfer takes wall time).
                done = 0
                while done < n:
                    off = (received + done) % PATTERN_PERIOD
                    k = min(n - done, PATTERN_PERIOD)
                    if not verify:
                        k = min(k, 256)
                    if view[done:done + k] != doubled[off:off + k]:
                        bad += 1
                    if not verify:
                        break
                    done += k
            received += n
        t1, c1 = time.perf_counter(), cpu_sample(vm.proc.pid)
        conn.close()
        conn = None
        at = vm.wait_for(b"vsock: conn ")
        line = vm.line_at(at)
        vm.wait_for(b"vsock: done", at)
        vm.finish()
    finally:
        if conn:
            conn.close()
        listener.close()
        vm.kill()
    if direction == "g2h" and (received != size or bad):
        raise Failed(f"host received {received} of {size} bytes, {bad} blocks differ")
    if direction == "h2g" and (field(line, "received") != str(size)
                               or field(line, "mismatches") != "0"):
        raise Failed(f"the guest did not receive the data intact: {line}")
    guest_ms = int(field(line, "ms") or 0)
    return dict(wall=t1 - t0, cpu=cpu_delta(c0, c1), guest_s=guest_ms / 1e3, bytes=size)


# ----------------------------------------------------------------------------------------------
# Report.

def med(values):
    return statistics.median(values) if values else None


def main():
    global VERBOSE, WORK
    ap = argparse.ArgumentParser(description="virtio-blk and vsock throughput of kiln-vmm")
    ap.add_argument("--size", type=int, default=64,
                    help="MiB moved per run and measure (64)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measure and mode (3)")
    ap.add_argument("--req", type=int, default=128, help="virtio-blk request size in KiB (128)")
    ap.add_argument("--depth", type=int, default=8,
                    help="virtio-blk requests in flight (8, at most 16)")
    ap.add_argument("--modes", default="cpl0,user",
                    help="guest modes to measure: cpl0, user or both (cpl0,user)")
    ap.add_argument("--only", default="blk,vsock", help="devices: blk, vsock or both")
    ap.add_argument("--verify", action="store_true",
                    help="check every byte the guest sends over vsock (default: a sample)")
    ap.add_argument("--kiln", help="kiln-vmm binary (default: scripts/build-static.sh's)")
    ap.add_argument("--qemu", help="qemu-system-x86_64 binary for the virtio-blk baseline "
                    "(default: from PATH)")
    ap.add_argument("--no-qemu", action="store_true", help="measure kiln-vmm only")
    ap.add_argument("--qemu-drive", default="",
                    help="extra -drive options for QEMU, e.g. aio=io_uring (default: QEMU's "
                         "own: cache=writeback, aio=threads)")
    ap.add_argument("--json", help="also write the raw figures to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose
    modes = [m for m in args.modes.split(",") if m]
    devices = [d for d in args.only.split(",") if d]
    if args.runs < 1 or args.size < 1 or not set(modes) <= {"cpl0", "user"} \
            or not set(devices) <= {"blk", "vsock"}:
        die("bad arguments (see --help)")

    atexit.register(cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is not accessible")
    WORK = tempfile.mkdtemp(prefix="kiln-devbench-", dir="/tmp")  # short socket paths
    kiln = find_kiln(args.kiln)
    qemu = None
    if "blk" in devices and not args.no_qemu:
        qemu = find_qemu(args.qemu)
        if not qemu:
            print("QEMU: qemu-system-x86_64 not found (Debian: apt-get install "
                  "qemu-system-x86, or --qemu PATH): measuring kiln-vmm only",
                  file=sys.stderr, flush=True)
    global QEMU_DRIVE
    if args.qemu_drive:
        QEMU_DRIVE += "," + args.qemu_drive
    guests = build_guests()
    size = args.size << 20
    req = args.req << 10

    # The disk: real data (not a sparse file), a little larger than what is moved, with a first
    # mark at the start of every request-sized chunk for the read runs to find until a write
    # run leaves its own.
    disk = os.path.join(WORK, "disk.img")
    with open(disk, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size + 1):
            f.write(chunk)
    disk_mark = new_mark()
    stamp_marks(disk, size, req, disk_mark)
    to_guest = pattern_block(seed_to_guest(VSOCK_PORT))
    to_guest_data = (to_guest * (size // PATTERN_PERIOD + 1))[:size]
    to_host_block = pattern_block(seed_to_host(VSOCK_PORT))

    measures = []
    if "blk" in devices:
        measures += [("blk write", "blk", "write"), ("blk read", "blk", "read")]
    if "vsock" in devices:
        measures += [("vsock guest->host", "vsock", "g2h"), ("vsock host->guest", "vsock", "h2g")]
    vmms = [("kiln-vmm", ("kiln", kiln))]
    if qemu:
        vmms.append(("QEMU", ("qemu", qemu)))
    load_before = os.getloadavg()
    raw = {}
    failures = []
    print(f"measuring: {args.runs} runs of {args.size} MiB per measure and mode "
          f"({' and '.join(name for name, _ in vmms)}, interleaved) ...",
          file=sys.stderr, flush=True)
    turn = 0
    for i in range(args.runs):
        for label, dev, what in measures:
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                # Both VMMs back to back for each measure and mode, alternating which goes
                # first; vsock is kiln-vmm only.
                order = vmms if dev == "blk" else vmms[:1]
                if turn % 2:
                    order = order[::-1]
                turn += 1
                for name, vmm in order:
                    key = f"{label} [{mode}] {name}"
                    mark = new_mark() if what == "write" else disk_mark
                    try:
                        if dev == "blk":
                            guest = guests["blk-bench" if vmm[0] == "kiln" else "blk-bench-pvh"]
                            r = blk_run(vmm, guest, disk, what, size, req, args.depth,
                                        mode == "user", mark)
                            if what == "write":
                                disk_mark = mark
                        else:
                            r = vsock_run(kiln, guests["vsock-bench"], what, size,
                                          mode == "user", to_guest_data, to_host_block,
                                          args.verify)
                    except Failed as e:
                        failures.append(f"{key} run {i}: {e}")
                        log(f"{key} failed: {e}")
                        if dev == "blk" and what == "write":
                            stamp_marks(disk, size, req, disk_mark)  # a known state again
                        continue
                    run_one(raw, key, r)
    report(args, modes, measures, vmms, raw, failures, load_before)
    return 0


def new_mark():
    """A nonzero per-run value for the guest's kiln.mark= (below 2^63, printed in decimal)."""
    return int.from_bytes(os.urandom(8), "little") >> 1 | 1


def stamp_marks(disk, size, req, mark):
    """Writes blk-bench's mark at the start of every req-sized chunk of disk[0:size]."""
    head = b"blkbench" + mark.to_bytes(8, "little")
    with open(disk, "r+b") as f:
        for off in range(0, size - size % req, req):
            f.seek(off)
            f.write(head)


def run_one(raw, key, r):
    raw.setdefault(key, []).append(r)
    log(f"{key}: {r['bytes'] / 1e6 / r['wall']:.1f} MB/s, "
        f"cpu {r['cpu']['run']:.3f} s (w/o vCPU {r['cpu']['vmm']:.3f}, user "
        f"{r['cpu']['user']:.2f} sys {r['cpu']['sys']:.2f} guest {r['cpu']['guest']:.2f}), "
        f"guest {r['guest_s']:.3f} s")


def summary(runs):
    """Medians of one measure's runs, as formatted cells; None if there are none."""
    if not runs:
        return None
    mb = runs[0]["bytes"] / 1e6
    lo, hi = min(mb / r["wall"] for r in runs), max(mb / r["wall"] for r in runs)
    guest = med([mb / r["guest_s"] for r in runs if r["guest_s"] > 0])
    return dict(
        wall=f"{med([mb / r['wall'] for r in runs]):.1f}",
        range=f"{lo:.0f}-{hi:.0f}" if lo >= 10 else f"{lo:.1f}-{hi:.1f}",
        per_cpu=f"{med([mb / max(r['cpu']['run'], 1e-9) for r in runs]):.1f}",
        cpu_s=f"{med([r['cpu']['run'] for r in runs]):.3f}",
        per_vmm=f"{med([mb / max(r['cpu']['vmm'], 1e-9) for r in runs]):.0f}",
        vmm_s=f"{med([r['cpu']['vmm'] for r in runs]):.3f}",
        split=(f"{med([r['cpu']['user'] for r in runs]):.2f}/"
               f"{med([r['cpu']['sys'] for r in runs]):.2f}/"
               f"{med([r['cpu']['guest'] for r in runs]):.2f}"),
        guest=f"{guest:.1f}" if guest else "n/a")


def table(head, rows):
    widths = [max(len(r[i]) for r in rows + head) for i in range(len(head[0]))]
    for h in head:
        print("  ".join(c.ljust(w) for c, w in zip(h, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def report(args, modes, measures, vmms, raw, failures, load_before):
    names = [name for name, _ in vmms]
    stats = {}
    for label, dev, _ in measures:
        for mode in modes:
            for name in names:
                key = f"{label} [{mode}] {name}"
                stats[key] = summary(raw.get(key, []))

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    load_after = os.getloadavg()
    print(f"\n{' vs '.join(names)} device throughput, {stamp}, {platform.node()}, "
          f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}")
    print(f"{args.runs} runs x {args.size} MiB per measure (median; MB = 10^6 bytes), 1 vCPU, "
          f"{MEM_MIB} MiB; blk: {args.req} KiB requests, {args.depth} in flight, file in {WORK} "
          f"(page cache not dropped); vsock: one stream, 64 KiB packets")
    print("CPU = run time (schedstat) of all threads of the VMM process, vCPU included, from "
          "the guest's start marker to its end marker (blk) or from accept() to EOF (vsock); "
          "w/o vCPU = the other threads (device emulation: kiln-vmm's event loop; QEMU's main "
          "loop, I/O worker threads and the rest); user/sys/guest = /proc/PID/stat split "
          "(10 ms ticks)")
    if "QEMU" in names:
        qver = subprocess.run([vmms[1][1][1], "--version"], capture_output=True,
                              text=True).stdout.splitlines()
        print(f"QEMU ({qver[0] if qver else '?'}), guest blk-bench-pvh (PVH entry), runs "
              f"interleaved with kiln-vmm's: "
              + " ".join(qemu_argv("qemu-system-x86_64", "GUEST", "DISK", "...")[1:-2]))
        feats = {}
        for key, runs in raw.items():
            for r in runs:
                if r.get("features"):
                    feats.setdefault(key.rsplit(" ", 1)[1], r["features"])
        print("blk data checked: every write run's mark in all chunks of the file, every read "
              "run's buffers hold the last mark; virtio features the guest accepted: "
              + ", ".join(f"{n} {f}" for n, f in feats.items())
              + " (bit 9 = FLUSH: QEMU then caches writes instead of writing through; kiln-vmm's "
              "default cache type neither offers it nor syncs)")
    else:
        print("QEMU: not measured (--no-qemu, or qemu-system-x86_64 not found)")
    if any(dev == "vsock" for _, dev, _ in measures):
        print("vsock: kiln-vmm only (QEMU's vsock is vhost-vsock; this host has no "
              "/dev/vhost-vsock)" if not os.path.exists("/dev/vhost-vsock") else
              "vsock: kiln-vmm only (QEMU's vhost-vsock is not wired into this bench)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")

    # Side by side: one row per measure and guest mode, a column per VMM for each figure.
    print()
    groups = ("MB/s wall", "MB/CPU-s", "MB/CPU-s w/o vCPU", "CPU-s w/o vCPU")
    cells = ("wall", "per_cpu", "per_vmm", "vmm_s")
    head = [["", *[g if j == 0 else "" for g in groups for j in range(len(names))]],
            ["measure [guest mode]", *[n for _ in groups for n in names]]]
    rows = []
    for label, dev, _ in measures:
        for mode in modes:
            row = [f"{label} [{mode}]"]
            for cell in cells:
                for name in names:
                    st = stats[f"{label} [{mode}] {name}"]
                    if st is None:
                        row.append("n/a" if dev == "vsock" and name != "kiln-vmm"
                                   else "failed")
                    else:
                        row.append(st[cell])
            rows.append(row)
    table(head, rows)

    # Details, a row per VMM.
    print()
    head = [["measure [guest mode] VMM", "MB/s wall", "(min-max)", "MB/CPU-s", "CPU-s",
             "MB/CPU-s w/o vCPU", "CPU-s w/o vCPU", "user/sys/guest s", "MB/s guest clock"]]
    rows = []
    for label, dev, _ in measures:
        for mode in modes:
            for name in names:
                if dev == "vsock" and name != "kiln-vmm":
                    continue
                key = f"{label} [{mode}] {name}"
                st = stats[key]
                if st is None:
                    rows.append([key, "failed", "", "", "", "", "", "", ""])
                    continue
                rows.append([key, st["wall"], st["range"], st["per_cpu"], st["cpu_s"],
                             st["per_vmm"], st["vmm_s"], st["split"], st["guest"]])
    table(head, rows)
    if failures:
        print(f"\n{len(failures)} failed runs, first: {failures[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": stamp, "host": platform.node(), "runs": args.runs,
                       "size_mib": args.size, "vmms": names, "raw": raw,
                       "failures": failures}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
