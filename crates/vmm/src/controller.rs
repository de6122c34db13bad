//! The VMM's control loop: owns the configuration and the running VM, answers API requests in
//! arrival order, and ends the process when the guest, a vCPU or a signal says so.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::arch::x86_64::cpuid::Topology;
use crate::builder::{self, Preparation, PreparedShape, RunningVm, VmmOptions};
use crate::config::{MetricsConfig, VmConfig};
use crate::devices::boot_timer::process_cpu_us;
use crate::devices::bus::lock;
use crate::rpc::{
    ActionError, ActionResult, InstanceInfo, InstanceState, VmmAction, VmmData, VmmInbox,
};
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::vm::MemoryShape;

/// How often metrics are written without a `FlushMetrics`.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn bad(message: impl Into<String>) -> ActionError {
    ActionError::BadRequest(message.into())
}

fn mmds_error(e: mmds::StoreError) -> ActionError {
    match e.status_code() {
        413 => ActionError::PayloadTooLarge(e.to_string()),
        _ => bad(e.to_string()),
    }
}

/// All VMM state the API can see or change.
pub struct Vmm {
    options: VmmOptions,
    config: VmConfig,
    state: InstanceState,
    running: Option<RunningVm>,
    exit: ExitSignal,
    inbox: Option<VmmInbox>,
    metrics: Option<File>,
    last_metrics: Instant,
    new_subscribers: Vec<Subscriber>,
    preparation: Preparation,
    mmds: Arc<Mutex<mmds::Mmds>>,
}

impl Vmm {
    /// A VMM that has not booted anything yet.
    pub fn new(options: VmmOptions, inbox: Option<VmmInbox>) -> std::io::Result<Vmm> {
        let mmds_size_limit = options.mmds_size_limit;
        Ok(Vmm {
            options,
            config: VmConfig::default(),
            state: InstanceState::NotStarted,
            running: None,
            exit: ExitSignal::new()?,
            inbox,
            metrics: None,
            last_metrics: Instant::now(),
            new_subscribers: Vec::new(),
            preparation: Preparation::default(),
            mmds: Arc::new(Mutex::new(
                mmds::Mmds::new(mmds_size_limit)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            )),
        })
    }

    /// The exit signal devices and vCPUs report through.
    pub fn exit_signal(&self) -> ExitSignal {
        self.exit.clone()
    }

    fn prepared_shape(&self) -> PreparedShape {
        let machine = &self.config.machine_config;
        PreparedShape {
            memory: MemoryShape {
                mem_size_mib: machine.mem_size_mib,
                track_dirty_pages: machine.track_dirty_pages,
            },
            topology: Topology {
                vcpu_count: machine.vcpu_count,
                smt: machine.smt,
            },
        }
    }

    /// Starts creating the KVM VM and its memory in the background, so that InstanceStart
    /// only loads the kernel and starts vCPUs. Call after the termination signals are
    /// blocked.
    pub fn begin_preparation(&mut self) {
        self.preparation = Preparation::start(self.prepared_shape());
    }

    fn started(&self) -> bool {
        self.state != InstanceState::NotStarted
    }

    fn pre_boot(&self, what: &str) -> Result<(), ActionError> {
        if self.started() {
            Err(bad(format!(
                "{what} cannot be changed after the microVM has started (InstanceStart already ran)."
            )))
        } else {
            Ok(())
        }
    }

    fn post_boot(&self, what: &str) -> Result<&RunningVm, ActionError> {
        self.running.as_ref().ok_or_else(|| {
            bad(format!(
                "{what} is only possible after the microVM has started; send InstanceStart first."
            ))
        })
    }

