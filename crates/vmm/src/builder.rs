//! Turning a validated [`VmConfig`] into a running VM: memory, kernel, devices, ACPI tables,
//! boot parameters and vCPU threads, in that order.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{IoEventAddress, VcpuFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, MmioDeviceInfo};
use crate::arch::x86_64::boot;
use crate::arch::x86_64::cpuid::{self, Topology};
use crate::arch::x86_64::layout::*;
use crate::config::{DriveConfig, NetworkInterfaceConfig, VmConfig};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_SIZE};
use crate::devices::legacy::cmos::{Cmos, CMOS_PORT, CMOS_PORT_COUNT};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORT_COUNT};
use crate::devices::legacy::serial::{SerialConsole, COM1_PORT, COM1_PORT_COUNT};
use crate::devices::legacy::IrqLine;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Entropy;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::Bus;
use crate::metrics::{BlockMetrics, EntropyMetrics, NetMetrics, VsockMetrics};
use crate::vstate::exit::ExitSignal;
use crate::vstate::vcpu::{self, VcpuRuntime, Vcpus};
use crate::vstate::vm::{MemoryShape, Vm};

/// Kernel command line used when the client gives none (Firecracker's default).
pub const DEFAULT_BOOT_ARGS: &str =
    "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Why the VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// KVM VM creation or memory registration failed.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The kernel or initrd could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A device could not be set up.
    #[error("device setup failed: {0}")]
    Device(String),
    /// A vCPU could not be created or configured.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// CPUID could not be built.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// The command line could not be built.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

/// Where guest serial output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// The VMM process's stdout.
    #[default]
    Stdout,
    /// A file (created or appended to).
    File(PathBuf),
    /// Discarded.
    Sink,
}

/// Process-level options that are not part of the VM configuration.
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// Instance id reported by `GET /`.
    pub id: String,
    /// Whether the boot-timer device exists.
    pub boot_timer: bool,
    /// Serial output destination.
    pub serial_output: SerialOutput,
    /// Largest metadata document `PUT /mmds` accepts, in bytes.
    pub mmds_size_limit: usize,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            id: String::new(),
            boot_timer: false,
            serial_output: SerialOutput::Stdout,
            mmds_size_limit: mmds::DEFAULT_SIZE_LIMIT,
        }
    }
}

/// A block device and its transport-side handle.
pub struct AttachedDrive {
    /// The drive's configuration as attached.
    pub config: DriveConfig,
    /// The device.
    pub device: Arc<Mutex<Block>>,
    /// Its counters.
    pub metrics: Arc<BlockMetrics>,
}

/// The vsock device of a running VM.
pub struct AttachedVsock {
    /// The device.
    pub device: Arc<Mutex<Vsock>>,
    /// Its counters.
    pub metrics: Arc<VsockMetrics>,
}

/// The entropy device of a running VM.
pub struct AttachedEntropy {
    /// The device.
    pub device: Arc<Mutex<Entropy>>,
    /// Its counters.
    pub metrics: Arc<EntropyMetrics>,
}

/// A network interface of a running VM.
pub struct AttachedNet {
    /// The interface's configuration as attached.
    pub config: NetworkInterfaceConfig,
    /// The device.
    pub device: Arc<Mutex<Net>>,
    /// Its counters.
    pub metrics: Arc<NetMetrics>,
}

