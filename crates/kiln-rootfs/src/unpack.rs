//! Applying OCI layers, in order, into a fresh directory.
//!
//! The tree is built in a temporary directory next to the destination and renamed into place
//! only when every layer applied, so a caller never sees a half-built root filesystem.
//!
//! Safety model: layers are hostile. Every entry path is split into components and checked
//! (no `..`, not absolute, no NUL, `NAME_MAX`/`PATH_MAX`, bounded depth); parents are opened one
//! component at a time from a descriptor of the tree's root with `O_NOFOLLOW | O_DIRECTORY`,
//! and entries are created with `*at()` calls relative to the parent's descriptor. A symlink is
//! therefore never followed on the host: an entry whose parent is a symlink is refused (instead
//! of being resolved inside the root, as some runtimes do), which also defeats the "plant
//! `a -> /etc`, then write `a/passwd`" attack whether the symlink comes from the same layer or an
//! earlier one. Symlink *targets* are stored verbatim, absolute or not: they only mean something
//! inside the guest.
//!
//! Whiteouts follow the OCI image spec: `.wh.NAME` removes `NAME` as lower layers left it,
//! `.wh..wh..opq` empties its directory of what lower layers put there. Entries of the layer
//! being applied are never removed by its own whiteouts, whatever their order in the tar.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

use crate::error::{EntryError, Error, Result};
use crate::fsops::{self, Keep, MAX_DEPTH};
use crate::layer::{open_layer, LayerSource};

/// Longest single name Linux accepts (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// Longest path Linux accepts, without the terminating NUL (`PATH_MAX - 1`).
const PATH_MAX: usize = 4095;
/// Whiteout prefix from the OCI image spec.
const WHITEOUT: &[u8] = b".wh.";
/// Opaque-directory marker from the OCI image spec.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Size of the buffer file data is copied through: few, large writes.
const COPY_BUF: usize = 256 * 1024;

/// A root filesystem tree unpacked from an image's layers.
#[derive(Debug)]
pub struct Rootfs {
    path: PathBuf,
    stats: UnpackStats,
}

/// Counts of what an unpack did, for logs and progress output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Layers applied.
    pub layers: usize,
    /// Tar entries created (files, directories, links, nodes).
    pub entries: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
}

impl Rootfs {
    /// Applies `layers` (lowest first) into a new directory `dest`, which must not exist.
    ///
    /// Nothing is left behind on failure: the tree is built under a temporary name in `dest`'s
    /// parent directory and renamed to `dest` only after the last layer applied. Needs root to
    /// keep owners and device nodes, as kiln always runs.
    ///
    /// The finished tree holds whatever the image holds, setuid-root binaries and device nodes
    /// included: put `dest` in a directory other host users cannot enter (as [`DiskCache`]
    /// does), or they could use those. While it is being filled the tree's root is 0700.
    ///
    /// [`DiskCache`]: crate::DiskCache
    pub fn unpack(layers: &[LayerSource], dest: &Path) -> Result<Rootfs> {
        Self::unpack_limited(layers, dest, None)
    }

