//! `CopyOut` and `CopyIn`: files in and out of the guest as tar archives, the format
//! `docker cp` speaks.
//!
//! Each copy runs on its own thread against one end of a pipe whose other end the event loop
//! treats like a process's stdout (`CopyOut`) or stdin (`CopyIn`), so copies get the same
//! credit-window flow control as processes and never stall the loop.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

/// How a copy ended: `Err` carries the message for `Failed`.
pub type CopyResult = Result<(), String>;

/// The name of `path`'s top entry in the archive: its base name (`.` for `/`).
fn top_name(path: &Path) -> PathBuf {
    path.components()
        .rev()
        .find_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            _ => None,
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes a tar archive of `path` (a file, symlink or directory, recursively; symlinks are
/// stored as symlinks) to `out`, its top entry named after `path`'s base name.
pub fn write_archive(path: &Path, out: impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let name = top_name(path);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    if meta.is_dir() {
        builder.append_dir_all(&name, path)?;
    } else {
        builder.append_path_with_name(path, &name)?;
    }
    builder.into_inner()?.flush()
}

/// Unpacks the tar archive read from `input` into the directory `dst`, keeping modes and
/// modification times. An entry that would land outside `dst` (`..`, or through a symlink
/// the archive planted) stops the copy with an error.
pub fn read_archive(dst: &Path, input: impl Read) -> io::Result<()> {
    let dst = dst.canonicalize()?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.unpack_in(&dst)? {
            let name = entry.path()?.display().to_string();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("refusing {name:?}: it would land outside {}", dst.display()),
            ));
        }
    }
    Ok(())
}

/// Checks a `CopyOut` source before the session starts: a missing path is `Failed` at once.
pub fn check_source(path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    match std::fs::symlink_metadata(&p) {
        Ok(_) => Ok(p),
        Err(e) => Err(format!("{path}: {}", crate::sys::error_text(&e))),
    }
}

/// Checks a `CopyIn` destination: it must be an existing directory.
pub fn check_destination(path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!("{path}: not a directory")),
        Err(e) => Err(format!("{path}: {}", crate::sys::error_text(&e))),
    }
}

/// Starts the thread writing the archive of `src` into `pipe`; `done` gets the result once the
/// archive is complete (the pipe is closed before).
pub fn spawn_copy_out(
    src: PathBuf,
    pipe: OwnedFd,
    done: impl FnOnce(CopyResult) + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("copy-out".into())
        .spawn(move || {
            let result = write_archive(
                &src,
                io::BufWriter::with_capacity(64 * 1024, File::from(pipe)),
            )
            .map_err(|e| format!("copying {}: {}", src.display(), crate::sys::error_text(&e)));
            done(result);
        })?;
    Ok(())
}

/// Starts the thread unpacking the archive read from `pipe` into `dst`; `done` gets the result
/// (the pipe is closed before, so further stdin for the session fails with `EPIPE`).
pub fn spawn_copy_in(
    dst: PathBuf,
    pipe: OwnedFd,
    done: impl FnOnce(CopyResult) + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("copy-in".into())
        .spawn(move || {
            let result = {
                let input = io::BufReader::with_capacity(64 * 1024, File::from(pipe));
                read_archive(&dst, input).map_err(|e| {
                    format!(
                        "copying into {}: {}",
                        dst.display(),
                        crate::sys::error_text(&e)
                    )
                })
            };
            done(result);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn top_names() {
        assert_eq!(top_name(Path::new("/a/b/")), PathBuf::from("b"));
        assert_eq!(
            top_name(Path::new("/a/file.txt")),
            PathBuf::from("file.txt")
        );
        assert_eq!(top_name(Path::new("/")), PathBuf::from("."));
    }

    #[test]
    fn a_tree_round_trips_with_modes_and_symlinks() {
        let src = tempfile::tempdir().expect("src");
        let tree = src.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("sub/script"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            tree.join("sub/script"),
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/script", tree.join("link")).expect("symlink");
        let mut archive = Vec::new();
        write_archive(&tree, &mut archive).expect("archive");

        let dst = tempfile::tempdir().expect("dst");
        read_archive(dst.path(), &archive[..]).expect("unpack");
        let out = dst.path().join("tree");
        assert_eq!(
            std::fs::read_to_string(out.join("sub/script")).expect("read"),
            "#!/bin/sh\n"
        );
        let mode = std::fs::metadata(out.join("sub/script"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o751);
        assert_eq!(
            std::fs::read_link(out.join("link")).expect("readlink"),
            PathBuf::from("sub/script")
        );
    }

    #[test]
    fn entries_escaping_the_destination_are_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..", so write the name bytes directly, as a hostile host would.
        let name = b"../escaped";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        builder.append(&header, &b"hi"[..]).expect("append");
        let archive = builder.into_inner().expect("finish");

        let root = tempfile::tempdir().expect("root");
        let dst = root.path().join("dst");
        std::fs::create_dir(&dst).expect("mkdir");
        let err = read_archive(&dst, &archive[..]).expect_err("escape");
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(!root.path().join("escaped").exists());
    }

    #[test]
    fn sources_and_destinations_are_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("f");
        std::fs::write(&file, "").expect("write");
        assert!(check_source("/nonexistent/kiln").is_err());
        assert!(check_source(&file.display().to_string()).is_ok());
        assert!(check_destination(&file.display().to_string())
            .expect_err("file")
            .contains("not a directory"));
        assert!(check_destination(&dir.path().display().to_string()).is_ok());
    }
}