/// A booted VM and the handles the event loop needs.
pub struct RunningVm {
    /// Keeps the VM (and so every KVM resource) alive.
    pub vm: Vm,
    /// Guest memory; must outlive the VM's memory slots.
    pub memory: GuestMemoryMmap,
    /// The vCPU threads.
    pub vcpus: Vcpus,
    /// The serial console (for stdin input).
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The i8042 (for Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// Block devices in slot order.
    pub drives: Vec<AttachedDrive>,
    /// The vsock device, if configured.
    pub vsock: Option<AttachedVsock>,
    /// The entropy device, if configured.
    pub entropy: Option<AttachedEntropy>,
    /// Network interfaces in slot order.
    pub nets: Vec<AttachedNet>,
}

fn serial_writer(output: &SerialOutput) -> Result<Box<dyn Write + Send>, StartError> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Sink => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| StartError::Open {
                    what: "serial output file",
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

fn irq_line(vm: &Vm, irq: u32) -> Result<EventFd, StartError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| StartError::Device(format!("eventfd for IRQ {irq}: {e}")))?;
    vm.fd
        .register_irqfd(&fd, irq)
        .map_err(|e| StartError::Device(format!("irqfd for IRQ {irq}: {e}")))?;
    Ok(fd)
}

fn device_err(e: impl std::fmt::Display) -> StartError {
    StartError::Device(e.to_string())
}

/// Drives in attachment order: the root device first (it becomes /dev/vda), then the rest as
/// the client added them.
pub fn ordered_drives(drives: &[DriveConfig]) -> Vec<DriveConfig> {
    let mut ordered: Vec<DriveConfig> = drives
        .iter()
        .filter(|d| d.is_root_device)
        .cloned()
        .collect();
    ordered.extend(drives.iter().filter(|d| !d.is_root_device).cloned());
    ordered
}

/// Builds the kernel command line: the client's arguments, the root device, and one
/// `virtio_mmio.device=` entry per virtio-mmio slot.
pub fn build_cmdline(config: &VmConfig, devices: &[MmioDeviceInfo]) -> Result<Cmdline, StartError> {
    let err = |e: linux_loader::cmdline::Error| StartError::Cmdline(e.to_string());
    let args = config
        .boot_source
        .as_ref()
        .and_then(|b| b.boot_args.clone())
        .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(err)?;
    let (boot_args, init_args) = match args.split_once(" -- ") {
        Some((boot, init)) => (boot.to_string(), Some(init.to_string())),
        None => (args, None),
    };
    if !boot_args.trim().is_empty() {
        cmdline.insert_str(boot_args.trim()).map_err(err)?;
    }
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        let device = match &root.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid}"),
            None => "root=/dev/vda".to_string(),
        };
        cmdline.insert_str(device).map_err(err)?;
        cmdline
            .insert_str(if root.is_read_only { "ro" } else { "rw" })
            .map_err(err)?;
    }
    for device in devices {
        cmdline
            .add_virtio_mmio_device(
                device.size,
                vm_memory::GuestAddress(device.address),
                device.irq,
                None,
            )
            .map_err(err)?;
    }
    if let Some(init) = init_args {
        cmdline.insert_init_args(init).map_err(err)?;
    }
    Ok(cmdline)
}

/// The part of a VM that does not depend on the kernel or devices: the KVM VM with its
/// interrupt controllers, registered guest memory, and KVM's CPUID. Creating these costs
/// several milliseconds on some hosts, so the VMM prepares them while the client is still
/// configuring, off the InstanceStart path.
pub struct PreparedVm {
    vm: Vm,
    shape: PreparedShape,
    vcpus: Vec<VcpuFd>,
}

/// Everything a prepared VM was built for; vCPUs cannot be removed from a KVM VM, so a
/// different vCPU count or topology means preparing a new VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreparedShape {
    /// Guest memory.
    pub memory: MemoryShape,
    /// vCPU topology.
    pub topology: Topology,
}

impl PartialEq for Topology {
    fn eq(&self, other: &Self) -> bool {
        self.vcpu_count == other.vcpu_count && self.smt == other.smt
    }
}

impl Eq for Topology {}

