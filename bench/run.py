#!/usr/bin/env python3
"""kiln run --rm IMAGE true vs a bare QEMU boot of the same guest, measured side by side.

Usage: bench/run.py [--runs N] [--kiln PATH] [--image REF] [--no-busybox] [--no-breakdown]
                    [--json FILE] [--keep] [-v]

Times, interleaved and alternating who goes first:

  kiln       `kiln run --rm IMAGE true`, spawn -> exit: the CLI, the state database, the VM
             disk, the supervisor, QEMU booting Debian's cloud kernel with kiln's initramfs,
             kiln-init, Configure, the process, its exit code back, power-off, VM removal.
  baseline   the bare boot of the same guest: the exact qemu-system-x86_64 command line kiln
             used (captured from /proc during the warm-up run: same kernel, same kiln-init
             initramfs, same -append, devices, memory, vCPUs), on a fresh copy of the same VM
             disk, run straight from this script. It ends when the guest is up: the script
             connects to the agent's console port, as kiln's supervisor does, reads kiln-init's
             Hello (root disk mounted, switch_root done, /dev /run /tmp and lo set up,
             transport open) and sends Shutdown at once; kiln-init syncs, remounts / read-only
             and resets the VM, which ends QEMU. Timed spawn -> QEMU exit.
  busybox    (reference) a Debian-style bare boot to init: the same command line with the
             busybox-script initramfs kiln's kernel store generates for the same kernel (same
             modules: insmod, wait for the root disk, mount it, switch_root) and
             `kiln.init=/sbin/reboot -- -f`, so the image's busybox powers the VM off as soon
             as it runs as PID 1. Timed spawn -> QEMU exit.

Then, once (unless --no-breakdown), where kiln's time goes: a few extra `kiln run --rm` under
`strace -f --seccomp-bpf` (timestamps of execve, connect, exits and the frames on the agent
socket: Hello, Configure, Configured, Exec, Started, Exited, Shutdown), not in the table.

Python 3 standard library only. Exit status: 0 when the measurements ran (target met or not),
1 when they could not run (no QEMU, no kernel, build failure, a boot that failed).
"""

import argparse
import atexit
import codecs
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import kilnbuild

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)

# Target (medians), from the issue; reported as PASS/MISS, a miss does not fail the script.
TARGET_RATIO = 1.15          # kiln run --rm IMAGE true  /  bare boot of the same guest

DEFAULT_IMAGE = "kiln/default"
BOOT_TIMEOUT = 180.0         # one boot, TCG on a loaded 2-core host included

# The agent protocol (crates/agent-protocol): a frame is a u32 LE length + a postcard payload;
# an enum is its variant index as a varint. HostMessage::Shutdown is variant 10, no fields.
SHUTDOWN_FRAME = b"\x01\x00\x00\x00\x0a"
GUEST_VARIANTS = ["Hello", "Pong", "Configured", "Started", "Failed", "Output", "StdinAck",
                  "Exited", "Error"]
HOST_VARIANTS = ["Ping", "Configure", "Exec", "Stdin", "CloseStdin", "Ack", "Resize", "Signal",
                 "CopyOut", "CopyIn", "Shutdown"]

VERBOSE = False
WORK = None        # temporary directory, removed on exit (unless --keep)
KEEP = False
LIVE = {}          # pid -> Popen still running (QEMU, kiln), killed on exit