    /// [`Rootfs::unpack`] that gives up with a "storage full" error once the tree would take
    /// more than `limit` bytes (file data in whole pages, plus a little per entry): scratch
    /// space on tmpfs is memory, and a layer can expand far beyond any estimate.
    pub(crate) fn unpack_limited(
        layers: &[LayerSource],
        dest: &Path,
        limit: Option<u64>,
    ) -> Result<Rootfs> {
        let (parent, name) = split_dest(dest)?;
        let parent_fd = rustix::fs::open(&parent, fsops::DIR_FLAGS, Mode::empty())
            .map_err(|e| Error::io("open directory", &parent, e))?;
        match rustix::fs::statat(&parent_fd, name.as_bytes(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => return Err(Error::DestinationExists(dest.to_path_buf())),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(Error::io("stat", dest, e)),
        }
        let tmp_name = temp_name(&name, "unpack");
        rustix::fs::mkdirat(&parent_fd, tmp_name.as_bytes(), Mode::from_raw_mode(0o700))
            .map_err(|e| Error::io("create directory", parent.join(&tmp_name), e))?;
        let result = Self::unpack_into(layers, parent_fd.as_fd(), &tmp_name, &parent, limit);
        let result = result.and_then(|stats| {
            match rustix::fs::renameat_with(
                &parent_fd,
                tmp_name.as_bytes(),
                &parent_fd,
                name.as_bytes(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => Ok(stats),
                Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                    Err(Error::DestinationExists(dest.to_path_buf()))
                }
                Err(e) => Err(Error::io("rename into place", dest, e)),
            }
        });
        match result {
            Ok(stats) => Ok(Rootfs {
                path: dest.to_path_buf(),
                stats,
            }),
            Err(e) => {
                if let Err(clean) = fsops::remove_tree(parent_fd.as_fd(), tmp_name.as_bytes()) {
                    tracing::warn!(
                        path = %parent.join(&tmp_name).display(),
                        error = %clean,
                        "could not remove a failed unpack"
                    );
                }
                Err(e)
            }
        }
    }

    fn unpack_into(
        layers: &[LayerSource],
        parent: BorrowedFd<'_>,
        tmp_name: &str,
        parent_path: &Path,
        limit: Option<u64>,
    ) -> Result<UnpackStats> {
        let root = fsops::open_dir(parent, tmp_name.as_bytes())
            .map_err(|e| Error::io("open directory", parent_path.join(tmp_name), e))?;
        let mut applier = Applier::new(root);
        applier.limit = limit;
        for (index, layer) in layers.iter().enumerate() {
            let reader = open_layer(index, layer)?;
            applier.apply_layer(index, layer, reader)?;
        }
        // The root stays 0700 while being filled, so no other host user can reach into a tree
        // whose files do not have their final modes yet; it gets its real mode (0755 unless a
        // layer's `./` entry said otherwise) only now. chmod leaves the mtime alone.
        rustix::fs::fchmod(&applier.root, Mode::from_raw_mode(applier.root_mode))
            .map_err(|e| Error::io("chmod", parent_path.join(tmp_name), e))?;
        Ok(applier.stats)
    }

    /// Where the tree is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the unpack did.
    pub fn stats(&self) -> UnpackStats {
        self.stats
    }

    /// Removes the tree (never following its symlinks), e.g. once it is in an ext4 image.
    pub fn remove(self) -> Result<()> {
        remove_path(&self.path)
    }
}

/// Removes a file or directory tree without ever following a symlink inside it.
pub(crate) fn remove_path(path: &Path) -> Result<()> {
    let (parent, name) = split_dest(path)?;
    let parent_fd = rustix::fs::open(&parent, fsops::DIR_FLAGS, Mode::empty())
        .map_err(|e| Error::io("open directory", &parent, e))?;
    fsops::remove_tree(parent_fd.as_fd(), name.as_bytes()).map_err(|e| Error::io("remove", path, e))
}

/// Splits a destination into its parent directory and final name.
fn split_dest(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::io(
                "use as destination",
                dest,
                io::Error::new(io::ErrorKind::InvalidInput, "needs a UTF-8 final component"),
            )
        })?
        .to_owned();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// A name for a temporary sibling of `name`, unique within this host.
pub(crate) fn temp_name(name: &str, what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = rustix::process::getpid().as_raw_nonzero();
    format!(".{name}.{what}-{pid}-{n}")
}

/// The per-entry metadata kept from a tar header and its PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What kind of object an entry creates.
enum Kind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Node(FileType, u32, u32),
}

