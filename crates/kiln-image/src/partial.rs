//! Partially downloaded blobs, kept so an interrupted pull resumes where it stopped.
//!
//! A blob being pulled is written to `images/partial/<hex>`, on the same filesystem as the
//! blobs, so the verified file is renamed into `blobs/sha256/<hex>` without a copy. Next to it,
//! `<hex>.json` records how many bytes of it are known to be on disk (`fdatasync`ed before the
//! record was written), so a tail torn by a crash or power loss is never trusted: a resumed
//! pull truncates the file to the recorded length, re-hashes that prefix (sha256 state cannot
//! be saved portably, and a local read is cheap next to the network) and asks the registry
//! for the rest with an HTTP range. The final size and digest check still decides: a partial
//! file that was damaged on disk fails it and is fetched again from byte 0.
//!
//! One writer at a time: the data file itself is `flock`ed exclusively for as long as a pull
//! writes it. Since the file is renamed (done) or unlinked (discarded) while locked, whoever
//! takes the lock checks afterwards that the path still names the inode it locked, and starts
//! over if not.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::blob::{digest_hex, sync_dir, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::lock::flock;

/// Suffix of the record of a partial file's synced length.
pub(crate) const META_SUFFIX: &str = ".json";

/// Partial files untouched for this long, and held by no pull, are removed by `prune`: old
/// enough that an interrupted pull is not coming back for them, young enough that an
/// abandoned multi-GB download does not hold disk space for long.
pub(crate) const PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// At most this long between making received data durable: what a `kill -9` or a power loss
/// costs a resumed pull (page-cache data past the record is not trusted).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// ... or this many bytes, whichever comes first (fast links).
const CHECKPOINT_BYTES: u64 = 32 << 20;

/// What `<hex>.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    digest: String,
    size: u64,
    /// Bytes of the data file that were `fdatasync`ed before this record was written.
    synced: u64,
}

/// A partial blob file, locked by this process, with the sha256 of what it holds so far.
pub(crate) struct Partial {
    file: File,
    path: PathBuf,
    meta: PathBuf,
    dest: PathBuf,
    digest: String,
    size: u64,
    hasher: Hasher,
    /// Bytes covered by the on-disk record.
    synced: u64,
    last_checkpoint: Instant,
}

/// Opens (creating if needed) and locks `path`, making sure the lock is on the inode the path
/// still names. `None` if `block` is false and another writer holds it.
fn open_locked(path: &Path, create: bool, block: bool) -> Result<Option<File>> {
    loop {
        let file = match OpenOptions::new()
            .create(create)
            .truncate(false)
            .read(true)
            .append(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        if !flock(&file, true, block).at(path)? {
            return Ok(None);
        }
        let locked = file.metadata().at(path)?;
        match fs::metadata(path) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                return Ok(Some(file))
            }
            // Renamed into the blob store or discarded by the previous holder.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if create {
                    continue;
                }
                return Ok(None);
            }
            Err(e) => return Err(Error::io(path, e)),
        }
    }
}

impl Partial {
    fn paths(partial_dir: &Path, hex: &str) -> (PathBuf, PathBuf) {
        (
            partial_dir.join(hex),
            partial_dir.join(format!("{hex}{META_SUFFIX}")),
        )
    }

    /// Takes the partial file of `digest`, creating it empty if there is none. With `block`
    /// false, `None` means another pull is writing it right now.
    pub(crate) fn lock(
        partial_dir: &Path,
        blob_dir: &Path,
        digest: &str,
        size: u64,
        block: bool,
    ) -> Result<Option<Partial>> {
        let hex = digest_hex(digest)?;
        let (path, meta) = Self::paths(partial_dir, hex);
        let Some(file) = open_locked(&path, true, block)? else {
            return Ok(None);
        };
        Ok(Some(Partial {
            file,
            path,
            meta,
            dest: blob_dir.join(hex),
            digest: digest.to_string(),
            size,
            hasher: Hasher::default(),
            synced: 0,
            last_checkpoint: Instant::now(),
        }))
    }