def log(msg):
    if VERBOSE:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def die(msg):
    print(f"bench/run.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# ----------------------------------------------------------------------------------------------
# Clean-up: every QEMU and kiln this script started is killed and the work directory (kiln
# root, disks, sockets, logs) removed on any exit, Ctrl-C and SIGTERM included.

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
        # A `kiln run` killed half-way leaves its supervisor (a session of its own) and QEMU
        # running: they are ours if their command line names this run's private directory.
        for pid in pids_mentioning(WORK):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if KEEP:
            say(f"work directory kept: {WORK}")
        else:
            shutil.rmtree(WORK, ignore_errors=True)


def pids_mentioning(text):
    """Processes (not this one) whose command line contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def on_signal(signum, _frame):
    cleanup()
    os._exit(128 + signum)


def spawn(cmd, **kw):
    proc = subprocess.Popen(cmd, **kw)
    LIVE[proc.pid] = proc
    return proc


def reap(proc, timeout):
    """Waits for proc in a blocking waitpid (Popen.wait with a timeout polls with sleeps of up
    to 50 ms, which would add up to 50 ms to a timed run), killing it after timeout seconds.
    Returns its exit status, or None if it had to be killed."""
    killed = []

    def kill():
        killed.append(True)
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    rc = proc.wait()
    timer.cancel()
    LIVE.pop(proc.pid, None)
    return None if killed else rc


# ----------------------------------------------------------------------------------------------
# Set-up: QEMU, the kiln binary, the kernel, the image.

def find_qemu():
    env = os.environ.get("KILN_QEMU")
    if env:
        if not os.access(env, os.X_OK):
            die(f"KILN_QEMU={env} is not an executable")
        return env
    path = shutil.which("qemu-system-x86_64")
    if not path:
        die("qemu-system-x86_64 not found: install the Debian package qemu-system-x86 "
            "(apt-get install qemu-system-x86), or set KILN_QEMU to its path")
    return path


def find_kiln(path):
    binary = kilnbuild.release_kiln(REPO, path, say, die)
    # A private copy: a rebuild during the run cannot swap the binary between measurements
    # (the supervisor runs as `current_exe() __supervise`, i.e. this copy too).
    copy = os.path.join(WORK, "kiln")
    shutil.copy2(binary, copy)
    return copy


def kiln_env(root):
    env = dict(os.environ, KILN_ROOT=root)
    env.pop("RUST_LOG", None)
    return env


def run_ok(cmd, env, what, timeout=600):
    log(" ".join(cmd))
    try:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"{what}: `{' '.join(cmd)}` did not finish within {timeout} s")
    if out.returncode != 0:
        die(f"{what}: `{' '.join(cmd)}` failed ({out.returncode}):\n"
            f"{out.stderr.decode(errors='replace')[-3000:]}")
    return out.stdout.decode(errors="replace")


def kernel_info(kiln, env):
    """Imports the installed Debian cloud kernel into the private root; dies clearly if none."""
    out = subprocess.run([kiln, "kernel", "ensure-default"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    if out.returncode != 0:
        die("no guest kernel: `kiln kernel ensure-default` failed:\n  "
            + out.stderr.decode(errors="replace").strip().replace("\n", "\n  ")
            + "\n  install Debian's linux-image-cloud-amd64 (apt-get install "
              "linux-image-cloud-amd64), or import a kernel with `kiln kernel import`")
    info = json.loads(run_ok([kiln, "kernel", "inspect", "default"], env, "kernel"))
    for key in ("kernel_path",):
        if not info.get(key) or not os.path.isfile(info[key]):
            die(f"kernel: `kiln kernel inspect default` has no usable {key}: {info.get(key)}")
    return info


# ----------------------------------------------------------------------------------------------
# The QEMU command line kiln uses, captured from /proc while the warm-up VM boots.

def find_qemu_of(root):
    """(pid, argv) of a running qemu-system-x86_64 whose command line mentions root."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if b"qemu-system" not in raw or root.encode() not in raw:
            continue
        argv = [a.decode() for a in raw.rstrip(b"\0").split(b"\0")]
        if os.path.basename(argv[0]).startswith("qemu-system"):
            return int(entry), argv
    return None


def option(argv, name):
    """Index of the value of the last `name` option in argv."""
    idx = [i for i, a in enumerate(argv[:-1]) if a == name]
    return idx[-1] + 1 if idx else None


def warm_up(kiln, env, image, root):
    """One untimed `kiln run --rm IMAGE true` (imports, initramfs, image disk get cached);
    returns the QEMU argv it used and the size of its VM disk."""
    errlog = os.path.join(WORK, "kiln-warm-up.err")
    with open(errlog, "wb") as errf:
        proc = spawn([kiln, "run", "--rm", image, "true"], env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=errf)
    argv, disk_size = None, None
    deadline = time.monotonic() + BOOT_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if argv is None:
            found = find_qemu_of(root)
            if found:
                argv = found[1]
                i = option(argv, "-drive")
                disk = next((kv.split("=", 1)[1] for kv in argv[i].split(",")
                             if kv.startswith("file=")), None) if i else None
                try:
                    disk_size = os.path.getsize(disk)
                except (OSError, TypeError):
                    pass
        time.sleep(0.001 if argv is None else 0.05)
    rc = reap(proc, max(1.0, deadline - time.monotonic()))
    err = console_tail(errlog)
    if rc != 0:
        die(f"warm-up `kiln run --rm {image} true` failed ({rc}):\n{err[-3000:]}")
    return argv, disk_size, err


def baseline_argv(argv, disk, sock, initrd=None, extra_append=None):
    """kiln's argv with this script's disk and agent socket (and optionally initrd, cmdline)."""
    argv = list(argv)
    i = option(argv, "-drive")
    argv[i] = ",".join(f"file={disk}" if kv.startswith("file=") else kv
                       for kv in argv[i].split(","))
    i = option(argv, "-chardev")
    argv[i] = ",".join(f"path={sock}" if kv.startswith("path=") else kv
                       for kv in argv[i].split(","))
    if initrd:
        argv[option(argv, "-initrd")] = initrd
    if extra_append:
        argv[option(argv, "-append")] += " " + extra_append
    return argv


def check_argv(argv, root, kernel):
    if argv is None:
        die("could not see kiln's qemu-system-x86_64 process during the warm-up run "
            "(is kiln using the qemu backend? this benchmark measures that one)")
    for name in ("-kernel", "-initrd", "-append", "-drive", "-chardev"):
        if option(argv, name) is None:
            die(f"kiln's QEMU command line has no {name}: {' '.join(argv)}")
    if argv[option(argv, "-kernel")] != kernel:
        die(f"kiln booted {argv[option(argv, '-kernel')]}, not the default kernel {kernel}")
    initrd = argv[option(argv, "-initrd")]
    if not initrd.startswith(os.path.join(root, "initramfs")):
        die(f"kiln's initramfs {initrd} is not the generated kiln-init one")
    if "kiln.debug" in argv[option(argv, "-append")]:
        die("kiln's kernel command line has kiln.debug: not a representative boot")
    netdev = option(argv, "-netdev")
    if netdev is not None and not argv[netdev].startswith("user,"):
        die(f"kiln's VM used -netdev {argv[netdev]}: the bare boot can only replay user-mode "
            "networking (a tap belongs to kiln's VM and is gone after it)")


# ----------------------------------------------------------------------------------------------
# Measurements.

def settle():
    """Flushes dirty pages left by the previous step (untimed), so that one side's writeback
    is not charged to the other."""
    os.sync()


def fresh_disk(kiln, env, image, path, size):
    """A VM disk made the way kiln makes one for a VM (copy of the cached image disk, grown)."""
    if os.path.exists(path):
        os.remove(path)
    run_ok([kiln, "image", "disk", "-q", image, "--vm-disk", path, "--size", str(size)],
           env, "baseline disk")


def time_kiln(kiln, env, image, root):
    errlog = os.path.join(WORK, "kiln-run.err")
    settle()
    with open(errlog, "wb") as err:
        t0 = time.perf_counter()
        proc = spawn([kiln, "run", "--rm", image, "true"], env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=err)
        rc = reap(proc, BOOT_TIMEOUT)
    t = time.perf_counter() - t0
    if rc != 0:
        die(f"`kiln run --rm {image} true` failed ({rc}):\n{console_tail(errlog)}")
    vms = os.path.join(root, "vms")
    left = os.listdir(vms) if os.path.isdir(vms) else []
    if left:
        die(f"`kiln run --rm` left VM directories behind: {left}")
    return {"total": t}


def read_frame(sock, buf, deadline, proc):
    """Reads one agent frame (payload bytes); (payload, rest of buf)."""
    while True:
        if len(buf) >= 4:
            n = int.from_bytes(buf[:4], "little")
            if len(buf) >= 4 + n:
                return buf[4:4 + n], buf[4 + n:]
        if time.monotonic() > deadline:
            return None, buf
        if proc.poll() is not None:
            return None, buf
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return None, buf
        buf += chunk


def varint(data, i):
    value, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def parse_hello(payload):
    """GuestMessage::Hello {version: u32, agent: String, boot_ms: u64} in postcard."""
    variant, i = varint(payload, 0)
    if variant != 0:
        return None
    version, i = varint(payload, i)
    n, i = varint(payload, i)
    agent = payload[i:i + n].decode(errors="replace")
    boot_ms, i = varint(payload, i + n)
    return {"version": version, "agent": agent, "boot_ms": boot_ms}


def console_tail(path):
    try:
        with open(path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")
    except OSError:
        return ""


def time_bare(argv, sock_path, logdir):
    """The bare boot: spawn -> Hello read from the agent port -> Shutdown -> QEMU exit."""
    console = os.path.join(logdir, "console.log")
    settle()
    with open(console, "wb") as out, open(os.path.join(logdir, "qemu.log"), "wb") as errf:
        t0 = time.perf_counter()
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=out, stderr=errf)
    deadline = time.monotonic() + BOOT_TIMEOUT
    # Connect as kiln's supervisor does (it retries every 10 ms; QEMU listens long before the
    # guest opens the port, so the retry period does not matter).
    sock = None
    while sock is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            die(f"bare boot: QEMU exited ({proc.returncode}) before its agent socket accepted; "
                f"console:\n{console_tail(console)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock_path)
            sock = s
        except OSError:
            s.close()
            time.sleep(0.002)
    t_conn = time.perf_counter() - t0
    sock.settimeout(0.05)
    payload, _ = read_frame(sock, b"", deadline, proc)
    t_hello = time.perf_counter() - t0
    hello = parse_hello(payload) if payload else None
    if hello is None:
        die(f"bare boot: no Hello from kiln-init (QEMU {proc.poll()}); console:\n"
            f"{console_tail(console)}")
    sock.sendall(SHUTDOWN_FRAME)
    rc = reap(proc, max(1.0, deadline - time.monotonic()))
    t = time.perf_counter() - t0
    sock.close()
    if rc != 0:
        die(f"bare boot: QEMU ended with {rc} after Shutdown; console:\n{console_tail(console)}")
    return {"total": t, "connect": t_conn, "hello": t_hello, "shutdown": t - t_hello,
            "guest_boot_ms": hello["boot_ms"], "agent": hello["agent"]}


def time_busybox(argv, logdir):
    console = os.path.join(logdir, "console-busybox.log")
    settle()
    with open(console, "wb") as out, open(os.path.join(logdir, "qemu-busybox.log"), "wb") as errf:
        t0 = time.perf_counter()
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=out, stderr=errf)
        rc = reap(proc, BOOT_TIMEOUT)
    t = time.perf_counter() - t0
    text = console_tail(console)
    if rc != 0 or "FATAL" in text:
        return None, f"QEMU ended with {rc}; console:\n{text}"
    return {"total": t}, None


# ----------------------------------------------------------------------------------------------
# Where kiln's time goes: `kiln run --rm` under strace -f, then the timestamps of the events
# that mark each phase (syscalls of the CLI, the supervisor and QEMU).

STRACE_SYSCALLS = "execve,connect,recvfrom,sendto,exit_group"


def parse_strace(path):
    """strace -f -ttt -T lines as (pid, t, syscall, args, result), t being when the call
    returned (entry + its duration): for a read that blocked, when the data arrived."""
    events, pending = [], {}
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 2)
            if len(parts) < 3 or not parts[0].isdigit():
                continue
            pid, t, rest = int(parts[0]), float(parts[1]), parts[2]
            if rest.startswith("+++ exited") or rest.startswith("+++ killed"):
                events.append((pid, t, "exited", rest, ""))
                continue
            if rest.startswith("---") or rest.startswith("+++"):
                continue
            if rest.startswith("<... "):
                name = rest[5:].split(" ", 1)[0]
                head = pending.pop((pid, name), None)
                if head is None:
                    continue
                t, rest = head[0], head[1] + rest.split("resumed>", 1)[1]
            elif rest.endswith("<unfinished ...>"):
                pending[(pid, rest.split("(", 1)[0])] = (t, rest[: -len("<unfinished ...>")])
                continue
            dur = re.search(r" <(\d+\.\d+)>$", rest)
            if dur:
                t += float(dur.group(1))
                rest = rest[: dur.start()]
            name = rest.split("(", 1)[0]
            args, _, result = rest.rpartition(" = ")
            events.append((pid, t, name, args, result.strip()))
    return events


