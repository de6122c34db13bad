//! The content-addressed image store.
//!
//! Image references live in one small JSON file, `refs.json`, replaced atomically (temp file,
//! fsync, rename, fsync dir) while holding an exclusive `flock` on `refs.lock`. That was chosen
//! over SQLite because the data is tiny (one line per tag), every operation reads or rewrites
//! all of it, the kernel drops `flock`s of killed processes so there is no stale lock to
//! recover, readers never need a lock (rename is atomic, so they see the old or the new file,
//! never a torn one), and it spares the build a bundled C library. Blobs are immutable files
//! named by digest. A pull downloads a blob into `partial/<hex>` under an exclusive `flock`
//! on that file, so concurrent pulls of one blob download it once (the others wait and find
//! it stored), and an interrupted pull leaves a prefix the next one resumes; imports write
//! blobs through temp files and race harmlessly to rename identical, verified content.
//!
//! Garbage collection is made safe by `gc.lock`: every writer (pull, import, tag, default
//! image) and every [`Lease`] holds it shared from before it writes its first blob until after
//! it records its reference; `prune` holds it exclusively, so it only ever sees blobs that are
//! either recorded or truly orphaned.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};

use crate::blob::{digest_hex, sync_dir, TMP_PREFIX};
use crate::error::{Error, IoContext, Result};
use crate::lock::FileLock;
use crate::manifest::{self, Manifest};
use crate::reference;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip-compressed tar.
    Gzip,
    /// zstd-compressed tar.
    Zstd,
}

/// One layer of an image, as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    /// `sha256:<hex>` of the (compressed) blob.
    pub digest: String,
    /// The layer media type from the manifest (OCI or Docker).
    pub media_type: String,
    /// Blob size in bytes (compressed).
    pub size: u64,
    /// The compression, derived from `media_type`.
    pub compression: Compression,
    /// The blob file in the store; complete and verified.
    pub path: PathBuf,
}

impl Layer {
    /// Opens the layer as an uncompressed tar stream, so consumers need not care how it was
    /// compressed.
    pub fn open(&self) -> Result<Box<dyn Read + Send>> {
        let file = File::open(&self.path).at(&self.path)?;
        let reader = std::io::BufReader::new(file);
        Ok(match self.compression {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(reader).at(&self.path)?)
            }
        })
    }
}

/// A stored image, resolved down to its blob files.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    /// The normalized reference (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// Digest of the image manifest (the platform manifest when pulled through an index).
    #[serde(rename = "digest")]
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if any.
    pub index_digest: Option<String>,
    /// Digest of the config blob (Docker's "image ID").
    pub config_digest: String,
    /// The image configuration: entrypoint, cmd, env, user, working dir, diff IDs, history.
    pub config: ImageConfiguration,
    /// Layers in application order (base first).
    pub layers: Vec<Layer>,
    /// Total size of the layer blobs in bytes.
    pub size: u64,
    /// When this reference was recorded (seconds since the Unix epoch).
    pub stored_at: u64,
}

impl ImageRecord {
    /// The record as pretty JSON (`kiln image inspect`): reference, digest, index and config
    /// digests, config, layers with their blob paths, size.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Other(format!("serializing {}: {e}", self.reference)))
    }

    /// One-line summary object for listings.
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "reference": self.reference,
            "digest": self.manifest_digest,
            "index_digest": self.index_digest,
            "config_digest": self.config_digest,
            "size": self.size,
            "layers": self.layers.len(),
            "created": self.config.created(),
            "stored_at": self.stored_at,
        })
    }
}

/// A listing as a pretty JSON array of summaries (`kiln image ls --format json`).
pub fn list_to_json(records: &[ImageRecord]) -> Result<String> {
    let list: Vec<serde_json::Value> = records.iter().map(ImageRecord::summary).collect();
    serde_json::to_string_pretty(&list).map_err(|e| Error::Other(format!("serializing list: {e}")))
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Digests (or temp file names) removed; stale partial downloads as
    /// `partial sha256:<hex>`.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub bytes: u64,
}

