//! The manifest and index JSON kiln reads and writes, tolerant of both Docker schema2 and OCI
//! media types (they share one shape).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Compression;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema2 config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI uncompressed layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer (as `docker save` describes its layers).
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Every manifest and index media type kiln asks a registry for.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// The compression a layer media type implies; `None` if it is not a layer type kiln unpacks.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        OCI_LAYER | DOCKER_LAYER | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            Some(Compression::None)
        }
        OCI_LAYER_GZIP
        | DOCKER_LAYER_GZIP
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        OCI_LAYER_ZSTD
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Length in bytes.
    pub size: u64,
    /// Where an index entry runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form metadata (image names in OCI layouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Alternative download locations (foreign layers); kiln never follows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Manifest media type; optional in OCI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Descriptor>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Index media type; optional in OCI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A parsed manifest-or-index document.
pub enum Document {
    /// A single-platform image.
    Manifest(Manifest),
    /// A multi-platform index.
    Index(Index),
}

/// Parses manifest or index JSON, telling them apart by media type or shape.
pub fn parse_document(bytes: &[u8], context: &str) -> Result<Document> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        schema_version: Option<u32>,
    }
    let invalid = |reason: String| Error::InvalidImage {
        context: context.to_string(),
        reason,
    };
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
    if probe.schema_version != Some(2) {
        return Err(invalid(format!(
            "unsupported manifest schema version {:?} (kiln reads schema 2 and OCI)",
            probe.schema_version
        )));
    }
    let is_index = match probe.media_type.as_deref() {
        Some(OCI_INDEX) | Some(DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => false,
        Some(other) => return Err(invalid(format!("unsupported manifest media type {other}"))),
        None => probe.manifests.is_some(),
    };
    if is_index {
        serde_json::from_slice(bytes)
            .map(Document::Index)
            .map_err(|e| invalid(format!("bad image index: {e}")))
    } else {
        serde_json::from_slice(bytes)
            .map(Document::Manifest)
            .map_err(|e| invalid(format!("bad image manifest: {e}")))
    }
}

/// Parses an image manifest (not an index).
pub fn parse_manifest(bytes: &[u8], context: &str) -> Result<Manifest> {
    match parse_document(bytes, context)? {
        Document::Manifest(m) => Ok(m),
        Document::Index(_) => Err(Error::InvalidImage {
            context: context.to_string(),
            reason: "expected an image manifest, found an index".into(),
        }),
    }
}

/// Picks the linux/amd64 entry of an index (plain `amd64` before any variant).
pub fn select_platform<'a>(index: &'a Index, reference: &str) -> Result<&'a Descriptor> {
    let candidates = index.manifests.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    let mut best: Option<&Descriptor> = None;
    for d in candidates {
        let plain = d
            .platform
            .as_ref()
            .is_some_and(|p| p.variant.is_none() || p.variant.as_deref() == Some("v1"));
        if best.is_none() || plain {
            best = Some(d);
            if plain {
                break;
            }
        }
    }
    best.ok_or_else(|| Error::NoMatchingPlatform {
        reference: reference.to_string(),
        available: {
            let list: Vec<String> = index
                .manifests
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => match &p.variant {
                        Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
                        None => format!("{}/{}", p.os, p.architecture),
                    },
                    None => "unknown".to_string(),
                })
                .collect();
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(", ")
            }
        },
    })
}

/// Checks that a manifest describes a container image kiln can unpack.
pub fn check_manifest(manifest: &Manifest, reference: &str) -> Result<()> {
    match manifest.config.media_type.as_str() {
        OCI_CONFIG | DOCKER_CONFIG => {}
        other => {
            return Err(Error::InvalidImage {
                context: reference.to_string(),
                reason: format!("not a container image (config media type {other})"),
            })
        }
    }
    crate::blob::digest_hex(&manifest.config.digest)?;
    for layer in &manifest.layers {
        crate::blob::digest_hex(&layer.digest)?;
        if layer_compression(&layer.media_type).is_none() {
            return Err(Error::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    Ok(())
}
