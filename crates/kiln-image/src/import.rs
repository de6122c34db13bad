//! `kiln image import`: `docker save` tarballs and OCI image layouts (directory or tar).

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::blob::{self, BlobWriter, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Descriptor, Document, Manifest};
use crate::store::{ImageRecord, Store};

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Name to give the image, overriding (or supplying) the names in the archive. Only
    /// allowed when the archive holds one image.
    pub tag: Option<String>,
}

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory under the store, removed on drop (and by `prune` if we are killed).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn import_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Import {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `base/rel`, refusing absolute paths, `..`, and symlinks that lead outside `base`.
fn inside(base: &Path, rel: &str, archive: &Path) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(import_err(
            archive,
            format!("unsafe path {rel:?} in the archive"),
        ));
    }
    let joined = base.join(rel_path);
    let canon_base = base.canonicalize().at(base)?;
    let canon = joined
        .canonicalize()
        .map_err(|e| import_err(archive, format!("{rel}: {e}")))?;
    if !canon.starts_with(&canon_base) {
        return Err(import_err(
            archive,
            format!("{rel} points outside the archive"),
        ));
    }
    Ok(canon)
}

/// Hashes a file, returning its digest and size.
fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut file = BufReader::new(File::open(path).at(path)?);
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

/// Copies a file into the store as blob `digest`, verifying it on the way.
fn copy_blob(dir: &Path, src: &Path, digest: &str, size: Option<u64>) -> Result<()> {
    if dir.join(blob::digest_hex(digest)?).is_file() {
        return Ok(());
    }
    let mut file = BufReader::new(File::open(src).at(src)?);
    let mut writer = BlobWriter::create(dir, digest, size)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).at(src)?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n])?;
    }
    writer.commit()?;
    Ok(())
}

/// The layer media type for a file, from its magic bytes.
fn sniff_layer_type(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).at(path)?;
    let n = file.read(&mut magic).at(path)?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => manifest::OCI_LAYER_GZIP,
        [0x28, 0xb5, 0x2f, 0xfd] => manifest::OCI_LAYER_ZSTD,
        _ => manifest::OCI_LAYER,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads an OCI layout's blob by digest.
fn layout_blob(src: &Path, digest: &str) -> Result<PathBuf> {
    Ok(src
        .join("blobs")
        .join("sha256")
        .join(blob::digest_hex(digest)?))
}

