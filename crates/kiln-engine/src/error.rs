//! The engine's errors: each says what went wrong and, where it can, what to do.

use std::path::{Path, PathBuf};

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bad request from the user (size, name, command line).
    #[error("{0}")]
    Invalid(String),
    /// The VM state store.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Images.
    #[error(transparent)]
    Image(#[from] kiln_image::Error),
    /// Root filesystems.
    #[error(transparent)]
    Rootfs(#[from] kiln_rootfs::Error),
    /// Kernels.
    #[error(transparent)]
    Kernel(#[from] kiln_kernel::Error),
    /// The hypervisor backend.
    #[error("{0}")]
    Backend(String),
    /// The guest agent or its connection.
    #[error("{0}")]
    Agent(String),
    /// The agent protocol.
    #[error(transparent)]
    Protocol(#[from] kiln_agent_protocol::Error),
    /// The VM is not in a state that allows the operation.
    #[error("{0}")]
    Conflict(String),
    /// A file operation.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl EngineError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        EngineError::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Engine results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
