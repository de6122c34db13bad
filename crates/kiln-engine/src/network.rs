//! Bridge networking (`--network bridge`): a Docker-like NAT bridge both backends use.
//!
//! - The host bridge [`BRIDGE`] (`kiln0`) carries the subnet's gateway address (default
//!   10.88.0.0/16, gateway 10.88.0.1; `KILN_SUBNET` picks another subnet at `kiln create`/`run`).
//!   It is created on first use ([`ensure_bridge`]) under a file lock in the kiln root, and every
//!   step tolerates another kiln having done it already.
//! - IPv4 forwarding is switched on and the nftables table `ip kiln` (kiln's own: nothing else
//!   is touched) masquerades what the subnet sends elsewhere.
//! - Each VM has an address leased in the state store (unique under concurrency, released with
//!   the record), a MAC derived from it ([`mac_for`]) and a tap device `kiln-<id prefix>`
//!   ([`tap_name`]) on the bridge, made by the supervisor before the hypervisor starts and
//!   deleted when it stops, or by `kiln rm`/`kiln system prune` if the supervisor died.
//! - Guests get the host's name servers unless those are loopback addresses (systemd-resolved's
//!   127.0.0.53, a local dnsmasq), which a guest cannot reach: then 1.1.1.1 and 8.8.8.8.
//!
//! The host tools are iproute2's `ip` and nftables' `nft`.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_agent_protocol::{GuestConfig, InterfaceConfig};

use crate::error::{EngineError, Result};

/// The host bridge.
pub const BRIDGE: &str = "kiln0";

/// The subnet when `KILN_SUBNET` is not set.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";

/// The nftables table kiln owns (family `ip`).
pub const NFT_TABLE: &str = "kiln";

/// Name servers for guests when the host's are loopback addresses.
pub const FALLBACK_NAMESERVERS: [&str; 2] = ["1.1.1.1", "8.8.8.8"];

/// Tap devices are `kiln-` and this many characters of the VM's ID (IFNAMSIZ allows 15).
const TAP_ID_CHARS: usize = 10;

/// An IPv4 subnet: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The subnet from `KILN_SUBNET`, or [`DEFAULT_SUBNET`].
    pub fn from_env() -> Result<Subnet> {
        match std::env::var("KILN_SUBNET") {
            Ok(value) if !value.trim().is_empty() => Subnet::parse(value.trim())
                .map_err(|e| EngineError::Invalid(format!("KILN_SUBNET: {e}"))),
            _ => Subnet::parse(DEFAULT_SUBNET),
        }
    }

    /// Parses `A.B.C.D/PREFIX` (prefix 8 to 29, host bits zero).
    pub fn parse(text: &str) -> Result<Subnet> {
        let (address, prefix) = text.split_once('/').ok_or_else(|| {
            EngineError::Invalid(format!("{text:?} is not a subnet like {DEFAULT_SUBNET}"))
        })?;
        let network: Ipv4Addr = address.parse().map_err(|_| {
            EngineError::Invalid(format!("{text:?} is not a subnet like {DEFAULT_SUBNET}"))
        })?;
        let prefix: u8 = prefix.parse().map_err(|_| {
            EngineError::Invalid(format!("{text:?} is not a subnet like {DEFAULT_SUBNET}"))
        })?;
        if !(8..=29).contains(&prefix) {
            return Err(EngineError::Invalid(format!(
                "subnet {text:?}: give a prefix length from 8 to 29"
            )));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(EngineError::Invalid(format!(
                "subnet {text:?} has host bits set: did you mean {}/{prefix}?",
                Ipv4Addr::from(u32::from(network) & subnet.mask())
            )));
        }
        Ok(subnet)
    }

    /// The subnet `address/prefix` belongs to (a lease as stored in a VM's spec).
    pub fn of_cidr(cidr: &str) -> Result<(Ipv4Addr, Subnet)> {
        let (address, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| EngineError::Invalid(format!("{cidr:?} is not ADDRESS/PREFIX")))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| EngineError::Invalid(format!("{cidr:?} is not ADDRESS/PREFIX")))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| EngineError::Invalid(format!("{cidr:?} is not ADDRESS/PREFIX")))?;
        let mask = Subnet {
            network: address,
            prefix,
        }
        .mask();
        let network = Ipv4Addr::from(u32::from(address) & mask);
        Ok((address, Subnet::parse(&format!("{network}/{prefix}"))?))
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The gateway: the subnet's first address, on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The lowest address from the second host address up to the last before the broadcast
    /// address that is not in `taken`.
    pub fn pick_free(&self, taken: &HashSet<String>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = (u32::from(self.network) | !self.mask()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|a| !taken.contains(&a.to_string()))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The tap device of VM `id`: `kiln-` and the first characters of its ID (15 characters at
/// most, the kernel's limit).
pub fn tap_name(id: &str) -> String {
    let prefix: String = id.chars().take(TAP_ID_CHARS).collect();
    format!("kiln-{prefix}")
}

/// The guest MAC for `address`: locally administered, unicast, `02:6b` ("k") then the four
/// bytes of the address, so it is unique wherever the address is.
pub fn mac_for(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("02:6b:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The name servers for guests: the host's IPv4 ones from `resolv_conf`, unless there are
/// none a guest can reach (loopback, like systemd-resolved's 127.0.0.53), then
/// [`FALLBACK_NAMESERVERS`].
pub fn guest_nameservers(resolv_conf: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(IpAddr::V4(address))) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if !address.is_loopback() && !address.is_unspecified() {
            out.push(address.to_string());
        }
    }
    if out.is_empty() {
        FALLBACK_NAMESERVERS.iter().map(|s| s.to_string()).collect()
    } else {
        out
    }
}

/// What a backend needs to put a VM on the bridge, and what the guest must configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeAttachment {
    /// The host tap device (already on the bridge).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The guest's `ADDRESS/PREFIX`.
    pub address: String,
    /// The default gateway (the bridge's address).
    pub gateway: String,
    /// Name servers.
    pub nameservers: Vec<String>,
    /// The guest's MTU when the host's uplink is smaller than Ethernet's 1500.
    pub mtu: Option<u32>,
}

/// The interface of the default route in `/proc/net/route` text.
fn default_route_interface(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Destination and mask both 0: the default route.
        (fields.get(1) == Some(&"00000000") && fields.get(7) == Some(&"00000000"))
            .then(|| fields[0].to_string())
    })
}

