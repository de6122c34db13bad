//! virtio-vsock end to end: the `vsock` and `hostile-vsock` test guests talk to host processes
//! through the real `kiln-vmm` binary's hybrid Unix-socket design (Firecracker's): guest
//! connections to host port P reach the Unix listener at `{uds_path}_{P}`, and host processes
//! reach guest listeners by connecting to `uds_path` and writing `CONNECT P\n`.
//!
//! Data is a pattern that the guest and these tests generate alike (a block of xorshift32
//! bytes seeded by the host-side port, repeated with a prime period so that no packet size
//! lines up with it), checked byte for byte on both ends. Every test skips (and says why) when
//! `/dev/kvm` cannot be opened.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{json, kvm_or_skip, line_field, line_num, Vmm};
use serde_json::json;

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const GUEST_CID: u64 = 3;
/// How long a guest run may take; generous, since guest code may be emulated slowly.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one host socket read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Sizes that let one packet carry 64 KiB (the device's per-packet limit).
const BIG_PACKETS: &str = "kiln.rxbuf=65580 kiln.rxbufs=16 kiln.txpkt=65536";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The pattern and the host side of a stream

/// Seed of the guest → host direction of a connection whose host-side port is `port`.
fn seed_to_host(port: u32) -> u32 {
    port.wrapping_mul(2_654_435_761) ^ 0x746f_6873
}

/// Seed of the host → guest direction.
fn seed_to_guest(port: u32) -> u32 {
    port.wrapping_mul(2_654_435_761) ^ 0x6775_6573
}

/// Period of the pattern (`VS_PAT_LEN` in vsock_drv.h), a prime.
const PATTERN_PERIOD: usize = 65_521;

/// `n` bytes of the pattern (same as `vs_pattern_fill` in vsock_drv.c, repeated).
fn pattern(seed: u32, n: usize) -> Vec<u8> {
    let mut x = if seed == 0 { 1 } else { seed };
    let mut block = Vec::with_capacity(PATTERN_PERIOD + 4);
    while block.len() < PATTERN_PERIOD {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        block.extend_from_slice(&x.to_le_bytes());
    }
    block.truncate(PATTERN_PERIOD);
    block.iter().copied().cycle().take(n).collect()
}

/// Where two byte strings first differ, for readable assertion messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts `got` is exactly `want`, saying where they differ otherwise.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: got {} bytes, expected {}; first difference at byte {at}",
            got.len(),
            want.len()
        );
    }
}

/// What one host-side stream did.
struct Exchange {
    received: Vec<u8>,
    /// From the first byte written or read to EOF and the last write, whichever is later.
    elapsed: Duration,
}

/// Writes `send` on a clone of `stream` while reading until EOF, then returns what was read.
/// The stream is closed when this returns (unless `keep` is given a place to put it).
fn exchange(stream: UnixStream, send: Vec<u8>, keep: Option<&mut Option<UnixStream>>) -> Exchange {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
    let start = Instant::now();
    let mut writer = stream.try_clone().expect("clone host stream");
    let write = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&send)?;
        writer.flush()
    });
    let mut received = Vec::new();
    let mut reader = &stream;
    let read = reader.read_to_end(&mut received);
    let wrote = write.join().expect("writer thread");
    let elapsed = start.elapsed();
    if let Err(e) = read {
        panic!("host read failed after {} bytes: {e}", received.len());
    }
    if let Err(e) = wrote {
        panic!("host write failed: {e}");
    }
    if let Some(slot) = keep {
        *slot = Some(stream);
    }
    Exchange { received, elapsed }
}

/// Connects to the VMM's vsock socket, asks for guest port `port`, and returns the stream and
/// the host-side port from the `OK` line; `Err` with what the VMM answered otherwise.
fn host_connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut stream = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "VMM closed the stream after {:?}",
                    String::from_utf8_lossy(&line)
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("reading the OK line: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line).to_string();
    let port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("expected \"OK <port>\", got {text:?}"))?;
    Ok((stream, port))
}

