//! The `newc` cpio format the kernel unpacks an initramfs from: a writer, and a reader for
//! checking what was written.
//!
//! Hand-written because it is tiny (a 110-byte ASCII header per entry, 4-byte alignment) and
//! because writing device nodes (`/dev/console`) into an archive needs no privileges this way,
//! where `cpio -o` from a directory would need `mknod`.

use std::io::Write;

use crate::error::{Error, Result};

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// Writes a `newc` archive with deterministic metadata (owner root, mtime 0, inode numbers
/// in write order), so the same inputs always give the same bytes and the same digest.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 0,
            offset: 0,
        }
    }

    /// Adds a directory. Parents must be added first: the kernel creates entries in order.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node (`/dev/console` is 5:1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let name = path.trim_start_matches('/');
        if name != TRAILER
            && (name.is_empty()
                || name.contains('\0')
                || name
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".."))
        {
            return Err(Error::Initramfs(format!("bad archive path {path:?}")));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| Error::Initramfs(format!("{path}: larger than 4 GiB")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| Error::Initramfs(format!("{path}: name too long")))?;
        self.ino += 1;
        let ino = if name == TRAILER { 0 } else { self.ino };
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::Initramfs(format!("writing the archive: {e}")))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.offset % 4)) % 4;
        self.write(&[0u8; 3][..n as usize])
    }

    /// Writes the `TRAILER!!!` entry and returns the output.
    pub fn finish(mut self) -> Result<W> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path without a leading `/`.
    pub name: String,
    /// `st_mode`: type bits and permissions.
    pub mode: u32,
    /// Device number of a device node.
    pub rdev: (u32, u32),
    /// File content, or the target of a symlink.
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// The type bits of [`CpioEntry::mode`].
    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// Parses an uncompressed `newc` archive up to its trailer; for tests and `inspect`-style
/// checks of generated images.
pub fn read_newc(data: &[u8]) -> Result<Vec<CpioEntry>> {
    let bad = |at: usize, what: &str| Error::Initramfs(format!("cpio at byte {at}: {what}"));
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let header = data
            .get(pos..pos + 110)
            .ok_or_else(|| bad(pos, "truncated header"))?;
        if header.get(..6) != Some(&MAGIC[..]) {
            return Err(bad(pos, "not a newc header (magic 070701)"));
        }
        let field = |i: usize| -> Result<u32> {
            let raw = header
                .get(6 + i * 8..6 + (i + 1) * 8)
                .ok_or_else(|| bad(pos, "short header"))?;
            let text = std::str::from_utf8(raw).map_err(|_| bad(pos, "non-ASCII header"))?;
            u32::from_str_radix(text, 16).map_err(|_| bad(pos, "non-hex header field"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = pos + 110;
        let name_bytes = data
            .get(name_start..name_start + namesize)
            .ok_or_else(|| bad(pos, "truncated name"))?;
        let name = std::str::from_utf8(name_bytes.strip_suffix(&[0]).unwrap_or(name_bytes))
            .map_err(|_| bad(pos, "non-UTF-8 name"))?
            .to_string();
        let data_start = align(name_start + namesize);
        let body = data
            .get(data_start..data_start + size)
            .ok_or_else(|| bad(pos, "truncated data"))?;
        pos = align(data_start + size);
        if name == TRAILER {
            return Ok(out);
        }
        out.push(CpioEntry {
            name,
            mode,
            rdev,
            data: body.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).expect("dir");
        w.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        w.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        w.symlink("bin/sh", "busybox").expect("link");
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_newc(&bytes).expect("parse");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "bin/sh"]);
        assert_eq!(entries[1].rdev, (5, 1));
        assert_eq!(entries[1].kind(), S_IFCHR);
        assert_eq!(entries[2].data, b"#!/bin/sh\n");
        assert_eq!(entries[3].data, b"busybox");
    }

    #[test]
    fn refuses_dot_dot() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
    }
}
