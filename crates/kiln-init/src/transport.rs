//! The byte streams the protocol runs on: a listening socket (AF_VSOCK in a kiln-vmm guest,
//! AF_UNIX for tests) whose accepted connections each replace the previous one, or a
//! virtio-console port (QEMU), which is always open and only tells by `POLLHUP` whether the
//! host side is connected.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::sys::{self, cvt};

/// Where the agent serves.
#[derive(Debug)]
pub enum Transport {
    /// A listening, non-blocking stream socket.
    Listener(OwnedFd),
    /// A virtio-console port opened read-write, non-blocking.
    Serial(OwnedFd),
}

/// Listens on the Unix socket `path` (replacing a stale socket file there).
pub fn listen_unix(path: &Path) -> io::Result<Transport> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(Transport::Listener(OwnedFd::from(listener)))
}

/// Listens on AF_VSOCK port `port` of any CID (the guest's own).
pub fn listen_vsock(port: u32) -> io::Result<Transport> {
    // SAFETY: plain socket creation.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: socket succeeded; the fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_vm is valid; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm of the length passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen on our bound socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
    Ok(Transport::Listener(fd))
}

/// Accepts a pending connection (non-blocking, close-on-exec), `None` if there is none.
pub fn accept(listener: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: accept4 without an address buffer.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            // The peer gave up before we accepted: not the listener's fault.
            _ if matches!(
                e.raw_os_error(),
                Some(libc::ECONNABORTED) | Some(libc::EPROTO)
            ) =>
            {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    // SAFETY: accept4 returned a new fd that is ours.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Opens a virtio-console port device read-write and non-blocking.
pub fn open_serial(dev: &Path) -> io::Result<Transport> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(dev)?;
    Ok(Transport::Serial(OwnedFd::from(file)))
}

/// The device node of the virtio-console port named `name` (`/dev/vport0p1`), if the port
/// exists and the host has told its name (it does so asynchronously, after the device
/// appears).
pub fn find_serial_port(sys_root: &Path, name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir(sys_root.join("class/virtio-ports")).ok()?;
    for entry in dir.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end_matches('\n') == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Whether a virtio-vsock device is bound to its driver. `/dev/vsock` alone does not tell:
/// it exists as soon as the vsock core module is loaded, device or not.
pub fn vsock_device_present(sys_root: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(sys_root.join("bus/virtio/drivers/vmw_vsock_virtio_transport"))
    else {
        return false;
    };
    dir.flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
}

/// Whether the host side of a virtio-console port is connected: the port polls `POLLHUP`
/// while it is not.
pub fn serial_host_connected(port: RawFd) -> bool {
    match sys::poll_now(port, libc::POLLIN) {
        Ok(revents) => revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) == 0,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_ports_are_found_by_name() {
        let sys_root = tempfile::tempdir().expect("sys");
        let ports = sys_root.path().join("class/virtio-ports");
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "other"),
            ("vport1p1", "kiln.agent"),
        ] {
            std::fs::create_dir_all(ports.join(port)).expect("mkdir");
            std::fs::write(ports.join(port).join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_serial_port(sys_root.path(), "kiln.agent"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_serial_port(sys_root.path(), "nope"), None);
    }

    #[test]
    fn vsock_presence_needs_a_bound_device() {
        let sys_root = tempfile::tempdir().expect("sys");
        let drv = sys_root
            .path()
            .join("bus/virtio/drivers/vmw_vsock_virtio_transport");
        assert!(!vsock_device_present(sys_root.path()));
        std::fs::create_dir_all(drv.join("module")).expect("mkdir");
        assert!(!vsock_device_present(sys_root.path()));
        std::fs::create_dir_all(drv.join("virtio3")).expect("mkdir");
        assert!(vsock_device_present(sys_root.path()));
    }
}
