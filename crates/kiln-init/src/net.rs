//! `Configure`: hostname, `/etc/hosts`, `/etc/resolv.conf` and static IPv4 interfaces, set
//! with the classic ioctls (no netlink library, no `ip` binary: the image may have neither).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent_protocol::{GuestConfig, InterfaceConfig};

use crate::sys::cvt;

/// How long `Configure` waits for a named interface to appear (its driver may still probe).
const INTERFACE_WAIT: Duration = Duration::from_secs(2);

/// The `/etc/hosts` the guest gets: loopback names, the hostname on 127.0.1.1 (as Debian
/// does) and the host's extra lines.
pub fn hosts_file(hostname: &str, extra: &[String]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
    if !hostname.is_empty() {
        s.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    for line in extra {
        s.push_str(line.trim_end_matches('\n'));
        s.push('\n');
    }
    s
}

/// The `/etc/resolv.conf` for the given name servers and search domains.
pub fn resolv_conf(nameservers: &[String], search: &[String]) -> String {
    let mut s = String::new();
    for ns in nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s
}

/// Replaces `path` with `contents` through a rename, so a symlink there (a `resolv.conf`
/// pointing into a systemd directory the image does not run, say) is replaced, not followed.
fn replace_file(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("kiln-tmp");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", path.display())
        })
}

/// Applies `config` to this machine (PID-1 mode only).
pub fn configure(config: &GuestConfig) -> Result<(), String> {
    let hostname = config.hostname.trim();
    if hostname.len() > 64 || hostname.contains(['\0', '\n', ' ', '\t']) {
        return Err(format!("invalid hostname {hostname:?}"));
    }
    if !hostname.is_empty() {
        // SAFETY: the pointer and length describe the hostname's bytes.
        cvt(unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) })
            .map_err(|e| format!("sethostname: {e}"))?;
        replace_file(Path::new("/etc/hostname"), &format!("{hostname}\n"))?;
    }
    replace_file(
        Path::new("/etc/hosts"),
        &hosts_file(hostname, &config.hosts),
    )?;
    if !config.nameservers.is_empty() {
        replace_file(
            Path::new("/etc/resolv.conf"),
            &resolv_conf(&config.nameservers, &config.search),
        )?;
    }
    if !config.interfaces.is_empty() {
        let sock = inet_socket().map_err(|e| format!("socket: {e}"))?;
        for iface in &config.interfaces {
            configure_interface(sock.as_raw_fd(), iface)
                .map_err(|e| format!("interface {}: {e}", iface.name))?;
        }
    }
    Ok(())
}

/// Parses `ADDRESS/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-32)"))?;
    Ok((addr, prefix))
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: the fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads a
    // sockaddr_in where the ioctls take a sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: RawFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: callers pass a pointer to the struct the request expects.
    cvt(unsafe { libc::ioctl(fd, request, arg) })?;
    Ok(())
}

/// Sets `IFF_UP` (and `IFF_RUNNING`) on an interface: how `lo` comes up at boot.
pub fn interface_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    set_up(sock.as_raw_fd(), name)
}

fn set_up(sock: RawFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

/// `struct rtentry` from `<net/route.h>` (the libc crate has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn configure_interface(sock: RawFd, iface: &InterfaceConfig) -> io::Result<()> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let (addr, prefix) = parse_cidr(&iface.address).map_err(invalid)?;
    let gateway = iface
        .gateway
        .as_deref()
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .map_err(|_| invalid(format!("{g:?} is not an IPv4 gateway")))
        })
        .transpose()?;
    let mut req = ifreq(&iface.name)?;

    let end = Instant::now() + INTERFACE_WAIT;
    while !Path::new("/sys/class/net").join(&iface.name).exists() {
        if Instant::now() >= end {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such interface"));
        }
        crate::sys::sleep(Duration::from_millis(20));
    }

    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("SIOCSIFADDR: {e}")))?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("SIOCSIFNETMASK: {e}")))?;
    if let Some(mtu) = iface.mtu {
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| invalid(format!("MTU {mtu}")))?;
        ioctl(
            sock,
            libc::SIOCSIFMTU,
            (&mut req as *mut libc::ifreq).cast(),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("SIOCSIFMTU {mtu}: {e}")))?;
    }
    set_up(sock, &iface.name).map_err(|e| io::Error::new(e.kind(), format!("up: {e}")))?;

    if let Some(gw) = gateway {
        let mut dev: Vec<libc::c_char> = iface
            .name
            .bytes()
            .map(|b| b as libc::c_char)
            .chain(std::iter::once(0))
            .collect();
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gw),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match ioctl(sock, libc::SIOCADDRT, (&mut rt as *mut RtEntry).cast()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("default route via {gw}: {e}"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_resolv_conf() {
        assert_eq!(
            hosts_file("web", &["10.0.0.2 db".into()]),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\tweb\n10.0.0.2 db\n"
        );
        assert_eq!(
            resolv_conf(
                &["1.1.1.1".into(), "8.8.8.8".into()],
                &["a.b".into(), "c".into()]
            ),
            "nameserver 1.1.1.1\nnameserver 8.8.8.8\nsearch a.b c\n"
        );
    }

    #[test]
    fn cidrs_and_netmasks() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Ok((Ipv4Addr::new(10, 0, 2, 15), 24))
        );
        assert!(parse_cidr("10.0.2.15").is_err());
        assert!(parse_cidr("10.0.2.15/33").is_err());
        assert!(parse_cidr("fe80::1/64").is_err());
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    }
}
