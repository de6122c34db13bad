//! Scratch space for the unpacked tree that `mkfs.ext4 -d` copies into an image.
//!
//! The tree only lives until mkfs.ext4 has read it, yet creating thousands of files on the
//! host's disk filesystem was the slowest step of a cold build: on a busy ext4 root, every
//! create costs ~0.3 ms in the inode allocator (5 s for a 4 500-file image, against 0.5 s for
//! the whole unpack on tmpfs). So the tree goes to tmpfs (`/dev/shm`) when it fits comfortably
//! in memory, and to the cache's own filesystem otherwise; the image itself is always written
//! into the cache directory.
//!
//! Each scratch directory is private: a fresh name made with `mkdir(2)` (never an existing
//! directory or symlink), mode 0700, inside a base directory that other users cannot rename
//! entries in (sticky, like `/dev/shm`, or not writable by them). It holds a lock file its
//! builder keeps `flock`ed; a builder that was killed leaves an unlocked one, which the next
//! build removes, because tmpfs would otherwise keep that memory until reboot. A directory
//! only gets its final `kiln-scratch-` name once its lock is held, so a sweeper never mistakes
//! one being set up for a dead one.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::error::Error;
use crate::unpack::{remove_path, temp_name};

/// Prefix of scratch directories in use (or left by a killed builder).
const PREFIX: &str = "kiln-scratch-";
/// Prefix while a scratch directory is being set up, before its lock is held.
const NEW_PREFIX: &str = ".kiln-scratch-";
/// Age after which a directory without a lock is considered abandoned.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// `TMPFS_MAGIC` from `<linux/magic.h>`.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Where scratch space is looked for by default.
pub(crate) const DEFAULT_BASE: &str = "/dev/shm";

/// A private, locked scratch directory; removed (with everything in it) when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    dir: PathBuf,
    limit: u64,
    _lock: File,
}

impl Scratch {
    /// A scratch directory under `base` for a tree estimated at `estimate` bytes, or `None`
    /// when `base` is unusable or the tree would take more than half of the space (and, on
    /// tmpfs, of the memory) available. `cap` bounds the space used whatever is free;
    /// `tmpfs_only` refuses a `base` that is not tmpfs (the default base, which is only worth
    /// it when it is memory).
    pub(crate) fn create(
        base: &Path,
        estimate: u64,
        cap: Option<u64>,
        tmpfs_only: bool,
    ) -> Option<Scratch> {
        let budget = match budget(base, tmpfs_only) {
            Ok(budget) => budget,
            Err(reason) => {
                tracing::debug!(base = %base.display(), reason, "no scratch space");
                return None;
            }
        };
        let limit = cap.map_or(budget, |cap| cap.min(budget));
        if estimate > limit {
            tracing::debug!(
                base = %base.display(),
                estimate,
                limit,
                "tree too big for scratch space"
            );
            return None;
        }
        sweep(base);
        match Self::make(base, limit) {
            Ok(scratch) => Some(scratch),
            Err(e) => {
                tracing::debug!(base = %base.display(), error = %e, "no scratch space");
                None
            }
        }
    }

    fn make(base: &Path, limit: u64) -> io::Result<Scratch> {
        let unique = temp_name("x", "y");
        // temp_name gives ".x.y-<pid>-<n>"; add the time so names stay unique across reboots
        // of a long-lived tmpfs and pid reuse.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let suffix = format!("{}-{nanos}", unique.trim_start_matches(".x.y-"));
        let new = base.join(format!("{NEW_PREFIX}{suffix}"));
        let dir = base.join(format!("{PREFIX}{suffix}"));
        std::fs::DirBuilder::new().mode(0o700).create(&new)?;
        let setup = (|| {
            let lock = lock_file(&new, true)?;
            rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive)?;
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &new,
                rustix::fs::CWD,
                &dir,
                RenameFlags::NOREPLACE,
            )?;
            Ok(lock)
        })();
        match setup {
            Ok(lock) => Ok(Scratch {
                dir,
                limit,
                _lock: lock,
            }),
            Err(e) => {
                let _ = remove_path(&new);
                Err(e)
            }
        }
    }

    /// Where the tree goes (it must not exist yet).
    pub(crate) fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// Bytes the tree may take here.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = remove_path(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "could not remove scratch space");
        }
    }
}

/// Whether an unpack into scratch space failed only because that space cannot hold the tree
/// (full, over budget, or missing a feature such as `user.*` xattrs on an old tmpfs): then the
/// build is redone on the cache's filesystem. Refusals of the image itself are not retried.
pub(crate) fn is_exhausted(err: &Error) -> bool {
    let source = match err {
        Error::Entry {
            reason: crate::error::EntryError::Io { source, .. },
            ..
        } => source,
        Error::Io { source, .. } => source,
        _ => return false,
    };
    matches!(
        source.kind(),
        io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge
            | io::ErrorKind::Unsupported
    ) || source.raw_os_error() == Some(Errno::NOSPC.raw_os_error())
}

