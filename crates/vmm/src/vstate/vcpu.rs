//! vCPU threads: each runs KVM_RUN in a loop and routes port and MMIO exits to the buses.
//!
//! Pausing sets a shared state and kicks every thread out of KVM_RUN with a real-time signal;
//! the kick is repeated until every vCPU has parked, which closes the race where a signal lands
//! just before a thread re-enters the guest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_xcrs, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use super::exit::{ExitReason, ExitSignal};
use crate::arch::x86_64::cpuid::{self, Topology};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{msr, regs::RegsError};
use crate::devices::bus::{lock, Bus};

/// Why a vCPU could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: KVM {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Boot MSRs could not be set.
    #[error("vCPU {0}: {1}")]
    Msr(u8, msr::MsrError),
    /// Boot registers could not be set.
    #[error("vCPU {0}: {1}")]
    Regs(u8, RegsError),
    /// The thread could not be spawned.
    #[error("cannot start the thread for vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
}

/// What the vCPU threads should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

/// State shared by all vCPU threads and the event loop.
pub struct VcpuControl {
    state: Mutex<RunState>,
    changed: Condvar,
    parked: AtomicUsize,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            state: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
        }
    }
}

/// Creates vCPU `index` and gives it its CPUID, which KVM only accepts before the vCPU first
/// runs.
pub fn create(
    vm: &kvm_ioctls::VmFd,
    index: u8,
    base_cpuid: &CpuId,
    topology: Topology,
) -> Result<VcpuFd, VcpuError> {
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let vcpu = vm
        .create_vcpu(index as u64)
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let table = cpuid::for_vcpu(base_cpuid, index, topology);
    vcpu.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
    if let Some(xcr0) = cpuid::boot_xcr0(&table) {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        // Not fatal: without it the guest boots as on hardware, only nested setups that miss
        // XSETBV exits see inconsistent XSAVE sizes (see `boot_xcr0`).
        if let Err(e) = vcpu.set_xcrs(&xcrs) {
            tracing::debug!("vCPU {index}: KVM_SET_XCRS (XCR0 {xcr0:#x}) failed: {e}");
        }
    }
    Ok(vcpu)
}

/// Guest address of the two-byte warm-up stub (unused low memory, zeroed again afterwards).
const WARM_UP_STUB: u64 = 0x1000;

/// Runs the boot vCPU once, in the long mode it will boot in, through a two-byte stub
/// (`out %al, $0x80`).
///
/// On some hosts the first KVM_RUN of a vCPU costs milliseconds of one-time set-up; paying it
/// while the client is still configuring keeps it off the InstanceStart → first-instruction
/// path. [`configure`] then overwrites every register the stub touched.
pub fn warm_up(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap, mem_end: u64) -> Result<(), VcpuError> {
    use vm_memory::{Bytes, GuestAddress};
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index: 0,
            what,
            source,
        }
    };
    mem.write_slice(&[0xe6, 0x80], GuestAddress(WARM_UP_STUB))
        .map_err(|e| VcpuError::Regs(0, RegsError::Memory(e)))?;
    regs::setup_boot_vcpu(vcpu, mem, mem_end, EntryMode::LinuxBoot64, WARM_UP_STUB)
        .map_err(|e| VcpuError::Regs(0, e))?;
    match vcpu.run() {
        Ok(VcpuExit::IoOut(0x80, _)) => {}
        Ok(other) => tracing::debug!("vCPU warm-up ended with {other:?}"),
        Err(e) => return Err(kvm_err("KVM_RUN (warm-up)")(e)),
    }
    mem.write_slice(&[0, 0], GuestAddress(WARM_UP_STUB))
        .map_err(|e| VcpuError::Regs(0, RegsError::Memory(e)))?;
    Ok(())
}

