//! `flock(2)` locks on lock files: released by the kernel when the process dies, so a killed
//! kiln never leaves the store locked.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{IoContext, Result};

/// A held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub(crate) fn acquire(path: &Path, exclusive: bool) -> Result<FileLock> {
        Self::lock(path, exclusive, true)?
            .ok_or_else(|| crate::Error::Other(format!("{}: lock not taken", path.display())))
    }

    /// Takes the lock if it is free right now; `None` if another process holds it.
    pub(crate) fn try_acquire(path: &Path, exclusive: bool) -> Result<Option<FileLock>> {
        Self::lock(path, exclusive, false)
    }

    fn lock(path: &Path, exclusive: bool, block: bool) -> Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .at(path)?;
        if flock(&file, exclusive, block).at(path)? {
            Ok(Some(FileLock { _file: file }))
        } else {
            Ok(None)
        }
    }
}

/// `flock(2)` on an open file: `Ok(true)` once held, `Ok(false)` if `block` is false and
/// another open file description holds a conflicting lock. The lock lasts as long as `file`'s
/// open file description (it is not tied to the path, which may be renamed or unlinked).
pub(crate) fn flock(file: &File, exclusive: bool, block: bool) -> std::io::Result<bool> {
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if !block {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock only takes a file descriptor, which `file` keeps open for the
        // duration of the call; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !block => return Ok(false),
            _ => return Err(err),
        }
    }
}