    /// Trusts the prefix the record vouches for, drops anything after it, and hashes that
    /// prefix. Returns the offset to resume from (0 when nothing usable is there).
    pub(crate) fn resume(&mut self) -> Result<u64> {
        let record: Option<Record> = fs::read(&self.meta)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let on_disk = self.file.metadata().at(&self.path)?.len();
        let trusted = match record {
            Some(r) if r.digest == self.digest && r.size == self.size => {
                r.synced.min(on_disk).min(self.size)
            }
            _ => 0,
        };
        if trusted < on_disk {
            self.file.set_len(trusted).at(&self.path)?;
        }
        // Read through the locked descriptor (pread: appends are unaffected).
        self.hasher = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        while self.hasher.len() < trusted {
            let want = usize::try_from(trusted - self.hasher.len())
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = self.file.read_at(chunk, self.hasher.len()).at(&self.path)?;
            if n == 0 {
                break;
            }
            self.hasher.update(chunk.get(..n).unwrap_or_default());
        }
        if self.hasher.len() != trusted {
            return Err(Error::io(
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read {} of {trusted} bytes", self.hasher.len()),
                ),
            ));
        }
        self.synced = trusted;
        self.last_checkpoint = Instant::now();
        Ok(trusted)
    }

    /// Empties the file to download the blob from byte 0.
    pub(crate) fn restart(&mut self) -> Result<()> {
        match fs::remove_file(&self.meta) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.meta, e)),
        }
        self.file.set_len(0).at(&self.path)?;
        self.hasher = Hasher::default();
        self.synced = 0;
        Ok(())
    }

    /// Appends content received from the registry.
    pub(crate) fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let len = self.hasher.len() + data.len() as u64;
        if len > self.size {
            return Err(Error::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: len,
            });
        }
        // Written first, hashed after: the hash never covers bytes that are not in the file.
        self.file.write_all(data).at(&self.path)?;
        self.hasher.update(data);
        Ok(())
    }

    /// Bytes the file holds.
    pub(crate) fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// A checkpoint to run (off the async runtime's thread) if one is due, or if `force` and
    /// anything is not yet recorded.
    pub(crate) fn checkpoint(&self, force: bool) -> Result<Option<Checkpoint>> {
        let len = self.written();
        if len <= self.synced {
            return Ok(None);
        }
        let due = force
            || len - self.synced >= CHECKPOINT_BYTES
            || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL;
        if !due {
            return Ok(None);
        }
        Ok(Some(Checkpoint {
            file: self.file.try_clone().at(&self.path)?,
            path: self.path.clone(),
            meta: self.meta.clone(),
            record: Record {
                digest: self.digest.clone(),
                size: self.size,
                synced: len,
            },
        }))
    }

    /// Notes that `checkpoint` ran.
    pub(crate) fn checkpointed(&mut self, synced: u64) {
        self.synced = self.synced.max(synced);
        self.last_checkpoint = Instant::now();
    }

    /// Checks size and digest and, if both are right, renames the file into the blob store.
    /// On a mismatch the content is dropped (the file emptied) and the error returned, so the
    /// caller may fetch again from byte 0 or [`Partial::discard`] it.
    pub(crate) fn finish(&mut self) -> Result<PathBuf> {
        let actual_len = self.written();
        if actual_len != self.size {
            self.restart()?;
            return Err(Error::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: actual_len,
            });
        }
        let actual = self.hasher.clone().finish();
        if actual != self.digest {
            self.restart()?;
            return Err(Error::DigestMismatch {
                digest: self.digest.clone(),
                actual,
            });
        }
        self.file.sync_all().at(&self.path)?;
        fs::rename(&self.path, &self.dest).at(&self.dest)?;
        let _ = fs::remove_file(&self.meta);
        // A checkpoint killed between writing and renaming its record leaves this behind.
        let _ = fs::remove_file(record_tmp(&self.meta));
        if let Some(dir) = self.dest.parent() {
            sync_dir(dir)?;
        }
        Ok(self.dest.clone())
    }

    /// Removes the partial file and its record (still holding the lock, so no other writer
    /// has it open as its own).
    pub(crate) fn discard(self) -> Result<()> {
        remove_pair(&self.path, &self.meta)
    }
}

/// Where a checkpoint writes the next record before renaming it over `meta`.
fn record_tmp(meta: &Path) -> PathBuf {
    meta.with_extension("json.tmp")
}