/// Half of what `base` has free, and on tmpfs also at most half of the memory available.
fn budget(base: &Path, tmpfs_only: bool) -> Result<u64, &'static str> {
    let st = std::fs::metadata(base).map_err(|_| "cannot stat")?;
    if !st.is_dir() {
        return Err("not a directory");
    }
    let euid = rustix::process::geteuid().as_raw();
    let mode = st.mode();
    let others_may_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if (st.uid() != 0 && st.uid() != euid) || (others_may_write && !sticky) {
        return Err("other users could rename entries in it");
    }
    let vfs = rustix::fs::statvfs(base).map_err(|_| "statvfs failed")?;
    let mut free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    let fs = rustix::fs::statfs(base).map_err(|_| "statfs failed")?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    if fs.f_type as i64 == TMPFS_MAGIC {
        free = free.min(mem_available().ok_or("no MemAvailable in /proc/meminfo")?);
        if let Some(headroom) = cgroup_headroom() {
            free = free.min(headroom);
        }
    } else if tmpfs_only {
        return Err("not tmpfs");
    }
    Ok(free / 2)
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// What this process's memory cgroup (and, on cgroup v2, each ancestor) still lets it use,
/// when limited. tmpfs pages are charged to the writer's cgroup and cannot be reclaimed
/// without swap, so overrunning the limit would get kiln killed by the OOM killer; a host's
/// `MemAvailable` knows nothing of it (kiln in a container, or a systemd unit with
/// `MemoryMax=`).
fn cgroup_headroom() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_headroom_in(&text, Path::new("/sys/fs/cgroup"))
}

/// [`cgroup_headroom`] for a `/proc/self/cgroup` text and a cgroup filesystem root.
fn cgroup_headroom_in(text: &str, sys: &Path) -> Option<u64> {
    let read =
        |path: &Path| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let mut headroom: Option<u64> = None;
    let mut limit = |max: Option<u64>, current: Option<u64>| {
        if let (Some(max), Some(current)) = (max, current) {
            let left = max.saturating_sub(current);
            headroom = Some(headroom.map_or(left, |h| h.min(left)));
        }
    };
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // v2 ("max" when unlimited does not parse, and is skipped).
            for base in [sys.to_path_buf(), sys.join("unified")] {
                let base = base.as_path();
                let mut dir = base.join(path);
                loop {
                    limit(
                        read(&dir.join("memory.max")),
                        read(&dir.join("memory.current")),
                    );
                    if dir.as_path() == base || !dir.pop() || !dir.starts_with(base) {
                        break;
                    }
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = sys.join("memory").join(path);
            limit(
                read(&dir.join("memory.limit_in_bytes")),
                read(&dir.join("memory.usage_in_bytes")),
            );
        }
    }
    headroom
}

fn lock_file(dir: &Path, create: bool) -> io::Result<File> {
    let path = dir.join("lock");
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if create {
        flags |= OFlags::CREATE | OFlags::EXCL;
    }
    let fd = rustix::fs::open(&path, flags, Mode::from_raw_mode(0o600))?;
    Ok(File::from(fd))
}

/// Removes scratch directories of this user whose builder is gone: unlocked ones, and ones
/// never finished setting up after [`ABANDONED_AFTER`].
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let euid = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let finished = name.starts_with(PREFIX);
        if !finished && !name.starts_with(NEW_PREFIX) {
            continue;
        }
        let path = entry.path();
        // Never follows a symlink; someone else's directories are not ours to judge.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != euid {
            continue;
        }
        let abandoned = || {
            meta.modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > ABANDONED_AFTER)
        };
        // A lock taken here is held until the directory is gone, so no builder can take it.
        let mut held = None;
        let stale = if finished {
            match lock_file(&path, false) {
                Ok(lock) => {
                    let free =
                        rustix::fs::flock(lock.as_fd(), FlockOperation::NonBlockingLockExclusive)
                            .is_ok();
                    held = Some(lock);
                    free
                }
                Err(_) => abandoned(),
            }
        } else {
            abandoned()
        };
        if stale {
            tracing::info!(path = %path.display(), "removing scratch space of a build that died");
            if let Err(e) = remove_path(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove scratch space");
            }
        }
        drop(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_bound_the_headroom() {
        let sys = std::env::temp_dir().join(format!("kiln-cgroup-test-{}", std::process::id()));
        let write = |rel: &str, value: &str| {
            let path = sys.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, value).expect("write");
        };
        // v2: the unit itself is unlimited, its parent slice is not.
        write("system.slice/memory.max", "1000000\n");
        write("system.slice/memory.current", "400000\n");
        write("system.slice/kiln.service/memory.max", "max\n");
        write("system.slice/kiln.service/memory.current", "100000\n");
        assert_eq!(
            cgroup_headroom_in("0::/system.slice/kiln.service\n", &sys),
            Some(600_000)
        );
        // v1 memory controller, next to other controllers.
        write("memory/box/memory.limit_in_bytes", "500000");
        write("memory/box/memory.usage_in_bytes", "450000");
        assert_eq!(
            cgroup_headroom_in("5:cpu,cpuacct:/box\n4:memory:/box\n0::/\n", &sys),
            Some(50_000)
        );
        assert_eq!(cgroup_headroom_in("0::/elsewhere\n", &sys), None);
        let _ = std::fs::remove_dir_all(&sys);
    }
}
