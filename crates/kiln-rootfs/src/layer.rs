//! Layer blobs: which media types are tar layers, and how to read them decompressed.
//!
//! Registries and old Docker versions sometimes label a layer with the wrong compression (an
//! uncompressed tar served as `tar.gzip`, for instance), so the magic bytes decide; the media
//! type only says whether the blob is a layer at all.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

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

/// A guess, without decompressing, at how many bytes of tar a layer holds: gzip's trailer
/// (the size modulo 2^32 of the last member) for gzip blobs under 1 GiB, four times the
/// blob for zstd and big gzip blobs, the blob's size for plain tar. Only used to decide
/// where to unpack; [`crate::Rootfs`]'s own limit catches a wrong guess.
pub(crate) fn unpacked_estimate(layer: &LayerSource) -> u64 {
    let guess = || -> io::Result<u64> {
        let mut file = File::open(&layer.path)?;
        let size = file.metadata()?.len();
        let mut head = [0u8; 4];
        let n = file.read(&mut head)?;
        Ok(match sniff_compression(&head[..n]) {
            Compression::None => size,
            Compression::Gzip if (18..1 << 30).contains(&size) => {
                let mut trailer = [0u8; 4];
                file.seek(SeekFrom::End(-4))?;
                file.read_exact(&mut trailer)?;
                u64::from(u32::from_le_bytes(trailer)).max(size)
            }
            Compression::Gzip | Compression::Zstd => size.saturating_mul(4),
        })
    };
    // An unreadable blob fails properly when it is unpacked; only the guess is lost here.
    guess().unwrap_or(u64::MAX)
}

/// Bytes of decompressed tar handed from the decompressing thread to the unpacker at a time.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads (2 MiB).
const CHUNKS_AHEAD: usize = 8;

/// The reading end of a decompressing thread: decompression (the biggest CPU cost of an
/// unpack) runs on another core while this thread creates files.
struct Pipelined {
    rx: Receiver<io::Result<Vec<u8>>>,
    /// Read chunks go back to the thread for reuse (fresh 256 KiB buffers would each be
    /// mapped, faulted in and unmapped).
    recycle: SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Pipelined {
    fn spawn(mut source: Box<dyn Read + Send>) -> io::Result<Pipelined> {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(CHUNKS_AHEAD);
        let (recycle, recycled) = sync_channel::<Vec<u8>>(CHUNKS_AHEAD + 2);
        std::thread::Builder::new()
            .name("kiln-decompress".into())
            .spawn(move || loop {
                let mut chunk = recycled.try_recv().unwrap_or_default();
                chunk.resize(CHUNK, 0);
                let mut filled = 0;
                while filled < CHUNK {
                    match source.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                chunk.truncate(filled);
                let end = filled == 0;
                // An empty chunk marks the end; a send fails once the reader is gone (the
                // unpack stopped early), which ends the thread.
                if tx.send(Ok(chunk)).is_err() || end {
                    return;
                }
            })?;
        Ok(Pipelined {
            rx,
            recycle,
            chunk: Vec::new(),
            pos: 0,
            done: false,
        })
    }
}

impl Read for Pipelined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.done = chunk.is_empty();
                    let used = std::mem::replace(&mut self.chunk, chunk);
                    if used.capacity() > 0 {
                        // Full (the thread has enough spare ones) or gone: just drop it.
                        let _ = self.recycle.try_send(used);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    self.chunk.clear();
                    self.pos = 0;
                    return Err(e);
                }
                // The thread ended without the end marker: never pass that off as the end of
                // the tar stream.
                Err(_) => {
                    return Err(io::Error::other(
                        "decompression thread ended before the end of the layer",
                    ))
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Opens a layer blob as a decompressed tar stream; compressed layers are decompressed on
/// a thread of their own, ahead of the reader.
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
    let decoder: Box<dyn Read + Send> = match actual {
        Compression::None => return Ok(Box::new(reader)),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(layer_err)?)
        }
    };
    Ok(Box::new(Pipelined::spawn(decoder).map_err(layer_err)?))
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
    fn pipelined_reader_passes_data_and_errors_through() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        Pipelined::spawn(Box::new(io::Cursor::new(data.clone())))
            .expect("spawn")
            .read_to_end(&mut out)
            .expect("read");
        assert_eq!(out, data);

        /// Gives `self.0` bytes, then fails.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("boom"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let err = Pipelined::spawn(Box::new(Failing(300_000)))
            .expect("spawn")
            .read_to_end(&mut out)
            .expect_err("the source's error reaches the reader");
        assert_eq!(err.to_string(), "boom");
        assert!(out.len() <= 300_000);
    }

    #[test]
    fn estimates() {
        let dir = std::env::temp_dir().join(format!("kiln-rootfs-estimate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let tar = vec![b'a'; 300_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        std::fs::write(dir.join("gz"), &gz).expect("write");
        std::fs::write(dir.join("tar"), &tar).expect("write");
        let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
        std::fs::write(dir.join("zst"), &zst).expect("write");
        let est = |name: &str| unpacked_estimate(&LayerSource::new(dir.join(name), ""));
        assert_eq!(est("gz"), 300_000, "gzip's trailer");
        assert_eq!(est("tar"), 300_000);
        assert_eq!(est("zst"), zst.len() as u64 * 4);
        assert_eq!(est("missing"), u64::MAX);
        let _ = std::fs::remove_dir_all(&dir);
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