/// State for applying the layers of one image into one tree.
struct Applier {
    root: OwnedFd,
    /// Paths (components joined by `/`, root is empty) that the current layer created or
    /// walked through. Whiteouts and opaque markers never remove these, and a directory among
    /// them cannot be replaced by a non-directory in the same layer.
    touched: HashSet<Vec<u8>>,
    /// Directory times to set once the layer is complete (creating children changes them).
    dir_times: Vec<(Vec<u8>, Timestamps)>,
    /// Times of existing directories the current layer changes without describing them, as
    /// they were before: restored at the end of the layer (before `dir_times`, so an entry
    /// that does describe one wins), so the time of the unpack never shows in the tree.
    kept_dir_times: Vec<(Vec<u8>, Timestamps)>,
    /// Times for directories the current entry's path needs but no entry described: the
    /// entry's own, so that the same layers always give the same tree (not the unpack time).
    implicit_dir_times: Timestamps,
    /// The last parent directory opened in this layer. Safe to reuse within a layer because a
    /// directory the layer walked through cannot be removed or replaced by that layer.
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    stats: UnpackStats,
    /// Mode for the root directory, applied after the last layer.
    root_mode: u32,
    /// Space the tree may take, if bounded (see [`Rootfs::unpack_limited`]).
    limit: Option<u64>,
    /// Space charged against `limit` so far; never decreases (whiteouts free space, but an
    /// overestimate is harmless).
    charged: u64,
    /// File data passes through here: one buffer for the whole unpack, zeroed once.
    buf: Vec<u8>,
}

