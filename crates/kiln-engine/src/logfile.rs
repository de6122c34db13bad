//! Size-capped log files: a VM that prints forever must not fill the host's disk.
//!
//! A log at `PATH` is kept to about twice its cap: when a write would take the file past the
//! cap, the file becomes `PATH.1` (replacing the previous one) and a new `PATH` starts. A
//! write is never split between the two, so a file of framed records stays whole records.
//! Readers take `PATH.1`, then `PATH`; a follower whose open file was renamed away reads it to
//! its end and then opens the new `PATH` ([`catch_up_rotation`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cap when the user gives none: per file, so a log takes at most about twice this.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 16 << 20;

/// Where a log's previous part is kept.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// An append-only log file with a size cap.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    /// Bytes per file before it rotates; 0 for no cap.
    max: u64,
}

impl RotatingLog {
    /// Opens (or creates) the log at `path` for appending, rotating at `max` bytes (0: never).
    pub fn open(path: &Path, max: u64) -> io::Result<RotatingLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            max,
        })
    }

    /// Appends `data` whole, rotating first if it would take the file past the cap.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        if self.max > 0 && self.size > 0 && self.size + len > self.max {
            std::fs::rename(&self.path, rotated_path(&self.path))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(data)?;
        self.size += len;
        Ok(())
    }
}

/// For a reader at the end of `file`, opened from `path`: the new file at `path` if the log
/// rotated since (`file` is then the renamed old part, read to its end).
pub fn reopen_if_rotated(file: &File, path: &Path) -> Option<File> {
    let open = file.metadata().ok()?;
    let now = std::fs::metadata(path).ok()?;
    if (open.dev(), open.ino()) == (now.dev(), now.ino()) {
        return None;
    }
    File::open(path).ok()
}

/// For a follower that has read `file` (opened from `path`) to its end: if the log rotated
/// since, everything it has not read yet, in order, and the file to follow from now on.
///
/// That is the rest of its own file (renamed away), then, if the log rotated more than once
/// meanwhile, the previous part it never had open (parts rotated away before that are gone),
/// then nothing of the new file, which the caller reads from its start.
pub fn catch_up_rotation(file: &mut File, path: &Path) -> io::Result<Option<(Vec<u8>, File)>> {
    let Some(new) = reopen_if_rotated(file, path) else {
        return Ok(None);
    };
    let mut unread = Vec::new();
    io::Read::read_to_end(file, &mut unread)?;
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino()));
    let (ours, current) = (id(file)?, id(&new)?);
    if let Ok(mut previous) = File::open(rotated_path(path)) {
        let theirs = id(&previous)?;
        if theirs != ours && theirs != current {
            io::Read::read_to_end(&mut previous, &mut unread)?;
        }
    }
    Ok(Some((unread, new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn rotates_whole_writes_and_keeps_one_previous_part() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.log");
        let mut log = RotatingLog::open(&path, 10).expect("open");
        let mut reader = File::open(&path).expect("reader");
        log.write(b"aaaaaa").expect("write");
        log.write(b"bbbbbb").expect("write"); // 12 > 10: rotates first
        log.write(b"cc").expect("write");
        assert_eq!(
            std::fs::read(rotated_path(&path)).expect("part 1"),
            b"aaaaaa"
        );
        assert_eq!(std::fs::read(&path).expect("current"), b"bbbbbbcc");
        // A follower reads its old file to the end, then moves on to the new one.
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).expect("read");
        assert_eq!(seen, b"aaaaaa");
        let mut reader = reopen_if_rotated(&reader, &path).expect("rotated");
        assert!(reopen_if_rotated(&reader, &path).is_none());
        reader.read_to_end(&mut seen).expect("read");
        assert_eq!(seen, b"aaaaaabbbbbbcc");
        log.write(b"dddddddddddd").expect("write"); // bigger than the cap: a file of its own
        assert_eq!(
            std::fs::read(rotated_path(&path)).expect("part 1"),
            b"bbbbbbcc"
        );
        assert_eq!(std::fs::read(&path).expect("current"), b"dddddddddddd");
    }

    #[test]
    fn a_follower_that_slept_through_two_rotations_reads_the_part_between() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.log");
        let mut log = RotatingLog::open(&path, 10).expect("open");
        log.write(b"aaaa").expect("write");
        let mut reader = File::open(&path).expect("reader");
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).expect("read");
        assert!(catch_up_rotation(&mut reader, &path)
            .expect("no rotation")
            .is_none());
        log.write(b"AAAA").expect("write"); // still in the follower's file
        log.write(b"bbbbbbbb").expect("write"); // rotates: the follower's file is part 1
        log.write(b"cccccccc").expect("write"); // rotates again: "bbbbbbbb" is part 1
        log.write(b"dd").expect("write");
        let (unread, mut current) = catch_up_rotation(&mut reader, &path)
            .expect("catch up")
            .expect("rotated");
        seen.extend_from_slice(&unread);
        current.read_to_end(&mut seen).expect("read");
        assert_eq!(seen, b"aaaaAAAAbbbbbbbbccccccccdd");
        assert!(catch_up_rotation(&mut current, &path)
            .expect("no rotation")
            .is_none());
    }

    #[test]
    fn no_cap_never_rotates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.log");
        let mut log = RotatingLog::open(&path, 0).expect("open");
        for _ in 0..100 {
            log.write(b"0123456789").expect("write");
        }
        assert!(!rotated_path(&path).exists());
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1000);
    }
}
