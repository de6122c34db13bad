//! Recognising kernel images: x86 bzImage or ELF `vmlinux`, and their version strings.
//!
//! kiln-vmm boots both, but differently (bzImage through the Linux boot protocol, ELF through
//! PVH or the 64-bit entry), and the version string ties a kernel to its
//! `lib/modules/<release>` directory, so both are recorded at import.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::util::{open_read, read_error};

/// How a kernel image is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    /// A compressed x86 `bzImage` (`/boot/vmlinuz-*`), booted through the Linux boot protocol.
    BzImage,
    /// An uncompressed ELF `vmlinux` (Weave Ignite's `/boot/vmlinux`), booted through PVH or
    /// the 64-bit entry point.
    Elf,
}

impl KernelFormat {
    /// The lowercase name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelFormat::BzImage => "bzimage",
            KernelFormat::Elf => "elf",
        }
    }
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`inspect_kernel`] learned from a kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// bzImage or ELF.
    pub format: KernelFormat,
    /// The whole version string (`6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ...`), if
    /// the image carries one.
    pub version: Option<String>,
    /// Its first word, the release (`6.1.0-56-cloud-amd64`): the name of the kernel's
    /// `lib/modules/<release>` directory and what `uname -r` prints in the guest.
    pub release: Option<String>,
}

/// Offset of the setup header's `kernel_version` field (a pointer minus 0x200).
const KERNEL_VERSION_OFFSET: usize = 0x20e;
/// Longest version string accepted (the kernel's banner is well under this).
const MAX_VERSION_LEN: usize = 512;