/// Accepts connections on `listener` in the background, running `handle` for each on its own
/// thread, until the returned server is stopped.
struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Server {
    fn start(
        listener: UnixListener,
        handle: impl Fn(UnixStream) + Send + Sync + 'static,
    ) -> Server {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handle = Arc::new(handle);
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).expect("blocking stream");
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let handle = handle.clone();
                            handlers.push(thread::spawn(move || handle(stream)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept on a host vsock listener: {e}"),
                    }
                }
                handlers
            })
        };
        Server {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// How many connections were accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting and waits for every handler; panics if one panicked.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            for handler in thread.join().expect("accept thread") {
                if let Err(panic) = handler.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// The VM

/// A kiln-vmm with a vsock device, booting the `guest` test guest with `args` appended.
struct VsockVm {
    vmm: Vmm,
    uds: PathBuf,
}

impl VsockVm {
    /// Configures the VM (machine, boot source, vsock) without starting it.
    fn configure(id: &str, guest: &str, args: &str) -> VsockVm {
        let vmm = Vmm::with_api(id, &[]);
        vmm.put_ok(
            "/machine-config",
            &json(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
        );
        vmm.put_ok(
            "/boot-source",
            &json(&json!({
                "kernel_image_path": test_guests::guest(guest),
                "boot_args": format!("{BOOT_ARGS} {args}"),
            })),
        );
        let uds = vmm.dir.join("v.sock");
        vmm.put_ok(
            "/vsock",
            &json(&json!({"guest_cid": GUEST_CID, "uds_path": uds})),
        );
        VsockVm { vmm, uds }
    }

    /// Binds the host listener that guest connections to `port` reach.
    fn host_listener(&self, port: u32) -> UnixListener {
        let path = format!("{}_{port}", self.uds.display());
        UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"))
    }

    fn start(&self) {
        self.vmm
            .put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    }

    /// Waits for a guest line containing `needle`; panics with the output if none comes.
    fn wait_line(&self, needle: &str) -> String {
        self.vmm
            .stdout
            .wait_for(needle, RUN_TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "the guest printed no line containing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.vmm.stdout.text(),
                    self.vmm.stderr.text()
                )
            })
    }

    /// The "vsock: conn" lines so far.
    fn conn_lines(&self) -> Vec<String> {
        self.vmm
            .stdout
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("vsock: conn ") && l.contains(" state="))
            .collect()
    }

    /// The conn line of the connection whose host-side port is `port`.
    fn conn_line(&self, port: u32) -> String {
        let needle = format!(" host-port={port} ");
        self.conn_lines()
            .into_iter()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| {
                panic!(
                    "no conn line for host port {port}:\n{}",
                    self.vmm.stdout.text()
                )
            })
    }

    /// Asserts the VMM still answers its API.
    fn assert_api_alive(&self) {
        let (status, body) = self.vmm.get("/");
        assert_eq!(status, 200, "GET / answered {status}: {body}");
    }
}