impl Applier {
    fn new(root: OwnedFd) -> Self {
        Self {
            root,
            root_mode: 0o755,
            touched: HashSet::new(),
            dir_times: Vec::new(),
            kept_dir_times: Vec::new(),
            implicit_dir_times: Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                last_modification: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
            },
            parent_cache: None,
            stats: UnpackStats::default(),
            limit: None,
            charged: 0,
            buf: vec![0; COPY_BUF],
        }
    }

    /// Charges an entry with `data` bytes of file content against the limit.
    fn charge(&mut self, data: u64) -> Result<(), EntryError> {
        // Kernel memory for the inode and dentry, and the data in whole pages.
        self.charged = self
            .charged
            .saturating_add(1024)
            .saturating_add(data.next_multiple_of(4096));
        match self.limit {
            Some(limit) if self.charged > limit => Err(EntryError::io(
                "write file data",
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("the tree needs more than the {limit} bytes of scratch space allowed"),
                ),
            )),
            _ => Ok(()),
        }
    }

    fn apply_layer(
        &mut self,
        index: usize,
        layer: &LayerSource,
        reader: Box<dyn Read>,
    ) -> Result<()> {
        let layer_err = |source: io::Error| Error::Layer {
            layer: index,
            path: layer.path.clone(),
            source,
        };
        // The root is never walked through: it keeps its times like any directory the
        // layer changes without describing.
        let root_times = dir_times_now(self.root.as_fd()).map_err(layer_err)?;
        self.kept_dir_times.push((Vec::new(), root_times));
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(layer_err)? {
            let mut entry = entry.map_err(layer_err)?;
            let raw_path = entry.path_bytes().into_owned();
            self.apply_entry(&mut entry, &raw_path)
                .map_err(|reason| Error::Entry {
                    layer: index,
                    entry: String::from_utf8_lossy(&raw_path).into_owned(),
                    reason,
                })?;
        }
        let kept = std::mem::take(&mut self.kept_dir_times);
        for (key, times) in kept.into_iter().chain(std::mem::take(&mut self.dir_times)) {
            let comps = split_key(&key);
            self.open_existing_dir(&comps)
                .and_then(|fd| {
                    rustix::fs::futimens(&fd, &times).map_err(|e| EntryError::io("set times", e))
                })
                .map_err(|reason| Error::Entry {
                    layer: index,
                    entry: String::from_utf8_lossy(&key).into_owned(),
                    reason,
                })?;
        }
        self.touched.clear();
        self.parent_cache = None;
        self.stats.layers += 1;
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
    ) -> Result<(), EntryError> {
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            return Ok(());
        }
        let comps = split_path(raw_path)?;
        let key = comps.join(&b'/');
        let mtime = Timespec {
            tv_sec: entry
                .header()
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(0),
            tv_nsec: 0,
        };
        self.implicit_dir_times = Timestamps {
            last_access: mtime,
            last_modification: mtime,
        };

        if let Some((last, parents)) = comps.split_last() {
            if last.starts_with(WHITEOUT) {
                return self.apply_whiteout(parents, last);
            }
        }

        let kind = match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
                if raw_path.ends_with(b"/") =>
            {
                Kind::Dir
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                Kind::File
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(link_name(entry)?),
            tar::EntryType::Link => Kind::Hardlink(link_name(entry)?),
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = entry
                    .header()
                    .device_major()
                    .map_err(EntryError::Header)?
                    .unwrap_or(0);
                let minor = entry
                    .header()
                    .device_minor()
                    .map_err(EntryError::Header)?
                    .unwrap_or(0);
                let ft = if entry_type == tar::EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                Kind::Node(ft, major, minor)
            }
            tar::EntryType::Fifo => Kind::Node(FileType::Fifo, 0, 0),
            other => return Err(EntryError::UnsupportedType(other.as_byte() as char)),
        };
        let meta = read_meta(entry)?;
        let data = if matches!(kind, Kind::File) {
            entry.size()
        } else {
            0
        };
        self.charge(data)?;

        let Some((name, parents)) = comps.split_last() else {
            // The entry describes the root directory itself (`./`).
            if !matches!(kind, Kind::Dir) {
                return Err(EntryError::RootNotDirectory);
            }
            let root = self
                .root
                .try_clone()
                .map_err(|e| EntryError::io("dup", e))?;
            apply_fd_meta(root.as_fd(), &meta)?;
            rustix::fs::fchmod(&root, Mode::from_raw_mode(0o700))
                .map_err(|e| EntryError::io("chmod", e))?;
            self.root_mode = meta.mode;
            self.dir_times.push((Vec::new(), meta.times));
            self.stats.entries += 1;
            return Ok(());
        };
        let name: &[u8] = name;

        // A hard link's target is checked before anything at the entry's own path changes.
        let link_target = match &kind {
            Kind::Hardlink(target) => Some(self.resolve_hardlink(target, &key)?),
            _ => None,
        };

        let parent = self.open_parent(parents)?;
        let parent = parent.as_fd();

        // Clear the way: whatever lower layers left at this path goes, except that an existing
        // directory stays (and merges) when the entry is a directory.
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode).is_dir();
                match (&kind, is_dir) {
                    (Kind::Dir, true) => {}
                    (_, true) => {
                        if self.touched.contains(&key) {
                            return Err(EntryError::ReplacesDirectory(lossy(&key)));
                        }
                        fsops::remove_tree(parent, name)
                            .map_err(|e| EntryError::io("remove directory", e))?;
                    }
                    (_, false) => {
                        rustix::fs::unlinkat(parent, name, AtFlags::empty())
                            .map_err(|e| EntryError::io("remove", e))?;
                    }
                }
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(EntryError::io("stat", e)),
        }
        self.touched.insert(key.clone());

        match kind {
            Kind::File => {
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| EntryError::io("create file", e))?;
                let mut file = File::from(fd);
                let written = copy_data(entry, &mut file, &mut self.buf)
                    .map_err(|e| EntryError::io("write file data", e))?;
                self.stats.bytes += written;
                apply_fd_meta(file.as_fd(), &meta)?;
            }
            Kind::Dir => {
                match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(EntryError::io("create directory", e)),
                }
                let fd = fsops::open_dir(parent, name)
                    .map_err(|e| EntryError::io("open directory", e))?;
                apply_fd_meta(fd.as_fd(), &meta)?;
                self.dir_times.push((key, meta.times));
            }
            Kind::Symlink(target) => {
                rustix::fs::symlinkat(target.as_slice(), parent, name)
                    .map_err(|e| EntryError::io("create symlink", e))?;
                apply_path_meta(parent, name, &meta, false)?;
            }
            Kind::Hardlink(_) => {
                if let Some((target_parent, target_name)) = link_target {
                    rustix::fs::linkat(
                        &target_parent,
                        target_name.as_slice(),
                        parent,
                        name,
                        AtFlags::empty(),
                    )
                    .map_err(|e| EntryError::io("create hard link", e))?;
                }
            }
            Kind::Node(ft, major, minor) => {
                rustix::fs::mknodat(
                    parent,
                    name,
                    ft,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| EntryError::io("create device node", e))?;
                apply_path_meta(parent, name, &meta, true)?;
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Applies `.wh.NAME` or the opaque marker found in directory `parents`.
    fn apply_whiteout(&mut self, parents: &[&[u8]], last: &[u8]) -> Result<(), EntryError> {
        let dir = self.open_parent(parents)?;
        let mut prefix = parents.join(&b'/');
        self.stats.whiteouts += 1;
        if last == OPAQUE {
            // Hide what lower layers put in this directory, keeping what this layer wrote.
            let touched = &self.touched;
            let base_len = prefix.len();
            return fsops::clear_dir(dir.as_fd(), &mut |rel, _is_dir| {
                prefix.truncate(base_len);
                if !prefix.is_empty() {
                    prefix.push(b'/');
                }
                prefix.extend_from_slice(rel);
                if touched.contains(&prefix) {
                    Keep::Descend
                } else {
                    Keep::No
                }
            })
            .map_err(|e| EntryError::io("clear opaque directory", e));
        }
        if last.starts_with(b".wh..wh.") {
            // aufs bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): not part of the image.
            return Ok(());
        }
        let victim = &last[WHITEOUT.len()..];
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(EntryError::BadWhiteout);
        }
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        prefix.extend_from_slice(victim);
        if self.touched.contains(&prefix) {
            // Whiteouts only delete what lower layers left.
            return Ok(());
        }
        fsops::remove_tree(dir.as_fd(), victim).map_err(|e| EntryError::io("apply whiteout", e))
    }

    /// Checks a hard link's target and returns its parent directory and name.
    fn resolve_hardlink(
        &mut self,
        target: &[u8],
        key: &[u8],
    ) -> Result<(OwnedFd, Vec<u8>), EntryError> {
        let bad = |why: &str| EntryError::BadHardlink {
            target: lossy(target),
            why: why.to_owned(),
        };
        let comps = split_path(target).map_err(|e| bad(&e.to_string()))?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(bad("is the root directory"));
        };
        if comps.join(&b'/') == key {
            return Err(bad("is the entry itself"));
        }
        let parent = self.walk(parents, false).map_err(|e| match e {
            EntryError::Io { source, .. }
                if source.raw_os_error() == Some(Errno::NOENT.raw_os_error()) =>
            {
                bad("does not exist")
            }
            other => bad(&other.to_string()),
        })?;
        match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode).is_dir() => Err(bad("is a directory")),
            Ok(_) => Ok((parent, name.to_vec())),
            Err(Errno::NOENT) => Err(bad("does not exist")),
            Err(e) => Err(EntryError::io("stat hard link target", e)),
        }
    }

    /// Opens (creating as needed) the directory `comps`, reusing the last one opened.
    fn open_parent(&mut self, comps: &[&[u8]]) -> Result<OwnedFd, EntryError> {
        let key = comps.join(&b'/');
        if let Some((cached, fd)) = &self.parent_cache {
            if *cached == key {
                return fd.try_clone().map_err(|e| EntryError::io("dup", e));
            }
        }
        let fd = self.walk(comps, true)?;
        let copy = fd.try_clone().map_err(|e| EntryError::io("dup", e))?;
        self.parent_cache = Some((key, copy));
        Ok(fd)
    }

    fn open_existing_dir(&mut self, comps: &[&[u8]]) -> Result<OwnedFd, EntryError> {
        self.walk(comps, false)
    }

    /// Walks `comps` from the root one component at a time, never following a symlink.
    /// With `create`, missing directories are made (mode 0755, owned by root, as Docker does)
    /// and every directory walked through is marked as touched by this layer.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, EntryError> {
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| EntryError::io("dup", e))?;
        let mut walked: Vec<u8> = Vec::new();
        for comp in comps {
            if !walked.is_empty() {
                walked.push(b'/');
            }
            walked.extend_from_slice(comp);
            let mut created = false;
            let next = match fsops::open_dir(cur.as_fd(), comp) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) && create => {
                    match rustix::fs::mkdirat(&cur, *comp, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            let fd = fsops::open_dir(cur.as_fd(), comp)
                                .map_err(|e| EntryError::io("open directory", e))?;
                            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                                .map_err(|e| EntryError::io("chmod", e))?;
                            self.dir_times
                                .push((walked.clone(), self.implicit_dir_times.clone()));
                            created = true;
                            fd
                        }
                        Err(e) => return Err(EntryError::io("create parent directory", e)),
                    }
                }
                Err(e) => return Err(classify_walk_error(cur.as_fd(), comp, &walked, e)),
            };
            if create && self.touched.insert(walked.clone()) && !created {
                // First walked through in this layer, and not described by it (yet): it
                // keeps the times it has now, whatever this layer creates or removes in it.
                let times = dir_times_now(next.as_fd()).map_err(|e| EntryError::io("stat", e))?;
                self.kept_dir_times.push((walked.clone(), times));
            }
            cur = next;
        }
        Ok(cur)
    }
}