    /// Carries out one request.
    pub fn handle(&mut self, action: VmmAction) -> ActionResult {
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                app_name: "kiln-vmm".into(),
                id: self.options.id.clone(),
                state: self.state,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            })),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.config.clone()))),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::PutMachineConfig(machine) => {
                self.pre_boot("The machine configuration")?;
                machine.validate().map_err(|e| bad(e.to_string()))?;
                self.config.machine_config = machine;
                self.preparation.reshape(self.prepared_shape());
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(update) => {
                self.pre_boot("The machine configuration")?;
                let machine = self.config.machine_config.merged(&update);
                machine.validate().map_err(|e| bad(e.to_string()))?;
                self.config.machine_config = machine;
                self.preparation.reshape(self.prepared_shape());
                Ok(VmmData::Empty)
            }
            VmmAction::PutBootSource(boot) => {
                self.pre_boot("The boot source")?;
                boot.validate().map_err(|e| bad(e.to_string()))?;
                self.config.boot_source = Some(boot);
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(drive) => {
                self.pre_boot("Drives")?;
                drive.validate().map_err(|e| bad(e.to_string()))?;
                if drive.is_root_device {
                    if let Some(other) = self
                        .config
                        .drives
                        .iter()
                        .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
                    {
                        return Err(bad(format!(
                            "A root block device already exists (drive \"{}\"); only one drive may have is_root_device set.",
                            other.drive_id
                        )));
                    }
                }
                let existing = self
                    .config
                    .drives
                    .iter()
                    .position(|d| d.drive_id == drive.drive_id);
                match existing {
                    Some(i) => self.config.drives[i] = drive,
                    None => {
                        if self.config.drives.len() as u64
                            >= crate::arch::x86_64::layout::VIRTIO_MMIO_SLOTS
                        {
                            return Err(bad(
                                "No more drives can be added: all virtio-mmio slots are used.",
                            ));
                        }
                        self.config.drives.push(drive)
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(update) => {
                let running = self.post_boot("Updating a drive")?;
                update.validate().map_err(|e| bad(e.to_string()))?;
                let device = running
                    .drives
                    .iter()
                    .find(|d| d.config.drive_id == update.drive_id)
                    .map(|d| d.device.clone())
                    .ok_or_else(|| {
                        bad(format!("No drive with id \"{}\" exists.", update.drive_id))
                    })?;
                if let Some(path) = &update.path_on_host {
                    lock(&device)
                        .update_backing_file(path)
                        .map_err(|e| bad(e.to_string()))?;
                }
                if let Some(limits) = &update.rate_limiter {
                    lock(&device).update_rate_limiter(limits);
                }
                if let Some(drive) = self
                    .config
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == update.drive_id)
                {
                    if let Some(path) = &update.path_on_host {
                        drive.path_on_host = path.clone();
                    }
                    if let Some(limits) = &update.rate_limiter {
                        drive.rate_limiter = Some(limits.clone());
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PutLogger(logger) => {
                crate::logger::configure(&logger).map_err(bad)?;
                self.config.logger = Some(logger);
                Ok(VmmData::Empty)
            }
            VmmAction::PutMetrics(metrics) => {
                if self.metrics.is_some() {
                    return Err(bad(
                        "Metrics are already configured; they can be set only once.",
                    ));
                }
                self.open_metrics(&metrics)?;
                self.config.metrics = Some(metrics);
                Ok(VmmData::Empty)
            }
            VmmAction::PutVsock(vsock) => {
                self.pre_boot("The vsock device")?;
                vsock.validate().map_err(|e| bad(e.to_string()))?;
                self.config.vsock = Some(vsock);
                Ok(VmmData::Empty)
            }
            VmmAction::PutEntropy(entropy) => {
                self.pre_boot("The entropy device")?;
                self.config.entropy = Some(entropy);
                Ok(VmmData::Empty)
            }
            VmmAction::PutNetworkInterface(iface) => {
                self.pre_boot("Network interfaces")?;
                iface.validate().map_err(|e| bad(e.to_string()))?;
                let others = self
                    .config
                    .network_interfaces
                    .iter()
                    .filter(|i| i.iface_id != iface.iface_id);
                for other in others {
                    if other.host_dev_name == iface.host_dev_name {
                        return Err(bad(format!(
                            "The tap device {} is already used by network interface {:?}.",
                            iface.host_dev_name, other.iface_id
                        )));
                    }
                    let same_mac = match (&other.guest_mac, &iface.guest_mac) {
                        (Some(a), Some(b)) => {
                            crate::config::parse_mac(a).ok() == crate::config::parse_mac(b).ok()
                        }
                        _ => false,
                    };
                    if same_mac {
                        return Err(bad(format!(
                            "The MAC address {} is already used by network interface {:?}.",
                            iface.guest_mac.as_deref().unwrap_or_default(),
                            other.iface_id
                        )));
                    }
                }
                let existing = self
                    .config
                    .network_interfaces
                    .iter()
                    .position(|i| i.iface_id == iface.iface_id);
                match existing {
                    Some(i) => self.config.network_interfaces[i] = iface,
                    None => self.config.network_interfaces.push(iface),
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(update) => {
                let running = self.post_boot("Updating a network interface")?;
                let device = running
                    .nets
                    .iter()
                    .find(|n| n.config.iface_id == update.iface_id)
                    .map(|n| n.device.clone())
                    .ok_or_else(|| {
                        bad(format!(
                            "No network interface with id {:?} exists.",
                            update.iface_id
                        ))
                    })?;
                lock(&device).update_rate_limiters(
                    update.rx_rate_limiter.as_ref(),
                    update.tx_rate_limiter.as_ref(),
                );
                if let Some(iface) = self
                    .config
                    .network_interfaces
                    .iter_mut()
                    .find(|i| i.iface_id == update.iface_id)
                {
                    if update.rx_rate_limiter.is_some() {
                        iface.rx_rate_limiter = update.rx_rate_limiter.clone();
                    }
                    if update.tx_rate_limiter.is_some() {
                        iface.tx_rate_limiter = update.tx_rate_limiter.clone();
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::GetMmds => Ok(VmmData::Json(lock(&self.mmds).data().clone())),
            VmmAction::PutMmds(value) => {
                lock(&self.mmds).put(value).map_err(mmds_error)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMmds(patch) => {
                lock(&self.mmds).patch(&patch).map_err(mmds_error)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutMmdsConfig(config) => {
                self.pre_boot("The MMDS configuration")?;
                let interfaces = &self.config.network_interfaces;
                config
                    .validate(|id| interfaces.iter().any(|i| i.iface_id == id))
                    .map_err(|e| bad(e.to_string()))?;
                lock(&self.mmds).apply_config(&config);
                self.config.mmds_config = Some(config);
                Ok(VmmData::Empty)
            }
            VmmAction::InstanceStart => self.start(),
            VmmAction::SendCtrlAltDel => {
                let running = self.post_boot("SendCtrlAltDel")?;
                if lock(&running.i8042).send_ctrl_alt_del() {
                    Ok(VmmData::Empty)
                } else {
                    Err(bad(
                        "The i8042 keyboard buffer is full; the guest is not reading it.",
                    ))
                }
            }
            VmmAction::FlushMetrics => {
                if self.metrics.is_none() {
                    return Err(bad("Metrics are not configured; send PUT /metrics first."));
                }
                self.write_metrics().map_err(ActionError::Internal)?;
                Ok(VmmData::Empty)
            }
            VmmAction::Pause => {
                let running = self.post_boot("Pausing")?;
                if !running.vcpus.pause() {
                    return Err(ActionError::Internal(
                        "The vCPUs did not stop within 2 s.".into(),
                    ));
                }
                self.state = InstanceState::Paused;
                Ok(VmmData::Empty)
            }
            VmmAction::Resume => {
                let running = self.post_boot("Resuming")?;
                running.vcpus.resume();
                self.state = InstanceState::Running;
                Ok(VmmData::Empty)
            }
        }
    }

    /// Boots the configured VM (InstanceStart).
    pub fn start(&mut self) -> ActionResult {
        if self.started() {
            return Err(bad(
                "The microVM is already running; InstanceStart can be sent only once.",
            ));
        }
        if self.config.boot_source.is_none() {
            return Err(bad(
                "Cannot start the microVM without a kernel: configure PUT /boot-source first.",
            ));
        }
        let start = (Instant::now(), process_cpu_us());
        let running = builder::start_vm(
            &self.config,
            &self.mmds,
            &self.options,
            &self.exit,
            start,
            &mut self.preparation,
        )
        .map_err(|e| bad(format!("Cannot start the microVM: {e}")))?;
        for drive in &running.drives {
            self.new_subscribers.push(drive.device.clone());
        }
        if let Some(vsock) = &running.vsock {
            self.new_subscribers.push(vsock.device.clone());
        }
        if let Some(entropy) = &running.entropy {
            self.new_subscribers.push(entropy.device.clone());
        }
        for net in &running.nets {
            self.new_subscribers.push(net.device.clone());
        }
        self.new_subscribers
            .push(Arc::new(Mutex::new(SerialInput::new(
                running.serial.clone(),
            ))));
        self.running = Some(running);
        self.state = InstanceState::Running;
        tracing::info!("microVM started");
        Ok(VmmData::Empty)
    }

    /// Loads a whole configuration (the `--config-file` path), validating each part as the
    /// API would.
    pub fn apply_config(&mut self, config: VmConfig) -> Result<(), ActionError> {
        if let Some(logger) = config.logger.clone() {
            self.handle(VmmAction::PutLogger(logger))?;
        }
        if let Some(metrics) = config.metrics.clone() {
            self.handle(VmmAction::PutMetrics(metrics))?;
        }
        self.handle(VmmAction::PutMachineConfig(config.machine_config.clone()))?;
        if let Some(boot) = config.boot_source.clone() {
            self.handle(VmmAction::PutBootSource(boot))?;
        }
        for drive in config.drives {
            self.handle(VmmAction::PutDrive(drive))?;
        }
        if let Some(vsock) = config.vsock {
            self.handle(VmmAction::PutVsock(vsock))?;
        }
        if let Some(entropy) = config.entropy {
            self.handle(VmmAction::PutEntropy(entropy))?;
        }
        for iface in config.network_interfaces {
            self.handle(VmmAction::PutNetworkInterface(iface))?;
        }
        if let Some(mmds_config) = config.mmds_config {
            self.handle(VmmAction::PutMmdsConfig(mmds_config))?;
        }
        Ok(())
    }

    fn open_metrics(&mut self, metrics: &MetricsConfig) -> Result<(), ActionError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics.metrics_path)
            .map_err(|e| {
                bad(format!(
                    "Cannot open the metrics file {}: {e}",
                    metrics.metrics_path.display()
                ))
            })?;
        self.metrics = Some(file);
        Ok(())
    }

    fn write_metrics(&mut self) -> Result<(), String> {
        let Some(file) = self.metrics.as_mut() else {
            return Ok(());
        };
        let mut block = serde_json::Map::new();
        let mut vsock = serde_json::Value::Null;
        let mut entropy = serde_json::Value::Null;
        let mut net = serde_json::Map::new();
        if let Some(running) = &self.running {
            for drive in &running.drives {
                block.insert(drive.config.drive_id.clone(), drive.metrics.to_json());
            }
            if let Some(device) = &running.vsock {
                vsock = device.metrics.to_json();
            }
            if let Some(device) = &running.entropy {
                entropy = device.metrics.to_json();
            }
            for iface in &running.nets {
                net.insert(iface.config.iface_id.clone(), iface.metrics.to_json());
            }
        }
        let utc_timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = serde_json::json!({
            "utc_timestamp_ms": utc_timestamp_ms,
            "block": block,
            "vsock": vsock,
            "entropy": entropy,
            "net": net,
        });
        writeln!(file, "{line}").map_err(|e| format!("Cannot write metrics: {e}"))?;
        self.last_metrics = Instant::now();
        Ok(())
    }

    /// Removes what the VM created on the host (the vsock socket), since the process exits
    /// without running destructors.
    fn release_host_resources(&mut self) {
        if let Some(vsock) = self.running.as_ref().and_then(|r| r.vsock.as_ref()) {
            let _ = std::fs::remove_file(lock(&vsock.device).uds_path());
        }
    }

    fn drain_inbox(&mut self) {
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        let _ = inbox.wake.read();
        let requests: Vec<_> = inbox.receiver.try_iter().collect();
        for request in requests {
            let result = self.handle(request.action);
            (request.respond)(result);
        }
    }
}

impl MutEventSubscriber for Vmm {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(inbox) = &self.inbox {
            if let Err(e) = ops.add(Events::new(inbox.wake.as_ref(), EventSet::IN)) {
                tracing::error!("cannot watch the API channel: {e:?}");
            }
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.drain_inbox();
    }
}

/// Feeds stdin to the guest's serial port, reading only as much as the UART's FIFO can take.
///
/// While the FIFO is full, stdin is not watched at all (level-triggered epoll would otherwise
/// spin); the UART's drain eventfd brings it back once the guest has read the FIFO empty.
struct SerialInput {
    serial: Arc<Mutex<crate::devices::legacy::serial::SerialConsole>>,
    /// Whether stdin is in the epoll set right now.
    watching: bool,
    /// Whether stdin reached end of file or failed; it is never watched again.
    finished: bool,
}

impl SerialInput {
    fn new(serial: Arc<Mutex<crate::devices::legacy::serial::SerialConsole>>) -> Self {
        SerialInput {
            serial,
            watching: false,
            finished: false,
        }
    }

    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    fn watch(&mut self, ops: &mut EventOps) {
        if self.watching || self.finished {
            return;
        }
        // A stdin that cannot be polled (a regular file, /dev/null) is simply not watched.
        match ops.add(Self::stdin_events()) {
            Ok(()) => self.watching = true,
            Err(e) => {
                tracing::debug!("stdin is not pollable ({e:?}); serial input disabled");
                self.finished = true;
            }
        }
    }

    fn unwatch(&mut self, ops: &mut EventOps) {
        if self.watching {
            let _ = ops.remove(Self::stdin_events());
            self.watching = false;
        }
    }

    /// Moves what stdin has (at most the FIFO's free room) into the UART.
    fn read_stdin(&mut self, ops: &mut EventOps) {
        let serial = Arc::clone(&self.serial);
        let mut serial = lock(&serial);
        let room = serial.input_room();
        if room == 0 {
            self.unwatch(ops);
            return;
        }
        let mut buffer = [0u8; 64];
        let want = room.min(buffer.len());
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe {
            libc::read(
                libc::STDIN_FILENO,
                buffer.as_mut_ptr() as *mut libc::c_void,
                want,
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                return;
            }
            tracing::debug!("stdin read failed ({error}); serial input ends");
        }
        if n <= 0 {
            self.unwatch(ops);
            self.finished = true;
            return;
        }
        serial.enqueue_input(&buffer[..n as usize]);
        if serial.input_room() == 0 {
            self.unwatch(ops);
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        let drained = lock(&self.serial).input_drained_fd();
        if let Err(e) = ops.add(Events::new_raw(drained, EventSet::IN)) {
            tracing::error!("cannot watch the serial input drain: {e:?}");
        }
        self.watch(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == libc::STDIN_FILENO {
            // A hang-up can come with data still buffered: read until end of file.
            self.read_stdin(ops);
        } else {
            lock(&self.serial).clear_input_drained();
            self.watch(ops);
        }
    }
}

/// Ends the VMM on SIGTERM/SIGINT through a signalfd, so the event loop shuts down in order.
pub struct SignalWatch {
    fd: OwnedFd,
    exit: ExitSignal,
}

impl SignalWatch {
    /// Blocks SIGTERM and SIGINT in this thread (and every thread it later spawns) and
    /// returns a signalfd for them. Call before starting any other thread.
    pub fn new(exit: ExitSignal) -> std::io::Result<SignalWatch> {
        // SAFETY: sigset operations on a local, zero-initialised set; pthread_sigmask and
        // signalfd only read it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SignalWatch {
                fd: OwnedFd::from_raw_fd(fd),
                exit,
            })
        }
    }
}

impl MutEventSubscriber for SignalWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd.as_raw_fd(), EventSet::IN)) {
            tracing::error!("cannot watch signals: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: an all-zero siginfo is valid; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: reading into `info`, which is exactly the size passed.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            self.exit.request(ExitReason::Signal(info.ssi_signo as i32));
        }
    }
}

/// Watches the exit eventfd so the loop wakes when a vCPU or device asks to stop.
struct ExitWatch(ExitSignal);

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            tracing::error!("cannot watch the exit event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }
}

/// Runs the event loop until the VM ends; returns why.
pub fn run(vmm: Vmm, signals: Option<SignalWatch>) -> ExitReason {
    let exit = vmm.exit_signal();
    let mut manager = match EventManager::<Subscriber>::new() {
        Ok(m) => m,
        Err(e) => return ExitReason::VmmError(format!("cannot create the event loop: {e:?}")),
    };
    let vmm = Arc::new(Mutex::new(vmm));
    manager.add_subscriber(vmm.clone());
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatch(exit.clone()))));
    if let Some(watch) = signals {
        manager.add_subscriber(Arc::new(Mutex::new(watch)));
    }
    loop {
        let pending: Vec<Subscriber> = std::mem::take(&mut lock(&vmm).new_subscribers);
        for subscriber in pending {
            manager.add_subscriber(subscriber);
        }
        if let Some(reason) = exit.reason() {
            let mut vmm = lock(&vmm);
            if vmm.metrics.is_some() {
                let _ = vmm.write_metrics();
            }
            vmm.release_host_resources();
            return reason;
        }
        if let Err(e) = manager.run_with_timeout(1000) {
            return ExitReason::VmmError(format!("event loop failed: {e:?}"));
        }
        let mut vmm = lock(&vmm);
        if vmm.metrics.is_some() && vmm.last_metrics.elapsed() >= METRICS_PERIOD {
            if let Err(e) = vmm.write_metrics() {
                tracing::warn!("{e}");
            }
        }
    }
}
