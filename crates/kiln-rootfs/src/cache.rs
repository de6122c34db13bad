//! One ext4 image per image digest, and cheap per-VM copies of it.
//!
//! Layout under the kiln root (`$KILN_ROOT`, default `/var/lib/kiln`):
//! `rootfs/<algorithm>/<encoded>.ext4` is the image for digest `<algorithm>:<encoded>`, with a
//! `.lock` file beside it. An image appears only by `rename(2)` of a complete, checked file,
//! so readers never see a partial one; builders of the same digest serialise on `flock(2)` of
//! the lock file and the second one finds the first one's result.
//!
//! A VM gets a reflink (`FICLONE`) of the image where the filesystem supports it (btrfs, XFS,
//! bcachefs), else a sparse copy that moves only the allocated extents, and then the copy is
//! grown to the requested size with `resize2fs`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags, RenameFlags, SeekFrom};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::ext4::{FsImageBuilder, MkfsExt4};
use crate::layer::{unpacked_estimate, LayerSource};
use crate::scratch::{self, Scratch};
use crate::unpack::{remove_path, temp_name, Rootfs};

/// Scratch space unless told otherwise: `$KILN_SCRATCH_DIR` (empty for none), else
/// `/dev/shm` when it is tmpfs.
fn default_scratch() -> Option<(PathBuf, bool)> {
    match std::env::var_os("KILN_SCRATCH_DIR") {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some((PathBuf::from(dir), false)),
        None => Some((PathBuf::from(scratch::DEFAULT_BASE), true)),
    }
}

/// Default kiln root when `$KILN_ROOT` is unset.
pub const DEFAULT_KILN_ROOT: &str = "/var/lib/kiln";

/// The kiln root: `$KILN_ROOT` if set and non-empty, else [`DEFAULT_KILN_ROOT`].
pub fn kiln_root() -> PathBuf {
    match std::env::var_os("KILN_ROOT") {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => PathBuf::from(DEFAULT_KILN_ROOT),
    }
}

/// How [`copy_disk`] copied a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Shared extents (`FICLONE`): instant, and copy-on-write from then on.
    Reflink,
    /// Only the allocated ranges were copied (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`);
    /// holes stay holes.
    Sparse,
}