/// The access and modification times `dir` has now.
fn dir_times_now(dir: BorrowedFd<'_>) -> io::Result<Timestamps> {
    let st = rustix::fs::fstat(dir)?;
    Ok(Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    })
}

/// Turns a failed `open(O_NOFOLLOW|O_DIRECTORY)` into the reason an image author can act on.
fn classify_walk_error(
    dir: BorrowedFd<'_>,
    comp: &[u8],
    walked: &[u8],
    e: io::Error,
) -> EntryError {
    let errno = e.raw_os_error().unwrap_or(0);
    if errno == Errno::LOOP.raw_os_error() || errno == Errno::NOTDIR.raw_os_error() {
        if let Ok(st) = rustix::fs::statat(dir, comp, AtFlags::SYMLINK_NOFOLLOW) {
            return if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                EntryError::ThroughSymlink(lossy(walked))
            } else {
                EntryError::ThroughNonDirectory(lossy(walked))
            };
        }
    }
    EntryError::io("open parent directory", e)
}

/// Copies a tar entry's data into a file through `buf`; returns the bytes copied.
///
/// Not `io::copy` into a `BufWriter`: that zeroes a fresh buffer for every file, since the
/// tar reader cannot fill uninitialised memory.
fn copy_data(from: &mut impl Read, to: &mut File, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Splits a tar path into checked components: `.` and empty components vanish, `..`, absolute
/// paths, NUL bytes and over-long names or paths are refused.
fn split_path(raw: &[u8]) -> Result<Vec<&[u8]>, EntryError> {
    if raw.contains(&0) {
        return Err(EntryError::Nul);
    }
    if raw.starts_with(b"/") {
        return Err(EntryError::Absolute);
    }
    if raw.len() > PATH_MAX {
        return Err(EntryError::PathTooLong);
    }
    let mut comps = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(EntryError::DotDot),
            c if c.len() > NAME_MAX => return Err(EntryError::NameTooLong),
            c => comps.push(c),
        }
    }
    if comps.len() > MAX_DEPTH {
        return Err(EntryError::TooDeep(MAX_DEPTH));
    }
    Ok(comps)
}

