//! Why the VM stopped, and the one-shot signal that carries it from whichever thread noticed
//! (a vCPU, a device, a signal handler) to the event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why the VMM process ends; each reason has its own exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`): a clean end.
    GuestReset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM_RUN failed or returned an exit kiln-vmm cannot handle.
    VcpuError(String),
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The VMM itself failed (for example the event loop).
    VmmError(String),
}

impl ExitReason {
    /// Process exit status for this reason (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset => 0,
            ExitReason::VmmError(_) => 1,
            ExitReason::TripleFault => 3,
            ExitReason::VcpuError(_) => 4,
            ExitReason::Signal(signo) => 128 + signo,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset the machine (i8042)"),
            ExitReason::TripleFault => write!(f, "a vCPU triple-faulted (KVM_EXIT_SHUTDOWN)"),
            ExitReason::VcpuError(e) => write!(f, "a vCPU failed: {e}"),
            ExitReason::Signal(signo) => write!(f, "stopped by signal {signo}"),
            ExitReason::VmmError(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// First-writer-wins exit request, readable by the event loop through its eventfd.
#[derive(Clone)]
pub struct ExitSignal {
    requested: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<ExitReason>>>,
    event: Arc<EventFd>,
}

impl ExitSignal {
    /// A signal with no exit requested yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            requested: Arc::new(AtomicBool::new(false)),
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Asks the VMM to stop; only the first reason is kept.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = crate::devices::bus::lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            tracing::error!("could not signal VM exit: {e}");
        }
    }

    /// Cheap check for vCPU threads: has anyone asked the VM to stop?
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The requested reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).clone()
    }

    /// The eventfd that becomes readable on a request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}