/// Checks a guest conn line for a pattern stream: everything sent and received, nothing wrong.
fn assert_guest_received_pattern(line: &str, expected: usize) {
    assert_eq!(line_num(line, "received"), expected as u64, "{line}");
    assert_eq!(line_num(line, "mismatches"), 0, "{line}");
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// Guest → host

#[test]
fn guest_connects_to_host_listener_sends_a_message_and_reads_the_reply() {
    if !kvm_or_skip("guest_connects_to_host_listener_sends_a_message_and_reads_the_reply") {
        return;
    }
    const PORT: u32 = 5200;
    const REPLY: &[u8] = b"hello guest, this is the host\n";
    let mut vm = VsockVm::configure(
        "vs-g2h",
        "vsock",
        &format!(
            "kiln.mode=connect kiln.port={PORT} kiln.text=1 kiln.recv={}",
            REPLY.len()
        ),
    );
    let got = Arc::new(Mutex::new(None));
    let server = {
        let got = got.clone();
        Server::start(vm.host_listener(PORT), move |stream| {
            let ex = exchange(stream, REPLY.to_vec(), None);
            *got.lock().expect("lock") = Some(ex.received);
        })
    };
    vm.start();
    let done = vm.wait_line("vsock: done");
    let status = vm.vmm.expect_exit(RUN_TIMEOUT);
    server.finish();
    assert!(
        status.success(),
        "guest reset ends the VMM with 0: {status}"
    );
    assert_eq!(line_num(&done, "finished"), 1, "{done}");

    let message = got.lock().expect("lock").take().expect("host accepted");
    let message = String::from_utf8_lossy(&message).to_string();
    assert_eq!(
        message,
        format!("hello host, this is guest cid {GUEST_CID} port 1024\n"),
        "what the guest sent"
    );
    let line = vm.conn_line(PORT);
    assert_eq!(line_field(&line, "refused"), Some("0"), "{line}");
    assert_eq!(line_num(&line, "received"), REPLY.len() as u64, "{line}");
    let shown = line
        .rsplit("text=\"")
        .next()
        .unwrap_or("")
        .trim_end_matches('"');
    assert_eq!(
        shown,
        String::from_utf8_lossy(REPLY).replace('\n', "\\n"),
        "the reply as the guest read it: {line}"
    );
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_refused_with_rst() {
    if !kvm_or_skip("guest_connect_to_a_port_nobody_listens_on_is_refused_with_rst") {
        return;
    }
    const PORT: u32 = 5300;
    let mut vm = VsockVm::configure(
        "vs-refused",
        "vsock",
        &format!("kiln.mode=connect kiln.port={PORT} kiln.send=100"),
    );
    vm.start();
    vm.wait_line("vsock: done");
    let status = vm.vmm.expect_exit(RUN_TIMEOUT);
    assert!(status.success(), "{status}");
    let line = vm.conn_line(PORT);
    assert_eq!(line_field(&line, "refused"), Some("1"), "{line}");
    assert_eq!(line_field(&line, "rst"), Some("1"), "{line}");
    assert_eq!(line_field(&line, "state"), Some("closed"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Host → guest

/// Runs `conns` host connections to a listening guest at once, `to_guest` bytes in and
/// `to_host` bytes out on each; checks both ends and returns (VM, elapsed per connection).
fn host_to_guest_streams(
    id: &str,
    conns: u32,
    to_guest: usize,
    to_host: usize,
    extra: &str,
) -> (VsockVm, Vec<Duration>) {
    const PORT: u32 = 5400;
    let vm = VsockVm::configure(
        id,
        "vsock",
        &format!(
            "kiln.mode=listen kiln.port={PORT} kiln.conns={conns} kiln.send={to_host} \
             kiln.recv={to_guest} kiln.close=none kiln.end=idle {extra}"
        ),
    );
    vm.start();
    vm.wait_line("vsock: listening");
    let mut threads = Vec::new();
    for _ in 0..conns {
        let uds = vm.uds.clone();
        threads.push(thread::spawn(move || {
            let (stream, host_port) = host_connect(&uds, PORT).expect("CONNECT answered OK");
            let ex = exchange(stream, pattern(seed_to_guest(host_port), to_guest), None);
            (host_port, ex)
        }));
    }
    let mut elapsed = Vec::new();
    let mut ports = Vec::new();
    for thread in threads {
        let (host_port, ex) = thread.join().expect("host connection thread");
        assert_same_bytes(
            &ex.received,
            &pattern(seed_to_host(host_port), to_host),
            &format!("guest → host on host port {host_port}"),
        );
        elapsed.push(ex.elapsed);
        ports.push(host_port);
    }
    let done = vm.wait_line("vsock: done");
    assert_eq!(line_num(&done, "finished"), u64::from(conns), "{done}");
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        ports.len(),
        conns as usize,
        "every OK names its own host port"
    );
    for port in ports {
        let line = vm.conn_line(port);
        assert_eq!(line_num(&line, "guest-port"), u64::from(PORT), "{line}");
        assert_guest_received_pattern(&line, to_guest);
        assert_eq!(line_num(&line, "sent"), to_host as u64, "{line}");
    }
    vm.assert_api_alive();
    (vm, elapsed)
}

#[test]
fn host_connects_to_guest_port_gets_ok_and_exchanges_data_both_ways() {
    if !kvm_or_skip("host_connects_to_guest_port_gets_ok_and_exchanges_data_both_ways") {
        return;
    }
    host_to_guest_streams("vs-h2g", 1, 10_000, 12_345, "");
}

#[test]
fn four_concurrent_host_connections_each_carry_their_own_data_both_ways() {
    if !kvm_or_skip("four_concurrent_host_connections_each_carry_their_own_data_both_ways") {
        return;
    }
    host_to_guest_streams("vs-four", 4, 300_000, 300_000, "");
}

#[test]
fn connect_to_a_guest_port_nobody_listens_on_is_closed_without_ok() {
    if !kvm_or_skip("connect_to_a_guest_port_nobody_listens_on_is_closed_without_ok") {
        return;
    }
    let vm = VsockVm::configure(
        "vs-noguest",
        "vsock",
        "kiln.mode=listen kiln.port=5400 kiln.conns=1 kiln.end=idle kiln.timeout=600",
    );
    vm.start();
    vm.wait_line("vsock: listening");
    let answer = host_connect(&vm.uds, 5999);
    assert!(
        answer.is_err(),
        "CONNECT to a port the guest does not listen on must not succeed: {:?}",
        answer.map(|(_, port)| port)
    );
    vm.assert_api_alive();
}

// ---------------------------------------------------------------------------------------------
// Large transfers: more than the 256 KiB the device grants per connection

#[test]
fn large_guest_to_host_transfer_needs_credit_updates_and_arrives_byte_for_byte() {
    if !kvm_or_skip("large_guest_to_host_transfer_needs_credit_updates_and_arrives_byte_for_byte") {
        return;
    }
    let bytes = 8 * MIB;
    let (vm, elapsed) = host_to_guest_streams("vs-big-out", 1, 0, bytes, BIG_PACKETS);
    let line = vm.conn_lines().pop().expect("one conn line");
    assert!(
        line_num(&line, "credit-updates") >= 1,
        "8 MiB out of a 256 KiB window needs CREDIT_UPDATEs from the device: {line}"
    );
    println!(
        "vsock guest → host: {bytes} bytes in {:?} = {:.1} MB/s (guest: {} ms)",
        elapsed[0],
        mb_per_s(bytes, elapsed[0]),
        line_num(&line, "ms")
    );
}

#[test]
fn large_host_to_guest_transfer_follows_guest_credit_and_arrives_byte_for_byte() {
    if !kvm_or_skip("large_host_to_guest_transfer_follows_guest_credit_and_arrives_byte_for_byte") {
        return;
    }
    let bytes = 8 * MIB;
    let (vm, elapsed) = host_to_guest_streams(
        "vs-big-in",
        1,
        bytes,
        0,
        &format!("{BIG_PACKETS} kiln.bufalloc=262144"),
    );
    let line = vm.conn_lines().pop().expect("one conn line");
    println!(
        "vsock host → guest: {bytes} bytes in {:?} = {:.1} MB/s (guest: {} ms)",
        elapsed[0],
        mb_per_s(bytes, elapsed[0]),
        line_num(&line, "ms")
    );
}

#[test]
fn large_transfer_both_ways_at_once_arrives_byte_for_byte() {
    if !kvm_or_skip("large_transfer_both_ways_at_once_arrives_byte_for_byte") {
        return;
    }
    let bytes = 4 * MIB;
    let (_vm, elapsed) = host_to_guest_streams("vs-big-both", 1, bytes, bytes, BIG_PACKETS);
    println!(
        "vsock both ways: 2 x {bytes} bytes in {:?} = {:.1} MB/s total",
        elapsed[0],
        mb_per_s(2 * bytes, elapsed[0])
    );
}

#[test]
fn large_transfer_with_4_kib_packets_arrives_byte_for_byte() {
    if !kvm_or_skip("large_transfer_with_4_kib_packets_arrives_byte_for_byte") {
        return;
    }
    let bytes = 2 * MIB;
    let (_vm, elapsed) = host_to_guest_streams("vs-4k", 1, bytes, bytes, "");
    println!(
        "vsock both ways, 4 KiB packets: 2 x {bytes} bytes in {:?} = {:.1} MB/s total",
        elapsed[0],
        mb_per_s(2 * bytes, elapsed[0])
    );
}

// ---------------------------------------------------------------------------------------------
// Closing

#[test]
fn host_closing_its_socket_makes_the_guest_see_shutdown() {
    if !kvm_or_skip("host_closing_its_socket_makes_the_guest_see_shutdown") {
        return;
    }
    const PORT: u32 = 5500;
    let mut vm = VsockVm::configure(
        "vs-hclose",
        "vsock",
        &format!(
            "kiln.mode=listen kiln.port={PORT} kiln.send=1000 kiln.recv=2000 kiln.close=host \
             kiln.timeout=60"
        ),
    );
    vm.start();
    vm.wait_line("vsock: listening");
    let (stream, host_port) = host_connect(&vm.uds, PORT).expect("CONNECT answered OK");
    let ex = exchange(stream, pattern(seed_to_guest(host_port), 2000), None);
    assert_same_bytes(
        &ex.received,
        &pattern(seed_to_host(host_port), 1000),
        "guest → host",
    );
    // `exchange` closed the host stream: the guest must hear SHUTDOWN and finish.
    let done = vm.wait_line("vsock: done");
    vm.vmm.expect_exit(RUN_TIMEOUT);
    let line = vm.conn_line(host_port);
    assert_eq!(line_num(&done, "finished"), 1, "{done}\n{line}");
    assert_eq!(
        line_num(&line, "shutdown-flags"),
        3,
        "SHUTDOWN with RCV|SEND after the host closed: {line}"
    );
    assert_eq!(line_field(&line, "state"), Some("closed"), "{line}");
    assert_guest_received_pattern(&line, 2000);
}

#[test]
fn guest_shutdown_right_after_sending_still_delivers_every_byte_to_a_slow_host_reader() {
    if !kvm_or_skip(
        "guest_shutdown_right_after_sending_still_delivers_every_byte_to_a_slow_host_reader",
    ) {
        return;
    }
    const PORT: u32 = 5600;
    let bytes = 2 * MIB;
    let mut vm = VsockVm::configure(
        "vs-gclose",
        "vsock",
        &format!(
            "kiln.mode=connect kiln.port={PORT} kiln.send={bytes} kiln.close=guest {BIG_PACKETS}"
        ),
    );
    let got = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let got = got.clone();
        Server::start(vm.host_listener(PORT), move |mut stream| {
            stream
                .set_read_timeout(Some(IO_TIMEOUT))
                .expect("read timeout");
            let mut all = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                // A slow reader: the device has to hold data back while the guest closes.
                thread::sleep(Duration::from_millis(2));
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("host read after {} bytes: {e}", all.len()),
                }
            }
            *got.lock().expect("lock") = all;
        })
    };
    vm.start();
    vm.wait_line("vsock: done");
    vm.vmm.expect_exit(RUN_TIMEOUT);
    server.finish();
    let line = vm.conn_line(PORT);
    assert_eq!(line_num(&line, "sent"), bytes as u64, "{line}");
    let got = got.lock().expect("lock");
    assert_same_bytes(
        &got,
        &pattern(seed_to_host(PORT), bytes),
        "guest → host before SHUTDOWN",
    );
}

#[test]
fn vsock_socket_file_is_removed_when_the_vmm_exits_after_guest_reset() {
    if !kvm_or_skip("vsock_socket_file_is_removed_when_the_vmm_exits_after_guest_reset") {
        return;
    }
    const PORT: u32 = 5700;
    // The guest listens and waits for one connection, so the VMM is certainly still up when
    // the socket is checked; a guest with nothing to wait for may reset (and the VMM exit and
    // remove the socket) before a loaded host gets to look.
    let mut vm = VsockVm::configure(
        "vs-cleanup",
        "vsock",
        &format!(
            "kiln.mode=listen kiln.port={PORT} kiln.conns=1 kiln.send=100 kiln.recv=200 \
             kiln.close=host kiln.timeout=600"
        ),
    );
    vm.start();
    vm.wait_line("vsock: listening");
    assert!(
        vm.uds.exists(),
        "{} exists while the VM runs",
        vm.uds.display()
    );
    // One exchange, then the host closes: the guest finishes its only connection and resets.
    let (stream, host_port) = host_connect(&vm.uds, PORT).expect("CONNECT answered OK");
    let ex = exchange(stream, pattern(seed_to_guest(host_port), 200), None);
    assert_same_bytes(
        &ex.received,
        &pattern(seed_to_host(host_port), 100),
        "guest → host",
    );
    let done = vm.wait_line("vsock: done");
    assert_eq!(line_num(&done, "finished"), 1, "{done}");
    let status = vm.vmm.expect_exit(RUN_TIMEOUT);
    assert!(status.success(), "{status}");
    assert!(
        !vm.uds.exists(),
        "{} must be gone after kiln-vmm exited",
        vm.uds.display()
    );
}

// ---------------------------------------------------------------------------------------------
// hostile-vsock

const HOSTILE_PORT: u32 = 7000;

/// One run of the hostile-vsock guest, shared by the tests that check different aspects.
struct HostileRun {
    lines: Vec<String>,
    liveness_failures: Vec<String>,
    good_accepted: usize,
    split_accepted: usize,
    good_received: Vec<u8>,
    stall_eof: Option<bool>,
}

fn hostile_run() -> &'static HostileRun {
    static RUN: OnceLock<HostileRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let vm = VsockVm::configure(
            "vs-hostile",
            "hostile-vsock",
            &format!("kiln.port={HOSTILE_PORT}"),
        );
        let good_received = Arc::new(Mutex::new(Vec::new()));
        let good = {
            let good_received = good_received.clone();
            Server::start(vm.host_listener(HOSTILE_PORT), move |stream| {
                let reply = pattern(seed_to_guest(HOSTILE_PORT), 64 * 1024);
                let ex = exchange(stream, reply, None);
                *good_received.lock().expect("lock") = ex.received;
            })
        };
        // Accepts and holds the stream without reading until the guest is done.
        let stall_release = Arc::new(AtomicBool::new(false));
        let stall_eof = Arc::new(Mutex::new(None));
        let stall = {
            let release = stall_release.clone();
            let eof = stall_eof.clone();
            Server::start(vm.host_listener(HOSTILE_PORT + 1), move |mut stream| {
                while !release.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(20));
                }
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("read timeout");
                let mut sink = Vec::new();
                *eof.lock().expect("lock") = Some(stream.read_to_end(&mut sink).is_ok());
            })
        };
        let split = Server::start(vm.host_listener(HOSTILE_PORT + 2), move |mut stream| {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        vm.start();

        let mut vmm = vm.vmm;
        let mut liveness_failures = common::watch_liveness(
            &mut vmm,
            "hostile-vsock: finished",
            Instant::now() + RUN_TIMEOUT,
            Duration::from_millis(300),
        );
        stall_release.store(true, Ordering::SeqCst);
        let good_accepted = good.accepted();
        let split_accepted = split.accepted();
        good.finish();
        stall.finish();
        split.finish();
        if !liveness_failures.is_empty() {
            liveness_failures.push(format!("stderr:\n{}", vmm.stderr.text()));
        }
        let lines = vmm.stdout.lines();
        let good_received = std::mem::take(&mut *good_received.lock().expect("lock"));
        let stall_eof = *stall_eof.lock().expect("lock");
        HostileRun {
            lines,
            liveness_failures,
            good_accepted,
            split_accepted,
            good_received,
            stall_eof,
        }
    })
}

