//! A small OCI image writer: layers from in-memory file lists, configs, manifests, indexes,
//! OCI image layouts and `docker save` tarballs.
//!
//! kiln builds its default image with it (no registry, no Docker), and the tests build the
//! images they push and import with it, so every byte under test comes from local files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::blob::sha256_digest;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Descriptor, Platform};
use crate::store::Compression;

/// A blob in memory with its media type and digest.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    /// Content.
    pub data: Vec<u8>,
}

impl Blob {
    /// Wraps bytes, computing the digest.
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&data),
            data,
        }
    }

    /// A descriptor for this blob.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.data.len() as u64,
            platform: None,
            annotations: None,
            urls: None,
        }
    }
}

/// Builds one layer tar with deterministic metadata (uid/gid 0, mtime 0), so the same inputs
/// always give the same digest.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        LayerBuilder { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn err(e: std::io::Error, path: &str) -> Error {
        Error::Other(format!("building layer entry {path}: {e}"))
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .map_err(|e| Self::err(e, path))?;
        Ok(self)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, path, data)
            .map_err(|e| Self::err(e, path))?;
        Ok(self)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .map_err(|e| Self::err(e, path))?;
        Ok(self)
    }

    /// Adds a hard link to an earlier entry.
    pub fn hardlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar
            .append_link(&mut h, path, target)
            .map_err(|e| Self::err(e, path))?;
        Ok(self)
    }

    /// Adds a whiteout deleting `path` from lower layers (`dir/.wh.name`).
    pub fn whiteout(&mut self, path: &str) -> Result<&mut Self> {
        let (dir, name) = match path.trim_end_matches('/').rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), 0o644, b"")
    }

    /// Marks `dir` opaque: lower layers' contents of it are hidden (`dir/.wh..wh..opq`).
    pub fn opaque(&mut self, dir: &str) -> Result<&mut Self> {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            0o644,
            b"",
        )
    }

    /// Finishes the tar and compresses it.
    pub fn finish(self, compression: Compression) -> Result<BuiltLayer> {
        let tar = self
            .tar
            .into_inner()
            .map_err(|e| Error::Other(format!("finishing layer tar: {e}")))?;
        BuiltLayer::from_tar(tar, compression)
    }
}

/// A finished layer.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The (compressed) layer blob, OCI media type.
    pub blob: Blob,
    /// `sha256` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// How `blob` is compressed.
    pub compression: Compression,
}

impl BuiltLayer {
    /// Compresses an uncompressed tar into a layer.
    pub fn from_tar(tar: Vec<u8>, compression: Compression) -> Result<BuiltLayer> {
        let diff_id = sha256_digest(&tar);
        let (media_type, data) = match compression {
            Compression::None => (manifest::OCI_LAYER, tar),
            Compression::Gzip => {
                let mut enc = flate2::GzBuilder::new()
                    .mtime(0)
                    .write(Vec::new(), flate2::Compression::default());
                enc.write_all(&tar)
                    .and_then(|_| enc.try_finish())
                    .map_err(|e| Error::Other(format!("gzip: {e}")))?;
                let data = enc
                    .finish()
                    .map_err(|e| Error::Other(format!("gzip: {e}")))?;
                (manifest::OCI_LAYER_GZIP, data)
            }
            Compression::Zstd => {
                let data = zstd::encode_all(&tar[..], 3)
                    .map_err(|e| Error::Other(format!("zstd: {e}")))?;
                (manifest::OCI_LAYER_ZSTD, data)
            }
        };
        Ok(BuiltLayer {
            blob: Blob::new(media_type, data),
            diff_id,
            compression,
        })
    }
}

/// Which family of media types a manifest uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `application/vnd.oci.*`.
    Oci,
    /// Docker schema2 (`application/vnd.docker.*`).
    Docker,
}

/// A complete image: config, layers and manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The config blob.
    pub config: Blob,
    /// Layers, base first.
    pub layers: Vec<BuiltLayer>,
    /// The manifest blob.
    pub manifest: Blob,
    /// The platform the config names.
    pub platform: Platform,
}

/// Assembles an image from layers and a few config fields.
pub struct ImageBuilder {
    layers: Vec<BuiltLayer>,
    container: serde_json::Map<String, serde_json::Value>,
    architecture: String,
    flavor: Flavor,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// A linux/amd64 OCI image with no layers.
    pub fn new() -> ImageBuilder {
        ImageBuilder {
            layers: Vec::new(),
            container: serde_json::Map::new(),
            architecture: "amd64".into(),
            flavor: Flavor::Oci,
        }
    }

    /// Appends a layer (applied after the ones before it).
    pub fn layer(mut self, layer: BuiltLayer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Sets `config.Cmd`.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.container.insert("Cmd".into(), json!(cmd));
        self
    }

