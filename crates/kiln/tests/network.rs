//! `kiln run --network bridge` end to end: the real `kiln` binary boots Debian's cloud kernel
//! under QEMU (TCG here) on the NAT bridge `kiln0`.
//!
//! The bridge, the nftables table and IPv4 forwarding are host-global, so every test first
//! moves its own thread into a fresh network namespace (`unshare(CLONE_NEWNET)` affects only
//! the calling thread; the kiln processes it starts, their supervisors and hypervisors inherit
//! it). The host's network is never touched, and tests cannot collide with each other. Each
//! test has its own kiln root too. No test needs outbound internet.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{assert_fails_with, describe, missing_boot_prerequisite, text, Root};

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("bridge networking needs root (network namespaces, taps, nftables)".into());
    }
    if let Some(why) = missing_boot_prerequisite() {
        return Some(why);
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing (modprobe tun)".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install {package})"
            ));
        }
    }
    None
}

/// Moves the calling thread into a new network namespace with loopback up.
fn enter_network_namespace() -> Result<(), String> {
    // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET is per thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip link set lo up: {}", text(&out.stderr)));
    }
    Ok(())
}

macro_rules! require_prerequisites {
    () => {
        if let Some(why) = missing_prerequisite() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        if let Err(why) = enter_network_namespace() {
            eprintln!("SKIPPED: no private network namespace: {why}");
            return;
        }
    };
}

/// `kiln` on the bridge network.
trait BridgeRoot {
    /// `kiln ARGS` with `KILN_SUBNET` set to `subnet` (unset for `None`).
    fn kiln_with_subnet(&self, args: &[&str], subnet: Option<&str>) -> Output;
    /// `kiln run` on the bridge with the QEMU backend and `args` after the flags.
    fn run(&self, args: &[&str]) -> Output;
}

impl BridgeRoot for Root {
    fn kiln_with_subnet(&self, args: &[&str], subnet: Option<&str>) -> Output {
        let mut command = self.command(args);
        if let Some(subnet) = subnet {
            command.env("KILN_SUBNET", subnet);
        }
        command.output().expect("run kiln")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["run", "--backend", "qemu", "--network", "bridge"];
        all.extend_from_slice(args);
        self.kiln(&all)
    }
}

/// The kiln tap devices in this thread's network namespace.
fn taps() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip -o link");
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .filter(|name| name.starts_with("kiln-"))
        .collect()
}

/// The address (without prefix) `kiln inspect` shows for a bridge VM.
fn address_of(record: &serde_json::Value) -> String {
    let cidr = record["spec"]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {record}"));
    let (address, prefix) = cidr.split_once('/').expect("ADDRESS/PREFIX");
    assert_eq!(prefix, "16", "{cidr}");
    address.to_string()
}

/// Whether `pid` is a live process. A zombie (dead, not yet reaped by whoever inherited it)
/// counts as gone.
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
}