impl PreparedVm {
    /// Creates the VM, its memory and its vCPUs now, and runs the boot vCPU once.
    pub fn new(shape: PreparedShape) -> Result<PreparedVm, StartError> {
        let vm = Vm::new(shape.memory)?;
        let cpuid = cpuid::supported(&vm.kvm)?;
        let memory = vm
            .memory()
            .ok_or_else(|| StartError::Device("the new VM has no memory".into()))?
            .clone();
        let mut vcpus = Vec::with_capacity(shape.topology.vcpu_count as usize);
        for index in 0..shape.topology.vcpu_count {
            vcpus.push(vcpu::create(&vm.fd, index, &cpuid, shape.topology)?);
        }
        if let Some(boot) = vcpus.first_mut() {
            vcpu::warm_up(boot, &memory, memory.last_addr().raw_value() + 1)?;
        }
        Ok(PreparedVm { vm, shape, vcpus })
    }
}

/// Drops a VM that will not be used on a thread of its own: the host kernel takes
/// milliseconds to tear a VM down, and nobody needs to wait for that.
fn close_in_background(prepared: PreparedVm) {
    if let Err(e) = std::thread::Builder::new()
        .name("vm-close".into())
        .spawn(move || drop(prepared))
    {
        tracing::debug!("closing the unused VM inline: {e}");
    }
}

/// A [`PreparedVm`] being built (or rebuilt for a new memory shape) on a helper thread.
#[derive(Default)]
pub struct Preparation {
    pending: Option<JoinHandle<Result<PreparedVm, StartError>>>,
}

impl Preparation {
    /// Starts preparing a VM with memory of `shape`. Spawn only after the termination signals
    /// are blocked, so the helper thread inherits the mask.
    pub fn start(shape: PreparedShape) -> Preparation {
        let pending = std::thread::Builder::new()
            .name("vm-prepare".into())
            .spawn(move || PreparedVm::new(shape))
            .map_err(|e| tracing::debug!("no preparation thread: {e}"))
            .ok();
        Preparation { pending }
    }

    /// Re-shapes the memory of the VM being prepared (after `PUT /machine-config`).
    pub fn reshape(&mut self, shape: PreparedShape) {
        let Some(previous) = self.pending.take() else {
            return;
        };
        self.pending = std::thread::Builder::new()
            .name("vm-prepare".into())
            .spawn(move || {
                let prepared = previous
                    .join()
                    .map_err(|_| StartError::Device("VM preparation panicked".into()))??;
                if prepared.shape == shape {
                    return Ok(prepared);
                }
                // A new VM (about 0.5 ms) beats changing this one's memory slots (see
                // `Vm::new`); closing the old one takes the host kernel milliseconds more, so
                // that happens on a thread of its own.
                close_in_background(prepared);
                PreparedVm::new(shape)
            })
            .map_err(|e| tracing::debug!("no preparation thread: {e}"))
            .ok();
    }

    /// The prepared VM, if preparation ran and succeeded.
    fn take(&mut self) -> Option<PreparedVm> {
        match self.pending.take()?.join() {
            Ok(Ok(prepared)) => Some(prepared),
            Ok(Err(e)) => {
                tracing::debug!("VM preparation failed, retrying at start: {e}");
                None
            }
            Err(_) => None,
        }
    }
}

