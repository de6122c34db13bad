//! VM lifecycle: create (image → disk, kernel → boot files, record), start (spawn the
//! supervisor), stop, kill, remove, and keeping `ps` honest when a supervisor died.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{read_message, write_message, ProcessSpec};
use kiln_image::{PullOptions, Store};
use kiln_kernel::KernelStore;
use kiln_rootfs::{DiskCache, LayerSource, MkfsExt4};
use serde::{Deserialize, Serialize};

use crate::backend::{backend, BackendKind, NetworkMode};
use crate::control::{ControlEvent, ControlRequest};
use crate::error::{EngineError, Result};
use crate::guest::{boot_files, BootFiles};
use crate::state::{now_ms, NewVm, StateStore, VmRecord, VmStatus};

/// Where one VM's files live (`<kiln root>/vms/<short id>/`).
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// The directory.
    pub dir: PathBuf,
    /// The root disk.
    pub disk: PathBuf,
    /// Serial console output.
    pub console: PathBuf,
    /// The main process's output records.
    pub output: PathBuf,
    /// The supervisor's control socket.
    pub control: PathBuf,
    /// Held locked by the live supervisor.
    pub lock: PathBuf,
}

impl VmPaths {
    /// The paths under `dir`.
    pub fn new(dir: &Path) -> Self {
        VmPaths {
            dir: dir.to_path_buf(),
            disk: dir.join("disk.ext4"),
            console: dir.join("console.log"),
            output: dir.join("output.log"),
            control: dir.join("control.sock"),
            lock: dir.join("supervisor.lock"),
        }
    }

    /// The supervisor's own log (its stdout and stderr).
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }
}

/// The kernel and initramfs, as stored in a VM's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// kiln-init initramfs.
    pub initrd: PathBuf,
}

impl From<BootFiles> for BootSpec {
    fn from(files: BootFiles) -> Self {
        BootSpec {
            kernel: files.kernel,
            initrd: files.initrd,
        }
    }
}

/// Everything about a VM that `kiln run`/`create` decided, stored with its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    /// The main process (entrypoint + cmd, env, working dir, user from the image and flags).
    pub process: ProcessSpec,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Backend.
    pub backend: BackendKind,
    /// Why that backend (for `inspect` and the user).
    pub backend_reason: String,
    /// Networking.
    pub network: NetworkMode,
    /// With [`NetworkMode::Bridge`]: the leased `ADDRESS/PREFIX` (the lease itself is in the
    /// state store, which keeps it unique).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Remove the VM when it stops.
    pub auto_remove: bool,
    /// The guest's hostname.
    pub hostname: String,
    /// Boot files.
    pub boot: BootSpec,
    /// Extra kernel command line.
    pub extra_cmdline: String,
    /// Bytes per console or output log file before it rotates (0: no cap).
    #[serde(default = "default_log_max_size")]
    pub log_max_size: u64,
}

fn default_log_max_size() -> u64 {
    crate::logfile::DEFAULT_LOG_MAX_SIZE
}

/// What `kiln create`/`run` asks for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Image reference.
    pub image: String,
    /// VM name (generated when `None`).
    pub name: Option<String>,
    /// Command (replaces the image's Cmd; with `entrypoint`, the Entrypoint too).
    pub command: Vec<String>,
    /// Replacement entrypoint (`--entrypoint`); `Some("")` clears it.
    pub entrypoint: Option<String>,
    /// Extra environment (`KEY=VALUE`, or `KEY` to take the value from kiln's environment).
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk size in bytes (0: image size plus 1 GiB).
    pub disk_size: u64,
    /// Kernel name in the kernel store (`None`: the default kernel).
    pub kernel: Option<String>,
    /// Backend.
    pub backend: BackendKind,
    /// Why.
    pub backend_reason: String,
    /// Network.
    pub network: NetworkMode,
    /// Remove when stopped.
    pub auto_remove: bool,
    /// Interactive: keep stdin open.
    pub stdin: bool,
    /// Allocate a tty.
    pub tty: bool,
    /// Initial window size for the tty.
    pub window: Option<(u16, u16)>,
    /// Pull options for a missing image.
    pub pull: PullOptions,
    /// Extra kernel command line (`--kernel-args`), after kiln's own arguments.
    pub kernel_args: String,
    /// Bytes per console or output log file before it rotates (0: no cap).
    pub log_max_size: u64,
}