/// The per-digest cache of root filesystem images.
pub struct DiskCache {
    dir: PathBuf,
    builder: Box<dyn FsImageBuilder>,
    /// Where unpacked trees go while an image is built, and whether that place must be
    /// tmpfs to be used (see [`DiskCache::with_scratch_dir`]).
    scratch: Option<(PathBuf, bool)>,
    /// Most bytes a tree may take in scratch space.
    scratch_cap: Option<u64>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DiskCache {
    /// Opens (creating if needed) the cache under kiln root `root`, building with e2fsprogs.
    pub fn open(root: impl AsRef<Path>) -> Result<DiskCache> {
        let root = root.as_ref();
        std::fs::create_dir_all(root).map_err(|e| Error::io("create directory", root, e))?;
        let dir = root.join("rootfs");
        private_dir(&dir)?;
        Ok(DiskCache {
            dir,
            builder: Box::new(MkfsExt4::new()),
            scratch: default_scratch(),
            scratch_cap: None,
        })
    }

    /// Sets where the unpacked tree of an image goes while its ext4 image is built: a
    /// directory on tmpfs makes cold builds several times faster than unpacking onto a disk
    /// filesystem, at the cost of holding the tree in memory for the build's duration.
    /// `None` unpacks next to the cache. A tree that would take more than half of the space
    /// free there (and, on tmpfs, half of the memory available), or more than
    /// [`DiskCache::with_scratch_cap`], is unpacked next to the cache instead.
    ///
    /// The default is `$KILN_SCRATCH_DIR` when set (empty: `None`), else `/dev/shm` if it is
    /// tmpfs.
    pub fn with_scratch_dir(mut self, dir: Option<PathBuf>) -> DiskCache {
        self.scratch = dir.map(|d| (d, false));
        self
    }

    /// Bounds the bytes an unpacked tree may take in scratch space (default: half of what is
    /// free, see [`DiskCache::with_scratch_dir`]).
    pub fn with_scratch_cap(mut self, bytes: u64) -> DiskCache {
        self.scratch_cap = Some(bytes);
        self
    }

    /// Opens the cache under [`kiln_root`].
    pub fn open_default() -> Result<DiskCache> {
        Self::open(kiln_root())
    }

    /// Replaces the image builder (a pure-Rust ext4 writer, or a test double).
    pub fn with_builder(mut self, builder: Box<dyn FsImageBuilder>) -> DiskCache {
        self.builder = builder;
        self
    }

    /// Where the image for `digest` lives (whether or not it exists yet).
    pub fn image_path(&self, digest: &str) -> Result<PathBuf> {
        let (algorithm, encoded) = parse_digest(digest)?;
        Ok(self.dir.join(algorithm).join(format!("{encoded}.ext4")))
    }

    /// The cached image for `digest`, if there is one.
    pub fn cached(&self, digest: &str) -> Result<Option<PathBuf>> {
        let path = self.image_path(digest)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(path)),
            Ok(_) => Err(Error::io(
                "use as image",
                &path,
                io::Error::other("not a regular file"),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    /// The ext4 image for `digest`, building it from `layers` (lowest first) with at least
    /// `free_space` bytes free if it is not cached yet. Concurrent calls for the same digest,
    /// from threads or processes, build it once.
    ///
    /// `free_space` only matters for the first build: a cached image is returned as it is
    /// (VM disks are grown per VM by [`DiskCache::vm_disk`] anyway).
    pub fn image_disk(
        &self,
        digest: &str,
        layers: &[LayerSource],
        free_space: u64,
    ) -> Result<PathBuf> {
        if let Some(path) = self.cached(digest)? {
            return Ok(path);
        }
        let path = self.image_path(digest)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.dir.clone());
        private_dir(&dir)?;
        let (_, encoded) = parse_digest(digest)?;
        let lock_path = dir.join(format!("{encoded}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open lock", &lock_path, e))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock", &lock_path, e))?;
        // Someone else may have built it while we waited.
        if let Some(path) = self.cached(digest)? {
            return Ok(path);
        }
        // Holding the lock, nobody else is building this digest: anything a builder of it
        // left behind is from one that died (crash, kill -9, power loss).
        clean_stale(&dir, encoded);
        let started = std::time::Instant::now();
        let tree = dir.join(temp_name(encoded, "tree"));
        let tmp_image = dir.join(temp_name(encoded, "build"));
        let mut remover = None;
        let result = (|| {
            let (rootfs, mut scratch) = self.unpack(layers, &tree)?;
            tracing::debug!(stats = ?rootfs.stats(), path = %rootfs.path().display(), "unpacked {digest}");
            // Once mkfs has read the tree, it is removed on another thread while the image is
            // checked and synced. Dropping the scratch space removes the tree in it; should
            // the thread not start, that happens right here, and a tree next to the cache is
            // removed below.
            let mut release = || {
                let scratch = scratch.take();
                let tree = tree.clone();
                remover = std::thread::Builder::new()
                    .name("kiln-rm-tree".into())
                    .spawn(move || match scratch {
                        Some(scratch) => drop(scratch),
                        None => {
                            if let Err(e) = remove_path(&tree) {
                                tracing::warn!(error = %e, "could not remove unpacked tree");
                            }
                        }
                    })
                    .ok();
            };
            self.builder
                .build_then_release(rootfs.path(), &tmp_image, free_space, &mut release)?;
            let file = File::open(&tmp_image).map_err(|e| Error::io("open", &tmp_image, e))?;
            file.sync_all()
                .map_err(|e| Error::io("sync", &tmp_image, e))?;
            std::fs::rename(&tmp_image, &path)
                .map_err(|e| Error::io("rename into place", &path, e))?;
            sync_dir(&dir)
        })();
        if let Some(remover) = remover {
            let _ = remover.join();
        }
        if tree.exists() {
            if let Err(e) = remove_path(&tree) {
                tracing::warn!(error = %e, "could not remove unpacked tree");
            }
        }
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp_image);
        }
        result?;
        tracing::info!(digest, elapsed = ?started.elapsed(), "built root filesystem image");
        drop(lock);
        Ok(path)
    }

