//! Layer blobs: which media types are tar layers, and how to read them decompressed.
//!
//! Registries and old Docker versions sometimes label a layer with the wrong compression (an
//! uncompressed tar served as `tar.gzip`, for instance), so the magic bytes decide; the media
//! type only says whether the blob is a layer at all.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One layer blob on disk, as the image store hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSource {
    /// The blob file (compressed or not, exactly as pulled).
    pub path: PathBuf,
    /// Its OCI or Docker media type from the manifest; empty when there is none (a
    /// `docker save` archive's `layer.tar`), in which case the magic bytes alone decide.
    pub media_type: String,
}

impl LayerSource {
    /// Pairs a blob file with its media type.
    pub fn new(path: impl Into<PathBuf>, media_type: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            media_type: media_type.into(),
        }
    }
}

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (RFC 1952), possibly several members concatenated.
    Gzip,
    /// Zstandard, possibly several frames.
    Zstd,
}

/// OCI and Docker layer media types this crate applies, with the compression each declares.
const KNOWN_LAYER_TYPES: &[(&str, Compression)] = &[
    ("application/vnd.oci.image.layer.v1.tar", Compression::None),
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        Compression::Zstd,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        Compression::None,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        Compression::Zstd,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        Compression::None,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        Compression::Zstd,
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        Compression::Gzip,
    ),
];

/// The compression a media type declares, or `None` if it is not a layer type kiln applies
/// (configs, encrypted layers, artifacts, ...).
pub fn declared_compression(media_type: &str) -> Option<Compression> {
    // Parameters (`; charset=...`) are not part of the type.
    let base = media_type.split(';').next().unwrap_or("").trim();
    KNOWN_LAYER_TYPES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(base))
        .map(|(_, c)| *c)
}

/// The compression the first bytes of a blob show (gzip `1f 8b`, zstd `28 b5 2f fd`).
pub fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Opens a layer blob as a decompressed tar stream.
pub(crate) fn open_layer(index: usize, layer: &LayerSource) -> Result<Box<dyn Read>> {
    let declared = if layer.media_type.trim().is_empty() {
        None
    } else {
        Some(declared_compression(&layer.media_type).ok_or_else(|| {
            Error::UnsupportedMediaType {
                layer: index,
                media_type: layer.media_type.clone(),
            }
        })?)
    };
    let layer_err = |source: io::Error| Error::Layer {
        layer: index,
        path: layer.path.clone(),
        source,
    };
    let file = File::open(&layer.path).map_err(layer_err)?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().map_err(layer_err)?;
    let actual = sniff_compression(head);
    if declared.is_some_and(|declared| declared != actual) {
        tracing::warn!(
            layer = index,
            media_type = %layer.media_type,
            ?actual,
            "layer compression differs from its media type; using the magic bytes"
        );
    }
    Ok(match actual {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(layer_err)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            declared_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            declared_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            declared_compression("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            declared_compression("application/vnd.oci.image.config.v1+json"),
            None
        );
        assert_eq!(
            declared_compression("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
            None
        );
    }

    #[test]
    fn magic_bytes() {
        assert_eq!(sniff_compression(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            sniff_compression(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(sniff_compression(b"etc/\0\0\0"), Compression::None);
        assert_eq!(sniff_compression(&[]), Compression::None);
    }
}