def first_string(args):
    """The bytes of the first quoted string argument in strace's notation."""
    i = args.find('"')
    if i < 0:
        return None
    j = i + 1
    while j < len(args) and args[j] != '"':
        j += 2 if args[j] == "\\" else 1
    return codecs.escape_decode(args[i + 1:j].encode("latin-1"))[0]


def sock_inode(args):
    m = re.search(r"UNIX-STREAM:\[(\d+)", args)
    return m.group(1) if m else None


def phases(events):
    """Phase durations of one strace'd `kiln run` (seconds), or None if a mark is missing."""
    ev = sorted(events, key=lambda e: e[1])
    if not ev:
        return None
    t_start, cli = ev[0][1], ev[0][0]
    sup = qemu = None
    m = {}
    agent_ino = None
    header = {}        # pid -> time a 4-byte frame header was read on the agent socket
    for pid, t, name, args, res in ev:
        if name == "execve" and res.startswith("0"):
            if "__supervise" in args and sup is None:
                sup, m["supervisor exec"] = pid, t
            elif "qemu-system" in args and qemu is None:
                qemu, m["qemu exec"] = pid, t
            elif "resize2fs" in args and "resize2fs" not in m:
                m["resize2fs"], resize_pid = t, pid
        elif name == "exited":
            if pid == qemu:
                m.setdefault("qemu exit", t)
            elif "resize2fs" in m and pid == resize_pid:
                m.setdefault("resize2fs exit", t)
            elif pid == cli:
                m["cli exit"] = t
        elif name == "exit_group" and pid == qemu:
            m.setdefault("qemu exit", t)
        elif name == "connect" and res.startswith("0"):
            if "agent.sock" in args and agent_ino is None:
                agent_ino, m["agent connect"] = sock_inode(args), t
            elif "control.sock" in args and pid == cli:
                m.setdefault("cli attach", t)
        elif name in ("sendto", "recvfrom") and agent_ino and sock_inode(args) == agent_ino:
            data = first_string(args)
            if not data:
                continue
            if name == "sendto" and len(data) >= 5 and data[4] < len(HOST_VARIANTS):
                m.setdefault("sent " + HOST_VARIANTS[data[4]], t)
            elif name == "recvfrom" and pid in header:
                # The payload that follows a header (read_message reads the two apart).
                t_hdr = header.pop(pid)
                if data[0] < len(GUEST_VARIANTS):
                    m.setdefault("got " + GUEST_VARIANTS[data[0]], t_hdr)
                if data[0] == 0 and "hello boot_ms" not in m:
                    try:
                        m["hello boot_ms"] = parse_hello(data)["boot_ms"]
                    except (IndexError, TypeError):
                        pass
            elif name == "recvfrom" and res == "4" and len(data) == 4:
                header[pid] = t
    need = ["supervisor exec", "qemu exec", "agent connect", "got Hello", "sent Configure",
            "got Configured", "sent Exec", "got Exited", "sent Shutdown", "qemu exit",
            "cli exit"]
    missing = [k for k in need if k not in m]
    if missing:
        log(f"strace marks missing {missing}: {m}")
        return None
    out = {}
    if "resize2fs exit" in m:
        out["CLI start -> resize2fs exec (kernel, initramfs, image, state, disk copy)"] = \
            m["resize2fs"] - t_start
        out["resize2fs (grow the VM disk)"] = m["resize2fs exit"] - m["resize2fs"]
        out["resize2fs exit -> supervisor exec (state, spawn)"] = \
            m["supervisor exec"] - m["resize2fs exit"]
    else:
        out["CLI start -> supervisor exec (create: kernel, image, disk, state)"] = \
            m["supervisor exec"] - t_start
    out.update({
        "supervisor exec -> QEMU exec": m["qemu exec"] - m["supervisor exec"],
        "QEMU exec -> agent Hello (guest boot)": m["got Hello"] - m["qemu exec"],
    })
    if "hello boot_ms" in m:
        out["  of which guest clock at Hello (boot_ms)"] = m["hello boot_ms"] / 1000
    out.update({
        "Hello -> Configure sent": m["sent Configure"] - m["got Hello"],
        "Configure sent -> Configured back": m["got Configured"] - m["sent Configure"],
        "Configured -> Exec sent": m["sent Exec"] - m["got Configured"],
    })
    if "got Started" in m:
        out["Exec sent -> Started back (guest forks, execs `true`)"] = \
            m["got Started"] - m["sent Exec"]
        out["Started -> Exited back"] = m["got Exited"] - m["got Started"]
    else:
        out["Exec sent -> Exited back (`true` runs)"] = m["got Exited"] - m["sent Exec"]
    out.update({
        "Exited -> Shutdown sent": m["sent Shutdown"] - m["got Exited"],
        "Shutdown sent -> QEMU exit (power-off)": m["qemu exit"] - m["sent Shutdown"],
        "QEMU exit -> CLI exit (reap, rm VM, state)": m["cli exit"] - m["qemu exit"],
        "total (strace'd)": m["cli exit"] - t_start,
    })
    return out