fn hostile_case<'a>(run: &'a HostileRun, name: &str) -> &'a str {
    let needle = format!(" {name}: ");
    run.lines
        .iter()
        .find(|l| l.starts_with("hostile-vsock: case ") && l.contains(&needle))
        .unwrap_or_else(|| panic!("no report of case {name}:\n{}", run.lines.join("\n")))
}

fn hostile_output(run: &HostileRun) -> String {
    run.lines.join("\n")
}

#[test]
fn hostile_vsock_packets_leave_the_vmm_up_and_a_good_connection_works_afterwards() {
    if !kvm_or_skip("hostile_vsock_packets_leave_the_vmm_up_and_a_good_connection_works_afterwards")
    {
        return;
    }
    let run = hostile_run();
    let output = hostile_output(run);
    println!("{output}");
    assert!(
        run.liveness_failures.is_empty(),
        "{}\nguest output:\n{output}",
        run.liveness_failures.join("\n")
    );
    let ready = run
        .lines
        .iter()
        .find(|l| l.starts_with("hostile-vsock: ready"))
        .unwrap_or_else(|| panic!("no ready line:\n{output}"));
    let cases = line_num(ready, "cases");
    let reported = run
        .lines
        .iter()
        .filter(|l| l.starts_with("hostile-vsock: case "))
        .count();
    assert_eq!(reported as u64, cases, "every case reported:\n{output}");
    assert!(
        run.lines
            .iter()
            .filter(|l| l.starts_with("hostile-vsock: case "))
            .all(|l| line_field(l, "needs-reset") == Some("0")),
        "no case may break the device:\n{output}"
    );
    let good = run
        .lines
        .iter()
        .find(|l| l.starts_with("hostile-vsock: good: conn "))
        .unwrap_or_else(|| panic!("no good connection report:\n{output}"));
    assert_eq!(line_field(good, "refused"), Some("0"), "{good}");
    assert_guest_received_pattern(good, 64 * 1024);
    assert_eq!(line_num(good, "sent"), 64 * 1024, "{good}");
    assert_same_bytes(
        &run.good_received,
        &pattern(seed_to_host(HOSTILE_PORT), 64 * 1024),
        "the good connection's data at the host",
    );
}