/// Removes a partial file, its record and any record a killed checkpoint left half-made.
fn remove_pair(path: &Path, meta: &Path) -> Result<()> {
    for p in [&record_tmp(meta), meta, path] {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    Ok(())
}

/// Making a partial file's received bytes durable and recording their number.
pub(crate) struct Checkpoint {
    file: File,
    path: PathBuf,
    meta: PathBuf,
    record: Record,
}

impl Checkpoint {
    /// `fdatasync`s the data, then replaces the record (temp file, fsync, rename); returns the
    /// length now recorded. Order matters: the record never covers bytes not yet on disk.
    pub(crate) fn run(self) -> Result<u64> {
        self.file.sync_data().at(&self.path)?;
        let bytes = serde_json::to_vec(&self.record)
            .map_err(|e| Error::Other(format!("serializing a partial-blob record: {e}")))?;
        let tmp = record_tmp(&self.meta);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        fs::rename(&tmp, &self.meta).at(&self.meta)?;
        Ok(self.record.synced)
    }
}

/// Removes partial files that no pull holds and that are stale: older than
/// [`PARTIAL_MAX_AGE`], or of a blob that is stored already. Returns `(name, bytes)` of each.
pub(crate) fn prune(partial_dir: &Path, blob_dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(partial_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(partial_dir, e)),
    };
    for entry in entries {
        let entry = entry.at(partial_dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = match name.split_once('.') {
            Some((hex, _)) => hex,
            None => name.as_str(),
        };
        if digest_hex(&format!("sha256:{hex}")).is_err() {
            continue; // not kiln's
        }
        let (path, meta) = Partial::paths(partial_dir, hex);
        if name != hex {
            // A record (or its temp file) without data is left over; the data file's turn
            // covers the rest.
            if !path.exists() {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        let Some(file) = open_locked(&path, false, false)? else {
            continue; // a pull is writing it, or it is gone
        };
        let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        let newest = [modified(&path), modified(&meta)]
            .into_iter()
            .flatten()
            .max();
        let stale = newest
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= PARTIAL_MAX_AGE);
        if stale || blob_dir.join(hex).is_file() {
            let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            remove_pair(&path, &meta)?;
            removed.push((format!("partial sha256:{hex}"), bytes));
        }
        drop(file);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::sha256_digest;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join("partial");
        let blobs = dir.path().join("blobs");
        fs::create_dir_all(&partial).expect("mkdir");
        fs::create_dir_all(&blobs).expect("mkdir");
        (dir, partial, blobs)
    }

    fn checkpoint(p: &mut Partial) {
        let done = p
            .checkpoint(true)
            .expect("checkpoint")
            .expect("due")
            .run()
            .expect("run");
        p.checkpointed(done);
    }

    #[test]
    fn resumes_only_the_recorded_prefix() {
        let (_dir, partial, blobs) = dirs();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let digest = sha256_digest(&data);
        let size = data.len() as u64;
        let mut p = Partial::lock(&partial, &blobs, &digest, size, false)
            .expect("lock")
            .expect("free");
        p.write_all(&data[..40_000]).expect("write");
        checkpoint(&mut p);
        // Written but never recorded: a torn tail after a crash, so not trusted.
        p.write_all(&data[40_000..50_000]).expect("write");
        drop(p);

        let mut p = Partial::lock(&partial, &blobs, &digest, size, false)
            .expect("lock")
            .expect("free");
        assert_eq!(p.resume().expect("resume"), 40_000);
        p.write_all(&data[40_000..]).expect("write");
        // A checkpoint killed before renaming its record left its temp file.
        let hex = digest_hex(&digest).expect("hex");
        fs::write(partial.join(format!("{hex}.json.tmp")), b"{").expect("stale temp record");
        let path = p.finish().expect("finish");
        assert_eq!(fs::read(path).expect("blob"), data);
        assert_eq!(
            fs::read_dir(&partial).expect("dir").count(),
            0,
            "nothing of the partial is left, the temp record included"
        );
    }

    #[test]
    fn a_record_of_another_blob_or_size_is_not_trusted() {
        let (_dir, partial, blobs) = dirs();
        let data = b"0123456789";
        let digest = sha256_digest(data);
        let mut p = Partial::lock(&partial, &blobs, &digest, 10, false)
            .expect("lock")
            .expect("free");
        p.write_all(data).expect("write");
        checkpoint(&mut p);
        drop(p);
        // Complete on disk (killed before the rename): resumes at the end, then verifies.
        let mut p = Partial::lock(&partial, &blobs, &digest, 10, false)
            .expect("lock")
            .expect("free");
        assert_eq!(p.resume().expect("resume"), 10);
        drop(p);
        // A descriptor with another size for the same digest: nothing is trusted.
        let mut p = Partial::lock(&partial, &blobs, &digest, 11, false)
            .expect("lock")
            .expect("free");
        assert_eq!(p.resume().expect("resume"), 0);
        assert_eq!(p.written(), 0);
        p.discard().expect("discard");
    }

    #[test]
    fn one_writer_at_a_time_and_prune_skips_held_files() {
        let (_dir, partial, blobs) = dirs();
        let digest = sha256_digest(b"abc");
        let held = Partial::lock(&partial, &blobs, &digest, 3, false)
            .expect("lock")
            .expect("free");
        assert!(Partial::lock(&partial, &blobs, &digest, 3, false)
            .expect("lock")
            .is_none());
        // Held: never removed, however old.
        fs::write(blobs.join(digest_hex(&digest).expect("hex")), b"abc").expect("blob");
        assert!(prune(&partial, &blobs).expect("prune").is_empty());
        drop(held);
        // Free, and its blob is stored: stale.
        let removed = prune(&partial, &blobs).expect("prune");
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(fs::read_dir(&partial).expect("dir").count(), 0);
    }

    #[test]
    fn mismatch_empties_the_file() {
        let (_dir, partial, blobs) = dirs();
        let digest = sha256_digest(b"right");
        let mut p = Partial::lock(&partial, &blobs, &digest, 5, false)
            .expect("lock")
            .expect("free");
        p.write_all(b"wrong").expect("write");
        let err = p.finish().expect_err("mismatch");
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert_eq!(p.written(), 0);
        p.discard().expect("discard");
        assert_eq!(fs::read_dir(&partial).expect("dir").count(), 0);
        assert_eq!(fs::read_dir(&blobs).expect("dir").count(), 0);
    }
}
