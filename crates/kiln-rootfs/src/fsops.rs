//! Directory-descriptor relative file operations that never follow a symlink on the host.
//!
//! Every function here takes one path component at a time (no `/`, never `.` or `..`) relative
//! to an open directory descriptor and opens with `O_NOFOLLOW`, so a symlink planted by an image
//! can never redirect an operation out of the tree being built.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Dir, Mode, OFlags};
use rustix::io::Errno;

/// Flags that open an existing directory for reading and `f*` calls, refusing symlinks.
pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Deepest tree this crate creates or removes; bounds recursion and open descriptors.
pub(crate) const MAX_DEPTH: usize = 256;

/// Opens directory `name` inside `dir` without following a symlink.
pub(crate) fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?)
}

/// Removes `name` inside `dir` whatever it is; a directory is emptied first. Symlinks are
/// removed, never followed. A missing `name` is not an error.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    remove_tree_at(dir, name, 0)
}

fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        // Linux reports EISDIR for unlink(2) of a directory.
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    if depth > MAX_DEPTH * 2 {
        return Err(io::Error::other("directory tree too deep to remove"));
    }
    let child = open_dir(dir, name)?;
    clear_dir_at(child.as_fd(), depth + 1, &mut |_, _| Keep::No)?;
    drop(child);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What `clear_dir` does with one child.
pub(crate) enum Keep {
    /// Remove it (recursively).
    No,
    /// Keep it, and if it is a directory filter its children through the callback too.
    Descend,
}

/// Removes the children of `dir` that `keep(relative_path, is_dir)` does not keep.
/// `relative_path` is relative to `dir`, components joined by `/`.
pub(crate) fn clear_dir(
    dir: BorrowedFd<'_>,
    keep: &mut dyn FnMut(&[u8], bool) -> Keep,
) -> io::Result<()> {
    clear_dir_at(dir, 0, keep)
}

fn clear_dir_at(
    dir: BorrowedFd<'_>,
    depth: usize,
    keep: &mut dyn FnMut(&[u8], bool) -> Keep,
) -> io::Result<()> {
    clear_dir_prefixed(dir, depth, &mut Vec::new(), keep)
}

fn clear_dir_prefixed(
    dir: BorrowedFd<'_>,
    depth: usize,
    prefix: &mut Vec<u8>,
    keep: &mut dyn FnMut(&[u8], bool) -> Keep,
) -> io::Result<()> {
    for (name, is_dir) in list_dir(dir)? {
        let saved = prefix.len();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        prefix.extend_from_slice(&name);
        let result = match keep(prefix, is_dir) {
            Keep::No => remove_tree_at(dir, &name, depth),
            Keep::Descend if is_dir => {
                if depth > MAX_DEPTH * 2 {
                    Err(io::Error::other("directory tree too deep"))
                } else {
                    open_dir(dir, &name).and_then(|child| {
                        clear_dir_prefixed(child.as_fd(), depth + 1, prefix, keep)
                    })
                }
            }
            Keep::Descend => Ok(()),
        };
        prefix.truncate(saved);
        result?;
    }
    Ok(())
}

/// The children of `dir` (without `.` and `..`) and whether each is a directory (never
/// following symlinks: a symlink to a directory is not a directory here).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, bool)>> {
    let reader = Dir::new(rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())?)?;
    let mut names = Vec::new();
    for entry in reader {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => {
                rustix::fs::statat(dir, bytes, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
                    .unwrap_or(false)
            }
            _ => false,
        };
        names.push((bytes.to_vec(), is_dir));
    }
    Ok(names)
}