#[test]
fn hostile_vsock_invalid_headers_are_answered_with_rst_and_never_reach_the_host() {
    if !kvm_or_skip("hostile_vsock_invalid_headers_are_answered_with_rst_and_never_reach_the_host")
    {
        return;
    }
    let run = hostile_run();
    for name in [
        "unknown-op",
        "wrong-type",
        "wrong-src-cid",
        "wrong-dst-cid",
        "rw-unknown-connection",
    ] {
        let line = hostile_case(run, name);
        assert_eq!(line_field(line, "rst"), Some("yes"), "{line}");
        assert_eq!(line_field(line, "response"), Some("no"), "{line}");
    }
    assert_eq!(
        run.good_accepted,
        1,
        "only the final good connection may reach the host listener:\n{}",
        hostile_output(run)
    );
}

#[test]
fn hostile_vsock_malformed_tx_chains_are_returned_and_dropped() {
    if !kvm_or_skip("hostile_vsock_malformed_tx_chains_are_returned_and_dropped") {
        return;
    }
    let run = hostile_run();
    for name in [
        "len-beyond-buffer",
        "len-over-64k",
        "header-shorter-than-44",
        "header-outside-ram",
        "payload-outside-ram",
        "header-in-mmio-gap",
        "descriptor-wrapping-address-space",
        "device-writable-header",
        "zero-length-descriptor",
    ] {
        let line = hostile_case(run, name);
        assert_eq!(line_field(line, "tx-used"), Some("yes"), "{line}");
        assert_eq!(line_field(line, "response"), Some("no"), "{line}");
        assert_eq!(line_field(line, "needs-reset"), Some("0"), "{line}");
    }
}