impl Store {
    /// Imports every image in a `docker save` tarball or an OCI image layout (a directory,
    /// or a tar of one, optionally gzip-compressed), verifying every blob, and records their
    /// names. Returns the imported images.
    pub fn import(&self, path: &Path, options: &ImportOptions) -> Result<Vec<ImageRecord>> {
        let meta = fs::metadata(path).at(path)?;
        let _lease = self.lease()?;
        let _scratch;
        let src = if meta.is_dir() {
            path.to_path_buf()
        } else {
            let dir = self.tmp_dir().join(format!(
                "import-{}-{}",
                std::process::id(),
                SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).at(&dir)?;
            _scratch = Scratch(dir.clone());
            self.extract(path, &dir)?;
            dir
        };
        let imported = if src.join("index.json").is_file() {
            self.import_layout(path, &src, options)?
        } else if src.join("manifest.json").is_file() {
            self.import_docker_save(path, &src, options)?
        } else {
            return Err(import_err(
                path,
                "neither an OCI image layout (index.json) nor a docker save archive \
                 (manifest.json)",
            ));
        };
        let mut records = Vec::new();
        for (name, manifest_digest, index_digest) in imported {
            self.record(&name, &manifest_digest, index_digest.as_deref())?;
            records.push(self.resolve(&name)?);
        }
        Ok(records)
    }

    fn extract(&self, archive: &Path, dir: &Path) -> Result<()> {
        let mut file = File::open(archive).at(archive)?;
        let mut magic = [0u8; 2];
        let n = file.read(&mut magic).at(archive)?;
        let file = File::open(archive).at(archive)?;
        let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(false);
        tar.set_overwrite(true);
        tar.unpack(dir)
            .map_err(|e| import_err(archive, format!("not a readable tar archive: {e}")))
    }

    /// Picks the names for the images found: `--tag` for a single image, else the archive's.
    fn names_for(
        archive: &Path,
        options: &ImportOptions,
        found: usize,
        names: Vec<String>,
    ) -> Result<Vec<String>> {
        match &options.tag {
            Some(tag) if found == 1 => Ok(vec![crate::reference::normalize_reference(tag)?]),
            Some(_) => Err(import_err(
                archive,
                format!("--tag needs an archive with one image, this one has {found}"),
            )),
            None => names
                .iter()
                .map(|n| crate::reference::normalize_reference(n))
                .collect(),
        }
    }

    fn import_layout(
        &self,
        archive: &Path,
        src: &Path,
        options: &ImportOptions,
    ) -> Result<Vec<(String, String, Option<String>)>> {
        let index_path = src.join("index.json");
        let bytes = fs::read(&index_path).at(&index_path)?;
        let index = match manifest::parse_document(&bytes, "index.json")? {
            Document::Index(i) => i,
            Document::Manifest(_) => return Err(import_err(archive, "index.json is a manifest")),
        };
        if index.manifests.is_empty() {
            return Err(import_err(
                archive,
                "the layout's index.json lists no images",
            ));
        }
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for entry in &index.manifests {
            let ann = entry.annotations.clone().unwrap_or_default();
            let ref_name = ann.get("org.opencontainers.image.ref.name");
            let name = ann
                .get("io.containerd.image.name")
                .or(ref_name.filter(|n| n.contains('/') || n.contains(':')))
                .cloned();
            let context = name.clone().unwrap_or_else(|| entry.digest.clone());
            // A nested index (multi-platform) resolves to its linux/amd64 manifest.
            let (manifest_desc, index_digest) = {
                let path = layout_blob(src, &entry.digest)?;
                copy_blob(&dir, &path, &entry.digest, Some(entry.size))?;
                let bytes = self.read_blob(&entry.digest)?;
                match manifest::parse_document(&bytes, &context)? {
                    Document::Manifest(_) => (entry.clone(), None),
                    Document::Index(nested) => {
                        let chosen = manifest::select_platform(&nested, &context)?.clone();
                        let path = layout_blob(src, &chosen.digest)?;
                        copy_blob(&dir, &path, &chosen.digest, Some(chosen.size))?;
                        (chosen, Some(entry.digest.clone()))
                    }
                }
            };
            let bytes = self.read_blob(&manifest_desc.digest)?;
            let m: Manifest = manifest::parse_manifest(&bytes, &context)?;
            manifest::check_manifest(&m, &context)?;
            for d in std::iter::once(&m.config).chain(m.layers.iter()) {
                let path = layout_blob(src, &d.digest)?;
                if !path.is_file() && !self.has_blob(&d.digest) {
                    return Err(import_err(archive, format!("blob {} is missing", d.digest)));
                }
                copy_blob(&dir, &path, &d.digest, Some(d.size))?;
                if d.digest == m.config.digest {
                    crate::pull::check_config(&self.read_blob(&d.digest)?, &context)?;
                }
            }
            out.push((name, manifest_desc.digest.clone(), index_digest));
        }
        let unnamed = out.iter().filter(|(n, _, _)| n.is_none()).count();
        if options.tag.is_none() && unnamed > 0 {
            return Err(import_err(
                archive,
                "the layout names no full image reference (only a tag, or nothing); \
                 give one with --tag",
            ));
        }
        let names = Self::names_for(
            archive,
            options,
            out.len(),
            out.iter().filter_map(|(n, _, _)| n.clone()).collect(),
        )?;
        Ok(names
            .into_iter()
            .zip(out)
            .map(|(name, (_, m, i))| (name, m, i))
            .collect())
    }

    fn import_docker_save(
        &self,
        archive: &Path,
        src: &Path,
        options: &ImportOptions,
    ) -> Result<Vec<(String, String, Option<String>)>> {
        let path = src.join("manifest.json");
        let bytes = fs::read(&path).at(&path)?;
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| import_err(archive, format!("manifest.json: {e}")))?;
        if entries.is_empty() {
            return Err(import_err(archive, "manifest.json lists no images"));
        }
        let dir = self.blob_dir();
        let mut out = Vec::new();
        let mut all_names = Vec::new();
        for entry in &entries {
            let config_path = inside(src, &entry.config, archive)?;
            let (config_digest, config_size) = hash_file(&config_path)?;
            let config_bytes = fs::read(&config_path).at(&config_path)?;
            crate::pull::check_config(&config_bytes, &entry.config)?;
            let mut layers = Vec::new();
            for layer in &entry.layers {
                let layer_path = inside(src, layer, archive)?;
                let (digest, size) = hash_file(&layer_path)?;
                let media_type = sniff_layer_type(&layer_path)?;
                copy_blob(&dir, &layer_path, &digest, Some(size))?;
                layers.push(Descriptor {
                    media_type: media_type.to_string(),
                    digest,
                    size,
                    platform: None,
                    annotations: None,
                    urls: None,
                });
            }
            copy_blob(&dir, &config_path, &config_digest, Some(config_size))?;
            let m = Manifest {
                schema_version: 2,
                media_type: Some(manifest::OCI_MANIFEST.into()),
                config: Descriptor {
                    media_type: manifest::OCI_CONFIG.into(),
                    digest: config_digest,
                    size: config_size,
                    platform: None,
                    annotations: None,
                    urls: None,
                },
                layers,
                annotations: None,
            };
            let mbytes = serde_json::to_vec(&m)
                .map_err(|e| Error::Other(format!("serializing manifest: {e}")))?;
            let mdigest = blob::sha256_digest(&mbytes);
            blob::write_blob(&dir, &mdigest, &mbytes)?;
            let tags = entry.repo_tags.clone().unwrap_or_default();
            if tags.is_empty() && options.tag.is_none() {
                return Err(import_err(
                    archive,
                    "an image in the archive has no RepoTags; give a name with --tag",
                ));
            }
            for tag in &tags {
                all_names.push(tag.clone());
                out.push(mdigest.clone());
            }
            if tags.is_empty() {
                out.push(mdigest.clone());
            }
        }
        if options.tag.is_some() {
            if entries.len() != 1 {
                return Err(import_err(
                    archive,
                    format!(
                        "--tag needs an archive with one image, this one has {}",
                        entries.len()
                    ),
                ));
            }
            let name = Self::names_for(archive, options, 1, Vec::new())?;
            let digest = out.first().cloned().unwrap_or_default();
            return Ok(name
                .into_iter()
                .map(|n| (n, digest.clone(), None))
                .collect());
        }
        let names = Self::names_for(archive, options, all_names.len(), all_names)?;
        Ok(names
            .into_iter()
            .zip(out)
            .map(|(n, d)| (n, d, None))
            .collect())
    }
}
