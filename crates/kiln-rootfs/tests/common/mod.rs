//! Helpers shared by the integration tests: temporary directories, tar layers written entry by
//! entry (including entries the `tar` crate's safe API refuses to write), and e2fsprogs
//! inspection of images without mounting them.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_rootfs::LayerSource;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-rootfs-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// These tests chown and mknod, as kiln does: they need root.
pub fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: needs root (chown, mknod, security.* xattrs)");
        false
    }
}

pub const MTIME: u64 = 1_600_000_000;

/// What an entry is.
#[derive(Clone)]
pub enum Kind<'a> {
    File(&'a [u8]),
    Dir,
    Symlink(&'a [u8]),
    Hardlink(&'a [u8]),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// Writes a tar layer entry by entry with full control over the raw path bytes.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends one entry; `path` is written verbatim (GNU long-name records when over 100
    /// bytes), so `..`, absolute and over-long paths can be produced.
    pub fn entry(
        &mut self,
        path: &[u8],
        kind: Kind<'_>,
        mode: u32,
        uid: u64,
        gid: u64,
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        if !xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            self.builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .expect("pax");
        }
        let mut header = tar::Header::new_gnu();
        let (ty, data, link): (tar::EntryType, &[u8], Option<&[u8]>) = match kind {
            Kind::File(d) => (tar::EntryType::Regular, d, None),
            Kind::Dir => (tar::EntryType::Directory, &[], None),
            Kind::Symlink(t) => (tar::EntryType::Symlink, &[], Some(t)),
            Kind::Hardlink(t) => (tar::EntryType::Link, &[], Some(t)),
            Kind::Char(maj, min) => {
                header.set_device_major(maj).expect("major");
                header.set_device_minor(min).expect("minor");
                (tar::EntryType::Char, &[], None)
            }
            Kind::Block(maj, min) => {
                header.set_device_major(maj).expect("major");
                header.set_device_minor(min).expect("minor");
                (tar::EntryType::Block, &[], None)
            }
            Kind::Fifo => (tar::EntryType::Fifo, &[], None),
        };
        if path.len() > 99 {
            self.long_record(tar::EntryType::GNULongName, path);
        }
        if let Some(link) = link {
            if link.len() > 99 {
                self.long_record(tar::EntryType::GNULongLink, link);
            }
            let field = &mut header.as_old_mut().linkname;
            let n = link.len().min(99);
            field[..n].copy_from_slice(&link[..n]);
        }
        {
            let field = &mut header.as_old_mut().name;
            let n = path.len().min(99);
            field[..n].copy_from_slice(&path[..n]);
        }
        header.set_entry_type(ty);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(MTIME);
        header.set_cksum();
        self.builder.append(&header, data).expect("append");
        self
    }

    /// A regular file whose path is only in a PAX `path` record (as Docker writes long
    /// names); the ustar name field holds a decoy.
    pub fn pax_file(&mut self, path: &[u8], data: &[u8]) -> &mut Self {
        self.builder
            .append_pax_extensions([("path", path)])
            .expect("pax path");
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..5].copy_from_slice(b"decoy");
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_cksum();
        self.builder.append(&header, data).expect("append");
        self
    }

    fn long_record(&mut self, ty: tar::EntryType, value: &[u8]) {
        let mut data = value.to_vec();
        data.push(0);
        let mut header = tar::Header::new_gnu();
        let name = b"././@LongLink";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(ty);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        self.builder
            .append(&header, data.as_slice())
            .expect("long name");
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path.as_bytes(), Kind::Dir, 0o755, 0, 0, &[])
    }

    pub fn file(&mut self, path: &str, data: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            Kind::File(data.as_bytes()),
            0o644,
            0,
            0,
            &[],
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            Kind::Symlink(target.as_bytes()),
            0o777,
            0,
            0,
            &[],
        )
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            Kind::Hardlink(target.as_bytes()),
            0o644,
            0,
            0,
            &[],
        )
    }

    /// `.wh.NAME` or `.wh..wh..opq` markers are plain empty files.
    pub fn marker(&mut self, path: &str) -> &mut Self {
        self.entry(path.as_bytes(), Kind::File(b""), 0o644, 0, 0, &[])
    }

    pub fn tar(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().expect("finish tar")
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Writes layers as blob files in `dir`, compressed as asked, with matching media types.
pub fn write_layers(dir: &Path, layers: Vec<(Vec<u8>, Compress)>) -> Vec<LayerSource> {
    layers
        .into_iter()
        .enumerate()
        .map(|(i, (tar, compress))| {
            let path = dir.join(format!("layer{i}"));
            let (bytes, media_type) = match compress {
                Compress::None => (tar, TAR),
                Compress::Gzip => {
                    let mut enc =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    enc.write_all(&tar).expect("gzip");
                    (enc.finish().expect("gzip"), TAR_GZIP)
                }
                Compress::Zstd => (zstd::encode_all(tar.as_slice(), 3).expect("zstd"), TAR_ZSTD),
            };
            std::fs::write(&path, bytes).expect("write layer");
            LayerSource::new(path, media_type)
        })
        .collect()
}

/// Plain-tar layers in `dir`.
pub fn plain_layers(dir: &Path, tars: Vec<Vec<u8>>) -> Vec<LayerSource> {
    write_layers(dir, tars.into_iter().map(|t| (t, Compress::None)).collect())
}

/// Runs `debugfs -R cmd image` and returns stdout; panics on failure.
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `e2fsck -fn`: must be clean.
pub fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck (e2fsprogs)");
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The parsed parts of `debugfs stat` that the tests check.
#[derive(Debug)]
pub struct Stat {
    pub inode: u64,
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u32,
    pub mtime: i64,
    pub raw: String,
}

pub fn stat(image: &Path, path: &str) -> Stat {
    let raw = debugfs(image, &format!("stat \"{path}\""));
    let word_after = |key: &str| -> String {
        raw.split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key:?} in stat {path}: {raw}"))
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mtime_hex = word_after("mtime:");
    let mtime_hex = mtime_hex
        .trim_start_matches("0x")
        .split(':')
        .next()
        .unwrap_or_default();
    Stat {
        inode: word_after("Inode:").parse().expect("inode"),
        kind: word_after("Type:"),
        mode: u32::from_str_radix(&word_after("Mode:"), 8).expect("mode"),
        uid: word_after("User:").parse().expect("uid"),
        gid: word_after("Group:").parse().expect("gid"),
        size: word_after("Size:").parse().expect("size"),
        links: word_after("Links:").parse().expect("links"),
        mtime: i64::from_str_radix(mtime_hex, 16).expect("mtime"),
        raw,
    }
}

/// `debugfs cat`.
pub fn cat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat \"{path}\""))
}