    /// Unpacks `layers` into scratch space if it can hold them, else at `tree`.
    fn unpack(&self, layers: &[LayerSource], tree: &Path) -> Result<(Rootfs, Option<Scratch>)> {
        let scratch = self.scratch.as_ref().and_then(|(base, tmpfs_only)| {
            let estimate = layers
                .iter()
                .map(unpacked_estimate)
                .fold(0u64, u64::saturating_add);
            Scratch::create(base, estimate, self.scratch_cap, *tmpfs_only)
        });
        if let Some(scratch) = scratch {
            match Rootfs::unpack_limited(layers, &scratch.tree(), Some(scratch.limit())) {
                Ok(rootfs) => return Ok((rootfs, Some(scratch))),
                Err(e) if scratch::is_exhausted(&e) => {
                    tracing::info!(error = %e, "scratch space cannot hold the tree; unpacking next to the cache");
                }
                Err(e) => return Err(e),
            }
        }
        Ok((Rootfs::unpack(layers, tree)?, None))
    }

    /// A new disk for one VM at `dest` (which must not exist): a copy-on-write copy of the
    /// cached image for `digest`, grown to `size` bytes with the filesystem resized to fill it.
    /// `size` of 0 keeps the image's size.
    pub fn vm_disk(&self, digest: &str, dest: &Path, size: u64) -> Result<PathBuf> {
        let image = self
            .cached(digest)?
            .ok_or_else(|| Error::NotCached(digest.to_owned()))?;
        let image_len = std::fs::metadata(&image)
            .map_err(|e| Error::io("stat", &image, e))?
            .len();
        if size != 0 && size < image_len {
            return Err(Error::SizeTooSmall {
                requested: size,
                image: image_len,
            });
        }
        if std::fs::symlink_metadata(dest).is_ok() {
            return Err(Error::DestinationExists(dest.to_path_buf()));
        }
        let name = dest.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            Error::io(
                "use as destination",
                dest,
                io::Error::new(io::ErrorKind::InvalidInput, "needs a UTF-8 file name"),
            )
        })?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = parent.join(temp_name(name, "disk"));
        let result = (|| {
            let method = copy_disk(&image, &tmp)?;
            tracing::debug!(?method, dest = %dest.display(), "copied image");
            if size > image_len {
                self.builder.grow(&tmp, size)?;
            }
            rename_noreplace(&tmp, dest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| dest.to_path_buf())
    }

    /// Removes the cached image for `digest` (VM disks already copied from it are unaffected).
    pub fn remove(&self, digest: &str) -> Result<bool> {
        let path = self.image_path(digest)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }
}

/// Removes temporaries (`.<encoded>.tree-*`, `.<encoded>.build-*` and the unpack directory
/// inside a tree's name) of earlier, dead builders of one digest. Only call with its lock held.
fn clean_stale(dir: &Path, encoded: &str) {
    let prefixes = [format!(".{encoded}."), format!("..{encoded}.")];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let path = dir.join(name);
            tracing::info!(path = %path.display(), "removing leftover of an interrupted build");
            if let Err(e) = remove_path(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove leftover");
            }
        }
    }
}

