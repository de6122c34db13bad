//! virtio-net end to end: the `net-pump` test guest (crates/test-guests/guests/net_pump.c)
//! sends and receives whole Ethernet frames that the test prepared on a virtio-blk disk, through
//! the real `kiln-vmm` binary and a real tap device.
//!
//! Every test creates its own network namespace (`kiln-test-<pid>-<n>`) with a tap inside,
//! starts kiln-vmm inside it with `ip netns exec`, and talks to the tap from the test process
//! through threads that `setns(2)` into the namespace (AF_PACKET sockets, /proc/net/dev). The
//! namespace, and with it the tap, is deleted when the test ends, panicking or not.
//!
//! Tests skip (and say why) when `/dev/kvm`, `/dev/net/tun` or `ip` are missing.

mod common;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::{json, kvm_unavailable, line_field, line_num, Vmm};
use serde_json::json;

/// The guest's MAC address, as configured and as it appears in frames.
const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const GUEST_MAC_TEXT: &str = "06:00:AC:10:00:02";
const GUEST_IP: [u8; 4] = [172, 16, 0, 2];
const TAP_IP: [u8; 4] = [172, 16, 0, 1];
const TAP: &str = "tap0";
/// Ethertype of the test's own frames (IEEE local experimental).
const ETH_TEST: u16 = 0x88b5;
/// Ethertype that ends the guest's FLOOD and SINK commands.
const ETH_STOP: u16 = 0x88b6;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
/// The virtio_net_hdr_v1 in front of every frame in guest memory.
const NET_HDR: usize = 12;
/// How long a guest that ends by resetting may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Keeps the tests that measure something over a time window (a rate, a count, CPU use) from
/// sharing the CPUs with another guest: every test that boots a guest holds this lock, those
/// that measure take it exclusively ([`timing_lock`]), the others shared ([`guest_lock`]). A
/// net-pump guest busy-polls, so each one running pegs a core, and a 2-core machine has two.
static TIMING: RwLock<()> = RwLock::new(());

/// For a test that boots a guest and measures over a time window: no other guest runs.
/// (Poison-tolerant: a test that panicked does not stop the others.)
fn timing_lock() -> RwLockWriteGuard<'static, ()> {
    TIMING
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// For a test that boots a guest but measures nothing: it may run beside another such test,
/// never beside a measuring one.
fn guest_lock() -> RwLockReadGuard<'static, ()> {
    TIMING
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Skipping

fn net_unavailable() -> Option<String> {
    if let Some(why) = kvm_unavailable() {
        return Some(why);
    }
    if let Err(err) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("cannot open /dev/net/tun read-write: {err}"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`ip -V` failed ({})", out.status)),
        Err(err) => Some(format!("cannot run `ip` (iproute2): {err}")),
    }
}

fn net_or_skip(test: &str) -> bool {
    match net_unavailable() {
        None => true,
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace with a tap `tap0` (172.16.0.1/24, up, no IPv6) inside; deleted on drop.
struct NetNs {
    name: String,
}

fn run_ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("running ip {args:?}: {err}"))
}

fn netns_list() -> String {
    String::from_utf8_lossy(&run_ip(&["netns", "list"]).stdout).to_string()
}

/// Deletes namespaces that killed runs of this test binary left behind (their pid is gone).
fn remove_stale_namespaces() {
    for line in netns_list().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("kiln-test-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_ip(&["netns", "del", name]);
        }
    }
}

