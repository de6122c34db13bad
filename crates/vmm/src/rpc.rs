//! The requests the API (or a config file) makes of the VMM, and their answers.
//!
//! The HTTP server runs on its own thread and hands each parsed request to the VMM's event loop
//! through a [`VmmHandle`]; the event loop owns all VM state, so requests are applied one at a
//! time in arrival order, as in Firecracker.

use std::sync::mpsc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{
    BootSourceConfig, DriveConfig, DriveUpdate, EntropyConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdate, VmConfig,
    VsockConfig,
};

/// One thing a client asks the VMM to do.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSourceConfig),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`.
    PatchDrive(DriveUpdate),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `PUT /entropy`.
    PutEntropy(EntropyConfig),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterfaceConfig),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /mmds`: replace the metadata document.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: JSON merge patch of the document.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(mmds::MmdsConfig),
    /// `PUT /actions` InstanceStart.
    InstanceStart,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
}

/// Lifecycle state as Firecracker reports it in `GET /`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configurable, not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs stopped by `PATCH /vm`.
    Paused,
}

/// The body of `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Always "kiln-vmm".
    pub app_name: String,
    /// The `--id` the VMM was started with.
    pub id: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    /// Nothing to return (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /vm/config`.
    VmConfig(Box<VmConfig>),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /mmds`.
    Json(serde_json::Value),
}

/// Why a request was refused; the message is shown to the client as `fault_message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The request is invalid or not allowed now (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The VMM failed while carrying out a valid request (HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// The request's data is larger than the VMM accepts (HTTP 413).
    #[error("{0}")]
    PayloadTooLarge(String),
}

/// The result of one request.
pub type ActionResult = Result<VmmData, ActionError>;

/// Callback that delivers a request's result back to whoever asked.
pub type Responder = Box<dyn FnOnce(ActionResult) + Send>;

/// A request in flight from the API thread to the event loop.
pub struct ApiRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the answer goes.
    pub respond: Responder,
}

/// The sending side that the API server holds: queue a request and wake the event loop.
#[derive(Clone)]
pub struct VmmHandle {
    sender: mpsc::Sender<ApiRequest>,
    wake: Arc<EventFd>,
}

/// The receiving side, owned by the event loop.
pub struct VmmInbox {
    /// Pending requests.
    pub receiver: mpsc::Receiver<ApiRequest>,
    /// Readable whenever requests are pending.
    pub wake: Arc<EventFd>,
}

/// Creates a connected handle/inbox pair.
pub fn channel() -> std::io::Result<(VmmHandle, VmmInbox)> {
    let (sender, receiver) = mpsc::channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok((
        VmmHandle {
            sender,
            wake: wake.clone(),
        },
        VmmInbox { receiver, wake },
    ))
}

impl VmmHandle {
    /// Queues `action`; `respond` is called exactly once with the result (or with an internal
    /// error if the VMM has already stopped).
    pub fn submit(&self, action: VmmAction, respond: Responder) {
        match self.sender.send(ApiRequest { action, respond }) {
            Ok(()) => {
                if self.wake.write(1).is_err() {
                    tracing::warn!("could not wake the VMM event loop");
                }
            }
            Err(mpsc::SendError(request)) => (request.respond)(Err(ActionError::Internal(
                "the VMM is shutting down".to_string(),
            ))),
        }
    }

    /// Queues `action` and blocks until it is answered.
    pub fn call(&self, action: VmmAction) -> ActionResult {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            action,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(ActionError::Internal("the VMM is shutting down".into())))
    }
}