/// Splits a key built by this module (already checked) back into components.
fn split_key(key: &[u8]) -> Vec<&[u8]> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split(|b| *b == b'/').collect()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Vec<u8>, EntryError> {
    let target = entry
        .link_name_bytes()
        .map(|t| t.into_owned())
        .unwrap_or_default();
    if target.is_empty() {
        return Err(EntryError::BadSymlink("is empty"));
    }
    if target.contains(&0) {
        return Err(EntryError::BadSymlink("contains a NUL byte"));
    }
    if target.len() > PATH_MAX {
        return Err(EntryError::BadSymlink("is longer than 4095 bytes"));
    }
    Ok(target)
}

/// Reads mode, owner, times and xattrs from the header and its PAX records.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryError> {
    let header = entry.header();
    let mode = header.mode().map_err(EntryError::Header)? & 0o7777;
    let uid = u32::try_from(header.uid().map_err(EntryError::Header)?)
        .map_err(|_| EntryError::Header(io::Error::other("uid does not fit in 32 bits")))?;
    let gid = u32::try_from(header.gid().map_err(EntryError::Header)?)
        .map_err(|_| EntryError::Header(io::Error::other("gid does not fit in 32 bits")))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(header.mtime().map_err(EntryError::Header)?).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(EntryError::Header)? {
        for record in pax {
            let record = record.map_err(EntryError::Header)?;
            let key = record.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.is_empty() || name.contains(&0) {
                    return Err(EntryError::Header(io::Error::other("invalid xattr name")));
                }
                xattrs.push((name.to_vec(), record.value_bytes().to_vec()));
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(record.value_bytes()) {
                    mtime = t;
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        times: Timestamps {
            last_access: mtime,
            last_modification: mtime,
        },
        xattrs,
    })
}