impl NetNs {
    /// Creates `kiln-test-<pid>-<n>` with `tap0` in it.
    fn new() -> NetNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        remove_stale_namespaces();
        let name = format!(
            "kiln-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let out = run_ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        // No IPv6 on the tap: router solicitations and MLD reports would be noise for the guest.
        ns.in_ns(|| {
            for conf in ["all", "default"] {
                let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
        });
        ns.add_tap(TAP);
        let tap_ip = format!("{}.{}.{}.{}/24", TAP_IP[0], TAP_IP[1], TAP_IP[2], TAP_IP[3]);
        ns.ip(&["addr", "add", &tap_ip, "dev", TAP]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip <args>` inside the namespace; panics if it fails.
    fn ip(&self, args: &[&str]) {
        let out = self.exec(&[&["ip"], args].concat());
        assert!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a command inside the namespace with `ip netns exec`.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        run_ip(&[&["netns", "exec", self.name.as_str()], args].concat())
    }

    /// Creates a tap called `name`, up.
    fn add_tap(&self, name: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Runs `f` on a thread that has joined the namespace (only that thread moves).
    fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file =
                        fs::File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
                    // SAFETY: setns(2) with a namespace fd we own; it only changes this thread's
                    // network namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("namespace thread")
        })
    }

    /// The counters of interface `name` as /proc/net/dev shows them in the namespace.
    fn counters(&self, name: &str) -> Counters {
        let text = self.in_ns(|| {
            fs::read_to_string("/proc/thread-self/net/dev").expect("read /proc/thread-self/net/dev")
        });
        let line = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{name}:"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no {name} in /proc/net/dev:\n{text}"));
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|f| f.parse().expect("number in /proc/net/dev"))
            .collect();
        Counters {
            rx_bytes: v[0],
            rx_packets: v[1],
        }
    }

    /// The MAC address of interface `name`.
    fn mac(&self, name: &str) -> [u8; 6] {
        let out = self.exec(&["cat", &format!("/sys/class/net/{name}/address")]);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("MAC {text:?}"));
        }
        mac
    }

    /// An AF_PACKET socket on interface `name` in the namespace.
    fn packet_socket(&self, name: &str) -> PacketSocket {
        self.in_ns(|| PacketSocket::open(name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.exec(&["ip", "link", "del", TAP]);
        let out = run_ip(&["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Drops the VMM and then the namespace, and checks the namespace is really gone.
fn finish(vmm: Vmm, ns: NetNs) {
    let name = ns.name.clone();
    drop(vmm);
    drop(ns);
    let left = netns_list();
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&name)),
        "network namespace {name} is still there after the test:\n{left}"
    );
}

/// Interface counters from /proc/net/dev.
#[derive(Clone, Copy, Debug)]
struct Counters {
    rx_bytes: u64,
    rx_packets: u64,
}

// ---------------------------------------------------------------------------------------------
// AF_PACKET

/// A raw packet socket bound to one interface.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Must run inside the namespace (see [`NetNs::packet_socket`]).
    fn open(name: &str) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name).expect("interface name");
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index != 0, "no interface {name}");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a properly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with an int option. Failure only means a smaller buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        PacketSocket { fd }
    }

    /// Sends one frame out of the interface (towards the tap's reader: the VMM).
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) reads `frame.len()` bytes from a valid slice.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame that came in from the VMM (frames this host sent are skipped), or `None`
    /// after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom(2) into a buffer and address of the sizes we pass.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    std::ptr::addr_of_mut!(addr).cast(),
                    &mut addr_len,
                )
            };
            if n < 0 {
                continue;
            }
            if addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(buf[..n as usize].to_vec());
        }
    }

    /// Frames from the VMM with ethertype `ethertype`, until `count` arrived or `timeout`.
    fn recv_type(&self, ethertype: u16, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(frame) if frame_type(&frame) == ethertype => frames.push(frame),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

fn frame_type(frame: &[u8]) -> u16 {
    if frame.len() < 14 {
        return 0;
    }
    u16::from_be_bytes([frame[12], frame[13]])
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A test frame of `len` bytes in all, with a payload derived from `seed`.
fn test_frame(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..len.saturating_sub(14))
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    ethernet(dst, GUEST_MAC, ETH_TEST, &payload)
}

/// The frame that ends the guest's FLOOD and SINK.
fn stop_frame() -> Vec<u8> {
    ethernet(GUEST_MAC, [0x02, 0, 0, 0, 0, 0x99], ETH_STOP, &[0u8; 46])
}

fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip);
    ethernet([0xff; 6], sender_mac, ETH_ARP, &arp)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo_request(dst_mac: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&TAP_IP);
    let sum = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(dst_mac, GUEST_MAC, ETH_IPV4, &ip)
}

// ---------------------------------------------------------------------------------------------
// The guest's script disk (see the layout at the top of net_pump.c)

const OP_SEND: u32 = 1;
const OP_RECV: u32 = 2;
const OP_FLOOD: u32 = 3;
const OP_SINK: u32 = 4;
const OP_HOSTILE: u32 = 5;
const OP_RESET: u32 = 6;
const OP_MARK: u32 = 7;
const OP_SLEEP: u32 = 8;
const OP_POST: u32 = 9;

/// Commands and frames for the net-pump guest.
#[derive(Default)]
struct Script {
    cmds: Vec<[u32; 4]>,
    frames: Vec<Vec<u8>>,
}

impl Script {
    /// Adds a frame; returns its index.
    fn frame(&mut self, frame: Vec<u8>) -> u32 {
        self.frames.push(frame);
        (self.frames.len() - 1) as u32
    }

    fn cmd(&mut self, op: u32, a: u32, b: u32, c: u32) -> &mut Script {
        assert!(self.cmds.len() < 30, "net-pump takes at most 30 commands");
        self.cmds.push([op, a, b, c]);
        self
    }

    fn send(&mut self, first: u32, count: u32) -> &mut Script {
        self.cmd(OP_SEND, first, count, 1)
    }

    fn recv(&mut self, count: u32, ms: u32, ethertype: u16) -> &mut Script {
        self.cmd(OP_RECV, count, ms, u32::from(ethertype))
    }

    fn out_offset(&self) -> u64 {
        (4096 + self.frames_area().len() as u64).next_multiple_of(MIB)
    }

    fn frames_area(&self) -> Vec<u8> {
        let mut area = (self.frames.len() as u32).to_le_bytes().to_vec();
        for frame in &self.frames {
            area.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            area.extend_from_slice(frame);
            area.resize(area.len().next_multiple_of(4), 0);
        }
        area
    }

    /// Writes the disk image the guest reads.
    fn write(&self, path: &Path) {
        let area = self.frames_area();
        let out_size: u32 = 2 << 20;
        let mut head = Vec::new();
        for word in [
            0x3150_4e4b,
            self.cmds.len() as u32,
            area.len() as u32,
            self.out_offset() as u32,
            out_size,
            0,
            0,
            0,
        ] {
            head.extend_from_slice(&u32::to_le_bytes(word));
        }
        for cmd in &self.cmds {
            for word in cmd {
                head.extend_from_slice(&word.to_le_bytes());
            }
        }
        head.resize(4096, 0);
        head.extend_from_slice(&area);
        fs::write(path, &head).expect("write script disk");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open script disk");
        file.set_len(self.out_offset() + u64::from(out_size))
            .expect("size script disk");
    }

    /// The RX buffers the guest stored (virtio-net header included).
    fn read_output(&self, path: &Path) -> Vec<Vec<u8>> {
        let disk = fs::read(path).expect("read script disk");
        let out = &disk[self.out_offset() as usize..];
        let word = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(word(0), 0x314f_4e4b, "the guest wrote no output");
        let count = word(4) as usize;
        let mut at = 16;
        let mut entries = Vec::new();
        for _ in 0..count {
            let len = word(at) as usize;
            entries.push(out[at + 4..at + 4 + len].to_vec());
            at += 4 + len.next_multiple_of(4);
        }
        entries
    }
}

// ---------------------------------------------------------------------------------------------
// Booting the guest

/// Options for one net-pump VM.
struct Boot<'a> {
    id: &'a str,
    guest_mac: Option<&'a str>,
    rx_rate_limiter: Option<serde_json::Value>,
    tx_rate_limiter: Option<serde_json::Value>,
    idle_at_end: bool,
    /// Extra feature bits the guest accepts (`kiln.net_features=`).
    features: u64,
}

impl<'a> Boot<'a> {
    fn new(id: &'a str) -> Boot<'a> {
        Boot {
            id,
            guest_mac: Some(GUEST_MAC_TEXT),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            idle_at_end: false,
            features: 0,
        }
    }
}

/// Starts kiln-vmm in `ns`, writes `script` to its disk and boots the net-pump guest; waits
/// until the guest has its network device up.
fn boot(ns: &NetNs, script: &Script, opts: Boot) -> Vmm {
    let vmm = Vmm::with_api_in_netns(&ns.name, opts.id, &[]);
    let disk = vmm.dir.join("script.img");
    script.write(&disk);
    vmm.put_ok(
        "/machine-config",
        &json(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
    );
    let mut boot_args = "console=ttyS0".to_string();
    if opts.idle_at_end {
        boot_args.push_str(" kiln.end=idle");
    }
    if opts.features != 0 {
        boot_args.push_str(&format!(" kiln.net_features={:#x}", opts.features));
    }
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest("net-pump"),
            "boot_args": boot_args,
        })),
    );
    vmm.put_ok(
        "/drives/script",
        &json(&json!({
            "drive_id": "script",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
        })),
    );
    let mut iface = json!({"iface_id": "eth0", "host_dev_name": TAP});
    if let Some(mac) = opts.guest_mac {
        iface["guest_mac"] = json!(mac);
    }
    if let Some(rx) = opts.rx_rate_limiter {
        iface["rx_rate_limiter"] = rx;
    }
    if let Some(tx) = opts.tx_rate_limiter {
        iface["tx_rate_limiter"] = tx;
    }
    vmm.put_ok("/network-interfaces/eth0", &json(&iface));
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    wait_line(&vmm, "net-pump: net base=");
    vmm
}

/// Waits for a serial line containing `needle`; panics with the output if none comes.
fn wait_line(vmm: &Vmm, needle: &str) -> String {
    vmm.stdout
        .wait_for(needle, LINE_TIMEOUT)
        .unwrap_or_else(|| {
            panic!(
                "the guest printed no line containing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                vmm.stdout.text(),
                vmm.stderr.text()
            )
        })
}

/// Waits until the guest printed `count` lines starting with `prefix`.
fn wait_count(vmm: &Vmm, prefix: &str, count: usize) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let lines = vmm.stdout.lines();
        if lines.iter().filter(|l| l.starts_with(prefix)).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest printed fewer than {count} lines starting with {prefix:?}\nstdout:\n{}\nstderr:\n{}",
            vmm.stdout.text(),
            vmm.stderr.text()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the guest to reset and checks kiln-vmm exited with status 0.
fn wait_reset(vmm: &mut Vmm) -> Vec<String> {
    let status: ExitStatus = vmm.expect_exit(EXIT_TIMEOUT);
    let lines = vmm.stdout.lines();
    assert!(
        status.success(),
        "kiln-vmm should exit with 0 after the guest's reset, got {status}\n{}\nstderr:\n{}",
        lines.join("\n"),
        vmm.stderr.text()
    );
    assert!(
        lines.iter().any(|l| l == "net-pump: done"),
        "the guest did not finish its script:\n{}",
        lines.join("\n")
    );
    lines
}

fn assert_alive(vmm: &Vmm, when: &str) {
    let (status, body) = vmm.get("/");
    assert_eq!(status, 200, "GET / {when} answered {status}: {body}");
}

/// Splits a stored RX buffer into its virtio-net header and frame, checking the header is
/// what a device without offloads must write (zeros, num_buffers 1).
fn split_rx(buffer: &[u8]) -> &[u8] {
    assert!(
        buffer.len() >= NET_HDR,
        "RX buffer of {} bytes",
        buffer.len()
    );
    assert_eq!(
        buffer[..NET_HDR],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "virtio-net header of a received frame (no offloads negotiated)"
    );
    &buffer[NET_HDR..]
}

// ---------------------------------------------------------------------------------------------
// Tests: traffic

#[test]
fn guest_arp_and_ping_are_answered_by_the_host_kernel() {
    if !net_or_skip("guest_arp_and_ping_are_answered_by_the_host_kernel") {
        return;
    }
    let _timing = guest_lock();
    let ns = NetNs::new();
    let tap_mac = ns.mac(TAP);
    let ping_payload: Vec<u8> = (0..56u8).map(|i| i ^ 0x5a).collect();
    let mut script = Script::default();
    let arp = script.frame(arp_request(GUEST_MAC, GUEST_IP, TAP_IP));
    let ping = script.frame(icmp_echo_request(tap_mac, 0x4b4c, 7, &ping_payload));
    script
        .send(arp, 1)
        .recv(1, 5000, ETH_ARP)
        .send(ping, 1)
        .recv(1, 5000, ETH_IPV4);
    let mut vmm = boot(&ns, &script, Boot::new("net-ping"));
    let net_line = wait_line(&vmm, "net-pump: net base=");
    assert_eq!(
        line_num(&net_line, "accepted"),
        (1 << 32) | (1 << 5),
        "the guest takes VERSION_1 and MAC: {net_line}"
    );
    assert_eq!(
        line_field(&net_line, "mac"),
        Some("0600ac100002"),
        "{net_line}"
    );
    assert_eq!(line_num(&net_line, "rxq"), 128, "{net_line}");
    let lines = wait_reset(&mut vmm);
    let disk = vmm.dir.join("script.img");
    let stored = script.read_output(&disk);
    assert_eq!(stored.len(), 2, "guest output:\n{}", lines.join("\n"));

    // The ARP reply, from the tap's MAC to the guest's.
    let reply = split_rx(&stored[0]);
    assert_eq!(frame_type(reply), ETH_ARP);
    assert_eq!(reply[..6], GUEST_MAC, "ARP reply destination");
    assert_eq!(reply[6..12], tap_mac, "ARP reply source");
    let arp = &reply[14..];
    assert_eq!(arp[6..8], [0, 2], "ARP opcode: reply");
    assert_eq!(arp[8..14], tap_mac, "sender hardware address");
    assert_eq!(arp[14..18], TAP_IP, "sender protocol address");
    assert_eq!(arp[18..24], GUEST_MAC, "target hardware address");
    assert_eq!(arp[24..28], GUEST_IP, "target protocol address");

    // The echo reply: same id, sequence and payload, valid checksums.
    let reply = split_rx(&stored[1]);
    assert_eq!(frame_type(reply), ETH_IPV4);
    assert_eq!(reply[..6], GUEST_MAC);
    assert_eq!(reply[6..12], tap_mac);
    let ip = &reply[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    assert_eq!(inet_checksum(&ip[..ihl]), 0, "IP header checksum");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(ip[12..16], TAP_IP, "source");
    assert_eq!(ip[16..20], GUEST_IP, "destination");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &ip[ihl..total];
    assert_eq!(inet_checksum(icmp), 0, "ICMP checksum");
    assert_eq!(icmp[0], 0, "echo reply");
    assert_eq!(icmp[4..6], 0x4b4cu16.to_be_bytes(), "identifier");
    assert_eq!(icmp[6..8], 7u16.to_be_bytes(), "sequence");
    assert_eq!(icmp[8..], ping_payload[..], "payload");

    // The tap saw both frames from the guest.
    let counters = ns.counters(TAP);
    assert!(counters.rx_packets >= 2, "{counters:?}");
    finish(vmm, ns);
}

#[test]
fn frames_cross_the_tap_intact_in_both_directions() {
    if !net_or_skip("frames_cross_the_tap_intact_in_both_directions") {
        return;
    }
    let _timing = guest_lock();
    let ns = NetNs::new();
    let socket = ns.packet_socket(TAP);
    let sizes = [14usize, 15, 42, 60, 61, 100, 511, 512, 1000, 1513, 1514];
    let to_guest: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| test_frame(GUEST_MAC, len, i as u8))
        .collect();
    let mut script = Script::default();
    for (i, &len) in sizes.iter().enumerate() {
        script.frame(test_frame([0x02, 0, 0, 0, 0, 1], len, 100 + i as u8));
    }
    script
        .recv(sizes.len() as u32, 20_000, ETH_TEST)
        .send(0, sizes.len() as u32);
    // No guest_mac: the device must not offer VIRTIO_NET_F_MAC.
    let mut opts = Boot::new("net-both-ways");
    opts.guest_mac = None;
    let mut vmm = boot(&ns, &script, opts);
    let net_line = wait_line(&vmm, "net-pump: net base=");
    assert_eq!(
        line_num(&net_line, "offered") & (1 << 5),
        0,
        "MAC offered without a guest_mac: {net_line}"
    );
    assert_eq!(
        line_field(&net_line, "mac"),
        Some("000000000000"),
        "{net_line}"
    );
    wait_line(&vmm, "net-pump: recv-start");
    for frame in &to_guest {
        socket.send(frame).expect("send to the guest");
    }
    let from_guest = socket.recv_type(ETH_TEST, sizes.len(), Duration::from_secs(60));
    let lines = wait_reset(&mut vmm);
    let stored = script.read_output(&vmm.dir.join("script.img"));
    assert_eq!(
        stored.len(),
        sizes.len(),
        "frames the guest received:\n{}",
        lines.join("\n")
    );
    for (i, (buffer, sent)) in stored.iter().zip(&to_guest).enumerate() {
        assert_eq!(
            split_rx(buffer),
            &sent[..],
            "frame {i} ({} bytes)",
            sizes[i]
        );
    }
    assert_eq!(
        from_guest.len(),
        sizes.len(),
        "frames from the guest at the tap"
    );
    for (i, (got, sent)) in from_guest.iter().zip(&script.frames).enumerate() {
        assert_eq!(got, sent, "frame {i} from the guest ({} bytes)", sizes[i]);
    }
    finish(vmm, ns);
}

/// Boots a guest that accepts `features` on top of VERSION_1 and MAC, sends it a UDP datagram
/// from the host kernel, and returns the virtio-net header and frame it received, with the
/// UDP checksum finished as a driver would if the header asks for it, and checked.
fn udp_to_guest(id: &str, features: u64) -> [u8; NET_HDR] {
    let ns = NetNs::new();
    let guest_ip = format!(
        "{}.{}.{}.{}",
        GUEST_IP[0], GUEST_IP[1], GUEST_IP[2], GUEST_IP[3]
    );
    ns.ip(&[
        "neigh",
        "add",
        &guest_ip,
        "lladdr",
        GUEST_MAC_TEXT,
        "dev",
        TAP,
        "nud",
        "permanent",
    ]);
    let mut script = Script::default();
    script.recv(1, 20_000, ETH_IPV4);
    let mut opts = Boot::new(id);
    opts.features = features;
    let mut vmm = boot(&ns, &script, opts);
    let net_line = wait_line(&vmm, "net-pump: net base=");
    assert_eq!(
        line_num(&net_line, "accepted"),
        (1 << 32) | (1 << 5) | features,
        "{net_line}"
    );
    wait_line(&vmm, "net-pump: recv-start");
    let payload: Vec<u8> = (0..333u32).map(|i| (i * 13 + 1) as u8).collect();
    let target = format!("{guest_ip}:4242");
    ns.in_ns(|| {
        let socket = std::net::UdpSocket::bind("172.16.0.1:4141").expect("bind UDP");
        socket.send_to(&payload, &target).expect("send UDP");
    });
    wait_reset(&mut vmm);
    let stored = script.read_output(&vmm.dir.join("script.img"));
    assert_eq!(stored.len(), 1);
    let buffer = &stored[0];
    let hdr: [u8; NET_HDR] = buffer[..NET_HDR].try_into().expect("header");
    let mut frame = buffer[NET_HDR..].to_vec();
    eprintln!("virtio-net header of a UDP frame with features {features:#x}: {hdr:02x?}");
    assert_eq!(hdr[1], 0, "gso_type: none");
    assert_eq!(hdr[10..12], [1, 0], "num_buffers");
    let ip = 14;
    let udp = ip + usize::from(frame[ip] & 0xf) * 4;
    assert_eq!(frame[ip + 9], 17, "UDP");
    if hdr[0] & 1 != 0 {
        // NEEDS_CSUM: finish the checksum as the driver would.
        let csum_start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let csum_offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        assert_eq!(
            (csum_start, csum_offset),
            (udp, 6),
            "checksum position: {hdr:02x?}"
        );
        let sum = inet_checksum(&frame[csum_start..]);
        frame[csum_start + csum_offset..csum_start + csum_offset + 2]
            .copy_from_slice(&sum.to_be_bytes());
    }
    // The (finished) checksum must be right: pseudo-header plus datagram sums to zero.
    let udp_len = frame.len() - udp;
    let mut pseudo = frame[ip + 12..ip + 20].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&frame[udp..]);
    assert_eq!(
        inet_checksum(&pseudo),
        0,
        "UDP checksum (header {hdr:02x?})"
    );
    assert_eq!(frame[udp + 8..], payload[..], "UDP payload");
    finish(vmm, ns);
    hdr
}

#[test]
fn checksum_offload_follows_the_negotiated_guest_csum_feature() {
    if !net_or_skip("checksum_offload_follows_the_negotiated_guest_csum_feature") {
        return;
    }
    let _timing = guest_lock();
    // Without VIRTIO_NET_F_GUEST_CSUM the tap must finish every checksum itself.
    let hdr = udp_to_guest("net-csum-off", 0);
    assert_eq!(
        hdr,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "no offload without GUEST_CSUM"
    );
    // With it, the host kernel's UDP checksum is left to the guest (VIRTIO_NET_HDR_F_NEEDS_CSUM).
    let hdr = udp_to_guest("net-csum-on", 1 << 1);
    assert_eq!(hdr[0], 1, "NEEDS_CSUM with GUEST_CSUM: {hdr:02x?}");
}

#[test]
fn hostile_chains_leave_the_vmm_up_and_later_frames_flow() {
    if !net_or_skip("hostile_chains_leave_the_vmm_up_and_later_frames_flow") {
        return;
    }
    let _timing = guest_lock();
    let ns = NetNs::new();
    let socket = ns.packet_socket(TAP);
    let mut script = Script::default();
    let good = script.frame(test_frame([0x02, 0, 0, 0, 0, 1], 200, 1));
    for kind in 1..=12 {
        script.cmd(OP_HOSTILE, kind, 0, 0);
    }
    script.send(good, 1).cmd(OP_MARK, 1, 0, 0);
    // A broken ring: the device must ask for a reset, and work again after it.
    script
        .cmd(OP_HOSTILE, 13, 0, 0)
        .cmd(OP_RESET, 0, 0, 0)
        .send(good, 1)
        .cmd(OP_HOSTILE, 14, 0, 0)
        .cmd(OP_RESET, 0, 0, 0)
        .send(good, 1)
        .cmd(OP_MARK, 2, 0, 0);
    // RX buffers too small, outside RAM, read-only; then normal ones.
    script
        .cmd(OP_RESET, 64, 0, 0)
        .recv(1, 20_000, ETH_TEST)
        .cmd(OP_RESET, 0, 1, 0)
        .recv(2, 20_000, ETH_TEST)
        .cmd(OP_RESET, 0, 2, 0)
        .recv(1, 20_000, ETH_TEST)
        .cmd(OP_RESET, 0, 0, 0)
        .recv(1, 20_000, ETH_TEST)
        .send(good, 1);
    let mut vmm = boot(&ns, &script, Boot::new("net-hostile"));

    wait_line(&vmm, "net-pump: mark 1");
    assert_alive(&vmm, "after the malformed TX chains");
    let lines = vmm.stdout.lines();
    let hostile: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("net-pump: hostile"))
        .collect();
    assert_eq!(hostile.len(), 12, "{}", lines.join("\n"));
    for l in &hostile {
        // Every malformed chain is returned, and none breaks the device.
        assert_eq!(line_num(l, "used"), 1, "{l}");
        assert_eq!(line_num(l, "needs-reset"), 0, "{l}");
    }
    // Of the odd chains only the largest legal frame reaches the tap: a chain cut short by a
    // `next` outside the ring (it would go out truncated, 48 bytes) and a descriptor loop are
    // refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before_good = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = socket
            .recv_type(ETH_TEST, 1, left)
            .pop()
            .unwrap_or_else(|| panic!("the good frame after the malformed ones did not arrive; got {before_good:?} bytes"));
        if frame == script.frames[0] {
            break;
        }
        before_good.push(frame.len());
    }
    eprintln!("frames at the tap from malformed chains: {before_good:?} bytes");
    assert_eq!(
        before_good,
        vec![65536],
        "only the max-frame chain makes a frame"
    );

    wait_line(&vmm, "net-pump: mark 2");
    assert_alive(&vmm, "after the broken rings");
    let lines = vmm.stdout.lines();
    for name in ["avail-jump", "head-out-of-range"] {
        let l = lines
            .iter()
            .find(|l| l.contains(&format!("name={name}")))
            .unwrap_or_else(|| panic!("no {name} line:\n{}", lines.join("\n")));
        assert_eq!(line_num(l, "needs-reset"), 1, "{l}");
    }
    let sends: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("net-pump: send"))
        .collect();
    assert_eq!(sends.len(), 3, "{}", lines.join("\n"));
    for l in &sends {
        assert_eq!(line_num(l, "drained"), 1, "{l}");
    }
    assert!(
        lines
            .iter()
            .filter(|l| *l == "net-pump: reset ok=1")
            .count()
            >= 2,
        "{}",
        lines.join("\n")
    );

    // Each RX phase: wait until the guest listens, then send frames.
    let to_guest = test_frame(GUEST_MAC, 1000, 9);
    for (phase, frames) in [(1usize, 1usize), (2, 2), (3, 1), (4, 1)] {
        wait_count(&vmm, "net-pump: recv-start", phase);
        for _ in 0..frames {
            socket.send(&to_guest).expect("send to the guest");
        }
        // The guest takes every frame of this phase before the next phase sends more.
        wait_count(&vmm, "net-pump: recv got=", phase);
        // After the last phase the guest finishes its script and resets the VM, so the VMM
        // may rightly be on its way out; `wait_reset` checks that it ended cleanly.
        if phase < 4 {
            assert_alive(&vmm, &format!("in RX phase {phase}"));
        }
    }
    let lines = wait_reset(&mut vmm);
    let recvs: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("net-pump: recv got="))
        .map(|l| (line_num(l, "got"), line_num(l, "empty")))
        .collect();
    assert_eq!(
        recvs,
        [(0, 1), (1, 1), (0, 1), (1, 0)],
        "(stored, returned empty) per RX phase: too small, outside RAM, read-only, normal\n{}",
        lines.join("\n")
    );
    let stored = script.read_output(&vmm.dir.join("script.img"));
    assert_eq!(stored.len(), 2);
    for buffer in &stored {
        assert_eq!(split_rx(buffer), &to_guest[..]);
    }
    let stderr = vmm.stderr.text();
    assert!(!stderr.contains("panicked"), "{stderr}");
    finish(vmm, ns);
}

/// CPU time (clock ticks) the VMM's threads other than its vCPUs have used.
fn vmm_non_vcpu_ticks(pid: u32) -> u64 {
    let mut ticks = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("list the VMM's threads") {
        let Ok(stat) = fs::read_to_string(task.expect("thread entry").path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ..." with utime and stime the 14th and 15th fields.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if head.contains("(vcpu") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    ticks
}

#[test]
fn deleting_the_tap_under_a_running_vm_leaves_the_vmm_up_and_idle() {
    if !net_or_skip("deleting_the_tap_under_a_running_vm_leaves_the_vmm_up_and_idle") {
        return;
    }
    let _timing = timing_lock();
    let ns = NetNs::new();
    let mut script = Script::default();
    let good = script.frame(test_frame([0x02, 0, 0, 0, 0, 1], 300, 2));
    script
        .send(good, 1)
        .cmd(OP_MARK, 1, 0, 0)
        .cmd(OP_SLEEP, 8000, 0, 0)
        .send(good, 1)
        .recv(1, 1000, ETH_TEST);
    let mut vmm = boot(&ns, &script, Boot::new("net-tap-gone"));
    wait_line(&vmm, "net-pump: mark 1");
    ns.ip(&["link", "del", TAP]);
    thread::sleep(Duration::from_millis(500));
    // The tap fd now reports errors: the event loop must not spin on it.
    let (ticks0, t0) = (vmm_non_vcpu_ticks(vmm.pid()), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let ticks1 = vmm_non_vcpu_ticks(vmm.pid());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = (ticks1 - ticks0) as f64 / hz / t0.elapsed().as_secs_f64();
    eprintln!(
        "VMM threads besides the vCPU after the tap was deleted: {:.0}% CPU",
        busy * 100.0
    );
    assert!(
        busy < 0.3,
        "the VMM uses {:.0}% CPU outside its vCPU with the tap gone",
        busy * 100.0
    );
    assert_alive(&vmm, "after the tap was deleted");
    let lines = wait_reset(&mut vmm);
    let sends: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("net-pump: send"))
        .collect();
    assert_eq!(sends.len(), 2, "{}", lines.join("\n"));
    for l in sends {
        assert_eq!(
            line_num(l, "drained"),
            1,
            "a frame sent to a deleted tap is still returned: {l}"
        );
        assert_eq!(line_num(l, "needs-reset"), 0, "{l}");
    }
    finish(vmm, ns);
}

// ---------------------------------------------------------------------------------------------
// Tests: rates

/// Samples `ns`'s tap rx_bytes (what the guest sent) at the start and end of `window`.
fn tap_rate(ns: &NetNs, window: Duration) -> f64 {
    let (b0, t0) = (ns.counters(TAP).rx_bytes, Instant::now());
    thread::sleep(window);
    let (b1, t1) = (ns.counters(TAP).rx_bytes, Instant::now());
    (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
}

fn assert_near(measured: f64, expected: f64, what: &str) {
    let error = (measured - expected).abs() / expected;
    eprintln!(
        "{what}: measured {:.0}/s, expected {:.0}/s ({:+.1}%)",
        measured,
        expected,
        (measured - expected) / expected * 100.0
    );
    assert!(
        error <= 0.10,
        "{what}: measured {measured:.0}/s, expected {expected:.0}/s (off by {:.1}%)",
        error * 100.0
    );
}

fn bandwidth(size: u64, burst: u64, refill_ms: u64) -> serde_json::Value {
    let mut bucket = json!({"size": size, "refill_time": refill_ms});
    if burst > 0 {
        bucket["one_time_burst"] = json!(burst);
    }
    json!({ "bandwidth": bucket })
}

/// Share of the limiter's bytes the tap counts: both limiters charge frame bytes only (no
/// virtio-net header), which is exactly what the tap sees.
fn tap_share(_frame: usize) -> f64 {
    1.0
}

#[test]
fn tx_rate_limiter_holds_the_rate_and_patch_changes_it_live() {
    if !net_or_skip("tx_rate_limiter_holds_the_rate_and_patch_changes_it_live") {
        return;
    }
    let _timing = timing_lock();
    let ns = NetNs::new();
    let socket = ns.packet_socket(TAP);
    const FRAME: usize = 1514;
    const SIZE: u64 = 100_000;
    const BURST: u64 = 300_000;
    let rate = 1_000_000.0; // 100 000 bytes per 100 ms
    let mut script = Script::default();
    let flood = script.frame(test_frame([0x02, 0, 0, 0, 0, 1], FRAME, 3));
    script.cmd(OP_FLOOD, flood, 60_000, 0);
    let mut opts = Boot::new("net-tx-rate");
    opts.tx_rate_limiter = Some(bandwidth(SIZE, BURST, 100));
    let before = Instant::now();
    let mut vmm = boot(&ns, &script, opts);
    let start_bytes = ns.counters(TAP).rx_bytes;
    wait_line(&vmm, "net-pump: flood-start");
    let started = Instant::now();

    // Average over the first ~3 s: the full bucket and the one-time burst, then the rate.
    thread::sleep(Duration::from_secs(3));
    let sent = ns.counters(TAP).rx_bytes - start_bytes;
    let elapsed = started.elapsed().as_secs_f64();
    let avg = (sent as f64 / tap_share(FRAME) - (SIZE + BURST) as f64) / elapsed;
    eprintln!(
        "tx limiter: {sent} bytes at the tap in {elapsed:.2} s (set-up took {:.2} s)",
        (started - before).as_secs_f64()
    );
    assert_near(avg, rate, "tx average rate after bucket and burst");
    let steady = tap_rate(&ns, Duration::from_secs(2)) / tap_share(FRAME);
    assert_near(steady, rate, "tx steady rate at 1 MB/s");

    // Twice the rate, live.
    vmm.patch_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "tx_rate_limiter": bandwidth(200_000, 0, 100)})),
    );
    thread::sleep(Duration::from_millis(500));
    let steady = tap_rate(&ns, Duration::from_secs(2)) / tap_share(FRAME);
    assert_near(steady, 2.0 * rate, "tx steady rate after PATCH to 2 MB/s");

    // A smaller bucket with a longer refill time: the same 0.5 MB/s on average.
    vmm.patch_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "tx_rate_limiter": bandwidth(250_000, 0, 500)})),
    );
    thread::sleep(Duration::from_millis(1000));
    let steady = tap_rate(&ns, Duration::from_secs(3)) / tap_share(FRAME);
    assert_near(steady, 0.5 * rate, "tx steady rate after PATCH to 0.5 MB/s");

    // Limiter off: far faster than any of the above.
    vmm.patch_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "tx_rate_limiter": bandwidth(0, 0, 0)})),
    );
    thread::sleep(Duration::from_millis(300));
    let unlimited = tap_rate(&ns, Duration::from_secs(1));
    eprintln!("tx after PATCH removing the limiter: {unlimited:.0} B/s");
    assert!(
        unlimited > 4.0 * rate,
        "removing the limiter should lift the rate well above 1 MB/s, got {unlimited:.0} B/s"
    );

    // An operations limit only: 200 frames per second, whatever their size.
    vmm.patch_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 500}}})),
    );
    thread::sleep(Duration::from_millis(1000));
    let (c0, t0) = (ns.counters(TAP), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let (c1, t1) = (ns.counters(TAP), Instant::now());
    let fps = (c1.rx_packets - c0.rx_packets) as f64 / (t1 - t0).as_secs_f64();
    assert_near(
        fps,
        200.0,
        "tx frames per second with an ops limiter of 100 per 500 ms",
    );

    let done = stop_guest(&vmm, &socket, "net-pump: flood-done");
    assert_eq!(line_field(&done, "why"), Some("stop"), "{done}");
    wait_reset(&mut vmm);
    finish(vmm, ns);
}

#[test]
fn guest_to_tap_throughput_without_a_limiter() {
    if !net_or_skip("guest_to_tap_throughput_without_a_limiter") {
        return;
    }
    let _timing = timing_lock();
    let ns = NetNs::new();
    let socket = ns.packet_socket(TAP);
    let mut script = Script::default();
    let flood = script.frame(test_frame([0x02, 0, 0, 0, 0, 1], 1514, 5));
    script.cmd(OP_FLOOD, flood, 60_000, 0);
    let mut vmm = boot(&ns, &script, Boot::new("net-tx-max"));
    wait_line(&vmm, "net-pump: flood-start");
    thread::sleep(Duration::from_millis(500));
    let c0 = ns.counters(TAP);
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(3));
    let c1 = ns.counters(TAP);
    let secs = t0.elapsed().as_secs_f64();
    let rate = (c1.rx_bytes - c0.rx_bytes) as f64 / secs;
    let pps = (c1.rx_packets - c0.rx_packets) as f64 / secs;
    eprintln!(
        "guest -> tap without a limiter: {:.1} MB/s, {pps:.0} frames/s of 1514 bytes",
        rate / 1e6
    );
    assert!(rate > 1e6, "guest -> tap at {rate:.0} B/s");
    assert_alive(&vmm, "during an unlimited flood");
    let done = stop_guest(&vmm, &socket, "net-pump: flood-done");
    assert_eq!(line_field(&done, "why"), Some("stop"), "{done}");
    wait_reset(&mut vmm);
    finish(vmm, ns);
}

/// Sends `frame` through `socket` at about `rate` bytes per second until `stop` is set.
fn flood_tap(
    socket: Arc<PacketSocket>,
    frame: Vec<u8>,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let started = Instant::now();
        let mut sent = 0u64;
        // One frame at a time, evenly spaced, so that each arrives on its own.
        while !stop.load(Ordering::Relaxed) {
            let due = Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
            // A full tap queue drops the frame, like a wire would.
            let _ = socket.send(&frame);
            sent += frame.len() as u64;
        }
        sent
    })
}

/// Sends stop frames until the guest prints a line containing `needle` (a full tap queue
/// drops frames, so one stop frame may be lost); returns that line.
fn stop_guest(vmm: &Vmm, socket: &PacketSocket, needle: &str) -> String {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        socket.send(&stop_frame()).expect("send the stop frame");
        if let Some(line) = vmm.stdout.wait_for(needle, Duration::from_millis(200)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not stop (no {needle:?}):\n{}",
            vmm.stdout.text()
        );
    }
}

/// (arrival time, bytes) of each progress line of the guest's SINK, in order, as the test
/// saw them arrive (polling every 5 ms).
struct SinkWatch {
    seen: usize,
    points: Vec<(Instant, u64)>,
}

impl SinkWatch {
    fn poll_for(&mut self, vmm: &Vmm, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            let lines = vmm.stdout.lines();
            let now = Instant::now();
            for l in &lines[self.seen..] {
                if l.starts_with("net-pump: sink frames=") {
                    self.points.push((now, line_num(l, "bytes")));
                }
            }
            self.seen = lines.len();
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Rate between the first progress line at or after `from` and the last one.
    fn rate_since(&self, from: Instant) -> f64 {
        let window: Vec<&(Instant, u64)> = self.points.iter().filter(|p| p.0 >= from).collect();
        assert!(
            window.len() >= 3,
            "too few progress lines: {}",
            window.len()
        );
        let (first, last) = (window[0], window[window.len() - 1]);
        (last.1 - first.1) as f64 / (last.0 - first.0).as_secs_f64()
    }
}

#[test]
fn rx_rate_limiter_holds_the_rate_and_patch_changes_it_live() {
    if !net_or_skip("rx_rate_limiter_holds_the_rate_and_patch_changes_it_live") {
        return;
    }
    let _timing = timing_lock();
    let ns = NetNs::new();
    let socket = Arc::new(ns.packet_socket(TAP));
    const FRAME: usize = 1000;
    const SIZE: u64 = 100_000;
    let rate = 1_000_000.0;
    let mut script = Script::default();
    // A progress line per 100 frames: serial output is slow, the guest must not spend its
    // time printing.
    script.cmd(OP_SINK, 60_000, 100, 0);
    let mut opts = Boot::new("net-rx-rate");
    opts.rx_rate_limiter = Some(bandwidth(SIZE, 0, 100));
    let mut vmm = boot(&ns, &script, opts);
    wait_line(&vmm, "net-pump: sink-start");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sender = flood_tap(
        socket.clone(),
        test_frame(GUEST_MAC, FRAME, 7),
        3.0 * rate,
        stop.clone(),
    );
    let mut watch = SinkWatch {
        seen: 0,
        points: Vec::new(),
    };
    watch.poll_for(&vmm, Duration::from_secs(3));
    // The first ~3 s on average: one full bucket, then the rate.
    let &(at, bytes) = watch.points.last().expect("progress lines from the guest");
    let avg = (bytes as f64 - SIZE as f64) / (at - started).as_secs_f64();
    assert_near(avg, rate, "rx average rate after the full bucket");
    let steady = watch.rate_since(started + Duration::from_secs(1));
    assert_near(steady, rate, "rx steady rate at 1 MB/s");

    vmm.patch_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "rx_rate_limiter": bandwidth(200_000, 0, 100)})),
    );
    let patched = Instant::now();
    watch.poll_for(&vmm, Duration::from_secs(3));
    let steady = watch.rate_since(patched + Duration::from_millis(500));
    assert_near(steady, 2.0 * rate, "rx steady rate after PATCH to 2 MB/s");
    assert_alive(&vmm, "while the tap is flooded");

    stop.store(true, Ordering::Relaxed);
    let offered = sender.join().expect("sender thread");
    eprintln!("rx: the host offered {offered} bytes");
    let done = stop_guest(&vmm, &socket, "net-pump: sink-done");
    assert_eq!(line_field(&done, "why"), Some("stop"), "{done}");
    wait_reset(&mut vmm);
    finish(vmm, ns);
}

#[test]
fn frames_waiting_for_rx_buffers_do_not_drain_the_rx_bucket() {
    if !net_or_skip("frames_waiting_for_rx_buffers_do_not_drain_the_rx_bucket") {
        return;
    }
    let _timing = timing_lock();
    let ns = NetNs::new();
    let socket = ns.packet_socket(TAP);
    // A bucket of ten 1000-byte frames, refilled very slowly: one frame per 5 s.
    const FRAME: u64 = 1000;
    const SIZE: u64 = 10 * FRAME;
    const REFILL_MS: u64 = 50_000;
    // A request passes whenever the budget is above zero (vmm::rate_limiter), so a full bucket
    // lets 11 frames through at once: 10 fit, the 11th goes into debt.
    const FRAMES: u32 = 11;
    // The guest posts no RX buffer for 2 s while the host keeps sending (50 frames/s, so each
    // arrival wakes the device), then posts 11.
    let mut script = Script::default();
    script
        .cmd(OP_RESET, 0, 3, 0)
        .cmd(OP_MARK, 1, 0, 0)
        .cmd(OP_SLEEP, 2000, 0, 0)
        .cmd(OP_POST, FRAMES, 0, 0)
        .recv(FRAMES, 20_000, ETH_TEST);
    let mut opts = Boot::new("net-rx-wait");
    opts.rx_rate_limiter = Some(bandwidth(SIZE, 0, REFILL_MS));
    let mut vmm = boot(&ns, &script, opts);
    wait_line(&vmm, "net-pump: mark 1");
    let frame = test_frame(GUEST_MAC, FRAME as usize, 4);
    let mut sent = 0;
    while !vmm.stdout.text().contains("net-pump: posted") {
        socket.send(&frame).expect("send to the guest");
        sent += 1;
        assert!(sent < 1000, "the guest never posted its buffers");
        thread::sleep(Duration::from_millis(20));
    }
    let posted = Instant::now();
    // Had the ~100 frames that arrived while the guest had no buffer been charged, the bucket
    // (drained after ten of them) would be at or below zero now, and within the window at most
    // 1 + WINDOW / (5 s per frame) = 2 frames could pass: one as soon as the budget is above
    // zero again, one 5 s later. A full bucket passes all 11 at once, so the guest's own speed
    // (it prints a line per frame, slowly when a loaded host emulates it) is all that limits
    // the count; THRESHOLD sits well between the two and asks the guest for little more than
    // a line a second.
    const WINDOW: Duration = Duration::from_secs(5);
    const THRESHOLD: usize = 6;
    let rx_lines = |vmm: &Vmm| {
        vmm.stdout
            .lines()
            .iter()
            .filter(|l| l.starts_with("net-pump: rx len=1000"))
            .count()
    };
    let mut early = rx_lines(&vmm);
    while early < THRESHOLD && posted.elapsed() < WINDOW {
        thread::sleep(Duration::from_millis(20));
        early = rx_lines(&vmm);
    }
    // Nothing was delivered while the guest had no buffer, so nothing may have been charged.
    eprintln!(
        "frames delivered within {:?} of posting buffers: {early}",
        posted.elapsed()
    );
    assert!(
        early >= THRESHOLD,
        "only {early} frames arrived within {WINDOW:?} after the guest posted buffers, though \
         the bucket should have been full: frames the device could not deliver were charged to \
         the RX rate limiter\n{}",
        vmm.stdout.text()
    );
    let lines = wait_reset(&mut vmm);
    let done = lines
        .iter()
        .find(|l| l.starts_with("net-pump: recv got="))
        .expect("recv summary");
    assert_eq!(line_num(done, "got"), u64::from(FRAMES), "{done}");
    finish(vmm, ns);
}

// ---------------------------------------------------------------------------------------------
// Tests: API errors that need real taps

fn expect_400(vmm: &Vmm, method: &str, path: &str, body: &str, needles: &[&str]) {
    let (status, answer) = vmm.api(method, path, Some(body));
    assert_eq!(
        status, 400,
        "{method} {path} {body} answered {status}: {answer}"
    );
    for needle in needles {
        assert!(
            answer.contains(needle),
            "{method} {path} {body}: the error should mention {needle:?}: {answer}"
        );
    }
}

#[test]
fn network_interface_errors_with_real_taps() {
    if !net_or_skip("network_interface_errors_with_real_taps") {
        return;
    }
    let _timing = guest_lock();
    let ns = NetNs::new();
    ns.add_tap("tap1");
    let vmm = Vmm::with_api_in_netns(&ns.name, "net-api", &[]);
    vmm.put_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC_TEXT})),
    );
    // The same MAC spelled differently is still the same MAC.
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth1",
        &json(
            &json!({"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}),
        ),
        &["MAC", "already used", "eth0"],
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth1",
        &json(&json!({"iface_id": "eth1", "host_dev_name": TAP})),
        &["tap0", "already used", "eth0"],
    );
    // A tap that exists outside the VMM's namespace but not inside does not exist for it.
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth1",
        &json(&json!({"iface_id": "eth1", "host_dev_name": "kilnnotap9"})),
        &["kilnnotap9", "does not exist"],
    );
    // Replacing eth0 with itself (same tap and MAC) is allowed.
    vmm.put_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC_TEXT})),
    );
    vmm.put_ok(
        "/network-interfaces/eth1",
        &json(
            &json!({"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:AC:10:00:03"}),
        ),
    );

    // Boot an idling guest with both interfaces.
    let mut script = Script::default();
    script.cmd(OP_SLEEP, 600_000, 0, 0);
    let disk = vmm.dir.join("script.img");
    script.write(&disk);
    vmm.put_ok(
        "/machine-config",
        &json(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
    );
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest("net-pump"),
            "boot_args": "console=ttyS0",
        })),
    );
    vmm.put_ok(
        "/drives/script",
        &json(&json!({"drive_id": "script", "path_on_host": disk, "is_root_device": false, "is_read_only": false})),
    );
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    wait_line(&vmm, "net-pump: net base=");

    expect_400(
        &vmm,
        "PATCH",
        "/network-interfaces/eth7",
        &json(&json!({"iface_id": "eth7", "tx_rate_limiter": bandwidth(1000, 0, 100)})),
        &["eth7"],
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth2",
        &json(&json!({"iface_id": "eth2", "host_dev_name": "tap1"})),
        &["Network interfaces"],
    );
    expect_400(
        &vmm,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","tx_rate_limiter":{"bandwidth":{"size":"big"}}}"#,
        &["size"],
    );
    vmm.patch_ok(
        "/network-interfaces/eth1",
        &json(&json!({"iface_id": "eth1", "rx_rate_limiter": bandwidth(1000, 0, 100)})),
    );
    let (status, config) = vmm.get("/vm/config");
    assert_eq!(status, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config).expect("JSON config");
    assert_eq!(
        config["network-interfaces"][1]["rx_rate_limiter"]["bandwidth"]["size"], 1000,
        "{config}"
    );
    assert_alive(&vmm, "after the refused requests");
    finish(vmm, ns);
}

#[test]
fn instance_start_fails_cleanly_when_a_tap_cannot_be_used() {
    if !net_or_skip("instance_start_fails_cleanly_when_a_tap_cannot_be_used") {
        return;
    }
    let _timing = guest_lock();
    let ns = NetNs::new();
    // A tap another process holds open (kiln-vmm opens taps single-queue, so a second open
    // is refused with EBUSY).
    let holder = Vmm::with_api_in_netns(&ns.name, "net-holder", &[]);
    let mut script = Script::default();
    script.cmd(OP_SLEEP, 600_000, 0, 0);
    let holder_disk = holder.dir.join("script.img");
    script.write(&holder_disk);
    for (path, body) in [
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
        (
            "/boot-source",
            json!({"kernel_image_path": test_guests::guest("net-pump"), "boot_args": "console=ttyS0"}),
        ),
        (
            "/drives/script",
            json!({"drive_id": "script", "path_on_host": holder_disk, "is_root_device": false, "is_read_only": false}),
        ),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": TAP}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ] {
        holder.put_ok(path, &json(&body));
    }
    wait_line(&holder, "net-pump: net base=");

    let vmm = Vmm::with_api_in_netns(&ns.name, "net-busy", &[]);
    let disk = vmm.dir.join("script.img");
    script.write(&disk);
    vmm.put_ok(
        "/machine-config",
        &json(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
    );
    vmm.put_ok(
        "/boot-source",
        &json(&json!({"kernel_image_path": test_guests::guest("net-pump"), "boot_args": "console=ttyS0"})),
    );
    vmm.put_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "host_dev_name": TAP})),
    );
    let (status, answer) = vmm.put("/actions", &json(&json!({"action_type": "InstanceStart"})));
    eprintln!("InstanceStart on a busy tap: {status} {answer}");
    assert_eq!(status, 400, "InstanceStart on a tap in use: {answer}");
    assert!(
        answer.contains(TAP),
        "the error should name the tap: {answer}"
    );
    assert_alive(&vmm, "after a failed InstanceStart");

    // A device that is not a tap (the namespace's loopback).
    vmm.put_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "host_dev_name": "lo"})),
    );
    let (status, answer) = vmm.put("/actions", &json(&json!({"action_type": "InstanceStart"})));
    eprintln!("InstanceStart on lo: {status} {answer}");
    assert_eq!(status, 400, "InstanceStart on lo: {answer}");
    assert!(
        answer.contains("lo"),
        "the error should name the device: {answer}"
    );

    // A tap removed between PUT and InstanceStart.
    ns.add_tap("tap2");
    vmm.put_ok(
        "/network-interfaces/eth0",
        &json(&json!({"iface_id": "eth0", "host_dev_name": "tap2"})),
    );
    ns.ip(&["link", "del", "tap2"]);
    let (status, answer) = vmm.put("/actions", &json(&json!({"action_type": "InstanceStart"})));
    eprintln!("InstanceStart on a removed tap: {status} {answer}");
    assert_eq!(status, 400, "InstanceStart on a removed tap: {answer}");
    assert!(
        answer.contains("tap2"),
        "the error should name the tap: {answer}"
    );
    assert_alive(&vmm, "after failed starts");
    drop(holder);
    finish(vmm, ns);
}