def strace_breakdown(kiln, env, image, runs):
    """Phase durations of `runs` strace'd `kiln run --rm IMAGE true`."""
    if not shutil.which("strace"):
        return None, "strace is not installed (apt-get install strace)"
    samples = []
    for k in range(runs):
        trace = os.path.join(WORK, f"strace-{k}.txt")
        settle()
        proc = spawn(["strace", "-f", "-ttt", "-T", "-q", "--seccomp-bpf", "-s", "64", "-x", "-yy",
                      "-e", f"trace={STRACE_SYSCALLS}", "-o", trace,
                      kiln, "run", "--rm", image, "true"],
                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=BOOT_TIMEOUT * 2)
        LIVE.pop(proc.pid, None)
        if proc.returncode != 0:
            return None, (f"strace'd kiln run failed ({proc.returncode}): "
                          f"{err.decode(errors='replace')[-1500:]}")
        ph = phases(parse_strace(trace))
        if ph is None:
            return None, f"could not find the phases in {trace} (run with -v --keep)"
        samples.append(ph)
    return samples, None


# ----------------------------------------------------------------------------------------------

def summary(values):
    return min(values), statistics.median(values), max(values)


def fmt(v):
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.2f} s"


def fmt3(values):
    lo, med, hi = summary(values)
    return f"{fmt(lo)} / {fmt(med)} / {fmt(hi)}"