/// Builds and starts the VM described by `config`, using the prepared VM if there is one.
pub fn start_vm(
    config: &VmConfig,
    mmds: &Arc<Mutex<mmds::Mmds>>,
    options: &VmmOptions,
    exit: &ExitSignal,
    start_time: (Instant, u64),
    preparation: &mut Preparation,
) -> Result<RunningVm, StartError> {
    let boot_source = config
        .boot_source
        .as_ref()
        .ok_or_else(|| StartError::Device("no boot source".into()))?;
    let machine = &config.machine_config;
    let shape = PreparedShape {
        memory: MemoryShape {
            mem_size_mib: machine.mem_size_mib,
            track_dirty_pages: machine.track_dirty_pages,
        },
        topology: Topology {
            vcpu_count: machine.vcpu_count,
            smt: machine.smt,
        },
    };
    let prepared = match preparation.take() {
        Some(prepared) if prepared.shape == shape => prepared,
        Some(other) => {
            close_in_background(other);
            PreparedVm::new(shape)?
        }
        None => PreparedVm::new(shape)?,
    };
    let PreparedVm {
        mut vm,
        vcpus: vcpu_fds,
        ..
    } = prepared;
    let memory = vm.ensure_memory(shape.memory)?.clone();
    let mem_end = memory.last_addr().raw_value() + 1;

    let open = |what, path: &PathBuf| {
        File::open(path).map_err(|source| StartError::Open {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut kernel = open("kernel image", &boot_source.kernel_image_path)?;
    let entry = boot::load_kernel(&memory, &mut kernel)?;

    // Legacy devices on the port bus.
    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(
        SerialConsole::new(
            IrqLine(irq_line(&vm, SERIAL_IRQ)?),
            serial_writer(&options.serial_output)?,
        )
        .map_err(|e| StartError::Device(format!("eventfd for serial input: {e}")))?,
    ));
    pio.insert(serial.clone(), COM1_PORT, COM1_PORT_COUNT)
        .map_err(device_err)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        IrqLine(irq_line(&vm, I8042_IRQ)?),
        exit.clone(),
    )));
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_COUNT)
        .map_err(device_err)?;
    pio.insert(
        Arc::new(Mutex::new(Cmos::default())),
        CMOS_PORT,
        CMOS_PORT_COUNT,
    )
    .map_err(device_err)?;

    // MMIO devices: the boot timer, then one virtio-mmio slot per drive.
    let mut mmio = Bus::new();
    if options.boot_timer {
        let timer = BootTimer::new(start_time.0, start_time.1);
        mmio.insert(
            Arc::new(Mutex::new(timer)),
            BOOT_TIMER_START,
            BOOT_TIMER_SIZE,
        )
        .map_err(device_err)?;
    }
    let drives_config = ordered_drives(&config.drives);
    let virtio_count = drives_config.len()
        + config.network_interfaces.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.entropy.is_some());
    if virtio_count as u64 > VIRTIO_MMIO_SLOTS {
        return Err(StartError::Device(format!(
            "{virtio_count} virtio devices configured, at most {VIRTIO_MMIO_SLOTS} fit"
        )));
    }
    let mut drives = Vec::new();
    let mut device_infos = Vec::new();
    for drive in &drives_config {
        let metrics = Arc::new(BlockMetrics::default());
        let block = Block::new(
            &drive.drive_id,
            &drive.path_on_host,
            drive.is_read_only,
            drive.cache_type,
            drive.rate_limiter.as_ref(),
            metrics.clone(),
        )
        .map_err(device_err)?;
        let device = Arc::new(Mutex::new(block));
        let info = attach_virtio(&vm, &memory, &mut mmio, device.clone(), device_infos.len())?;
        device_infos.push(info);
        drives.push(AttachedDrive {
            config: drive.clone(),
            device,
            metrics,
        });
    }
    let mut nets = Vec::new();
    for iface in &config.network_interfaces {
        let metrics = Arc::new(NetMetrics::default());
        let mac = iface
            .guest_mac
            .as_deref()
            .map(crate::config::parse_mac)
            .transpose()
            .map_err(device_err)?;
        let net = Net::new(
            &iface.iface_id,
            &iface.host_dev_name,
            mac,
            iface.rx_rate_limiter.as_ref(),
            iface.tx_rate_limiter.as_ref(),
            metrics.clone(),
        )
        .map_err(device_err)?;
        let mut net = net;
        if let Some(mmds_config) = config
            .mmds_config
            .as_ref()
            .filter(|c| c.network_interfaces.contains(&iface.iface_id))
        {
            let stack =
                mmds::MmdsNetworkStack::new(mmds::DEFAULT_MAC, mmds_config.ipv4(), mmds.clone());
            net.set_frame_handler(Arc::new(Mutex::new(MmdsFrames(stack))));
        }
        let device = Arc::new(Mutex::new(net));
        let info = attach_virtio(&vm, &memory, &mut mmio, device.clone(), device_infos.len())?;
        device_infos.push(info);
        nets.push(AttachedNet {
            config: iface.clone(),
            device,
            metrics,
        });
    }
    let vsock = match &config.vsock {
        Some(vsock_config) => {
            let metrics = Arc::new(VsockMetrics::default());
            let vsock = Vsock::new(
                u64::from(vsock_config.guest_cid),
                &vsock_config.uds_path,
                metrics.clone(),
            )
            .map_err(device_err)?;
            let device = Arc::new(Mutex::new(vsock));
            let info = attach_virtio(&vm, &memory, &mut mmio, device.clone(), device_infos.len())?;
            device_infos.push(info);
            Some(AttachedVsock { device, metrics })
        }
        None => None,
    };
    let entropy = match &config.entropy {
        Some(entropy_config) => {
            let metrics = Arc::new(EntropyMetrics::default());
            let entropy = Entropy::new(entropy_config.rate_limiter.as_ref(), metrics.clone())
                .map_err(device_err)?;
            let device = Arc::new(Mutex::new(entropy));
            let info = attach_virtio(&vm, &memory, &mut mmio, device.clone(), device_infos.len())?;
            device_infos.push(info);
            Some(AttachedEntropy { device, metrics })
        }
        None => None,
    };

    let cmdline = build_cmdline(config, &device_infos)?;
    boot::load_cmdline(&memory, &cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| StartError::Cmdline(e.to_string()))?;
    let initrd = match &boot_source.initrd_path {
        Some(path) => {
            let mut file = open("initrd", path)?;
            Some(boot::load_initrd(&memory, &mut file, entry.kernel_end)?)
        }
        None => None,
    };
    acpi::write_tables(&memory, machine.vcpu_count, &device_infos)?;
    boot::write_boot_params(&memory, &entry, cmdline_len, initrd)?;

    for (index, fd) in vcpu_fds.iter().enumerate() {
        let boot = (index == 0).then_some((entry.mode, entry.address));
        vcpu::configure(fd, index as u8, &memory, mem_end, boot)?;
    }
    let vcpus = Vcpus::start(
        vcpu_fds,
        VcpuRuntime {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: exit.clone(),
        },
    )?;
    Ok(RunningVm {
        vm,
        memory,
        vcpus,
        serial,
        i8042,
        drives,
        vsock,
        entropy,
        nets,
    })
}

