//! Small shared pieces: digests, `flock` locks, atomic file replacement, scratch directories.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;

use crate::error::{Error, IoContext, Result};

/// Lowercase hex of bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// A running sha256 that ends as a `sha256:<hex>` digest.
///
/// ring's assembly implementation rather than the `sha2` crate: a kernel import hashes the
/// whole modules tree (~100 MiB for Debian's), which takes seconds with an unoptimized `sha2`
/// (tests, debug builds) and well under a second with ring in any build profile.
#[derive(Clone)]
pub(crate) struct Hasher {
    inner: ring::digest::Context,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            inner: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }
}

impl Hasher {
    /// Adds bytes.
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }

    /// The digest of everything hashed.
    pub(crate) fn finish(self) -> String {
        format!("sha256:{}", to_hex(self.inner.finish().as_ref()))
    }
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    let mut h = Hasher::default();
    h.update(data);
    h.finish()
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
///
/// Every digest read back from `kernels.json` goes through here before it becomes a path, so
/// a damaged or edited file cannot point the store outside its directories.
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let bad = || Error::Other(format!("malformed digest {digest:?}"));
    let hex = digest.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(bad())
    }
}

/// Copies `reader` to `writer` while hashing; returns (digest, bytes).
pub(crate) fn copy_hashing(
    mut reader: impl Read,
    mut writer: impl Write,
    src: &Path,
    dst: &Path,
) -> Result<(String, u64)> {
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(src, e)),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        writer.write_all(chunk).at(dst)?;
        total += n as u64;
    }
    Ok((hasher.finish(), total))
}

/// An I/O error from reading `path`, with a hint when it is a permission problem (Debian
/// installs kernels 0600, so this is the first thing an unprivileged user hits).
pub(crate) fn read_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Error::PermissionDenied {
            path: path.to_path_buf(),
            hint: format!(
                "run kiln as root, or make it readable with `sudo chmod 0644 {}`",
                path.display()
            ),
        }
    } else {
        Error::io(path, e)
    }
}

/// Opens a file for reading, mapping permission errors to [`Error::PermissionDenied`].
pub(crate) fn open_read(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| read_error(path, e))
}

/// fsyncs a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique among all threads and processes using the store right now.
pub(crate) fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{n}-{nanos:08x}", std::process::id())
}

/// Replaces `path` with `bytes` atomically: temp file in the same directory, fsync, rename,
/// fsync the directory. Readers see the old or the new file, never a torn one.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Other(format!("{} has no parent directory", path.display())))?;
    let tmp = dir.join(unique_name(".tmp-"));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(dir)
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A held `flock(2)` lock; the kernel drops it when the process dies, so a killed kiln never
/// leaves the store locked. Dropping it (closing the file) releases it.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub(crate) fn acquire(path: &Path, exclusive: bool) -> Result<FileLock> {
        Self::lock(path, exclusive, true)?
            .ok_or_else(|| Error::Other(format!("{}: lock not taken", path.display())))
    }

    /// Takes the lock if it is free right now; `None` if another holder has it.
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
        let op = match (exclusive, block) {
            (true, true) => FlockOperation::LockExclusive,
            (true, false) => FlockOperation::NonBlockingLockExclusive,
            (false, true) => FlockOperation::LockShared,
            (false, false) => FlockOperation::NonBlockingLockShared,
        };
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(Some(FileLock { _file: file })),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) if !block => return Ok(None),
                Err(e) => return Err(Error::io(path, e.into())),
            }
        }
    }
}

/// A scratch directory removed (with everything in it) when dropped, so a failed import
/// leaves nothing behind.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh directory with a unique name in `parent`.
    pub(crate) fn new(parent: &Path, prefix: &str) -> Result<ScratchDir> {
        let path = parent.join(unique_name(prefix));
        fs::create_dir_all(&path).at(&path)?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Compares version strings the way `sort -V` roughly does: runs of digits numerically,
/// everything else bytewise, so `6.1.0-10` sorts after `6.1.0-9`.
pub(crate) fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            let boundary = i == bytes.len()
                || bytes.get(i).map(u8::is_ascii_digit) != bytes.get(i - 1).map(u8::is_ascii_digit);
            if boundary {
                let digit = bytes.get(start).is_some_and(u8::is_ascii_digit);
                out.push((digit, s.get(start..i).unwrap_or_default()));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, xs), (true, ys)) => {
                let (xt, yt) = (xs.trim_start_matches('0'), ys.trim_start_matches('0'));
                xt.len().cmp(&yt.len()).then_with(|| xt.cmp(yt))
            }
            ((_, xs), (_, ys)) => xs.cmp(ys),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(
            version_cmp("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.10.0-1", "6.9.0-1"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-9", "6.1.0-9"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn digests() {
        let d = sha256_digest(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(digest_hex(&d).is_ok());
        assert!(digest_hex("sha256:../../etc").is_err());
    }
}