#[test]
fn bridge_gives_address_route_and_reaches_the_host() {
    require_prerequisites!();
    let root = Root::new("kiln-net", "basic");
    // The host side of the bridge: a listener in this namespace (any address, so it can be
    // bound before kiln makes 10.88.0.1).
    let listener = TcpListener::bind("0.0.0.0:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (stream, peer) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).expect("read");
        (&stream).write_all(b"pong\n").expect("write");
        (peer, line)
    });
    let script = format!(
        "ip addr show eth0; ip route; cat /etc/resolv.conf; echo ping | nc 10.88.0.1 {port}"
    );
    let out = root.run(&["--rm", "kiln/default", "sh", "-c", &script]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("inet 10.88.0.2/16"),
        "eth0 has the first leased address: {stdout}"
    );
    assert!(
        stdout.contains("link/ether 02:6b:0a:58:00:02"),
        "the MAC is derived from the address: {stdout}"
    );
    assert!(
        stdout.contains("default via 10.88.0.1 dev eth0"),
        "default route via the bridge: {stdout}"
    );
    assert!(stdout.contains("nameserver "), "DNS configured: {stdout}");
    assert!(
        stdout.contains("pong"),
        "the guest reached the host at 10.88.0.1:{port}: {stdout}"
    );
    let (peer, line) = server.join().expect("server");
    assert_eq!(line, "ping\n");
    assert_eq!(
        peer.ip().to_string(),
        "10.88.0.2",
        "no NAT inside the subnet"
    );

    // The host side: bridge with the gateway, forwarding, kiln's nft table; no tap left.
    let addr = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", "kiln0"])
        .output()
        .expect("ip addr");
    assert!(text(&addr.stdout).contains("10.88.0.1/16"), "{addr:?}");
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("sysctl");
    assert_eq!(forward.trim(), "1");
    let nft = Command::new("nft")
        .args(["list", "table", "ip", "kiln"])
        .output()
        .expect("nft");
    assert!(
        text(&nft.stdout).contains("ip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 masquerade"),
        "{}",
        describe(&nft)
    );
    assert_eq!(taps(), Vec::<String>::new(), "--rm removed the tap");

    // Idempotent: a second VM reuses bridge, address and rule (exactly one rule).
    let out = root.run(&["--rm", "kiln/default", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let nft = Command::new("nft")
        .args(["list", "table", "ip", "kiln"])
        .output()
        .expect("nft");
    assert_eq!(text(&nft.stdout).matches("masquerade").count(), 1);
    assert_eq!(taps(), Vec::<String>::new());
}

#[test]
fn two_vms_get_different_addresses_and_reach_each_other() {
    require_prerequisites!();
    let root = Root::new("kiln-net", "pair");
    // At once, on a namespace without a bridge yet: both make sure of it under the lock and
    // lease concurrently. (Threads spawned here inherit this thread's namespace.)
    std::thread::scope(|scope| {
        let handles: Vec<_> = ["net-a", "net-b"]
            .into_iter()
            .map(|name| {
                let root = &root;
                scope.spawn(move || {
                    root.run(&[
                        "-d",
                        "--memory",
                        "256M",
                        "--name",
                        name,
                        "kiln/default",
                        "sleep",
                        "600",
                    ])
                })
            })
            .collect();
        for handle in handles {
            let out = handle.join().expect("thread");
            assert!(out.status.success(), "{}", describe(&out));
        }
    });
    let a = address_of(&root.wait_status("net-a", "running", Duration::from_secs(180)));
    let b = address_of(&root.wait_status("net-b", "running", Duration::from_secs(180)));
    assert_ne!(a, b, "distinct leases");
    assert_eq!(taps().len(), 2, "one tap each: {:?}", taps());

    let out = root.kiln(&["exec", "net-a", "ping", "-c", "1", "-W", "10", &b]);
    assert!(out.status.success(), "a pings b: {}", describe(&out));
    // TCP between them: b listens (nc -l in the background), a connects.
    let out = root.kiln(&[
        "exec",
        "net-b",
        "sh",
        "-c",
        "(nc -l -p 7000 > /tmp/got &) ; sleep 0.5",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    // The listener may still be starting in a slow guest: a refused connect is retried.
    let out = root.kiln(&[
        "exec",
        "net-a",
        "sh",
        "-c",
        &format!(
            "i=0; until echo hello-from-a | nc -w 5 {b} 7000; do \
             i=$((i+1)); [ $i -ge 50 ] && exit 1; sleep 0.2; done"
        ),
    ]);
    assert!(out.status.success(), "a connects to b: {}", describe(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = root.kiln(&["exec", "net-b", "cat", "/tmp/got"]);
        if text(&out.stdout) == "hello-from-a\n" {
            break;
        }
        assert!(Instant::now() < deadline, "b got: {}", describe(&out));
        std::thread::sleep(Duration::from_millis(200));
    }

    // rm -f: taps gone, leases released (the lowest one is taken again).
    for name in ["net-a", "net-b"] {
        let out = root.kiln(&["rm", "-f", name]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    assert_eq!(taps(), Vec::<String>::new(), "rm -f removed the taps");
    let out = root.run(&[
        "--rm",
        "kiln/default",
        "sh",
        "-c",
        "ip -4 -o addr show eth0",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let first = a.clone().min(b.clone());
    assert!(
        text(&out.stdout).contains(&format!("inet {first}/16")),
        "the released lease {first} is taken again: {}",
        describe(&out)
    );
}

#[test]
fn a_killed_supervisors_tap_goes_with_rm_and_prune() {
    require_prerequisites!();
    let root = Root::new("kiln-net", "kill9");
    for name in ["victim", "victim2"] {
        let out = root.run(&[
            "-d",
            "--memory",
            "256M",
            "--name",
            name,
            "kiln/default",
            "sleep",
            "600",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let mut pids = Vec::new();
    for name in ["victim", "victim2"] {
        let record = root.wait_status(name, "running", Duration::from_secs(180));
        pids.push(record["supervisor_pid"].as_u64().expect("supervisor pid") as i32);
        pids.push(record["vmm_pid"].as_u64().expect("vmm pid") as i32);
    }
    assert_eq!(taps().len(), 2, "{:?}", taps());
    for pid in pids.iter().step_by(2) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "supervisor or hypervisor lives on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(taps().len(), 2, "a killed supervisor cannot remove its tap");

    let out = root.kiln(&["rm", "victim"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        taps().len(),
        1,
        "rm removed the dead VM's tap: {:?}",
        taps()
    );
    let out = root.kiln(&["system", "prune"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(taps(), Vec::<String>::new(), "prune removed the last tap");
}

#[test]
fn network_flag_errors_are_clear() {
    // No namespace or VM needed: refused before anything is made.
    let root = Root::new("kiln-net", "flags");
    let out = root.kiln(&[
        "run",
        "--backend",
        "qemu",
        "--network",
        "bogus",
        "kiln/default",
        "true",
    ]);
    assert_fails_with(&out, "use bridge, user or none");
    let out = root.kiln(&[
        "run",
        "--backend",
        "vmm",
        "--network",
        "user",
        "kiln/default",
        "true",
    ]);
    assert_fails_with(&out, "no user-mode network");
}

#[test]
fn bridge_failures_leave_nothing_and_kiln_subnet_is_honoured() {
    require_prerequisites!();
    let root = Root::new("kiln-net", "fail");
    // Something else holds the bridge's name: a clear error, no VM, no tap, no table.
    let out = Command::new("ip")
        .args(["tuntap", "add", "dev", "kiln0", "mode", "tap"])
        .output()
        .expect("ip tuntap");
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.run(&["--rm", "kiln/default", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("kiln0 exists but is not a bridge"),
        "{}",
        describe(&out)
    );
    let ps = root.kiln(&["ps", "-a", "-q"]);
    assert_eq!(text(&ps.stdout), "", "no VM record left");
    assert_eq!(taps(), Vec::<String>::new());
    let out = Command::new("ip")
        .args(["link", "del", "kiln0"])
        .output()
        .expect("ip link del");
    assert!(out.status.success(), "{}", describe(&out));

    // A bad KILN_SUBNET is refused before anything is made.
    let out = root.kiln_with_subnet(
        &[
            "run",
            "--backend",
            "qemu",
            "--network",
            "bridge",
            "--rm",
            "kiln/default",
            "true",
        ],
        Some("10.77.0.1/24"),
    );
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("host bits set"),
        "{}",
        describe(&out)
    );
    assert_eq!(text(&root.kiln(&["ps", "-a", "-q"]).stdout), "");

    // Another subnet.
    let out = root.kiln_with_subnet(
        &[
            "run",
            "--backend",
            "qemu",
            "--network",
            "bridge",
            "--rm",
            "kiln/default",
            "sh",
            "-c",
            "ip -4 -o addr show eth0; ip route; ping -c 1 -W 10 10.77.0.1",
        ],
        Some("10.77.0.0/24"),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("inet 10.77.0.2/24"), "{stdout}");
    assert!(stdout.contains("default via 10.77.0.1"), "{stdout}");
    assert_eq!(taps(), Vec::<String>::new());
}

#[test]
fn guests_take_the_uplink_mtu_when_it_is_smaller() {
    require_prerequisites!();
    let root = Root::new("kiln-net", "mtu");
    // An uplink with a 1400-byte MTU carrying the default route, as on this kind of cloud host.
    for args in [
        &["tuntap", "add", "dev", "uplink0", "mode", "tap"][..],
        &["link", "set", "uplink0", "mtu", "1400", "up"],
        &["route", "add", "default", "dev", "uplink0"],
    ] {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
    }
    let out = root.run(&["--rm", "kiln/default", "ip", "link", "show", "eth0"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("mtu 1400"),
        "the guest's eth0 takes the uplink's MTU: {}",
        describe(&out)
    );
}
