//! Errors of the kernel store, kernel imports and initramfs generation.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with kernels; each message names the kernel, file, module or
/// image involved so a user can act on it without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named path. The OS error is part of the message rather than a
    /// `source`, so `anyhow`'s `{:#}` does not print it twice.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// A kernel or module file exists but may not be read (Debian installs
    /// `/boot/vmlinuz-*` mode 0600).
    #[error("cannot read {path}: permission denied ({hint})")]
    PermissionDenied {
        /// The unreadable file.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// The file is not a kernel image kiln-vmm can boot.
    #[error("{path} is not a kernel kiln can boot: {reason}")]
    NotAKernel {
        /// The file given.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// No kernel is stored under that name.
    #[error("no kernel named {name:?} (see `kiln kernel ls`)")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// Names are unique; importing under a taken name is refused.
    #[error(
        "a kernel named {name:?} already exists (choose another --name or remove it first with `kiln kernel rm {name}`)"
    )]
    NameInUse {
        /// The taken name.
        name: String,
    },
    /// The name cannot be used as a kernel name.
    #[error("invalid kernel name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A modules directory (`lib/modules/<release>`) is missing, incomplete or malformed.
    #[error("kernel modules in {dir}: {reason}")]
    Modules {
        /// The modules directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A module the guest cannot do without is neither a module nor built in.
    #[error(
        "kernel module {name} is needed but is neither in {dir}/modules.dep nor built into the kernel (modules.builtin)"
    )]
    ModuleNotFound {
        /// The module name.
        name: String,
        /// The modules directory searched.
        dir: PathBuf,
    },
    /// A compressed module could not be decompressed.
    #[error("cannot decompress kernel module {path}: {reason}")]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The initramfs cannot be built (e.g. no static busybox).
    #[error("cannot build the initramfs: {0}")]
    Initramfs(String),
    /// A kernel OCI image is unusable or hostile.
    #[error("kernel image {reference}: {reason}")]
    OciImage {
        /// The image reference.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Pulling or resolving the kernel's OCI image failed.
    #[error(transparent)]
    Image(#[from] kiln_image::Error),
    /// There is no kernel to make the default one.
    #[error("no default kernel: {0}")]
    NoDefaultKernel(String),
    /// The store's own files are damaged.
    #[error("kernel store at {path} is damaged: {reason}")]
    CorruptStore {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Any other failure with a description.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
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