/// The engine's entry point: the kiln root and its stores.
pub struct Engine {
    root: PathBuf,
    /// The VM records.
    pub state: StateStore,
}

/// The default `PATH` of a process whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Engine {
    /// Opens the engine on `root` (the kiln root).
    pub fn open(root: &Path) -> Result<Engine> {
        Ok(Engine {
            root: root.to_path_buf(),
            state: StateStore::open(root)?,
        })
    }

    /// The kiln root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a VM: resolves (pulls) the image, builds its disk and the boot files, and
    /// stores the record. Nothing is left behind on failure.
    pub fn create(&self, options: &CreateOptions) -> Result<VmRecord> {
        if options.vcpus == 0 || options.vcpus > 32 {
            return Err(EngineError::Invalid(format!(
                "--cpus {} is out of range: give 1 to 32",
                options.vcpus
            )));
        }
        if options.memory_mib < 64 {
            return Err(EngineError::Invalid(format!(
                "--memory {}M is too small: a Linux guest needs at least 64M (try 512M)",
                options.memory_mib
            )));
        }
        backend(options.backend).check()?;
        if options.kernel_args.chars().any(|c| c.is_control()) {
            return Err(EngineError::Invalid(
                "--kernel-args must be one line without control characters".into(),
            ));
        }
        if options.network == NetworkMode::Bridge {
            crate::network::check_prerequisites()?;
            crate::network::Subnet::from_env()?;
        }
        // The kernel first: cheap to check, and a missing kernel should fail before a pull.
        let kernels = KernelStore::open(&self.root)?;
        let kernel = match &options.kernel {
            Some(name) => kernels.get(name)?,
            None => kernels.ensure_default(&Default::default()).map_err(|e| {
                EngineError::Invalid(format!(
                    "no kernel to boot: {e}. Install Debian's linux-image-cloud-amd64 or import \
                     one with `kiln kernel import`"
                ))
            })?,
        };
        let boot = boot_files(&self.root, &kernel)?;

        let images = Store::open(&self.root)?;
        let lease = images.lease()?;
        let image = images.ensure(&options.image, &options.pull)?;
        let cache = DiskCache::open(&self.root)?;
        let image_id = image.config_digest.clone();
        if cache.cached(&image_id)?.is_none() {
            MkfsExt4::check_tools()?;
            let layers: Vec<LayerSource> = image
                .layers
                .iter()
                .map(|l| LayerSource::new(&l.path, &l.media_type))
                .collect();
            cache.image_disk(&image_id, &layers, 64 << 20)?;
        }
        drop(lease);

        let process = process_from_image(&image.config, options)?;
        let record = self.state.create(&NewVm {
            name: options.name.clone(),
            image: image.reference.clone(),
            image_digest: image_id.clone(),
            kernel: kernel.name.clone(),
            backend: options.backend.to_string(),
            spec: serde_json::Value::Null,
            dir: PathBuf::new(),
        })?;
        let result = (|| -> Result<VmRecord> {
            let dir = self.root.join("vms").join(record.short_id());
            std::fs::create_dir_all(&dir).map_err(|e| EngineError::io("create", &dir, e))?;
            let paths = VmPaths::new(&dir);
            let image_len = cache
                .cached(&image_id)?
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .unwrap_or(0);
            let size = if options.disk_size == 0 {
                image_len + (1 << 30)
            } else if options.disk_size < image_len {
                return Err(EngineError::Invalid(format!(
                    "--size {} is smaller than the image's filesystem ({}): give at least that",
                    kiln_image::human_size(options.disk_size),
                    kiln_image::human_size(image_len)
                )));
            } else {
                options.disk_size
            };
            cache.vm_disk(&image_id, &paths.disk, size)?;
            let address = match options.network {
                NetworkMode::Bridge => {
                    let address = self.lease_address(&record.id)?;
                    // The bridge now, so that its errors reach the user directly (the
                    // supervisor checks again before each boot).
                    let (_, subnet) = crate::network::Subnet::of_cidr(&address)?;
                    crate::network::ensure_bridge(&self.root, &subnet)?;
                    Some(address)
                }
                _ => None,
            };
            let spec = VmSpec {
                process,
                vcpus: options.vcpus,
                memory_mib: options.memory_mib,
                disk_size: size,
                backend: options.backend,
                backend_reason: options.backend_reason.clone(),
                network: options.network,
                address,
                auto_remove: options.auto_remove,
                hostname: record.short_id().to_string(),
                boot: boot.into(),
                extra_cmdline: options.kernel_args.clone(),
                log_max_size: options.log_max_size,
            };
            let spec_json = serde_json::to_value(&spec)
                .map_err(|e| EngineError::Invalid(format!("VM spec: {e}")))?;
            Ok(self.state.update(&record.id, |r| {
                r.dir = dir.clone();
                r.spec = spec_json;
            })?)
        })();
        match result {
            Ok(record) => Ok(record),
            Err(e) => {
                let dir = self.root.join("vms").join(record.short_id());
                let _ = std::fs::remove_dir_all(dir);
                let _ = self.state.remove(&record.id);
                Err(e)
            }
        }
    }

    /// Leases VM `id` an address on the bridge subnet (`KILN_SUBNET`), as `ADDRESS/PREFIX`.
    /// Removing the record releases it.
    fn lease_address(&self, id: &str) -> Result<String> {
        let subnet = crate::network::Subnet::from_env()?;
        let address = self
            .state
            .lease_address(id, |taken| subnet.pick_free(taken).map(|a| a.to_string()))?
            .ok_or_else(|| {
                EngineError::Conflict(format!(
                    "no free address left in {subnet}: remove VMs (kiln rm, kiln system prune) \
                     or set KILN_SUBNET to a larger subnet"
                ))
            })?;
        Ok(format!("{address}/{}", subnet.prefix()))
    }

    /// Starts VM `record` by spawning its supervisor, and waits until its control socket
    /// accepts. `wait_attach`: the main process waits for the first `attach`.
    pub fn start(&self, record: &VmRecord, wait_attach: bool) -> Result<VmRecord> {
        let record = self.refresh(record)?;
        if supervisor_alive(&record) {
            return Err(EngineError::Conflict(format!(
                "VM {} ({}) is already running",
                record.name,
                record.short_id()
            )));
        }
        let paths = VmPaths::new(&record.dir);
        if !paths.disk.is_file() {
            return Err(EngineError::Conflict(format!(
                "VM {} has no disk at {}: remove it with `kiln rm {}`",
                record.name,
                paths.disk.display(),
                record.name
            )));
        }
        let exe = std::env::current_exe()
            .map_err(|e| EngineError::Backend(format!("finding the kiln executable: {e}")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.supervisor_log())
            .map_err(|e| EngineError::io("open", paths.supervisor_log(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| EngineError::io("open", paths.supervisor_log(), e))?;
        let _ = std::fs::remove_file(&paths.control);
        let mut command = Command::new(exe);
        command
            .arg("__supervise")
            .arg(&record.id)
            .env("KILN_ROOT", &self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        if wait_attach {
            command.arg("--wait-attach");
        }
        // A session of its own: the terminal's Ctrl-C and hangup do not reach it.
        // SAFETY: setsid is async-signal-safe; the closure runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| EngineError::Backend(format!("starting the VM supervisor: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if UnixStream::connect(&paths.control).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(paths.supervisor_log()).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                return Err(EngineError::Backend(format!(
                    "the VM supervisor exited at once ({status}): {last}"
                )));
            }
            if Instant::now() >= deadline {
                return Err(EngineError::Backend(format!(
                    "the VM supervisor did not open {} within 30 s; see {}",
                    paths.control.display(),
                    paths.supervisor_log().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not reaped here: it runs on after we exit (then init reaps it), and a thread of ours
        // waiting on it would receive the signals the CLI forwards.
        drop(child);
        Ok(self.state.get(&record.id)?)
    }

    /// The record with its status corrected if its supervisor died without saying so.
    pub fn refresh(&self, record: &VmRecord) -> Result<VmRecord> {
        if record.status.is_active() && !supervisor_alive(record) {
            // Re-check under the store's transaction: the supervisor may just have finished.
            let pid = record.supervisor_pid;
            let updated = self.state.update(&record.id, |r| {
                if r.status.is_active() {
                    r.status = VmStatus::Exited;
                    r.status_reason = Some(match pid {
                        Some(pid) => format!("supervisor died (pid {pid})"),
                        None => "supervisor died".into(),
                    });
                    r.finished_at = Some(now_ms());
                }
            })?;
            if let Some(pid) = updated.vmm_pid {
                kill_if_ours(pid, &record.dir);
            }
            // Its tap, if it had one (a supervisor killed with -9 cannot remove it).
            let _ = crate::network::delete_tap(&crate::network::tap_name(&record.id));
            return Ok(updated);
        }
        Ok(record.clone())
    }

    /// Finds a VM by id, id prefix or name, with its status refreshed.
    pub fn get(&self, id_or_name: &str) -> Result<VmRecord> {
        let record = self.state.get(id_or_name)?;
        self.refresh(&record)
    }

    /// All VMs (running only unless `all`), statuses refreshed.
    pub fn list(&self, all: bool) -> Result<Vec<VmRecord>> {
        let mut out = Vec::new();
        for record in self.state.list(true)? {
            let record = self.refresh(&record)?;
            if all || record.status.is_active() {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Stops a running VM (SIGTERM, then SIGKILL after `timeout`), waiting for it.
    pub fn stop(&self, record: &VmRecord, timeout: Duration) -> Result<()> {
        let record = self.refresh(record)?;
        if !supervisor_alive(&record) {
            return Ok(());
        }
        let paths = VmPaths::new(&record.dir);
        match control_request(
            &paths,
            &ControlRequest::Stop {
                timeout_secs: timeout.as_secs(),
            },
        ) {
            Ok(_) => {}
            Err(e) if supervisor_alive(&record) => return Err(e),
            Err(_) => {}
        }
        // Wait for the supervisor to record the end.
        let deadline = Instant::now() + timeout + Duration::from_secs(30);
        while supervisor_alive(&record) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if supervisor_alive(&record) {
            self.kill_supervisor(&record);
        }
        Ok(())
    }

    /// Sends `signal` to the VM's main process.
    pub fn kill(&self, record: &VmRecord, signal: i32) -> Result<()> {
        let record = self.refresh(record)?;
        if !supervisor_alive(&record) {
            return Err(EngineError::Conflict(format!(
                "VM {} is not running",
                record.name
            )));
        }
        let paths = VmPaths::new(&record.dir);
        match control_request(&paths, &ControlRequest::Kill { signal })? {
            ControlEvent::Done => Ok(()),
            ControlEvent::Error { message } => Err(EngineError::Conflict(message)),
            other => Err(EngineError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    fn kill_supervisor(&self, record: &VmRecord) {
        if let Ok(fresh) = self.state.get(&record.id) {
            if let Some(pid) = fresh.supervisor_pid {
                kill_if_ours(pid, &record.dir);
            }
            if let Some(pid) = fresh.vmm_pid {
                kill_if_ours(pid, &record.dir);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while supervisor_alive(record) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes a VM: its disk, sockets, logs and record. A running VM needs `force`, which
    /// kills it first.
    pub fn remove(&self, record: &VmRecord, force: bool) -> Result<()> {
        let record = self.refresh(record)?;
        if supervisor_alive(&record) {
            if !force {
                return Err(EngineError::Conflict(format!(
                    "VM {} is running: stop it first (kiln stop {}) or use rm -f",
                    record.name, record.name
                )));
            }
            self.kill_supervisor(&record);
            if supervisor_alive(&record) {
                return Err(EngineError::Conflict(format!(
                    "could not kill the supervisor of VM {}",
                    record.name
                )));
            }
        }
        if let Some(pid) = record.vmm_pid {
            kill_if_ours(pid, &record.dir);
        }
        // A supervisor that died cannot have removed its tap.
        crate::network::delete_tap(&crate::network::tap_name(&record.id))?;
        if record.dir.as_os_str().len() > 1 && record.dir.starts_with(self.root.join("vms")) {
            match std::fs::remove_dir_all(&record.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("remove", &record.dir, e)),
            }
        }
        self.state.remove(&record.id)?;
        Ok(())
    }

    /// Removes every stopped VM and VM directories no record knows; returns the removed ids.
    pub fn prune(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for record in self.list(true)? {
            if matches!(record.status, VmStatus::Exited | VmStatus::Created) {
                self.remove(&record, false)?;
                removed.push(record.short_id().to_string());
            }
        }
        let vms = self.root.join("vms");
        let known: Vec<String> = self
            .state
            .list(true)?
            .iter()
            .map(|r| r.short_id().to_string())
            .collect();
        if let Ok(entries) = std::fs::read_dir(&vms) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !known.contains(&name) && !lock_held(&entry.path()) {
                    let _ = crate::network::delete_tap(&crate::network::tap_name(&name));
                    let _ = std::fs::remove_dir_all(entry.path());
                    removed.push(name);
                }
            }
        }
        Ok(removed)
    }
}

/// Connects to a VM's supervisor and sends one request.
pub fn connect_control(paths: &VmPaths, request: &ControlRequest) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(&paths.control).map_err(|e| {
        EngineError::Conflict(format!(
            "cannot reach the VM's supervisor at {}: {e} (is the VM running?)",
            paths.control.display()
        ))
    })?;
    write_message(&mut stream, request)?;
    Ok(stream)
}

fn control_request(paths: &VmPaths, request: &ControlRequest) -> Result<ControlEvent> {
    let mut stream = connect_control(paths, request)?;
    Ok(read_message(&mut stream)?)
}

/// Whether the supervisor of `record` is alive: it holds `supervisor.lock` for its whole life.
pub fn supervisor_alive(record: &VmRecord) -> bool {
    lock_held(&record.dir)
}

/// Whether a live supervisor holds the lock in VM directory `dir`.
fn lock_held(dir: &Path) -> bool {
    let path = VmPaths::new(dir).lock;
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
        return false;
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Kills `pid` if its command line mentions `dir` (so a reused pid is never hit).
fn kill_if_ours(pid: u32, dir: &Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ_dir = dir.to_string_lossy();
    let id_in = |hay: &[u8], needle: &[u8]| {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    };
    let short = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if id_in(&cmdline, environ_dir.as_bytes()) || id_in(&cmdline, short.as_bytes()) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Applies `-e` overrides to `env` (`KEY=VALUE` lists): `KEY=VALUE` replaces or adds,
/// `KEY` alone takes kiln's own value (and is skipped if kiln has none), as Docker does.
pub fn merge_env(env: &mut Vec<String>, overrides: &[String]) -> Result<()> {
    for entry in overrides {
        let entry = if entry.contains('=') {
            entry.clone()
        } else {
            match std::env::var(entry) {
                Ok(value) => format!("{entry}={value}"),
                Err(_) => continue,
            }
        };
        let key = entry.split('=').next().unwrap_or("").to_string();
        if key.is_empty() {
            return Err(EngineError::Invalid(format!(
                "bad environment variable {entry:?}: use KEY=VALUE"
            )));
        }
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    }
    Ok(())
}

/// The main process from the image config and the user's overrides, Docker's rules:
/// `--entrypoint` replaces Entrypoint (and drops Cmd), a command replaces Cmd, env from the
/// image then `-e`, working dir and user from the flag or the image.
pub fn process_from_image(
    config: &kiln_image::ImageConfiguration,
    options: &CreateOptions,
) -> Result<ProcessSpec> {
    let image_config = config.config().as_ref();
    let image_entrypoint = image_config
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    let image_cmd = image_config
        .and_then(|c| c.cmd().clone())
        .unwrap_or_default();
    let entrypoint = match &options.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image_entrypoint,
    };
    let cmd = if !options.command.is_empty() {
        options.command.clone()
    } else if options.entrypoint.is_some() {
        Vec::new()
    } else {
        image_cmd
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(EngineError::Invalid(format!(
            "image {} has no Entrypoint or Cmd: give a command (kiln run {} sh)",
            options.image, options.image
        )));
    }
    let mut env: Vec<String> = image_config
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    merge_env(&mut env, &options.env)?;
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if options.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let cwd = options
        .workdir
        .clone()
        .or_else(|| image_config.and_then(|c| c.working_dir().clone()))
        .filter(|w| !w.is_empty());
    if let Some(cwd) = &cwd {
        if !cwd.starts_with('/') {
            return Err(EngineError::Invalid(format!(
                "working directory {cwd:?} must be an absolute path"
            )));
        }
    }
    let user = options
        .user
        .clone()
        .or_else(|| image_config.and_then(|c| c.user().clone()))
        .filter(|u| !u.is_empty());
    Ok(ProcessSpec {
        args,
        env,
        cwd,
        user,
        tty: options.tty,
        window: options.window,
        stdin: options.stdin,
        main: true,
    })
}