    /// Sets `config.Entrypoint`.
    pub fn entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.container
            .insert("Entrypoint".into(), json!(entrypoint));
        self
    }

    /// Sets `config.Env`.
    pub fn env(mut self, env: &[&str]) -> Self {
        self.container.insert("Env".into(), json!(env));
        self
    }

    /// Sets `config.WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.container.insert("WorkingDir".into(), json!(dir));
        self
    }

    /// Sets `config.User`.
    pub fn user(mut self, user: &str) -> Self {
        self.container.insert("User".into(), json!(user));
        self
    }

    /// Sets the architecture (default `amd64`).
    pub fn architecture(mut self, arch: &str) -> Self {
        self.architecture = arch.to_string();
        self
    }

    /// Chooses OCI or Docker schema2 media types.
    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    /// Writes config and manifest.
    pub fn build(self) -> Result<BuiltImage> {
        let mut layers = self.layers;
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": self.architecture,
            "os": "linux",
            "config": self.container,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| json!({"created_by": "kiln oci writer"})).collect::<Vec<_>>(),
        });
        let config_bytes = serde_json::to_vec(&config)
            .map_err(|e| Error::Other(format!("serializing config: {e}")))?;
        let (manifest_type, config_type) = match self.flavor {
            Flavor::Oci => (manifest::OCI_MANIFEST, manifest::OCI_CONFIG),
            Flavor::Docker => (manifest::DOCKER_MANIFEST, manifest::DOCKER_CONFIG),
        };
        if self.flavor == Flavor::Docker {
            for layer in &mut layers {
                let docker_type = match layer.compression {
                    Compression::None => manifest::DOCKER_LAYER,
                    Compression::Gzip => manifest::DOCKER_LAYER_GZIP,
                    Compression::Zstd => manifest::OCI_LAYER_ZSTD,
                };
                layer.blob.media_type = docker_type.to_string();
            }
        }
        let config = Blob::new(config_type, config_bytes);
        let m = manifest::Manifest {
            schema_version: 2,
            media_type: Some(manifest_type.to_string()),
            config: config.descriptor(),
            layers: layers.iter().map(|l| l.blob.descriptor()).collect(),
            annotations: None,
        };
        let manifest_bytes = serde_json::to_vec(&m)
            .map_err(|e| Error::Other(format!("serializing manifest: {e}")))?;
        Ok(BuiltImage {
            config,
            layers,
            manifest: Blob::new(manifest_type, manifest_bytes),
            platform: Platform {
                architecture: self.architecture,
                os: "linux".into(),
                variant: None,
            },
        })
    }
}

/// An index over several images (one per platform).
pub fn build_index(images: &[&BuiltImage], flavor: Flavor) -> Result<Blob> {
    let media_type = match flavor {
        Flavor::Oci => manifest::OCI_INDEX,
        Flavor::Docker => manifest::DOCKER_MANIFEST_LIST,
    };
    let index = manifest::Index {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        manifests: images
            .iter()
            .map(|img| Descriptor {
                platform: Some(img.platform.clone()),
                ..img.manifest.descriptor()
            })
            .collect(),
        annotations: None,
    };
    let bytes =
        serde_json::to_vec(&index).map_err(|e| Error::Other(format!("serializing index: {e}")))?;
    Ok(Blob::new(media_type, bytes))
}

fn write_blob_file(dir: &Path, blob: &Blob) -> Result<()> {
    let hex = crate::blob::digest_hex(&blob.digest)?;
    let path = dir.join("blobs").join("sha256").join(hex);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    fs::write(&path, &blob.data).at(&path)
}

/// Writes an OCI image layout directory holding `images`, each entry of `index.json` named by
/// its `org.opencontainers.image.ref.name` annotation (a tag like `v1`, or a full reference).
pub fn write_layout(dir: &Path, images: &[(&BuiltImage, Option<&str>)]) -> Result<()> {
    fs::create_dir_all(dir).at(dir)?;
    let layout = dir.join("oci-layout");
    fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).at(&layout)?;
    let mut entries = Vec::new();
    for (image, name) in images {
        write_image_blobs(dir, image)?;
        let mut d = image.manifest.descriptor();
        if let Some(name) = name {
            let mut ann = BTreeMap::new();
            ann.insert(
                "org.opencontainers.image.ref.name".to_string(),
                name.to_string(),
            );
            d.annotations = Some(ann);
        }
        entries.push(d);
    }
    let index = manifest::Index {
        schema_version: 2,
        media_type: Some(manifest::OCI_INDEX.into()),
        manifests: entries,
        annotations: None,
    };
    let path = dir.join("index.json");
    let bytes =
        serde_json::to_vec(&index).map_err(|e| Error::Other(format!("serializing index: {e}")))?;
    fs::write(&path, bytes).at(&path)
}

/// Writes an image's manifest, config and layer blobs into a layout's `blobs/`.
pub fn write_image_blobs(dir: &Path, image: &BuiltImage) -> Result<()> {
    write_blob_file(dir, &image.manifest)?;
    write_blob_file(dir, &image.config)?;
    for layer in &image.layers {
        write_blob_file(dir, &layer.blob)?;
    }
    Ok(())
}

/// Writes a classic `docker save` tarball (`manifest.json`, `<id>.json`,
/// `<id>/layer.tar`); layers must be uncompressed, as Docker writes them.
pub fn write_docker_save(path: &Path, image: &BuiltImage, repo_tags: &[&str]) -> Result<()> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
            .map_err(|e| Error::Other(format!("docker save tar {name}: {e}")))
    };
    let config_hex = crate::blob::digest_hex(&image.config.digest)?;
    let config_name = format!("{config_hex}.json");
    add(&config_name, &image.config.data)?;
    let mut layer_names = Vec::new();
    for layer in &image.layers {
        if layer.compression != Compression::None {
            return Err(Error::Other(
                "docker save tarballs hold uncompressed layers".into(),
            ));
        }
        let hex = crate::blob::digest_hex(&layer.blob.digest)?;
        let name = format!("{hex}/layer.tar");
        add(&name, &layer.blob.data)?;
        layer_names.push(name);
    }
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]);
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| Error::Other(format!("serializing manifest.json: {e}")))?;
    add("manifest.json", &bytes)?;
    let data = tar
        .into_inner()
        .map_err(|e| Error::Other(format!("docker save tar: {e}")))?;
    fs::write(path, data).at(path)
}
