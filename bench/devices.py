#!/usr/bin/env python3
"""virtio-blk and vsock throughput of kiln-vmm, in MB/s of wall time and MB per host CPU second.

Usage: bench/devices.py [--size MiB] [--runs N] [--req KiB] [--depth D] [--modes cpl0,user]
                        [--kiln PATH] [--json FILE] [-v]

Test guests (crates/test-guests: blk-bench, vsock-bench) move --size MiB through the device:
virtio-blk sequential writes then reads of a file in the work directory (on the local disk),
vsock guest -> host and host -> guest over one stream to this script's Unix sockets. Each
measure runs twice: with the guest's loop in kernel mode (CPL0, as the test guests normally
run: on this host's kvm_pvm that code is emulated one instruction at a time) and in user mode
(ring 3, run natively; see crates/test-guests/guests/usermode.h). The CPU of the kiln-vmm
process (all threads, vCPU included) is read from /proc before and after the transfer.

QEMU is not measured: see bench/README.md ("Device throughput") for why.

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
    """Builds crates/test-guests and copies blk-bench and vsock-bench into the work dir."""
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
    for name in ("blk-bench", "vsock-bench"):
        src = os.path.join(out_dir, "guests", name)
        if not os.path.exists(src):
            die(f"{src} was not built")
        guests[name] = os.path.join(WORK, name)
        shutil.copy2(src, guests[name])
    return guests


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
        if comm.startswith("vcpu"):  # kiln-vmm names its vCPU threads vcpu0, vcpu1, ...
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
    def __init__(self, kiln, config, tag):
        path = os.path.join(WORK, f"{tag}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.err_path = os.path.join(WORK, f"{tag}.stderr")
        err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([kiln, "--config-file", path, "--no-api"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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

def blk_run(kiln, guest, disk, op, size, req, depth, user):
    args = (f"kiln.op={op} kiln.bytes={size} kiln.req={req} kiln.depth={depth} "
            f"kiln.user={1 if user else 0}")
    config = base_config(guest, args)
    config["drives"] = [{"drive_id": "bench", "path_on_host": disk, "is_root_device": False,
                         "is_read_only": False}]
    vm = Vm(kiln, config, "blk")
    try:
        at = vm.wait_for(b"blkbench: start round=0\r\n")
        t0, c0 = time.perf_counter(), cpu_sample(vm.proc.pid)
        at = vm.wait_for(b"blkbench: end", at)
        t1, c1 = time.perf_counter(), cpu_sample(vm.proc.pid)
        line = vm.line_at(vm.wait_for(b"blkbench: round=0 ", at))
        vm.wait_for(b"blkbench: done", at)
        vm.finish()
    finally:
        vm.kill()
    errors = int(field(line, "errors") or -1)
    if errors != 0:
        raise Failed(f"the guest reported errors: {line}")
    if field(line, "cpl") != ("3" if user else "0"):
        raise Failed(f"the guest ran at the wrong privilege level: {line}")
    return dict(wall=t1 - t0, cpu=cpu_delta(c0, c1), guest_s=int(field(line, "us")) / 1e6,
                bytes=int(field(line, "bytes")))


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
    guests = build_guests()
    size = args.size << 20
    req = args.req << 10

    # The disk: real data (not a sparse file), a little larger than what is moved.
    disk = os.path.join(WORK, "disk.img")
    with open(disk, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size + 1):
            f.write(chunk)
    to_guest = pattern_block(seed_to_guest(VSOCK_PORT))
    to_guest_data = (to_guest * (size // PATTERN_PERIOD + 1))[:size]
    to_host_block = pattern_block(seed_to_host(VSOCK_PORT))

    measures = []
    if "blk" in devices:
        measures += [("blk write", "blk", "write"), ("blk read", "blk", "read")]
    if "vsock" in devices:
        measures += [("vsock guest->host", "vsock", "g2h"), ("vsock host->guest", "vsock", "h2g")]
    load_before = os.getloadavg()
    raw = {}
    failures = []
    print(f"measuring: {args.runs} runs of {args.size} MiB per measure and mode ...",
          file=sys.stderr, flush=True)
    for i in range(args.runs):
        for label, dev, what in measures:
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                key = f"{label} [{mode}]"
                try:
                    if dev == "blk":
                        r = blk_run(kiln, guests["blk-bench"], disk, what, size, req,
                                    args.depth, mode == "user")
                    else:
                        r = vsock_run(kiln, guests["vsock-bench"], what, size, mode == "user",
                                      to_guest_data, to_host_block, args.verify)
                except Failed as e:
                    failures.append(f"{key} run {i}: {e}")
                    log(f"{key} failed: {e}")
                    continue
                raw.setdefault(key, []).append(r)
                log(f"{key}: {r['bytes'] / 1e6 / r['wall']:.1f} MB/s, "
                    f"cpu {r['cpu']['run']:.3f} s (w/o vCPU {r['cpu']['vmm']:.3f}, user {r['cpu']['user']:.2f} sys "
                    f"{r['cpu']['sys']:.2f} guest {r['cpu']['guest']:.2f}), "
                    f"guest {r['guest_s']:.3f} s")

    rows = []
    for label, dev, what in measures:
        for mode in modes:
            key = f"{label} [{mode}]"
            runs = raw.get(key, [])
            if not runs:
                rows.append((key, "failed", "", "", "", "", "", "", ""))
                continue
            mb = runs[0]["bytes"] / 1e6
            wall = med([mb / r["wall"] for r in runs])
            per_cpu = med([mb / max(r["cpu"]["run"], 1e-9) for r in runs])
            cpu_s = med([r["cpu"]["run"] for r in runs])
            per_vmm = med([mb / max(r["cpu"]["vmm"], 1e-9) for r in runs])
            vmm_s = med([r["cpu"]["vmm"] for r in runs])
            split = (f"{med([r['cpu']['user'] for r in runs]):.2f}/"
                     f"{med([r['cpu']['sys'] for r in runs]):.2f}/"
                     f"{med([r['cpu']['guest'] for r in runs]):.2f}")
            guest = med([mb / r["guest_s"] for r in runs if r["guest_s"] > 0])
            lo, hi = min(mb / r["wall"] for r in runs), max(mb / r["wall"] for r in runs)
            rng = f"{lo:.0f}-{hi:.0f}" if lo >= 10 else f"{lo:.1f}-{hi:.1f}"
            rows.append((key, f"{wall:.1f}", rng, f"{per_cpu:.1f}", f"{cpu_s:.3f}",
                         f"{per_vmm:.0f}", f"{vmm_s:.3f}", split,
                         f"{guest:.1f}" if guest else "n/a"))
    head = ("measure [guest mode]", "MB/s wall", "(min-max)", "MB/CPU-s", "CPU-s",
            "MB/CPU-s w/o vCPU", "CPU-s w/o vCPU", "user/sys/guest s", "MB/s guest clock")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    load_after = os.getloadavg()
    print(f"\nkiln-vmm device throughput, {stamp}, {platform.node()}, {os.cpu_count()} CPUs "
          f"({cpu}), kernel {platform.release()}")
    print(f"{args.runs} runs x {args.size} MiB per measure (median; MB = 10^6 bytes), 1 vCPU, "
          f"{MEM_MIB} MiB; blk: {args.req} KiB requests, {args.depth} in flight, file in {WORK} "
          f"(page cache not dropped); vsock: one stream, 64 KiB packets")
    print("CPU = run time (schedstat) of all threads of the kiln-vmm process, vCPU included, "
          "from the guest's start marker to its end marker (blk) or from accept() to EOF "
          "(vsock); w/o vCPU = the other threads (device emulation); user/sys/guest = "
          "/proc/PID/stat split (10 ms ticks)")
    print("QEMU: not measured (see bench/README.md, 'Device throughput')")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if failures:
        print(f"\n{len(failures)} failed runs, first: {failures[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": stamp, "host": platform.node(), "runs": args.runs,
                       "size_mib": args.size, "raw": raw, "failures": failures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