/// Parses a PAX time (`seconds[.fraction]`, possibly negative) to nanosecond precision.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if negative {
        if nanos == 0 {
            Timespec {
                tv_sec: -secs,
                tv_nsec: 0,
            }
        } else {
            Timespec {
                tv_sec: -secs - 1,
                tv_nsec: 1_000_000_000 - nanos,
            }
        }
    } else {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        }
    })
}

/// Owner, then mode (chown clears set-id bits), then xattrs (chown also drops
/// `security.capability`), then times, on an open file or directory.
fn apply_fd_meta(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), EntryError> {
    rustix::fs::fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .map_err(|e| EntryError::io("chown", e))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
        .map_err(|e| EntryError::io("chmod", e))?;
    for (name, value) in &meta.xattrs {
        rustix::fs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty())
            .map_err(|e| EntryError::io("set xattr", e))?;
    }
    rustix::fs::futimens(fd, &meta.times).map_err(|e| EntryError::io("set times", e))?;
    Ok(())
}

/// The same for objects that cannot be opened for writing metadata (symlinks, device nodes,
/// FIFOs), addressed as `name` inside `parent` without following symlinks.
fn apply_path_meta(
    parent: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    has_mode: bool,
) -> Result<(), EntryError> {
    rustix::fs::chownat(
        parent,
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| EntryError::io("chown", e))?;
    if has_mode {
        // Only called right after mknodat created `name` in a directory only this process
        // writes to, so `name` is the node, not a symlink.
        rustix::fs::chmodat(
            parent,
            name,
            Mode::from_raw_mode(meta.mode),
            AtFlags::empty(),
        )
        .map_err(|e| EntryError::io("chmod", e))?;
    }
    if !meta.xattrs.is_empty() {
        // lsetxattr on /proc/self/fd/N/name: the magic link is our own verified parent
        // descriptor, and the final component is not followed.
        let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
        path.extend_from_slice(name);
        for (xname, value) in &meta.xattrs {
            rustix::fs::lsetxattr(
                path.as_slice(),
                xname.as_slice(),
                value,
                XattrFlags::empty(),
            )
            .map_err(|e| EntryError::io("set xattr", e))?;
        }
    }
    rustix::fs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| EntryError::io("set times", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            split_path(b"./a//b/./c/").ok(),
            Some(vec![&b"a"[..], b"b", b"c"])
        );
        assert_eq!(split_path(b"./").ok(), Some(vec![]));
        assert!(matches!(split_path(b"a/../b"), Err(EntryError::DotDot)));
        assert!(matches!(
            split_path(b"/etc/passwd"),
            Err(EntryError::Absolute)
        ));
        assert!(matches!(split_path(b"a\0b"), Err(EntryError::Nul)));
        assert!(matches!(
            split_path(&[b'x'; 256]),
            Err(EntryError::NameTooLong)
        ));
        let long = b"d/".repeat(2048);
        assert!(matches!(split_path(&long), Err(EntryError::PathTooLong)));
        let deep = b"d/".repeat(300);
        assert!(matches!(split_path(&deep), Err(EntryError::TooDeep(_))));
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time(b"1700000000.5").map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t, Some((1_700_000_000, 500_000_000)));
        let t = parse_pax_time(b"-1.25").map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t, Some((-2, 750_000_000)));
        assert!(parse_pax_time(b"abc").is_none());
    }
}