/// The MTU of the host's default-route interface when it is below 1500. Guests get the same,
/// so that full-size packets they send out through the NAT are not dropped on the uplink
/// (path-MTU discovery does not rescue every protocol).
fn uplink_mtu() -> Option<u32> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let interface = default_route_interface(&routes)?;
    let mtu = interface_mtu(&interface)?;
    (576..1500).contains(&mtu).then_some(mtu)
}

/// An interface's MTU, asked of the kernel (SIOCGIFMTU) in our own network namespace; sysfs
/// may show another namespace's interfaces.
fn interface_mtu(name: &str) -> Option<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into `request`, which is a
    // valid ifreq for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFMTU,
            &mut request,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFMTU the union holds the MTU.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).ok()
}

impl BridgeAttachment {
    /// Adds the guest side (eth0, default route, DNS) to `config`.
    pub fn configure_guest(&self, config: &mut GuestConfig) {
        config.interfaces.push(InterfaceConfig {
            name: "eth0".into(),
            address: self.address.clone(),
            gateway: Some(self.gateway.clone()),
            mtu: self.mtu,
        });
        config.nameservers.extend(self.nameservers.iter().cloned());
    }
}

/// Finds `name` in `PATH`, then in the sbin directories (not in every user's `PATH`).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Checks that this process can build the bridge network, with what to do if not.
pub fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(EngineError::Backend(
            "--network bridge needs root (it creates the kiln0 bridge, tap devices and nftables \
             rules): run kiln as root, or use --network user (qemu backend) or --network none"
                .into(),
        ));
    }
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Err(EngineError::Backend(format!(
            "--network bridge needs /dev/net/tun for its tap devices ({e}): load the module \
             (modprobe tun), or in a container give it the device (--device /dev/net/tun)"
        )));
    }
    if tool("ip").is_none() {
        return Err(EngineError::Backend(
            "--network bridge needs the ip command: install iproute2 (apt-get install iproute2)"
                .into(),
        ));
    }
    if tool("nft").is_none() {
        return Err(EngineError::Backend(
            "--network bridge needs the nft command for its NAT rules: install nftables \
             (apt-get install nftables)"
                .into(),
        ));
    }
    Ok(())
}

