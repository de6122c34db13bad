//! Errors of the image store, pulls and imports.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with images; each message names the image, registry, blob or
/// file involved so the user can act on it without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference does not parse as `[registry/]repository[:tag][@digest]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// What the user wrote.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
    /// The registry has no such repository, tag or digest.
    #[error("image not found: {reference}")]
    ImageNotFound {
        /// The normalized reference.
        reference: String,
    },
    /// The image is not in the local store.
    #[error("image not found in the local store: {reference} (pull or import it first)")]
    NotInStore {
        /// What the user asked for.
        reference: String,
    },
    /// A short digest or ID matched more than one stored image.
    #[error("{prefix} matches more than one image: {}", matches.join(", "))]
    Ambiguous {
        /// The prefix given.
        prefix: String,
        /// The references it matched.
        matches: Vec<String>,
    },
    /// The registry could not be reached at all (DNS, refused connection, TLS, timeout).
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable {
        /// Registry host\[:port\].
        registry: String,
        /// The underlying failure, flattened to text.
        reason: String,
    },
    /// The registry wants credentials and none were configured.
    #[error("registry {registry} requires authentication: run `kiln login {registry}`")]
    AuthRequired {
        /// Registry host\[:port\].
        registry: String,
    },
    /// Credentials were sent and refused.
    #[error("authentication to registry {registry} failed: {reason}")]
    AuthFailed {
        /// Registry host\[:port\].
        registry: String,
        /// What the registry said, or a summary.
        reason: String,
    },
    /// Docker's config names a credential helper (`credsStore`, `credHelpers`) whose program
    /// is not installed. Docker fails the same way rather than pulling anonymously, which
    /// would only end in a confusing "authentication required" for private images.
    #[error(
        "credential helper {program} (named by {config}) is not in PATH: install it, or remove \
         \"credsStore\"/\"credHelpers\" for this registry from that file (or use `kiln login`)"
    )]
    CredentialHelperMissing {
        /// The program looked for, `docker-credential-<helper>`.
        program: String,
        /// The Docker config file that names it.
        config: std::path::PathBuf,
    },
    /// A credential helper ran and failed, or answered something that is not credentials.
    #[error("credential helper {program} failed: {reason}")]
    CredentialHelper {
        /// The program, `docker-credential-<helper>`.
        program: String,
        /// Its exit status and output, or what was wrong with its answer.
        reason: String,
    },
    /// Any other error answer from a registry.
    #[error("registry {registry}: {message}")]
    Registry {
        /// Registry host\[:port\].
        registry: String,
        /// The registry's answer, flattened to text.
        message: String,
    },
    /// A blob's content does not hash to its digest; nothing of it was kept.
    #[error("blob {digest} is corrupt: its content hashes to {actual}; it was not stored")]
    DigestMismatch {
        /// The expected digest (the blob's name).
        digest: String,
        /// What the received content hashes to.
        actual: String,
    },
    /// A blob's length differs from what its descriptor promised.
    #[error(
        "blob {digest} has {actual} bytes, but its descriptor says {expected}; it was not stored"
    )]
    SizeMismatch {
        /// The blob's digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A digest string is not `sha256:<64 lowercase hex>`.
    #[error("unsupported or malformed digest {0:?} (kiln supports sha256 only)")]
    BadDigest(String),
    /// A manifest, index or config is not what kiln can use.
    #[error("{context}: {reason}")]
    InvalidImage {
        /// Which image or blob.
        context: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An index has no image kiln can run.
    #[error("{reference} has no linux/amd64 image (it offers: {available})")]
    NoMatchingPlatform {
        /// The reference pulled.
        reference: String,
        /// Platforms the index offers.
        available: String,
    },
    /// A layer media type kiln does not know how to unpack.
    #[error("{reference}: unsupported layer media type {media_type}")]
    UnsupportedMediaType {
        /// The reference pulled.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// A file to import is neither a `docker save` tarball nor an OCI layout.
    #[error("cannot import {path}: {reason}")]
    Import {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The store's own files are damaged.
    #[error("image store at {path} is damaged: {reason}")]
    CorruptStore {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error on a named path. The OS error is part of the message (not a separate
    /// `source`), so `{:#}` chains do not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Any other failure with a description.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// Attaches a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Turns an I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