/// A shared hold on the store's blobs: while a lease is alive, `prune` waits, so blob paths
/// from [`Store::resolve`] stay valid (e.g. while kiln-rootfs unpacks layers).
#[derive(Debug)]
pub struct Lease {
    _lock: FileLock,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RefsFile {
    version: u32,
    images: BTreeMap<String, RefEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefEntry {
    pub(crate) manifest_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) index_digest: Option<String>,
    #[serde(default)]
    pub(crate) stored_at: u64,
}

/// The image store under a kiln root. Cheap to open; any number of processes may use the same
/// root at once.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store in `<kiln_root>/images`.
    pub fn open(kiln_root: &Path) -> Result<Store> {
        let dir = kiln_root.join("images");
        let store = Store {
            root: kiln_root.to_path_buf(),
            dir,
        };
        for d in [store.blob_dir(), store.tmp_dir(), store.partial_dir()] {
            fs::create_dir_all(&d).at(&d)?;
        }
        Ok(store)
    }

    /// Opens the store under [`crate::root()`].
    pub fn open_default() -> Result<Store> {
        Store::open(&crate::root())
    }

    /// The kiln root this store lives in.
    pub fn kiln_root(&self) -> &Path {
        &self.root
    }

    /// `<root>/images/blobs/sha256`.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs").join("sha256")
    }

    /// `<root>/images/partial`: blobs a pull has begun, kept so the next pull resumes them
    /// (see the `partial` module); never read as blobs.
    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    /// Scratch space on the store's filesystem (import extraction).
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The file a blob is (or would be) stored at; errors on a malformed digest.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.blob_dir().join(digest_hex(digest)?))
    }

    /// Whether a complete, verified blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Reads a whole blob (manifests, configs).
    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::CorruptStore {
                    path: path.clone(),
                    reason: format!("blob {digest} is missing"),
                }
            } else {
                Error::io(&path, e)
            }
        })
    }

    /// Holds the store's blobs against `prune` until the lease is dropped.
    pub fn lease(&self) -> Result<Lease> {
        Ok(Lease {
            _lock: FileLock::acquire(&self.dir.join("gc.lock"), false)?,
        })
    }

    fn refs_path(&self) -> PathBuf {
        self.dir.join("refs.json")
    }

    fn read_refs(&self) -> Result<RefsFile> {
        let path = self.refs_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::CorruptStore {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RefsFile::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Read-modify-write of `refs.json` under the exclusive refs lock.
    fn update_refs<T>(&self, f: impl FnOnce(&mut RefsFile) -> Result<T>) -> Result<T> {
        let _lock = FileLock::acquire(&self.dir.join("refs.lock"), true)?;
        let mut refs = self.read_refs()?;
        let out = f(&mut refs)?;
        refs.version = 1;
        let path = self.refs_path();
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}refs-{}.json", std::process::id()));
        let bytes = serde_json::to_vec_pretty(&refs)
            .map_err(|e| Error::Other(format!("serializing image references: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        fs::rename(&tmp, &path).at(&path)?;
        sync_dir(&self.dir)?;
        Ok(out)
    }

    /// Records `reference` → manifest (all its blobs must already be stored).
    pub(crate) fn record(
        &self,
        reference: &str,
        manifest_digest: &str,
        index_digest: Option<&str>,
    ) -> Result<()> {
        let entry = RefEntry {
            manifest_digest: manifest_digest.to_string(),
            index_digest: index_digest.map(str::to_string),
            stored_at: now(),
        };
        self.update_refs(|refs| {
            refs.images.insert(reference.to_string(), entry);
            Ok(())
        })
    }

    /// Finds the stored entry for what the user typed: a reference (normalized), a
    /// `repo@digest` whose manifest or index is stored under another tag, or a digest or
    /// digest prefix (at least 4 hex digits).
    fn find<'a>(refs: &'a RefsFile, input: &str) -> Result<(&'a String, &'a RefEntry)> {
        let not_found = || Error::NotInStore {
            reference: input.to_string(),
        };
        let input = if input.trim() == crate::DEFAULT_IMAGE_ALIAS {
            crate::DEFAULT_IMAGE
        } else {
            input
        };
        // A reference already in normalized form needs no parsing (parsing compiles a regex,
        // which dominates a cached `kiln image disk`).
        if let Some(found) = refs.images.get_key_value(input) {
            return Ok(found);
        }
        if let Ok(parsed) = reference::parse(input) {
            let whole = parsed.whole();
            if let Some(found) = refs.images.get_key_value(&whole) {
                return Ok(found);
            }
            if let Some(digest) = parsed.digest() {
                let repo = format!("{}/{}", parsed.registry(), parsed.repository());
                let hit = refs.images.iter().find(|(name, e)| {
                    repo_of(name) == repo
                        && (e.manifest_digest == digest
                            || e.index_digest.as_deref() == Some(digest))
                });
                if let Some(found) = hit {
                    return Ok(found);
                }
            }
        }
        let prefix = input.strip_prefix("sha256:").unwrap_or(input);
        if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let prefix = prefix.to_ascii_lowercase();
            let hits: Vec<(&String, &RefEntry)> = refs
                .images
                .iter()
                .filter(|(_, e)| {
                    digest_hex(&e.manifest_digest).is_ok_and(|h| h.starts_with(&prefix))
                })
                .collect();
            let distinct: BTreeSet<&str> = hits
                .iter()
                .map(|(_, e)| e.manifest_digest.as_str())
                .collect();
            match distinct.len() {
                0 => {}
                1 => return hits.first().copied().ok_or_else(not_found),
                _ => {
                    return Err(Error::Ambiguous {
                        prefix: input.to_string(),
                        matches: hits.iter().map(|(n, _)| n.to_string()).collect(),
                    })
                }
            }
        }
        if let Err(e @ Error::InvalidReference { .. }) = reference::parse(input) {
            return Err(e);
        }
        Err(not_found())
    }

    /// Looks up a stored image by reference, `repo@digest`, or digest prefix.
    ///
    /// Pair with [`Store::lease`] when the blob files must outlive a concurrent `prune`.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord> {
        let refs = self.read_refs()?;
        let (name, entry) = Self::find(&refs, reference)?;
        self.load(name, entry)
    }

    /// Whether `reference` is stored (by exact normalized name or digest form).
    pub fn contains(&self, reference: &str) -> Result<bool> {
        let refs = self.read_refs()?;
        match Self::find(&refs, reference) {
            Ok(_) => Ok(true),
            Err(Error::NotInStore { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Builds the record for a ref entry from its stored manifest and config.
    pub(crate) fn load(&self, name: &str, entry: &RefEntry) -> Result<ImageRecord> {
        let manifest_bytes = self.read_blob(&entry.manifest_digest)?;
        let manifest: Manifest = manifest::parse_manifest(&manifest_bytes, name)?;
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::InvalidImage {
                context: format!("{name}: config {}", manifest.config.digest),
                reason: e.to_string(),
            })?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for d in &manifest.layers {
            let compression = manifest::layer_compression(&d.media_type).ok_or_else(|| {
                Error::UnsupportedMediaType {
                    reference: name.to_string(),
                    media_type: d.media_type.clone(),
                }
            })?;
            layers.push(Layer {
                digest: d.digest.clone(),
                media_type: d.media_type.clone(),
                size: d.size,
                compression,
                path: self.blob_path(&d.digest)?,
            });
        }
        Ok(ImageRecord {
            reference: name.to_string(),
            manifest_digest: entry.manifest_digest.clone(),
            index_digest: entry.index_digest.clone(),
            config_digest: manifest.config.digest.clone(),
            config,
            size: layers.iter().map(|l| l.size).sum(),
            layers,
            stored_at: entry.stored_at,
        })
    }

    /// Every stored image, sorted by reference. Images whose blobs are damaged are skipped
    /// with a warning rather than hiding the rest.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let refs = self.read_refs()?;
        let mut out = Vec::new();
        for (name, entry) in &refs.images {
            match self.load(name, entry) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!("skipping {name}: {e}"),
            }
        }
        Ok(out)
    }

    /// Gives the image `source` names the additional reference `target`.
    pub fn tag(&self, source: &str, target: &str) -> Result<ImageRecord> {
        let target = reference::parse(target)?;
        if target.digest().is_some() {
            return Err(Error::InvalidReference {
                reference: target.whole(),
                reason: "a tag target cannot contain a digest".into(),
            });
        }
        let target = target.whole();
        let _lease = self.lease()?;
        let entry = self.update_refs(|refs| {
            let (_, entry) = Self::find(refs, source)?;
            let mut entry = entry.clone();
            entry.stored_at = now();
            refs.images.insert(target.clone(), entry.clone());
            Ok(entry)
        })?;
        self.load(&target, &entry)
    }

    /// Removes a reference (or, given a digest, every reference to that image). Blobs stay
    /// until `prune`. Returns the references removed.
    pub fn remove(&self, reference: &str) -> Result<Vec<String>> {
        self.update_refs(|refs| {
            let (name, entry) = Self::find(refs, reference)?;
            let exact = reference::parse(reference).is_ok_and(|r| r.whole() == *name);
            let names: Vec<String> = if exact {
                vec![name.clone()]
            } else {
                // Named by digest: every reference to that image goes.
                let digest = entry.manifest_digest.clone();
                refs.images
                    .iter()
                    .filter(|(_, e)| e.manifest_digest == digest)
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            for n in &names {
                refs.images.remove(n);
            }
            Ok(names)
        })
    }

    /// Deletes every blob no stored reference needs, and leftovers of interrupted writes.
    /// Waits for running pulls, imports and leases to finish first.
    ///
    /// Partial downloads (`images/partial/`) are removed when no pull holds them and they are
    /// stale: untouched for 24 hours, or of a blob that is stored by now. A fresher one stays,
    /// so pruning between an interrupted pull and its retry does not throw the download away.
    pub fn prune(&self) -> Result<PruneReport> {
        let gc_path = self.dir.join("gc.lock");
        let _gc = match FileLock::try_acquire(&gc_path, true)? {
            Some(lock) => lock,
            None => {
                tracing::info!("waiting for other kiln processes using the image store");
                FileLock::acquire(&gc_path, true)?
            }
        };
        let refs = self.read_refs()?;
        let mut keep = BTreeSet::new();
        for (name, entry) in &refs.images {
            keep.insert(entry.manifest_digest.clone());
            if let Some(index) = &entry.index_digest {
                keep.insert(index.clone());
            }
            // A damaged manifest keeps only itself; its other blobs cannot be named.
            let Ok(bytes) = self.read_blob(&entry.manifest_digest) else {
                tracing::warn!("{name}: manifest {} is missing", entry.manifest_digest);
                continue;
            };
            let Ok(m) = manifest::parse_manifest(&bytes, name) else {
                continue;
            };
            keep.insert(m.config.digest.clone());
            keep.extend(m.layers.iter().map(|l| l.digest.clone()));
        }
        let keep_hex: BTreeSet<String> = keep
            .iter()
            .filter_map(|d| digest_hex(d).ok().map(str::to_string))
            .collect();
        let mut report = PruneReport::default();
        let dir = self.blob_dir();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep_hex.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let path = entry.path();
            fs::remove_file(&path).at(&path)?;
            report.bytes += size;
            report.removed.push(if name.starts_with(TMP_PREFIX) {
                name
            } else {
                format!("sha256:{name}")
            });
        }
        // Partial downloads no pull holds that are old, or whose blob arrived meanwhile.
        // Younger ones stay so an interrupted pull still resumes after a prune.
        for (name, bytes) in crate::partial::prune(&self.partial_dir(), &dir)? {
            report.bytes += bytes;
            report.removed.push(name);
        }
        // Import scratch directories of killed processes.
        let tmp = self.tmp_dir();
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(report)
    }
}

/// `registry/repo` of a normalized reference.
fn repo_of(name: &str) -> &str {
    let without_digest = name.split('@').next().unwrap_or(name);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_of_strips_tag_and_digest() {
        assert_eq!(repo_of("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b");
        assert_eq!(repo_of("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b");
        assert_eq!(
            repo_of("docker.io/library/x@sha256:00"),
            "docker.io/library/x"
        );
    }
}