/// Creates a directory only root can enter (images hold whole guest filesystems, secrets
/// included); an existing one is left as it is.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io("create directory", dir, e)),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => Err(Error::DestinationExists(to.to_path_buf())),
        Err(e) => Err(Error::io("rename into place", to, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open directory", dir, e))?;
    rustix::fs::fsync(&fd).map_err(|e| Error::io("sync", dir, e))
}

/// Copies `src` to a new file `dst` as cheaply as the filesystem allows: a reflink, else
/// only the allocated ranges (the result is as sparse as the source).
pub fn copy_disk(src: &Path, dst: &Path) -> Result<CopyMethod> {
    let input = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| Error::io("create", dst, e))?;
    let result = copy_fds(&input, &output).map_err(|e| Error::io("copy to", dst, e));
    if result.is_err() {
        drop(output);
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_fds(input: &File, output: &File) -> io::Result<CopyMethod> {
    match rustix::fs::ioctl_ficlone(output, input) {
        Ok(()) => return Ok(CopyMethod::Reflink),
        // Not supported by this filesystem, or across filesystems: fall back.
        Err(
            Errno::OPNOTSUPP
            | Errno::XDEV
            | Errno::INVAL
            | Errno::NOTTY
            | Errno::NOSYS
            | Errno::PERM,
        ) => {}
        Err(e) => return Err(e.into()),
    }
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let mut offset = 0;
    while offset < len {
        let data = match rustix::fs::seek(input, SeekFrom::Data(offset)) {
            Ok(d) => d,
            // No data after `offset`: the rest is a hole, already there thanks to set_len.
            Err(Errno::NXIO) => break,
            // SEEK_DATA unsupported: treat everything as data.
            Err(Errno::INVAL) => offset,
            Err(e) => return Err(e.into()),
        };
        let hole = match rustix::fs::seek(input, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(Errno::INVAL) => len,
            Err(e) => return Err(e.into()),
        };
        copy_range(input, output, data, hole)?;
        offset = hole;
    }
    Ok(CopyMethod::Sparse)
}

/// Copies bytes `[start, end)` at the same offsets, in the kernel where possible.
fn copy_range(input: &File, output: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let mut off_in = pos;
        let mut off_out = pos;
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(
            input.as_fd(),
            Some(&mut off_in),
            output.as_fd(),
            Some(&mut off_out),
            want,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ))
            }
            Ok(n) => pos += n as u64,
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                return copy_range_rw(input, output, pos, end);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The portable fallback: read and write, skipping all-zero blocks so the copy stays sparse.
fn copy_range_rw(input: &File, output: &File, start: u64, end: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = input.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        for (i, chunk) in buf[..n].chunks(4096).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                output.write_all_at(chunk, pos + (i * 4096) as u64)?;
            }
        }
        pos += n as u64;
    }
    Ok(())
}

/// Splits an OCI digest (`algorithm ":" encoded`) after checking it can safely name a file:
/// algorithm components `[a-z0-9]+` joined by `+._-`, encoded `[a-zA-Z0-9=_-]+`, with the
/// registered algorithms' exact lengths.
fn parse_digest(digest: &str) -> Result<(&str, &str)> {
    let invalid = || Error::InvalidDigest(digest.to_owned());
    let (algorithm, encoded) = digest.split_once(':').ok_or_else(invalid)?;
    let alg_ok = !algorithm.is_empty()
        && algorithm.len() <= 32
        && algorithm.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    let enc_ok = !encoded.is_empty()
        && encoded.len() <= 200
        && encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-');
    let hex = |n: usize| {
        encoded.len() == n
            && encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let registered_ok = match algorithm {
        "sha256" => hex(64),
        "sha512" => hex(128),
        _ => true,
    };
    if alg_ok && enc_ok && registered_ok {
        Ok((algorithm, encoded))
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        assert_eq!(
            parse_digest(&format!("sha256:{hex}")).ok(),
            Some(("sha256", hex.as_str()))
        );
        assert!(parse_digest("sha256:abc").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(parse_digest("sha256").is_err());
        assert!(parse_digest("../x:abc").is_err());
        assert!(parse_digest("foo:../../etc").is_err());
        assert!(parse_digest("foo:a/b").is_err());
        assert!(
            parse_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8").is_ok()
        );
    }
}
