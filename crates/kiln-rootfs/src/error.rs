//! Errors of this crate.
//!
//! An image is untrusted input, so every problem it causes names the layer (its index in the
//! list the caller gave, counted from 0) and the entry's path as written in the tar, letting a
//! user see at once which layer of which image is broken or hostile.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while unpacking layers or building and copying disks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One tar entry was refused or could not be applied; nothing was left at the destination.
    #[error("layer {layer} entry {entry:?}: {reason}")]
    Entry {
        /// Index of the layer in the list passed in, from 0.
        layer: usize,
        /// The entry's path as the tar spells it (lossily decoded for display).
        entry: String,
        /// Why the entry was refused.
        #[source]
        reason: EntryError,
    },
    /// A layer file could not be opened, decompressed or parsed as tar.
    #[error("layer {layer} ({path}): {source}")]
    Layer {
        /// Index of the layer in the list passed in, from 0.
        layer: usize,
        /// The layer blob file.
        path: PathBuf,
        /// The underlying read or decode error.
        #[source]
        source: io::Error,
    },
    /// A layer's media type is not a (possibly compressed) tar layer this crate can apply.
    #[error("layer {layer}: unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        /// Index of the layer in the list passed in, from 0.
        layer: usize,
        /// The media type as given.
        media_type: String,
    },
    /// A host filesystem operation outside any particular tar entry failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The unpack destination exists; unpacking never merges into or replaces a tree.
    #[error("destination {0} already exists")]
    DestinationExists(PathBuf),
    /// An e2fsprogs tool is not installed.
    #[error("{tool} not found in PATH, /usr/sbin or /sbin: install the Debian package e2fsprogs (apt-get install e2fsprogs)")]
    ToolMissing {
        /// The program looked for.
        tool: &'static str,
    },
    /// An e2fsprogs tool ran and failed.
    #[error("{tool} failed ({status}): {output}")]
    ToolFailed {
        /// The program that failed.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed (stderr, then stdout), trimmed.
        output: String,
    },
    /// A digest string is not `algorithm:encoded` in the OCI grammar, so it cannot name a file.
    #[error("invalid image digest {0:?}")]
    InvalidDigest(String),
    /// A VM disk was asked to be smaller than the image it is copied from.
    #[error("requested disk size {requested} bytes is smaller than the image ({image} bytes)")]
    SizeTooSmall {
        /// The requested size in bytes.
        requested: u64,
        /// The cached image's size in bytes.
        image: u64,
    },
    /// The cache has no image for this digest (build it with `DiskCache::image_disk` first).
    #[error("no cached root filesystem for {0}")]
    NotCached(String),
    /// The tree needs more inodes or blocks than an ext4 filesystem can describe.
    #[error("root filesystem too large for ext4: {0}")]
    TooLarge(String),
}

/// Why a single tar entry was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// A `..` component would climb out of the root filesystem.
    #[error("path has a '..' component")]
    DotDot,
    /// Absolute paths are refused rather than silently re-rooted.
    #[error("absolute path")]
    Absolute,
    /// Paths with NUL bytes cannot be represented on Linux.
    #[error("path contains a NUL byte")]
    Nul,
    /// A component is longer than `NAME_MAX` (255 bytes).
    #[error("a path component is longer than 255 bytes")]
    NameTooLong,
    /// The whole path is longer than `PATH_MAX - 1` (4095 bytes).
    #[error("path longer than 4095 bytes")]
    PathTooLong,
    /// Deeper than this crate's limit, which bounds the descriptors held while walking a tree.
    #[error("path deeper than {0} components")]
    TooDeep(usize),
    /// A parent component is a symlink: writing through it could reach the host.
    #[error("path goes through symlink {0:?}")]
    ThroughSymlink(String),
    /// A parent component exists but is not a directory.
    #[error("path goes through non-directory {0:?}")]
    ThroughNonDirectory(String),
    /// A hard link whose target is unusable (missing, a directory, outside the tree, ...).
    #[error("hard link to {target:?}: {why}")]
    BadHardlink {
        /// The link target as the tar spells it.
        target: String,
        /// Why it is refused.
        why: String,
    },
    /// A symlink entry whose target cannot be created.
    #[error("symlink target {0}")]
    BadSymlink(&'static str),
    /// A directory that this same layer created or wrote into is replaced by a non-directory:
    /// no real layer diff does this, a hostile one does it to redirect later entries.
    #[error("replaces directory {0:?} that this layer already created or wrote into")]
    ReplacesDirectory(String),
    /// The tar entry type has no meaning in a root filesystem.
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    /// Only a directory entry may describe the root itself.
    #[error("non-directory entry for the root directory")]
    RootNotDirectory,
    /// A `.wh.` name that deletes nothing meaningful (`.wh.`, `.wh..`, ...).
    #[error("invalid whiteout name")]
    BadWhiteout,
    /// The tar header itself is malformed (bad number fields, ...).
    #[error("malformed tar header: {0}")]
    Header(#[source] io::Error),
    /// A filesystem operation for this entry failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl EntryError {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        EntryError::Io {
            op,
            source: source.into(),
        }
    }
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<io::Error>,
    ) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