/// Runs a host tool; a failure says what ran and what it printed.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let path = tool(program).ok_or_else(|| {
        EngineError::Backend(format!("{program} not found (see `kiln run --help`)"))
    })?;
    let mut command = Command::new(&path);
    command
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = command
        .spawn()
        .map_err(|e| EngineError::Backend(format!("running {program}: {e}")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        input
            .write_all(text.as_bytes())
            .map_err(|e| EngineError::Backend(format!("writing to {program}: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| EngineError::Backend(format!("running {program}: {e}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(EngineError::Backend(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Whether network device `name` exists in this process's network namespace (asked of the
/// kernel: /sys/class/net shows the namespace /sys was mounted in).
pub fn link_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Makes sure the bridge, its gateway address for `subnet`, IPv4 forwarding and the NAT rule
/// exist. Serialized by `<kiln_root>/network.lock`; safe if another kiln did (part of) it. If
/// it fails, a bridge it created is removed again.
pub fn ensure_bridge(kiln_root: &Path, subnet: &Subnet) -> Result<()> {
    check_prerequisites()?;
    let lock_path = kiln_root.join("network.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| EngineError::io("open", &lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| EngineError::io("lock", &lock_path, e.into()))?;
    let created = if link_exists(BRIDGE) {
        false
    } else {
        match run("ip", &["link", "add", BRIDGE, "type", "bridge"], None) {
            Ok(_) => true,
            // Another kiln (with another root) won the race.
            Err(_) if link_exists(BRIDGE) => false,
            Err(e) => return Err(e),
        }
    };
    let result = configure_bridge(subnet);
    if result.is_err() && created {
        let _ = run("ip", &["link", "del", BRIDGE], None);
    }
    drop(lock);
    result
}

fn configure_bridge(subnet: &Subnet) -> Result<()> {
    let bridges = run(
        "ip",
        &["-o", "link", "show", "dev", BRIDGE, "type", "bridge"],
        None,
    )?;
    if bridges.trim().is_empty() {
        return Err(EngineError::Backend(format!(
            "the network device {BRIDGE} exists but is not a bridge: kiln needs that name for \
             its bridge; remove the device (ip link del {BRIDGE}) or use --network user/none"
        )));
    }
    let gateway = format!("{}/{}", subnet.gateway(), subnet.prefix());
    let addresses = run("ip", &["-o", "-4", "addr", "show", "dev", BRIDGE], None)?;
    if !addresses
        .split_whitespace()
        .any(|word| word == gateway.as_str())
    {
        if let Err(e) = run("ip", &["addr", "add", &gateway, "dev", BRIDGE], None) {
            let again = run("ip", &["-o", "-4", "addr", "show", "dev", BRIDGE], None)?;
            if !again.split_whitespace().any(|w| w == gateway.as_str()) {
                return Err(e);
            }
        }
    }
    run("ip", &["link", "set", "dev", BRIDGE, "up"], None)?;
    let forward = Path::new("/proc/sys/net/ipv4/ip_forward");
    let on = std::fs::read_to_string(forward).is_ok_and(|s| s.trim() == "1");
    if !on {
        std::fs::write(forward, "1").map_err(|e| {
            EngineError::Backend(format!(
                "turning on IPv4 forwarding ({}): {e}",
                forward.display()
            ))
        })?;
    }
    // The table and chain are declared (a no-op when they exist); the rule is added once.
    let rule = format!("ip saddr {subnet} ip daddr != {subnet} masquerade");
    let listing = run("nft", &["list", "table", "ip", NFT_TABLE], None).unwrap_or_default();
    let mut script = format!(
        "table ip {NFT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting \
         priority srcnat; policy accept;\n  }}\n}}\n"
    );
    if !listing.contains(&rule) {
        script.push_str(&format!("add rule ip {NFT_TABLE} postrouting {rule}\n"));
    }
    run("nft", &["-f", "-"], Some(&script))?;
    Ok(())
}

/// A tap device on the bridge; deleted on drop.
#[derive(Debug)]
pub struct Tap {
    name: String,
}

impl Tap {
    /// Creates tap `name` (replacing a stale one of that name: VM IDs make names unique) and
    /// puts it on the bridge. Nothing is left behind on failure.
    pub fn create(name: &str) -> Result<Tap> {
        if link_exists(name) {
            delete_tap(name)?;
        }
        run("ip", &["tuntap", "add", "dev", name, "mode", "tap"], None)?;
        let tap = Tap {
            name: name.to_string(),
        };
        run(
            "ip",
            &["link", "set", "dev", name, "master", BRIDGE, "up"],
            None,
        )?;
        Ok(tap)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = delete_tap(&self.name) {
            tracing::warn!("removing tap {}: {e}", self.name);
        }
    }
}

/// Deletes tap `name` if it exists.
pub fn delete_tap(name: &str) -> Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    match run("ip", &["link", "del", "dev", name], None) {
        Ok(_) => Ok(()),
        Err(_) if !link_exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets up VM `id`'s side of the bridge for its leased `address` (`ADDRESS/PREFIX`): the
/// bridge if need be, then its tap. The tap goes away when the returned [`Tap`] is dropped.
pub fn attach(kiln_root: &Path, id: &str, address: &str) -> Result<(Tap, BridgeAttachment)> {
    let (ip, subnet) = Subnet::of_cidr(address)?;
    ensure_bridge(kiln_root, &subnet)?;
    let tap = Tap::create(&tap_name(id))?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let attachment = BridgeAttachment {
        tap: tap.name().to_string(),
        mac: mac_for(ip),
        address: address.to_string(),
        gateway: subnet.gateway().to_string(),
        nameservers: guest_nameservers(&resolv),
        mtu: uplink_mtu(),
    };
    Ok((tap, attachment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_interface_is_found() {
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      kiln0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                      eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(routes).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.88.0.0/16").expect("parse");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(s.to_string(), "10.88.0.0/16");
        assert!(Subnet::parse("10.88.0.1/16").is_err());
        assert!(Subnet::parse("10.88.0.0/31").is_err());
        assert!(Subnet::parse("10.88.0.0").is_err());
        let mut taken = HashSet::new();
        assert_eq!(s.pick_free(&taken), Some(Ipv4Addr::new(10, 88, 0, 2)));
        taken.insert("10.88.0.2".to_string());
        assert_eq!(s.pick_free(&taken), Some(Ipv4Addr::new(10, 88, 0, 3)));
        let small = Subnet::parse("192.168.7.0/29").expect("parse");
        let taken: HashSet<String> = (2..=6).map(|i| format!("192.168.7.{i}")).collect();
        assert_eq!(small.pick_free(&taken), None);
        let (ip, of) = Subnet::of_cidr("10.88.3.4/16").expect("cidr");
        assert_eq!(ip, Ipv4Addr::new(10, 88, 3, 4));
        assert_eq!(of, s);
    }

    #[test]
    fn names_and_macs() {
        let name = tap_name(&"ab12".repeat(16));
        assert_eq!(name, "kiln-ab12ab12ab");
        assert!(name.len() <= 15);
        assert_eq!(mac_for(Ipv4Addr::new(10, 88, 0, 2)), "02:6b:0a:58:00:02");
    }

    /// Many processes' worth of handles lease at once: every VM gets its own address, a
    /// repeated lease returns the same one, and removing a record releases its address.
    #[test]
    fn leases_are_unique_under_concurrency() {
        use crate::state::{NewVm, StateStore};
        let root = tempfile::tempdir().expect("tempdir");
        let subnet = Subnet::parse("10.99.0.0/24").expect("subnet");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let root = root.path().to_path_buf();
                std::thread::spawn(move || {
                    let store = StateStore::open(&root).expect("open");
                    (0..5)
                        .map(|_| {
                            let record = store
                                .create(&NewVm {
                                    name: None,
                                    image: "i".into(),
                                    image_digest: "d".into(),
                                    kernel: "k".into(),
                                    backend: "qemu".into(),
                                    spec: serde_json::Value::Null,
                                    dir: PathBuf::new(),
                                })
                                .expect("create");
                            let pick =
                                |t: &HashSet<String>| subnet.pick_free(t).map(|a| a.to_string());
                            let address = store.lease_address(&record.id, pick).expect("lease");
                            let again = store.lease_address(&record.id, pick).expect("lease");
                            assert_eq!(address, again);
                            (record.id, address.expect("free address"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let leases: Vec<(String, String)> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        let distinct: HashSet<&String> = leases.iter().map(|(_, a)| a).collect();
        assert_eq!(distinct.len(), 40);
        let store = StateStore::open(root.path()).expect("open");
        let (id, address) = &leases[0];
        assert_eq!(
            store.leased_address(id).expect("get").as_ref(),
            Some(address)
        );
        store.remove(id).expect("remove");
        assert_eq!(store.leased_address(id).expect("get"), None);
        let (id, _) = &leases[1];
        store.release_address(id).expect("release");
        assert_eq!(store.leased_address(id).expect("get"), None);
    }

    #[test]
    fn nameservers() {
        assert_eq!(
            guest_nameservers("nameserver 127.0.0.53\noptions edns0\n"),
            vec!["1.1.1.1", "8.8.8.8"]
        );
        assert_eq!(
            guest_nameservers("# x\nnameserver ::1\nnameserver 10.0.0.2\nnameserver 127.0.0.1\n"),
            vec!["10.0.0.2"]
        );
        assert_eq!(guest_nameservers(""), vec!["1.1.1.1", "8.8.8.8"]);
    }
}
