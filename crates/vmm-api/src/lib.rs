//! kiln-vmm's HTTP API: Firecracker's paths and JSON on a Unix socket.
//!
//! Existing Firecracker clients (SDKs, `curl --unix-socket` scripts) must drive kiln-vmm
//! unchanged, so routes, bodies, status codes and the `{"fault_message": ...}` error shape follow
//! Firecracker's API; `openapi.yaml` beside this crate documents them and a test holds the server
//! to it.
//!
//! The server runs on its own thread with a single-threaded tokio runtime: it only parses
//! requests and forwards them to the VMM's event loop through a [`vmm::rpc::VmmHandle`], so one
//! thread is plenty, and it keeps start-up to a socket bind and a thread spawn.

mod request;
mod server;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm::rpc::VmmHandle;

pub use server::MAX_BODY_SIZE;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something already lives at the socket path. It is never removed for the caller: it may
    /// be another VMM's live socket.
    #[error("The API socket path {} already exists; remove it first if no VMM is using it.", .0.display())]
    SocketExists(PathBuf),
    /// The socket could not be created (missing directory, permissions, path too long...).
    #[error("Cannot bind the API socket {}: {source}.", path.display())]
    Bind {
        /// The path that was asked for.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The runtime or thread the server runs on could not be set up.
    #[error("Cannot start the API server: {0}.")]
    Setup(#[source] std::io::Error),
}

/// A running API server. Dropping it (or calling [`ApiServer::stop`]) stops serving and removes
/// the socket file, so a stopped VMM leaves nothing behind for the next one to trip on.
pub struct ApiServer {
    socket_path: PathBuf,
    /// Device and inode of the socket we bound, so that we never remove a file someone else
    /// put at the same path after ours was removed.
    socket_id: Option<(u64, u64)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `socket_path` and serves the API on it from a new thread, forwarding requests to
/// `handle`.
///
/// The socket accepts connections when this returns, so the caller can announce readiness
/// right away. An existing file at `socket_path` is an error, never silently replaced.
pub fn start(socket_path: &Path, handle: VmmHandle) -> Result<ApiServer, ApiError> {
    match std::fs::symlink_metadata(socket_path) {
        Ok(_) => return Err(ApiError::SocketExists(socket_path.to_path_buf())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Bind {
                path: socket_path.to_path_buf(),
                source,
            })
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(socket_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            // Created by someone else between our check and the bind.
            ApiError::SocketExists(socket_path.to_path_buf())
        } else {
            ApiError::Bind {
                path: socket_path.to_path_buf(),
                source,
            }
        }
    })?;
    let socket_id = std::fs::symlink_metadata(socket_path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()));
    let mut server = ApiServer {
        socket_path: socket_path.to_path_buf(),
        socket_id,
        stop: None,
        thread: None,
    };
    // From here on, dropping `server` on an error removes the socket again.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let running = server::Running::new(listener, handle, stop_rx).map_err(ApiError::Setup)?;
    let thread = std::thread::Builder::new()
        .name("kiln-api".to_string())
        .spawn(move || running.run())
        .map_err(ApiError::Setup)?;
    server.stop = Some(stop_tx);
    server.thread = Some(thread);
    Ok(server)
}

impl ApiServer {
    /// The path the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops accepting and serving, waits for the server thread, and removes the socket.
    /// Requests still waiting for the VMM are dropped with their connections.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the server thread is already gone, which is what we want.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the API server thread panicked");
            }
        }
        if let Some((dev, ino)) = self.socket_id.take() {
            let ours = std::fs::symlink_metadata(&self.socket_path)
                .is_ok_and(|meta| meta.dev() == dev && meta.ino() == ino);
            if ours {
                if let Err(err) = std::fs::remove_file(&self.socket_path) {
                    tracing::warn!(
                        "could not remove the API socket {}: {err}",
                        self.socket_path.display()
                    );
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