/// The metadata service's network stack, answering the frames a guest sends to it.
struct MmdsFrames(mmds::MmdsNetworkStack);

impl crate::devices::virtio::net::FrameHandler for MmdsFrames {
    fn handle_tx(&mut self, frame: &[u8]) -> bool {
        self.0.handle_frame(frame)
    }

    fn next_rx(&mut self) -> Option<Vec<u8>> {
        self.0.next_frame()
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.0.next_timeout()
    }

    fn on_timer(&mut self, now: Instant) {
        self.0.on_timer(now)
    }
}

/// Puts a virtio device in MMIO slot `slot`: its register window on the MMIO bus, one
/// ioeventfd per queue on the notify register, and an irqfd for its interrupt line.
fn attach_virtio<D: VirtioDevice + 'static>(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    mmio: &mut Bus,
    device: Arc<Mutex<D>>,
    slot: usize,
) -> Result<MmioDeviceInfo, StartError> {
    let info = MmioDeviceInfo {
        address: VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + slot as u32,
    };
    {
        let device = crate::devices::bus::lock(&device);
        for (queue, event) in device.queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(
                    event,
                    &IoEventAddress::Mmio(info.address + NOTIFY_REG_OFFSET),
                    queue as u32,
                )
                .map_err(|e| StartError::Device(format!("ioeventfd in virtio slot {slot}: {e}")))?;
        }
    }
    let interrupt = Arc::new(VirtioInterrupt::new(irq_line(vm, info.irq)?));
    let transport = MmioTransport::new(device, memory.clone(), interrupt);
    mmio.insert(Arc::new(Mutex::new(transport)), info.address, info.size)
        .map_err(device_err)?;
    Ok(info)
}
