//! A host tap device opened with virtio-net headers, so frames move between the tap and the
//! guest's rings without translation and the kernel can do checksum and segmentation offload.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`), used on both sides.
pub const VNET_HDR_SIZE: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Offload flags for [`Tap::set_offload`].
pub const TUN_F_CSUM: u32 = 0x01;
/// TCP segmentation offload, IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCP segmentation offload, IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = 0x10;

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name exists on the host.
    #[error(
        "the tap device {0:?} does not exist; create it first (ip tuntap add dev {0} mode tap)"
    )]
    Missing(String),
    /// The name cannot be an interface name.
    #[error("{0:?} is not a valid interface name (1 to 15 characters, no '/' or whitespace)")]
    BadName(String),
    /// Opening or configuring the tap failed.
    #[error("cannot use tap device {name}: {what}: {source}")]
    Io {
        /// Interface name.
        name: String,
        /// Which step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name the way the kernel would, before it reaches an ioctl.
pub fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
        || name == "."
        || name == ".."
    {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

/// Whether a network interface `name` exists in this process's network namespace. Asks the
/// kernel (`if_nametoindex`) rather than /sys/class/net, which shows the namespace sysfs was
/// mounted in, not necessarily ours.
pub fn exists(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

impl Tap {
    /// Opens the existing tap `name` in non-blocking mode with virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        if !exists(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let io = |what| {
            move |source| TapError::Io {
                name: name.to_string(),
                what,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(io("open /dev/net/tun"))?;
        let mut request = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq; `request` is a valid, fully initialised one.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
            return Err(io("TUNSETIFF (is it a tap device, and not in use?)")(
                std::io::Error::last_os_error(),
            ));
        }
        let size: libc::c_int = VNET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the guest can take.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(TapError::Io {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header).
    pub fn read_frame(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buffer)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-very-long-name-0").is_err());
        assert!(check_name("../etc").is_err());
        assert!(check_name("tap 0").is_err());
    }

    #[test]
    fn a_missing_tap_is_reported_by_name() {
        match Tap::open("kilnnotap0") {
            Err(TapError::Missing(name)) => assert_eq!(name, "kilnnotap0"),
            other => panic!("{other:?}"),
        }
    }
}
