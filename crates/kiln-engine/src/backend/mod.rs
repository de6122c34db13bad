//! Hypervisor backends: what starts the VM process and how the agent inside is reached.
//!
//! A [`Backend`] turns a [`LaunchSpec`] (kernel, initramfs, disk, size) into a running
//! hypervisor process whose serial console is its stdin/stdout, plus an [`AgentTransport`]
//! to kiln-init. Everything above this seam (supervisor, CLI) is the same for every backend.

mod qemu;
mod vmm;

pub use qemu::QemuBackend;
pub use vmm::VmmBackend;

use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::Instant;

use kiln_agent_protocol::GuestConfig;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The hypervisors kiln can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// kiln-vmm, kiln's own VMM, on hardware KVM; the agent speaks over virtio-vsock.
    Vmm,
    /// qemu-system-x86_64 `-M microvm`, with KVM or TCG; the agent speaks over a
    /// virtio-console port.
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Vmm => "vmm",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Pick the best one this host can run (see [`choose_backend`]).
    #[default]
    Auto,
    /// This one.
    Kind(BackendKind),
}

impl std::str::FromStr for BackendChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "vmm" | "kiln-vmm" => Ok(BackendChoice::Kind(BackendKind::Vmm)),
            "qemu" => Ok(BackendChoice::Kind(BackendKind::Qemu)),
            other => Err(EngineError::Invalid(format!(
                "unknown backend {other:?}: use auto, vmm or qemu"
            ))),
        }
    }
}

/// How the host's KVM can run guests, which decides the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// /dev/kvm with hardware virtualization (vmx or svm): stock kernels boot fast.
    Hardware,
    /// /dev/kvm exists but the CPU has no vmx/svm (for example kvm_pvm): stock Linux
    /// kernels cannot boot under it.
    NoHardwareVirtualization,
    /// No usable /dev/kvm.
    Unavailable(String),
}

/// Probes /dev/kvm and /proc/cpuinfo.
pub fn kvm_support() -> KvmSupport {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) => return KvmSupport::Unavailable(format!("/dev/kvm: {e}")),
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hardware {
        KvmSupport::Hardware
    } else {
        KvmSupport::NoHardwareVirtualization
    }
}

/// Resolves `choice` for this host, with the reason to tell the user.
pub fn choose_backend(choice: BackendChoice) -> (BackendKind, String) {
    match choice {
        BackendChoice::Kind(kind) => (kind, format!("{kind} backend chosen with --backend")),
        BackendChoice::Auto => match kvm_support() {
            KvmSupport::Hardware => (
                BackendKind::Vmm,
                "kiln-vmm: /dev/kvm has hardware virtualization".into(),
            ),
            KvmSupport::NoHardwareVirtualization => (
                BackendKind::Qemu,
                "qemu with TCG: this host's /dev/kvm has no vmx/svm (kvm_pvm?), and stock Linux \
                 kernels cannot boot under it"
                    .into(),
            ),
            KvmSupport::Unavailable(why) => (
                BackendKind::Qemu,
                format!("qemu with TCG: no usable KVM ({why})"),
            ),
        },
    }
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network interface (loopback only).
    None,
    /// Outbound access through the hypervisor's user-mode NAT (QEMU's slirp): no host setup,
    /// no root needed.
    #[default]
    User,
    /// A tap device on the host's NAT bridge `kiln0` (see [`crate::network`]): an address of
    /// its own, reachable from the host and the other VMs; needs root.
    Bridge,
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::None => "none",
            NetworkMode::User => "user",
            NetworkMode::Bridge => "bridge",
        })
    }
}

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM's directory: sockets and logs go there.
    pub dir: PathBuf,
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs with kiln-init as /init.
    pub initrd: PathBuf,
    /// Kernel command line arguments on top of the backend's own.
    pub extra_cmdline: String,
    /// The root disk (ext4, read-write).
    pub disk: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Networking.
    pub network: NetworkMode,
    /// With [`NetworkMode::Bridge`]: the tap (made by the caller) and the guest's address.
    pub bridge: Option<crate::network::BridgeAttachment>,
}

/// A started hypervisor process.
pub struct Launched {
    /// The process; its stdin/stdout are the guest's serial console.
    pub child: Child,
    /// How to reach the agent.
    pub transport: Box<dyn AgentTransport>,
    /// Network settings the guest must apply (from the backend's network).
    pub guest_config: GuestConfig,
}

/// A backend: starts the hypervisor for one VM.
pub trait Backend: Send + Sync {
    /// Which one this is.
    fn kind(&self) -> BackendKind;
    /// Checks that the backend can run here (binaries present, KVM as needed), with an
    /// actionable error if not.
    fn check(&self) -> Result<()>;
    /// Starts the VM. The process dies with the calling process (parent-death signal), so a
    /// supervisor that is killed cannot leak it.
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched>;
}

/// How the host reaches kiln-init in a running VM: the seam between backends and the agent
/// client, so the protocol does not care whether bytes go over vsock or a console port.
pub trait AgentTransport: Send {
    /// Opens a stream to the agent. The guest may still be booting: implementations retry
    /// until `deadline`.
    fn connect(&self, deadline: Instant) -> Result<UnixStream>;
    /// For messages: what this transport is.
    fn describe(&self) -> String;
}

/// The backend for `kind`.
pub fn backend(kind: BackendKind) -> Box<dyn Backend> {
    match kind {
        BackendKind::Vmm => Box::new(VmmBackend::from_env()),
        BackendKind::Qemu => Box::new(QemuBackend::from_env()),
    }
}

/// Kernel command line every kiln guest gets: serial console, reset ends the VM (both
/// hypervisors exit on a guest reset), a panic resets at once, quiet boot.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw";

/// Makes `command`'s process get SIGKILL when the calling thread's process dies.
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl and getppid,
    // which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}

/// Tries `attempt` until it succeeds or `deadline` has passed, pausing `pause` in between:
/// how transports wait for a guest whose agent is not listening yet. The last error is
/// returned.
pub(crate) fn retry_until<T>(
    deadline: Instant,
    pause: std::time::Duration,
    mut attempt: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(pause),
        }
    }
}

/// `program`, or the backend error `missing` (which says how to install it) if it was not
/// found.
pub(crate) fn require_program<'a>(
    program: &'a Option<PathBuf>,
    missing: &str,
) -> Result<&'a PathBuf> {
    program
        .as_ref()
        .ok_or_else(|| EngineError::Backend(missing.to_string()))
}

/// Finds an executable: an explicit path from `env_var`, next to the running `kiln`, or in
/// `PATH`.
pub(crate) fn find_program(env_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