#[test]
fn hostile_vsock_header_split_across_descriptors_is_a_valid_request() {
    if !kvm_or_skip("hostile_vsock_header_split_across_descriptors_is_a_valid_request") {
        return;
    }
    let run = hostile_run();
    let line = hostile_case(run, "header-split-across-descriptors");
    assert_eq!(line_field(line, "response"), Some("yes"), "{line}");
    assert_eq!(
        run.split_accepted, 2,
        "split-header and established cases reach the host"
    );
}

#[test]
fn hostile_vsock_unknown_op_on_an_established_connection_resets_it() {
    if !kvm_or_skip("hostile_vsock_unknown_op_on_an_established_connection_resets_it") {
        return;
    }
    let line = hostile_case(hostile_run(), "unknown-op-on-established-connection");
    assert_eq!(line_field(line, "response"), Some("yes"), "{line}");
    assert_eq!(line_field(line, "rst"), Some("yes"), "{line}");
}

#[test]
fn hostile_vsock_credit_overrun_resets_that_connection() {
    if !kvm_or_skip("hostile_vsock_credit_overrun_resets_that_connection") {
        return;
    }
    let run = hostile_run();
    let line = hostile_case(run, "credit-overrun");
    assert_eq!(line_field(line, "response"), Some("yes"), "{line}");
    assert_eq!(line_field(line, "rst"), Some("yes"), "{line}");
    let sent = line_num(line, "overrun-sent");
    assert!(
        sent > 256 * 1024 && sent < 16 << 20,
        "the RST came after the guest exceeded its 256 KiB credit: {line}"
    );
    assert_eq!(
        run.stall_eof,
        Some(true),
        "the host side of the overrun connection sees EOF"
    );
}