/// Reads a kernel image far enough to tell its format and version.
///
/// bzImage is recognised by the setup header (`0xAA55` boot flag, `HdrS` magic); its version
/// is the NUL-terminated string that the header's `kernel_version` field points to. ELF must be
/// 64-bit x86-64; its version is the `Linux version ...` banner found by scanning the file.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo> {
    let meta = std::fs::metadata(path).map_err(|e| read_error(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotAKernel {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut file = open_read(path)?;
    let mut head = Vec::with_capacity(64 * 1024);
    (&mut file)
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(|e| read_error(path, e))?;
    let not_kernel = |reason: &str| Error::NotAKernel {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if head.starts_with(b"\x7fELF") {
        check_elf(&head).map_err(|r| not_kernel(&r))?;
        let version = scan_linux_banner(file, &head).map_err(|e| read_error(path, e))?;
        return Ok(KernelInfo {
            format: KernelFormat::Elf,
            release: version.as_deref().map(release_of),
            version,
        });
    }
    if is_bzimage(&head) {
        let version = bzimage_version(&head);
        return Ok(KernelInfo {
            format: KernelFormat::BzImage,
            release: version.as_deref().map(release_of),
            version,
        });
    }
    Err(not_kernel(&describe_unknown(&head)))
}

/// Whether `head` starts with an x86 Linux setup header.
pub(crate) fn is_bzimage(head: &[u8]) -> bool {
    head.get(0x1fe..0x200) == Some(&[0x55, 0xaa][..]) && head.get(0x202..0x206) == Some(b"HdrS")
}

/// The version string of a bzImage whose first bytes are `head` (the string sits in the
/// setup code, within the first 32 KiB).
pub(crate) fn bzimage_version(head: &[u8]) -> Option<String> {
    let field = head.get(KERNEL_VERSION_OFFSET..KERNEL_VERSION_OFFSET + 2)?;
    let ptr = usize::from(u16::from_le_bytes([*field.first()?, *field.get(1)?]));
    if ptr == 0 {
        return None;
    }
    let start = ptr + 0x200;
    let rest = head.get(start..)?;
    let end = rest.iter().take(MAX_VERSION_LEN).position(|&b| b == 0)?;
    printable(rest.get(..end)?)
}

/// `6.1.0-56-cloud-amd64` from `6.1.0-56-cloud-amd64 (debian-kernel@...) #1 ...`.
fn release_of(version: &str) -> String {
    version
        .split_whitespace()
        .next()
        .unwrap_or(version)
        .to_string()
}

fn printable(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?.trim();
    if s.is_empty() || s.chars().any(|c| c.is_control()) {
        None
    } else {
        Some(s.to_string())
    }
}

/// Refuses ELF files that are not 64-bit little-endian x86-64 executables.
fn check_elf(head: &[u8]) -> std::result::Result<(), String> {
    if head.get(4) != Some(&2) {
        return Err("a 32-bit ELF file (kiln boots 64-bit x86-64 kernels)".into());
    }
    if head.get(5) != Some(&1) {
        return Err("a big-endian ELF file".into());
    }
    let machine = head
        .get(18..20)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if machine != 0x3e {
        return Err(format!(
            "an ELF file for machine {machine:#x}, not x86-64 (0x3e)"
        ));
    }
    let kind = head
        .get(16..18)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if kind != 2 {
        return Err(format!(
            "an ELF file of type {kind} (a kernel vmlinux is an executable, type 2)"
        ));
    }
    Ok(())
}

/// Scans an ELF vmlinux for its `Linux version <digit>...` banner, streaming so a vmlinux
/// with debug info (hundreds of MiB) is never held in memory.
fn scan_linux_banner(mut rest: impl Read, head: &[u8]) -> std::io::Result<Option<String>> {
    const NEEDLE: &[u8] = b"Linux version ";
    let keep = NEEDLE.len() + MAX_VERSION_LEN;
    let mut window: Vec<u8> = head.to_vec();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if let Some(v) = find_banner(&window, NEEDLE) {
            return Ok(Some(v));
        }
        let n = match rest.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let drop = window.len().saturating_sub(keep);
        window.drain(..drop);
        window.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
}

/// The first `Linux version X...` in `data` whose X starts with a digit and which is complete
/// (ends with NUL or newline inside `data`).
fn find_banner(data: &[u8], needle: &[u8]) -> Option<String> {
    let mut from = 0;
    while let Some(pos) = data
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
    {
        let start = from + pos + needle.len();
        let rest = data.get(start..)?;
        if rest.first().is_some_and(u8::is_ascii_digit) {
            if let Some(end) = rest
                .iter()
                .take(MAX_VERSION_LEN)
                .position(|&b| b == 0 || b == b'\n')
            {
                if let Some(v) = printable(rest.get(..end)?) {
                    return Some(v);
                }
            }
        }
        from = start;
    }
    None
}

/// A short description of what an unrecognised file looks like, for the error message.
fn describe_unknown(head: &[u8]) -> String {
    let what = if head.starts_with(&[0x1f, 0x8b]) {
        "gzip data (a compressed vmlinux? decompress it, or use the bzImage)"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd data (a compressed vmlinux? decompress it, or use the bzImage)"
    } else if head.starts_with(b"\xfd7zXZ") {
        "xz data (a compressed vmlinux? decompress it, or use the bzImage)"
    } else if head.get(0x38..0x3c) == Some(b"ARM\x64") {
        "an arm64 Image (kiln runs x86-64 guests)"
    } else if head.starts_with(b"070701") || head.starts_with(b"070702") {
        "a cpio archive (an initramfs? pass it with --initrd)"
    } else if head.is_empty() {
        "an empty file"
    } else {
        "neither an x86 bzImage (no HdrS setup header) nor an ELF vmlinux"
    };
    what.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x4000];
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let at = 0x1000usize;
        img[KERNEL_VERSION_OFFSET..KERNEL_VERSION_OFFSET + 2]
            .copy_from_slice(&((at - 0x200) as u16).to_le_bytes());
        img[at..at + version.len()].copy_from_slice(version.as_bytes());
        img
    }

    #[test]
    fn bzimage_version_from_setup_header() {
        let img = fake_bzimage("6.1.0-9-amd64 (x@y) #1 SMP");
        assert!(is_bzimage(&img));
        assert_eq!(
            bzimage_version(&img).as_deref(),
            Some("6.1.0-9-amd64 (x@y) #1 SMP")
        );
        let mut none = img.clone();
        none[KERNEL_VERSION_OFFSET] = 0;
        none[KERNEL_VERSION_OFFSET + 1] = 0;
        assert_eq!(bzimage_version(&none), None);
    }

    #[test]
    fn banner_search_skips_format_strings() {
        let data = b"xxLinux version %s (%s)\0yyLinux version 5.10.1 (a@b) #2\n";
        assert_eq!(
            find_banner(data, b"Linux version ").as_deref(),
            Some("5.10.1 (a@b) #2")
        );
    }

    #[test]
    fn banner_across_read_chunks() {
        let mut data = vec![b'x'; 3 << 20];
        let banner = b"Linux version 6.6.6 (k@h) #1\n";
        let at = (1 << 20) - 5;
        data[at..at + banner.len()].copy_from_slice(banner);
        let found = scan_linux_banner(&data[64..], &data[..64]).expect("read");
        assert_eq!(found.as_deref(), Some("6.6.6 (k@h) #1"));
    }
}
