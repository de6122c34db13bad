//! Digests and verified, atomic blob writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};

/// Prefix of temporary blob files; `prune` removes leftovers of killed processes.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
///
/// Everything that turns a digest into a path goes through here, so a hostile manifest cannot
/// name `../../etc/passwd` as a blob.
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::BadDigest(digest.to_string()))?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(Error::BadDigest(digest.to_string()))
    }
}

/// Lowercase hex of bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", to_hex(&Sha256::digest(data)))
}

/// A running sha256 that ends as a `sha256:<hex>` digest.
#[derive(Default, Clone)]
pub(crate) struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// Adds bytes.
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The digest of everything hashed.
    pub(crate) fn finish(self) -> String {
        format!("sha256:{}", to_hex(&self.inner.finalize()))
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A blob being written: a temporary file in the blob directory that becomes
/// `blobs/sha256/<hex>` only after [`BlobWriter::commit`] has verified it.
///
/// Dropping an uncommitted writer deletes the temporary file, so a failed or corrupt download
/// leaves nothing behind.
pub(crate) struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    digest: String,
    expected_size: Option<u64>,
    hasher: Hasher,
}

impl BlobWriter {
    /// Starts writing the blob `digest` into `dir` (`blobs/sha256`).
    pub(crate) fn create(dir: &Path, digest: &str, expected_size: Option<u64>) -> Result<Self> {
        let hex = digest_hex(digest)?;
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{hex}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp).at(&tmp)?;
        Ok(BlobWriter {
            file: Some(file),
            dest: dir.join(hex),
            tmp,
            digest: digest.to_string(),
            expected_size,
            hasher: Hasher::default(),
        })
    }

    /// Appends content.
    pub(crate) fn write_all(&mut self, data: &[u8]) -> Result<()> {
        if let Some(expected) = self.expected_size {
            let len = self.hasher.len() + data.len() as u64;
            if len > expected {
                return Err(Error::SizeMismatch {
                    digest: self.digest.clone(),
                    expected,
                    actual: len,
                });
            }
        }
        self.hasher.update(data);
        match self.file.as_mut() {
            Some(file) => file.write_all(data).at(&self.tmp),
            None => Err(Error::Other("blob writer already finished".into())),
        }
    }

    /// fsyncs, verifies size and digest, and renames the blob into place.
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::Other("blob writer already finished".into()))?;
        file.sync_all().at(&self.tmp)?;
        drop(file);
        let actual_len = self.hasher.len();
        if let Some(expected) = self.expected_size {
            if expected != actual_len {
                return Err(Error::SizeMismatch {
                    digest: self.digest.clone(),
                    expected,
                    actual: actual_len,
                });
            }
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                digest: self.digest.clone(),
                actual,
            });
        }
        fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        if let Some(dir) = self.dest.parent() {
            sync_dir(dir)?;
        }
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Committed blobs were renamed away; anything still at `tmp` is unverified.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// fsyncs a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Writes `data` (whose digest is known to be `digest`) as a blob in `dir`, unless present.
pub(crate) fn write_blob(dir: &Path, digest: &str, data: &[u8]) -> Result<PathBuf> {
    let dest = dir.join(digest_hex(digest)?);
    if dest.exists() {
        return Ok(dest);
    }
    let mut writer = BlobWriter::create(dir, digest, Some(data.len() as u64))?;
    writer.write_all(data)?;
    writer.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_validation_refuses_paths() {
        assert!(digest_hex("sha256:../../etc/passwd").is_err());
        assert!(digest_hex("sha512:00").is_err());
        let ok = sha256_digest(b"hello");
        assert_eq!(
            ok,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(digest_hex(&ok).is_ok());
        assert!(digest_hex(&ok.to_uppercase()).is_err());
    }

    #[test]
    fn corrupt_blob_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = sha256_digest(b"right");
        let mut w = BlobWriter::create(dir.path(), &digest, None).expect("create");
        w.write_all(b"wrong").expect("write");
        let err = w.commit().expect_err("mismatch must fail");
        assert!(err.to_string().contains(&digest), "{err}");
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }
}