/// Names in a directory of the image (`debugfs ls`), without `.` and `..`.
pub fn ls(image: &Path, path: &str) -> Vec<String> {
    let out = debugfs(image, &format!("ls -p \"{path}\""));
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_owned))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// Names in a host directory, sorted.
pub fn host_ls(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// `security.capability` granting CAP_NET_RAW, as `setcap cap_net_raw+ep` writes it.
pub const CAP_NET_RAW: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// A symlink target too long to live in the inode (a "slow" symlink in ext4).
pub const LONG_SYMLINK_TARGET: &str =
    "/usr/lib/x86_64-linux-gnu/some/really/long/path/to/a/library.so.1.2.3";

/// Everything a layer can say about an entry: modes, owners, xattrs (`security.*` and
/// `user.*`), hard links, device nodes, FIFOs, long and short symlinks, whiteouts.
pub fn rich_layers(dir: &Path) -> Vec<LayerSource> {
    let long_target = LONG_SYMLINK_TARGET;
    let l0 = Layer::new()
        .entry(b"./", Kind::Dir, 0o751, 0, 0, &[])
        .entry(
            b"bin/ping",
            Kind::File(b"ping!"),
            0o4755,
            0,
            0,
            &[("security.capability", CAP_NET_RAW)],
        )
        .entry(b"bin/ping2", Kind::Hardlink(b"bin/ping"), 0, 0, 0, &[])
        .entry(b"bin/sh", Kind::Symlink(b"busybox"), 0o777, 0, 0, &[])
        .entry(
            b"lib",
            Kind::Symlink(long_target.as_bytes()),
            0o777,
            0,
            0,
            &[],
        )
        .entry(
            b"home/user/",
            Kind::Dir,
            0o700,
            1000,
            1001,
            &[("user.note", b"hello")],
        )
        .entry(
            b"home/user/notes",
            Kind::File(b"user data\n"),
            0o600,
            1000,
            1001,
            &[("user.tag", b"x")],
        )
        .entry(b"dev/null", Kind::Char(1, 3), 0o666, 0, 0, &[])
        .entry(b"dev/vda", Kind::Block(254, 0), 0o660, 0, 6, &[])
        .entry(b"run/initctl", Kind::Fifo, 0o600, 0, 0, &[])
        .entry(b"tmp/", Kind::Dir, 0o1777, 0, 0, &[])
        .entry(b"etc/gone", Kind::File(b"old"), 0o644, 0, 0, &[])
        .entry(b"var/cache/a", Kind::File(b"a"), 0o644, 0, 0, &[])
        .tar();
    let l1 = Layer::new()
        .marker("etc/.wh.gone")
        .marker("var/cache/.wh..wh..opq")
        .file("var/cache/b", "b")
        .file("etc/hostname", "kiln\n")
        .tar();
    write_layers(dir, vec![(l0, Compress::Gzip), (l1, Compress::Zstd)])
}