def main():
    global VERBOSE, WORK, KEEP
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per measure (default 10)")
    ap.add_argument("--kiln", help="kiln binary (default: cargo build --release -p kiln)")
    ap.add_argument("--image", default=DEFAULT_IMAGE,
                    help=f"image to run `true` in (default {DEFAULT_IMAGE}, built offline)")
    ap.add_argument("--no-busybox", action="store_true",
                    help="skip the busybox-initramfs reference boot")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the strace'd runs that show where kiln's time goes")
    ap.add_argument("--breakdown-runs", type=int, default=3,
                    help="strace'd kiln runs for the breakdown (default 3)")
    ap.add_argument("--json", help="also write the raw figures to this file")
    ap.add_argument("--workdir", help="parent of the temporary directory (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE, KEEP = args.verbose, args.keep
    if args.runs < 1:
        die("--runs must be at least 1")

    qemu = find_qemu()
    WORK = tempfile.mkdtemp(prefix="kiln-bench-run-", dir=args.workdir)
    atexit.register(cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    kiln = find_kiln(args.kiln)
    root = os.path.join(WORK, "root")
    os.makedirs(root)
    env = kiln_env(root)

    say("preparing the private kiln root (kernel import, image disk, warm-up run)")
    kinfo = kernel_info(kiln, env)
    run_ok([kiln, "image", "pull", "-q", args.image], env, "image")
    argv, vm_disk_size, warm_err = warm_up(kiln, env, args.image, root)
    check_argv(argv, root, kinfo["kernel_path"])
    if vm_disk_size is None:
        die("could not read the size of kiln's VM disk during the warm-up run")
    log("kiln's QEMU: " + " ".join(argv))
    if os.path.realpath(argv[0]) != os.path.realpath(qemu):
        say(f"note: kiln ran {argv[0]}; the baseline runs the same")

    base_dir = os.path.join(WORK, "bare")
    os.makedirs(base_dir)
    disk = os.path.join(base_dir, "disk.ext4")
    sock = os.path.join(base_dir, "agent.sock")
    bare = baseline_argv(argv, disk, sock)
    busybox_argv, busybox_note = None, None
    initrd_bb = kinfo.get("initrd_path")
    if args.no_busybox:
        busybox_note = "skipped (--no-busybox)"
    elif not initrd_bb or (kinfo.get("initrd") or {}).get("kind") != "generated":
        busybox_note = "skipped: the default kernel has no generated busybox initramfs"
    else:
        busybox_argv = baseline_argv(argv, disk, os.path.join(base_dir, "bb.sock"),
                                     initrd=initrd_bb,
                                     extra_append="kiln.init=/sbin/reboot -- -f")

    # One untimed bare boot: checks the baseline works before the timed loop.
    fresh_disk(kiln, env, args.image, disk, vm_disk_size)
    time_bare(bare, sock, base_dir)
    if busybox_argv:
        fresh_disk(kiln, env, args.image, disk, vm_disk_size)
        r, why = time_busybox(busybox_argv, base_dir)
        if r is None:
            busybox_note = f"skipped: the busybox boot failed: {why[-300:]}"
            busybox_argv = None

    load_before = os.getloadavg()
    kiln_r, bare_r, bb_r = [], [], []
    for i in range(args.runs):
        who = ["kiln", "bare"] + (["busybox"] if busybox_argv else [])
        # Rotate the order so that no side always follows the same one.
        who = who[i % len(who):] + who[:i % len(who)]
        for w in who:
            if w == "kiln":
                kiln_r.append(time_kiln(kiln, env, args.image, root))
            elif w == "bare":
                fresh_disk(kiln, env, args.image, disk, vm_disk_size)
                bare_r.append(time_bare(bare, sock, base_dir))
            else:
                fresh_disk(kiln, env, args.image, disk, vm_disk_size)
                r, why = time_busybox(busybox_argv, base_dir)
                if r is None:
                    die(f"busybox boot failed: {why}")
                bb_r.append(r)
        log(f"run {i + 1}/{args.runs}: kiln {kiln_r[-1]['total']:.3f} s, bare "
            f"{bare_r[-1]['total']:.3f} s" + (f", busybox {bb_r[-1]['total']:.3f} s"
                                             if bb_r else ""))
    load_after = os.getloadavg()

    bd, bd_note = (None, "skipped (--no-breakdown)")
    if not args.no_breakdown and args.breakdown_runs > 0:
        say(f"breakdown: {args.breakdown_runs} strace'd kiln runs")
        bd, bd_note = strace_breakdown(kiln, env, args.image, args.breakdown_runs)

    # ------------------------------------------------------------------ report
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        cpu = next(l.split(":", 1)[1].strip() for l in cpuinfo.splitlines()
                   if l.startswith("model name"))
        flags = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "").split()
        accel = "KVM" if ("vmx" in flags or "svm" in flags) and os.path.exists("/dev/kvm") \
            else "TCG (no vmx/svm)"
    except Exception:
        accel = "?"
    qver = subprocess.run([argv[0], "--version"], stdout=subprocess.PIPE).stdout.decode() \
        .splitlines()[0]
    append = argv[option(argv, "-append")]
    print(f"\nkiln run --rm {args.image} true vs a bare QEMU boot of the same guest — "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
          f"{os.cpu_count()} CPUs ({cpu}), {platform.release()}")
    print(f"{qver}; accel {argv[option(argv, '-accel')]} ({accel}); kernel {kinfo.get('release')}; "
          f"-m {argv[option(argv, '-m')]} -smp {argv[option(argv, '-smp')]}; "
          f"VM disk {vm_disk_size / 2**20:.0f} MiB")
    print(f"-append '{append}'")
    print(f"{args.runs} runs each, interleaved (order rotated per run); load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}\n")

    rows = [("kiln run --rm (spawn -> exit)", [r["total"] for r in kiln_r])]
    rows.append(("bare boot (spawn -> QEMU exit)", [r["total"] for r in bare_r]))
    rows.append(("  spawn -> agent Hello read", [r["hello"] for r in bare_r]))
    rows.append(("  guest clock at Hello (boot_ms)", [r["guest_boot_ms"] / 1000 for r in bare_r]))
    rows.append(("  Shutdown sent -> QEMU exit", [r["shutdown"] for r in bare_r]))
    if bb_r:
        rows.append(("busybox /init, reboot -f (spawn -> exit)", [r["total"] for r in bb_r]))
    w = max(len(r[0]) for r in rows) + 2
    print("measure (min / median / max)")
    print("-" * (w + 30))
    for label, vals in rows:
        print(f"{label:<{w}}{fmt3(vals)}")

    k_med = statistics.median(r["total"] for r in kiln_r)
    b_med = statistics.median(r["total"] for r in bare_r)
    ratio = k_med / b_med
    print(f"\nkiln median {fmt(k_med)}, bare boot median {fmt(b_med)}: kiln/bare = {ratio:.2f}x "
          f"({'+' if k_med >= b_med else '-'}{fmt(abs(k_med - b_med))})  target <= {TARGET_RATIO:.2f}x: "
          f"{'PASS' if ratio <= TARGET_RATIO else 'MISS'}")
    diffs = [k["total"] - b["total"] for k, b in zip(kiln_r, bare_r)]
    d_lo, d_med, d_hi = summary(diffs)
    k_min = min(r["total"] for r in kiln_r)
    b_min = min(r["total"] for r in bare_r)
    print(f"paired by run, kiln - bare: median {d_med * 1000:+.0f} ms (min {d_lo * 1000:+.0f}, "
          f"max {d_hi * 1000:+.0f}); fastest kiln / fastest bare = {k_min / b_min:.2f}x")
    if bb_r:
        bb_med = statistics.median(r["total"] for r in bb_r)
        print(f"reference: busybox-initramfs boot to init median {fmt(bb_med)} "
              f"(kiln/busybox = {k_med / bb_med:.2f}x)")
    elif busybox_note:
        print(f"reference busybox boot: {busybox_note}")
    print("\nbaseline: kiln's own QEMU command line (captured), fresh copy of the VM disk, "
          "same kiln-init initramfs; the script connects to the agent port, reads Hello, "
          "sends Shutdown; timed to QEMU's exit")

    if bd:
        print(f"\nwhere kiln's time goes ({len(bd)} extra runs under strace -f --seccomp-bpf; "
              f"medians; strace slows syscalls, compare with the table's total)")
        keys = list(bd[0].keys())
        kw = max(len(k) for k in keys) + 2
        for k in keys:
            vals = [s[k] for s in bd]
            print(f"  {k:<{kw}}{fmt(statistics.median(vals)):>9}   "
                  f"({fmt(min(vals))} - {fmt(max(vals))})")
        # What the bare boot does not pay: every phase but the boot to Hello and the power-off.
        shared = ("QEMU exec -> agent Hello (guest boot)", "Shutdown sent -> QEMU exit (power-off)",
                  "total (strace'd)")
        own = [sum(v for k, v in smp.items() if k not in shared and not k.startswith(" "))
               for smp in bd]
        own_med = statistics.median(own)
        print(f"  {'= kiln-only work (all but the boot to Hello and the power-off)':<{kw}}"
              f"{fmt(own_med):>9}   ({fmt(min(own))} - {fmt(max(own))}); "
              f"(bare median + it) / bare median = {(b_med + own_med) / b_med:.2f}x")
    elif bd_note:
        print(f"\nbreakdown: {bd_note}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kiln": kiln_r, "bare": bare_r, "busybox": bb_r, "breakdown": bd,
                       "qemu_argv": argv, "vm_disk_size": vm_disk_size,
                       "ratio": ratio, "target": TARGET_RATIO}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