/// Sets the state for vCPU `index` before the guest runs: MSRs, FPU, LAPIC, and for the boot
/// vCPU the registers of its entry protocol.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    mem: &GuestMemoryMmap,
    mem_end: u64,
    boot: Option<(EntryMode, u64)>,
) -> Result<(), VcpuError> {
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    msr::setup_msrs(vcpu).map_err(|e| VcpuError::Msr(index, e))?;
    regs::setup_fpu(vcpu).map_err(|e| VcpuError::Regs(index, e))?;
    set_lint(vcpu).map_err(kvm_err("KVM_SET_LAPIC"))?;
    if let Some((mode, entry)) = boot {
        regs::setup_boot_vcpu(vcpu, mem, mem_end, mode, entry)
            .map_err(|e| VcpuError::Regs(index, e))?;
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs, as on a PC.
fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    let mut update = |offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    update(APIC_LVT0, APIC_MODE_EXTINT);
    update(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
}

fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid start; we set a handler that does nothing,
        // which is async-signal-safe, and no SA_RESTART so KVM_RUN returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
                tracing::error!("cannot install the vCPU kick handler");
            }
        }
    });
}

/// The running vCPU threads of a VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<(JoinHandle<()>, libc::pthread_t)>,
}

/// Everything a vCPU thread needs.
pub struct VcpuRuntime {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the VM.
    pub exit: ExitSignal,
}

impl Vcpus {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<VcpuFd>, runtime: VcpuRuntime) -> Result<Vcpus, VcpuError> {
        install_kick_handler();
        let control = Arc::new(VcpuControl::new());
        let runtime = Arc::new(runtime);
        let mut threads = Vec::with_capacity(vcpus.len());
        for (index, fd) in vcpus.into_iter().enumerate() {
            let control = control.clone();
            let runtime = runtime.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // SAFETY: pthread_self has no preconditions.
                    let _ = tx.send(unsafe { libc::pthread_self() });
                    run_vcpu(index as u8, fd, &control, &runtime);
                })
                .map_err(|e| VcpuError::Spawn(index as u8, e))?;
            let pthread = rx
                .recv()
                .map_err(|_| VcpuError::Spawn(index as u8, std::io::Error::other("thread died")))?;
            threads.push((handle, pthread));
        }
        Ok(Vcpus { control, threads })
    }

    fn kick_all(&self) {
        for (handle, pthread) in &self.threads {
            if !handle.is_finished() {
                // SAFETY: the thread is alive (not finished), so its pthread_t is valid.
                unsafe { libc::pthread_kill(*pthread, kick_signal()) };
            }
        }
    }

    fn live_threads(&self) -> usize {
        self.threads
            .iter()
            .filter(|(h, _)| !h.is_finished())
            .count()
    }

    /// Stops every vCPU and waits until all have left the guest.
    pub fn pause(&self) -> bool {
        *lock(&self.control.state) = RunState::Paused;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.control.parked.load(Ordering::SeqCst) < self.live_threads() {
            if Instant::now() > deadline {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        *lock(&self.control.state) = RunState::Running;
        self.control.changed.notify_all();
    }
}

fn run_vcpu(index: u8, mut fd: VcpuFd, control: &VcpuControl, runtime: &VcpuRuntime) {
    loop {
        {
            let mut state = lock(&control.state);
            if *state == RunState::Paused {
                control.parked.fetch_add(1, Ordering::SeqCst);
                while *state == RunState::Paused {
                    state = control
                        .changed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                control.parked.fetch_sub(1, Ordering::SeqCst);
            }
        }
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !runtime.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                runtime.pio.write(port as u64, data);
                // A reset through the i8042 must not let the guest run on.
                if runtime.exit.is_requested() {
                    return;
                }
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                if !runtime.mmio.read(address, data) {
                    tracing::debug!("vCPU {index}: read of unmapped MMIO {address:#x}");
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                if !runtime.mmio.write(address, data) {
                    tracing::debug!("vCPU {index}: write to unmapped MMIO {address:#x}");
                }
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(VcpuExit::Shutdown) => {
                runtime.exit.request(ExitReason::TripleFault);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                runtime.exit.request(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                    | kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    other => ExitReason::VcpuError(format!("vCPU {index}: system event {other}")),
                });
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                runtime.exit.request(ExitReason::VcpuError(format!(
                    "vCPU {index}: VM entry failed on host CPU {cpu} (hardware reason {reason:#x})"
                )));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                runtime.exit.request(ExitReason::VcpuError(format!(
                    "vCPU {index}: KVM internal error (the guest ran something KVM cannot emulate)"
                )));
                return;
            }
            Ok(other) => {
                runtime.exit.request(ExitReason::VcpuError(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                )));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                runtime
                    .exit
                    .request(ExitReason::VcpuError(format!("vCPU {index}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}
