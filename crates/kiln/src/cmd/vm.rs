//! The VM commands: `run`, `create`, `start`, `stop`, `kill`, `rm`, `ps`, `logs`, `exec`,
//! `attach`, `cp`, `inspect`, `system prune`, and the hidden `__supervise` the supervisor
//! runs as.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kiln_engine::backend::{choose_backend, BackendChoice, NetworkMode};
use kiln_engine::client::{Session, SessionEnd};
use kiln_engine::control::{parse_output_log, LogRecord};
use kiln_engine::logfile::{catch_up_rotation, rotated_path};
use kiln_engine::state::{VmRecord, VmStatus};
use kiln_engine::vm::{CreateOptions, Engine, VmPaths};
use kiln_image::{ProgressMode, PullOptions};

use crate::cmd::image::parse_size;
use crate::term;

/// Exit code for failures of kiln itself (Docker's convention).
pub const EXIT_KILN_ERROR: u8 = 125;

/// Options shared by `run` and `create`.
#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Name of the VM (unique; default: a generated one).
    #[arg(long)]
    name: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory (K, M, G suffixes).
    #[arg(short = 'm', long, default_value = "512M", value_name = "SIZE")]
    memory: String,
    /// Root disk size (default: the image's filesystem plus 1G).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Kernel from `kiln kernel ls` (default: the default kernel).
    #[arg(long)]
    kernel: Option<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to pass kiln's own value).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines, # comments).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Working directory inside the VM.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User inside the VM (name, uid, name:group or uid:gid).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Replace the image's entrypoint ("" clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Keep stdin open.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Remove the VM when it stops.
    #[arg(long)]
    rm: bool,
    /// Hypervisor: auto, vmm (kiln-vmm, needs vmx/svm) or qemu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Network: bridge (the NAT bridge kiln0, an address of the VM's own from KILN_SUBNET,
    /// default 10.88.0.0/16; needs root, iproute2 and nftables), user (QEMU's user-mode NAT,
    /// qemu backend only) or none. Default: bridge with the vmm backend, user with qemu.
    #[arg(long, default_value = "default")]
    network: String,
    /// Extra kernel command line arguments (for example "kiln.debug" for kiln-init's boot log
    /// on the console, see `kiln logs --console`).
    #[arg(long = "kernel-args", value_name = "ARGS", default_value = "")]
    kernel_args: String,
    /// Size at which the console and output logs rotate: each keeps its current file and
    /// the one before, so a chatty VM takes at most about twice this per log (0: no cap).
    #[arg(long = "log-max-size", value_name = "SIZE", default_value = "16M")]
    log_max_size: String,
    /// Registries to reach over plain HTTP when pulling.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Image to boot.
    image: String,
    /// Command and arguments (default: the image's Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `kiln run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run in the background and print the VM's ID.
    #[arg(short = 'd', long)]
    detach: bool,
    #[command(flatten)]
    create: CreateArgs,
}

/// `kiln start`.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// Attach to the main process's output and return its exit code.
    #[arg(short = 'a', long)]
    attach: bool,
    /// VMs (ID, ID prefix or name).
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `kiln stop`.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u64,
    /// VMs.
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `kiln kill`.
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal (name like TERM or SIGTERM, or number).
    #[arg(short = 's', long, default_value = "KILL")]
    signal: String,
    /// VMs.
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `kiln rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill and remove running VMs too.
    #[arg(short = 'f', long)]
    force: bool,
    /// VMs.
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `kiln ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show stopped VMs too.
    #[arg(short = 'a', long)]
    all: bool,
    /// Only IDs.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// `kiln logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep following new output until the VM stops.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Show the serial console (kernel and init messages) instead of the process's output.
    #[arg(long)]
    console: bool,
    /// Only the last N lines (then follow, with -f).
    #[arg(short = 'n', long, value_name = "N")]
    tail: Option<usize>,
    /// Start each line with the time kiln received it (RFC 3339, UTC).
    #[arg(short = 't', long)]
    timestamps: bool,
    /// Only output received since a time (2026-12-07T16:30:00Z) or for a duration (10m).
    #[arg(long, value_name = "TIME|DURATION")]
    since: Option<String>,
    /// VM.
    vm: String,
}

/// Where the last `lines` lines of the byte chunks start: (chunk index, offset in it).
fn tail_start(chunks: &[&[u8]], lines: usize) -> (usize, usize) {
    let ends_with_newline = chunks
        .iter()
        .rev()
        .find(|c| !c.is_empty())
        .is_some_and(|c| c.last() == Some(&b'\n'));
    // The newline that ends the line before the ones wanted.
    let mut to_skip = lines + usize::from(ends_with_newline);
    for (i, chunk) in chunks.iter().enumerate().rev() {
        for (j, &byte) in chunk.iter().enumerate().rev() {
            if byte == b'\n' {
                to_skip -= 1;
                if to_skip == 0 {
                    return (i, j + 1);
                }
            }
        }
    }
    (0, 0)
}

/// `kiln exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// VM.
    vm: String,
    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `kiln attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Attach to the main process (its output, and its stdin and terminal when it was started
    /// with -i/-t) instead of the serial console: the way back into a `run -it` session left
    /// with Ctrl-P Ctrl-Q, as `docker attach` does.
    #[arg(long)]
    main: bool,
    /// VM.
    vm: String,
}

/// `kiln cp`.
#[derive(Args, Debug)]
pub struct CpArgs {
    /// Source: VM:PATH or a host path.
    src: String,
    /// Destination: VM:PATH or a host path.
    dst: String,
}

/// `kiln inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// VMs.
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `kiln __supervise` (internal).
#[derive(Args, Debug)]
pub struct SuperviseArgs {
    /// VM ID.
    id: String,
    /// Hold the main process until a client attaches.
    #[arg(long)]
    wait_attach: bool,
}

fn engine() -> anyhow::Result<Engine> {
    let root = kiln_image::root();
    Engine::open(&root).with_context(|| format!("opening kiln's state in {}", root.display()))
}

fn parse_env_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading env file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// The host's RAM in bytes (MemTotal), if /proc/meminfo says.
fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn create_options(args: &CreateArgs) -> anyhow::Result<CreateOptions> {
    let memory = parse_size(&args.memory).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    let memory_mib = memory / (1 << 20);
    if memory_mib < 64 {
        bail!(
            "--memory {} is too small: a Linux guest needs at least 64M (for example --memory 512M)",
            args.memory
        );
    }
    let memory_mib = u32::try_from(memory_mib)
        .map_err(|_| anyhow::anyhow!("--memory {} is too large", args.memory))?;
    if let Some(host) = host_memory() {
        if memory > host {
            bail!(
                "--memory {} is more than this host has ({}): give less",
                args.memory,
                kiln_image::human_size(host)
            );
        }
    }
    let disk_size = match &args.size {
        Some(size) => parse_size(size).map_err(|e| anyhow::anyhow!("--size: {e}"))?,
        None => 0,
    };
    let choice: BackendChoice = args.backend.parse()?;
    let (backend, reason) = choose_backend(choice);
    let vmm = backend == kiln_engine::backend::BackendKind::Vmm;
    let network = match args.network.as_str() {
        "bridge" => NetworkMode::Bridge,
        "user" if vmm => bail!(
            "the vmm backend has no user-mode network: use --network bridge (its default) or none"
        ),
        "user" => NetworkMode::User,
        "none" => NetworkMode::None,
        "default" if !vmm => NetworkMode::User,
        "default" => match kiln_engine::network::check_prerequisites() {
            Ok(()) => NetworkMode::Bridge,
            Err(e) => {
                eprintln!(
                    "kiln: no bridge network, the VM gets loopback only ({e}; --network none \
                     silences this)"
                );
                NetworkMode::None
            }
        },
        other => bail!("unknown --network {other:?}: use bridge, user or none"),
    };
    let mut env = Vec::new();
    for file in &args.env_file {
        env.extend(parse_env_file(file)?);
    }
    env.extend(args.env.iter().cloned());
    let window = if args.tty {
        term::window_size(0).or(Some((24, 80)))
    } else {
        None
    };
    Ok(CreateOptions {
        image: args.image.clone(),
        name: args.name.clone(),
        command: args.command.clone(),
        entrypoint: args.entrypoint.clone(),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        vcpus: args.cpus,
        memory_mib,
        disk_size,
        kernel: args.kernel.clone(),
        backend,
        backend_reason: reason,
        network,
        auto_remove: args.rm,
        stdin: args.interactive,
        tty: args.tty,
        window,
        kernel_args: args.kernel_args.clone(),
        log_max_size: parse_size(&args.log_max_size)
            .map_err(|e| anyhow::anyhow!("--log-max-size: {e}"))?,
        pull: PullOptions {
            insecure_registries: args.insecure_registries.clone(),
            progress: ProgressMode::Auto,
            ..PullOptions::default()
        },
    })
}

fn announce_backend(options: &CreateOptions, choice: &str) {
    if choice == "auto" {
        eprintln!("kiln: backend {}", options.backend_reason);
    }
}

/// `kiln run`: create, start, attach; the exit code is the main process's.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let options = create_options(&args.create)?;
    if args.create.tty && !args.detach && !term::is_tty(0) {
        bail!("the input device is not a TTY: drop -t, or run kiln from a terminal");
    }
    let engine = engine()?;
    announce_backend(&options, &args.create.backend);
    let record = engine.create(&options)?;
    if args.detach {
        engine.start(&record, false)?;
        println!("{}", record.id);
        return Ok(0);
    }
    *lock_ignoring_poison(&PENDING_VM) = Some(record.id.clone());
    start_attached(&engine, &record, options.stdin, options.tty)
}

/// `kiln create`: prints the new VM's ID.
pub fn create(args: CreateArgs) -> anyhow::Result<u8> {
    let options = create_options(&args)?;
    let engine = engine()?;
    announce_backend(&options, &args.backend);
    let record = engine.create(&options)?;
    println!("{}", record.id);
    Ok(0)
}

/// Starts `record` with the main process held until we attach, then follows it.
fn start_attached(
    engine: &Engine,
    record: &VmRecord,
    stdin: bool,
    tty: bool,
) -> anyhow::Result<u8> {
    // Opened before the supervisor starts: it may fail and remove the directory (--rm) at
    // once, and we must still be able to wait for it to finish doing so.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(VmPaths::new(&record.dir).lock)
        .ok();
    // Waits until the supervisor has recorded the end (and removed the VM for --rm), so that
    // nothing of a finished `run --rm` is left when kiln returns, on success or error.
    let wait_for_supervisor = || {
        if let Some(lock) = &lock {
            let _ = rustix::fs::flock(lock, rustix::fs::FlockOperation::LockShared);
        }
    };
    let record = engine.start(record, true)?;
    let paths = VmPaths::new(&record.dir);
    let end = match Session::attach(&paths, stdin)
        .map_err(anyhow::Error::from)
        .and_then(|session| follow(session, stdin, tty))
    {
        Ok(end) => end,
        Err(e) => {
            wait_for_supervisor();
            return Err(e);
        }
    };
    if DETACHED.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(0);
    }
    wait_for_supervisor();
    report_end(&end)
}

/// Text from the guest made safe for the user's terminal: control characters (escape
/// sequences a hostile guest could use to rewrite the screen) are shown escaped.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn report_end(end: &SessionEnd) -> anyhow::Result<u8> {
    if let SessionEnd::Failed { message, code } = end {
        eprintln!("kiln: {}", printable(message));
        return Ok(u8::try_from(*code).unwrap_or(EXIT_KILN_ERROR));
    }
    Ok(u8::try_from(end.code()).unwrap_or(EXIT_KILN_ERROR))
}

/// The VM a foreground `kiln run` created and has not reached the process of yet: removed if
/// the user interrupts the run before that.
static PENDING_VM: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Ctrl-P Ctrl-Q: leave a `-it` session with the process still running.
const DETACH_KEYS: &[u8] = &[0x10, 0x11];

/// Set when the user detached with [`DETACH_KEYS`].
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the signal thread forwards Ctrl-C, SIGTERM and window changes; until a session is
/// up, those signals end kiln.
static FORWARD_TO: std::sync::Mutex<Option<kiln_engine::client::SessionInput>> =
    std::sync::Mutex::new(None);

/// Takes SIGINT, SIGTERM, SIGHUP and SIGWINCH on a thread of their own, for the whole run of a
/// foreground command: blocked in every thread (this must run before any other thread
/// starts), then forwarded to the session once there is one.
pub fn forward_signals() {
    let signals = term::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH]);
    std::thread::spawn(move || loop {
        let signal = term::wait_signal(&signals);
        let mut target = lock_ignoring_poison(&FORWARD_TO);
        match target.as_mut() {
            Some(input) => {
                let sent = if signal == libc::SIGWINCH {
                    match term::window_size(0) {
                        Some((rows, cols)) => input.resize(rows, cols),
                        None => Ok(()),
                    }
                } else {
                    input.signal(signal)
                };
                if sent.is_err() {
                    *target = None;
                }
            }
            None if signal == libc::SIGWINCH => {}
            None => {
                // Interrupted before the process was reached: a VM made for this run goes.
                let pending = lock_ignoring_poison(&PENDING_VM).take();
                if let Some(id) = pending {
                    eprintln!("kiln: interrupted; removing the VM");
                    if let Ok(engine) = engine() {
                        if let Ok(record) = engine.get(&id) {
                            let _ = engine.remove(&record, true);
                        }
                    }
                }
                std::process::exit(128 + signal)
            }
        }
    });
}

/// Runs a session in the foreground: stdin forwarded (with `stdin`), the terminal in raw mode
/// and resizes forwarded (with `tty`), Ctrl-C and SIGTERM forwarded as signals (without
/// `tty`; with one, Ctrl-C is a byte for the guest's terminal).
fn follow(mut session: Session, stdin: bool, tty: bool) -> anyhow::Result<SessionEnd> {
    let mut input = session.input()?;
    {
        // From here on, signals go to the process and the VM is the user's.
        let mut forward = lock_ignoring_poison(&FORWARD_TO);
        *forward = Some(input.try_clone()?);
        lock_ignoring_poison(&PENDING_VM).take();
    }
    let raw = if tty { term::RawMode::enable(0) } else { None };
    if stdin {
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut lock = stdin.lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match lock.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // Ctrl-P Ctrl-Q detaches a terminal session, as in Docker.
                        let detach_at = tty
                            .then(|| buf[..n].windows(2).position(|w| w == DETACH_KEYS))
                            .flatten();
                        let data = &buf[..detach_at.unwrap_or(n)];
                        if !data.is_empty() && input.stdin(data).is_err() {
                            return;
                        }
                        if detach_at.is_some() {
                            DETACHED.store(true, std::sync::atomic::Ordering::SeqCst);
                            input.detach();
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = input.close_stdin();
        });
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let end = session.wait(&mut stdout.lock(), &mut stderr.lock());
    drop(raw);
    if DETACHED.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!(
            "kiln: detached; the VM runs on (kiln attach --main, kiln logs -f, kiln exec, kiln stop)"
        );
        return Ok(SessionEnd::Exited(0));
    }
    end.map_err(Into::into)
}

/// `kiln start`.
pub fn start(args: StartArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    if args.attach {
        if args.vms.len() != 1 {
            bail!("start -a takes exactly one VM");
        }
        let record = engine.get(&args.vms[0])?;
        let spec: kiln_engine::vm::VmSpec =
            serde_json::from_value(record.spec.clone()).context("reading the VM's stored spec")?;
        return start_attached(&engine, &record, spec.process.stdin, spec.process.tty);
    }
    let mut failed = false;
    for vm in &args.vms {
        match engine.get(vm).and_then(|r| engine.start(&r, false)) {
            Ok(_) => println!("{vm}"),
            Err(e) => {
                eprintln!("kiln: {vm}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// `kiln stop`.
pub fn stop(args: StopArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    let mut failed = false;
    for vm in &args.vms {
        match engine
            .get(vm)
            .and_then(|r| engine.stop(&r, Duration::from_secs(args.time)))
        {
            Ok(()) => println!("{vm}"),
            Err(e) => {
                eprintln!("kiln: {vm}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// Parses a signal name (`TERM`, `SIGTERM`) or number.
pub fn parse_signal(text: &str) -> anyhow::Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {n} is out of range (1-64)");
    }
    let name = text.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => bail!("unknown signal {text:?}: use a name like TERM or a number"),
    };
    Ok(signal)
}

/// `kiln kill`.
pub fn kill(args: KillArgs) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let engine = engine()?;
    let mut failed = false;
    for vm in &args.vms {
        match engine.get(vm).and_then(|r| engine.kill(&r, signal)) {
            Ok(()) => println!("{vm}"),
            Err(e) => {
                eprintln!("kiln: {vm}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// `kiln rm`.
pub fn rm(args: RmArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    let mut failed = false;
    for vm in &args.vms {
        match engine.get(vm).and_then(|r| engine.remove(&r, args.force)) {
            Ok(()) => println!("{vm}"),
            Err(e) => {
                eprintln!("kiln: {vm}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=1 => "just now".into(),
        2..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

fn status_text(record: &VmRecord) -> String {
    match record.status {
        VmStatus::Exited => match (record.exit_code, &record.status_reason) {
            (Some(code), _) => format!(
                "Exited ({code}) {}",
                record.finished_at.map(ago).unwrap_or_default()
            ),
            (None, Some(reason)) => format!("Exited: {reason}"),
            (None, None) => "Exited".into(),
        },
        VmStatus::Running => format!(
            "Up since {}",
            record.started_at.map(ago).unwrap_or_default()
        ),
        other => {
            let text = other.to_string();
            let mut chars = text.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => text,
            }
        }
    }
}

fn command_text(record: &VmRecord) -> String {
    let args: Vec<String> = record
        .spec
        .get("process")
        .and_then(|p| p.get("args"))
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let text = args.join(" ");
    if text.chars().count() > 24 {
        format!("\"{}…\"", text.chars().take(22).collect::<String>())
    } else {
        format!("\"{text}\"")
    }
}

/// `kiln ps`.
pub fn ps(args: PsArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    let records = engine.list(args.all)?;
    if args.quiet {
        for r in &records {
            println!("{}", r.short_id());
        }
        return Ok(0);
    }
    match args.format.as_str() {
        "json" => {
            let list: Vec<serde_json::Value> = records.iter().map(VmRecord::to_json).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        "table" => {
            let rows: Vec<[String; 7]> = records
                .iter()
                .map(|r| {
                    [
                        r.short_id().to_string(),
                        r.image.clone(),
                        command_text(r),
                        ago(r.created_at),
                        status_text(r),
                        r.backend.clone(),
                        r.name.clone(),
                    ]
                })
                .collect();
            let header = [
                "VM ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "BACKEND", "NAME",
            ];
            let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row.iter()) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<&str>| {
                let mut out = String::new();
                for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                    if i + 1 == cells.len() {
                        out.push_str(cell);
                    } else {
                        out.push_str(&format!("{cell:<w$}   ", w = *w));
                    }
                }
                out
            };
            println!("{}", line(header.to_vec()));
            for row in &rows {
                println!("{}", line(row.iter().map(String::as_str).collect()));
            }
        }
        other => bail!("unknown --format {other:?}: use table or json"),
    }
    Ok(0)
}

/// Writes `output.log` records to the user's stdout and stderr, with `--timestamps` and
/// `--since` applied line by line.
struct LogPrinter {
    /// The console log is plain bytes, not records.
    console: bool,
    timestamps: bool,
    since_ns: Option<u64>,
    /// Per stream (stdout, stderr): whether the next byte starts a line.
    at_line_start: [bool; 2],
    /// The start of a record not yet whole.
    pending: Vec<u8>,
}

impl LogPrinter {
    fn new(args: &LogsArgs) -> anyhow::Result<LogPrinter> {
        let since_ns = args.since.as_deref().map(parse_since).transpose()?;
        Ok(LogPrinter {
            console: args.console,
            timestamps: args.timestamps,
            since_ns,
            at_line_start: [true, true],
            pending: Vec::new(),
        })
    }

    /// Prints the next bytes read from the log: every whole record in them (with what was
    /// pending before), or, for the console, the bytes themselves.
    fn feed(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.console {
            return std::io::stdout().lock().write_all(bytes);
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(bytes);
        let used = parse_output_log(&pending, |r| self.print(r));
        pending.drain(..used);
        self.pending = pending;
        Ok(())
    }

    /// Whether `--since` keeps this record (records without a time are kept).
    fn wanted(&self, record: &LogRecord<'_>) -> bool {
        match (self.since_ns, record.time_ns) {
            (Some(since), Some(time)) => time >= since,
            _ => true,
        }
    }

    fn print(&mut self, record: LogRecord<'_>) {
        if !self.wanted(&record) {
            return;
        }
        let stream = usize::from(record.stderr);
        let mut out: Box<dyn Write> = if record.stderr {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        let stamp = match (self.timestamps, record.time_ns) {
            (true, Some(ns)) => Some(humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + Duration::from_nanos(ns),
            )),
            _ => None,
        };
        let Some(stamp) = stamp else {
            let _ = out.write_all(record.data);
            self.at_line_start[stream] = record.data.last() == Some(&b'\n');
            return;
        };
        for line in record.data.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start[stream] {
                let _ = write!(out, "{stamp} ");
            }
            let _ = out.write_all(line);
            self.at_line_start[stream] = line.last() == Some(&b'\n');
        }
    }
}

/// `--since`: an RFC 3339 time (`2026-12-07T16:30:00Z`, or without the zone, as UTC) or a
/// duration back from now (`10m`, `1h 30m`).
fn parse_since(text: &str) -> anyhow::Result<u64> {
    let time = if let Ok(ago) = humantime::parse_duration(text) {
        std::time::SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(std::time::UNIX_EPOCH)
    } else if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        time
    } else {
        bail!(
            "--since {text:?} is neither a time like 2026-12-07T16:30:00Z nor a duration like 10m"
        );
    };
    Ok(time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
}

/// `kiln logs`.
pub fn logs(args: LogsArgs) -> anyhow::Result<u8> {
    if args.console && (args.timestamps || args.since.is_some()) {
        bail!("--timestamps and --since apply to the process's output, not to --console");
    }
    let mut printer = LogPrinter::new(&args)?;
    let engine = engine()?;
    let record = engine.get(&args.vm)?;
    let paths = VmPaths::new(&record.dir);
    let path = if args.console {
        paths.console.clone()
    } else {
        paths.output.clone()
    };
    let open = |path: &std::path::Path| match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    };
    // The log's previous part, if it has rotated, comes first. (Read before the current
    // file is opened: a rotation in between shows the moved part twice rather than losing it.)
    let mut earlier = Vec::new();
    if let Some(mut f) = open(&rotated_path(&path))? {
        f.read_to_end(&mut earlier)?;
    }
    let mut file = open(&path)?;
    if let (Some(lines), Some(f)) = (args.tail, file.as_mut()) {
        let mut all = std::mem::take(&mut earlier);
        f.read_to_end(&mut all)?;
        if args.console {
            let (_, at) = tail_start(&[&all], lines);
            printer.feed(&all[at..])?;
        } else {
            // Whole records only; a record still being written is picked up below.
            let mut records = Vec::new();
            let used = parse_output_log(&all, |r| {
                if printer.wanted(&r) {
                    records.push(r);
                }
            });
            let chunks: Vec<&[u8]> = records.iter().map(|r| r.data).collect();
            let (first, offset) = tail_start(&chunks, lines);
            for (i, record) in records.iter().enumerate().skip(first) {
                let data = if i == first {
                    &record.data[offset..]
                } else {
                    record.data
                };
                printer.print(LogRecord { data, ..*record });
            }
            printer.feed(&all[used..])?;
        }
    } else {
        printer.feed(&earlier)?;
        // Each part holds whole records; a fragment at the end of the earlier one (a
        // supervisor killed mid-write) must not run into the current part.
        printer.pending.clear();
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut progressed = false;
        if let Some(f) = file.as_mut() {
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                progressed = true;
                printer.feed(&buf[..n])?;
            }
            std::io::stdout().lock().flush()?;
        } else if args.follow {
            file = open(&path).ok().flatten();
        }
        if !args.follow {
            break;
        }
        if progressed {
            continue;
        }
        if let Some(f) = file.as_mut() {
            // The supervisor moved our file aside: what it wrote there (and in a part that
            // came and went while we slept) is read first, then the new file.
            if let Some((unread, new)) = catch_up_rotation(f, &path)? {
                printer.feed(&unread)?;
                file = Some(new);
                continue;
            }
        }
        let fresh = engine.get(&record.id);
        if !fresh.as_ref().is_ok_and(|r| r.status.is_active()) {
            // One last read for output written just before the end, across a last rotation.
            let mut rest = Vec::new();
            if let Some(mut f) = file.take() {
                f.read_to_end(&mut rest)?;
                if let Some((unread, mut new)) = catch_up_rotation(&mut f, &path)? {
                    rest.extend_from_slice(&unread);
                    new.read_to_end(&mut rest)?;
                }
            }
            printer.feed(&rest)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}

/// `kiln exec`: the exit code is the process's.
pub fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    if args.tty && !term::is_tty(0) {
        bail!("the input device is not a TTY: drop -t, or run kiln from a terminal");
    }
    let engine = engine()?;
    let record = engine.get(&args.vm)?;
    if record.status != VmStatus::Running {
        bail!(
            "VM {} is not running ({}): start it with `kiln start {}`",
            record.name,
            record.status,
            record.name
        );
    }
    let spec: kiln_engine::vm::VmSpec =
        serde_json::from_value(record.spec.clone()).context("reading the VM's stored spec")?;
    let mut env = spec.process.env.clone();
    kiln_engine::vm::merge_env(&mut env, &args.env)?;
    let process = kiln_agent_protocol::ProcessSpec {
        args: args.command.clone(),
        env,
        cwd: args.workdir.clone().or(spec.process.cwd.clone()),
        user: args.user.clone().or(spec.process.user.clone()),
        tty: args.tty,
        window: if args.tty { term::window_size(0) } else { None },
        stdin: args.interactive,
        main: false,
    };
    let paths = VmPaths::new(&record.dir);
    let session = Session::exec(&paths, process)?;
    let end = follow(session, args.interactive, args.tty)?;
    report_end(&end)
}

/// `kiln attach`: the serial console (Ctrl-] detaches), or with `--main` the main process.
pub fn attach(args: AttachArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    let record = engine.get(&args.vm)?;
    if record.status != VmStatus::Running && record.status != VmStatus::Starting {
        bail!("VM {} is not running ({})", record.name, record.status);
    }
    let paths = VmPaths::new(&record.dir);
    if args.main {
        return attach_main(&record, &paths);
    }
    let mut session = Session::console(&paths)?;
    let mut input = session.input()?;
    // Shared with the input thread, which ends the process on Ctrl-]: whoever finishes first
    // restores the terminal.
    let raw = std::sync::Arc::new(std::sync::Mutex::new(term::RawMode::enable(0)));
    if lock_ignoring_poison(&raw).is_some() {
        eprint!(
            "kiln: attached to the console of {}; Ctrl-] detaches\r\n",
            record.name
        );
    }
    let raw_for_input = raw.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        loop {
            match lock.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(at) = buf[..n].iter().position(|&b| b == 0x1d) {
                        let _ = input.stdin(&buf[..at]);
                        break;
                    }
                    if input.stdin(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        // Detach: the console session has no end of its own, so end the process here, with
        // the terminal restored first.
        let _ = input.close_stdin();
        lock_ignoring_poison(&raw_for_input).take();
        std::process::exit(0);
    });
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let _ = session.wait(&mut stdout.lock(), &mut stderr.lock());
    lock_ignoring_poison(&raw).take();
    Ok(0)
}

/// `kiln attach --main`: follows the main process as `kiln run` does, with stdin and the
/// terminal as the VM was created with; the exit code is the process's when it ends.
fn attach_main(record: &VmRecord, paths: &VmPaths) -> anyhow::Result<u8> {
    let spec: kiln_engine::vm::VmSpec =
        serde_json::from_value(record.spec.clone()).context("reading the VM's stored spec")?;
    let (stdin, tty) = (spec.process.stdin, spec.process.tty);
    if tty && stdin && !term::is_tty(0) {
        bail!(
            "VM {} runs its process on a terminal: attach from a terminal, or use kiln logs -f",
            record.name
        );
    }
    let session = Session::attach(paths, stdin)?;
    if tty {
        // The size may have changed since the process last saw a terminal.
        if let (Some((rows, cols)), Ok(mut input)) = (term::window_size(0), session.input()) {
            let _ = input.resize(rows, cols);
        }
    }
    let end = follow(session, stdin, tty)?;
    if DETACHED.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(0);
    }
    report_end(&end)
}

/// Locks a mutex whose data stays usable even if a thread panicked holding it.
fn lock_ignoring_poison<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// `kiln inspect`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    let mut out = Vec::new();
    for vm in &args.vms {
        out.push(engine.get(vm)?.to_json());
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

/// `kiln system prune`.
pub fn prune() -> anyhow::Result<u8> {
    let engine = engine()?;
    for id in engine.prune()? {
        println!("removed {id}");
    }
    Ok(0)
}

/// `kiln __supervise`.
pub fn supervise(args: SuperviseArgs) -> anyhow::Result<u8> {
    let root = kiln_image::root();
    kiln_engine::supervisor::run(&root, &args.id, args.wait_attach)?;
    Ok(0)
}

/// Whether `arg` names a VM path (`VM:PATH`).
fn split_vm_path(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    if vm.is_empty() || vm.contains('/') {
        return None;
    }
    Some((vm, path))
}

/// `kiln cp`: a file or directory between the host and a running VM, in either direction,
/// with Docker's rules: into an existing directory, or to a new name.
pub fn cp(args: CpArgs) -> anyhow::Result<u8> {
    let engine = engine()?;
    match (split_vm_path(&args.src), split_vm_path(&args.dst)) {
        (Some((vm, path)), None) => {
            let record = running(&engine, vm)?;
            copy_out(&VmPaths::new(&record.dir), path, Path::new(&args.dst))
        }
        (None, Some((vm, path))) => {
            let record = running(&engine, vm)?;
            copy_in(&VmPaths::new(&record.dir), Path::new(&args.src), path)
        }
        (Some(_), Some(_)) => {
            bail!("copying between two VMs is not supported: copy through the host")
        }
        (None, None) => bail!("one of source and destination must be VM:PATH"),
    }
}

fn running(engine: &Engine, vm: &str) -> anyhow::Result<VmRecord> {
    let record = engine.get(vm)?;
    if record.status != VmStatus::Running {
        bail!("VM {} is not running ({})", record.name, record.status);
    }
    Ok(record)
}

fn base_name(path: &str) -> anyhow::Result<String> {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| anyhow::anyhow!("{path:?} has no file name to copy"))
}

fn copy_out(paths: &VmPaths, guest_path: &str, dest: &Path) -> anyhow::Result<u8> {
    if !guest_path.starts_with('/') {
        bail!("the VM path {guest_path:?} must be absolute");
    }
    let name = base_name(guest_path)?;
    // Where the entry lands: into an existing directory, or as `dest` itself.
    let (parent, final_path) = if dest.is_dir() {
        (dest.to_path_buf(), dest.join(&name))
    } else {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!("destination directory {} does not exist", parent.display());
        }
        (parent, dest.to_path_buf())
    };
    let mut session = Session::copy_out(paths, guest_path)?;
    if let Some(end) = session.wait_started()? {
        return report_end(&end);
    }
    let staging = tempfile::Builder::new()
        .prefix(".kiln-cp-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let (reader, mut writer) = std::io::pipe().context("creating a pipe")?;
    let staging_path = staging.path().to_path_buf();
    let unpacker = std::thread::spawn(move || -> std::io::Result<()> {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        // unpack() refuses entries that would land outside the staging directory.
        archive.unpack(&staging_path)
    });
    let mut stderr = std::io::stderr();
    let end = session.wait(&mut writer, &mut stderr)?;
    drop(writer);
    let unpacked = unpacker
        .join()
        .map_err(|_| anyhow::anyhow!("the unpacking thread panicked"))?;
    if end.code() != 0 {
        return report_end(&end);
    }
    unpacked.context("unpacking the archive from the VM")?;
    let staged = staging.path().join(&name);
    if final_path.is_dir() && !staged.is_dir() {
        bail!(
            "cannot overwrite directory {} with a file",
            final_path.display()
        );
    }
    if final_path.is_dir() {
        merge_dir(&staged, &final_path)?;
    } else {
        std::fs::rename(&staged, &final_path)
            .with_context(|| format!("moving into place {}", final_path.display()))?;
    }
    Ok(0)
}

/// Moves the contents of `src` into the existing directory `dst`, recursively.
fn merge_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let target = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() && target.is_dir() {
            merge_dir(&entry.path(), &target)?;
        } else {
            std::fs::rename(entry.path(), &target)
                .with_context(|| format!("moving into place {}", target.display()))?;
        }
    }
    Ok(())
}

fn copy_in(paths: &VmPaths, src: &Path, guest_path: &str) -> anyhow::Result<u8> {
    if !guest_path.starts_with('/') {
        bail!("the VM path {guest_path:?} must be absolute");
    }
    let meta =
        std::fs::symlink_metadata(src).with_context(|| format!("source {}", src.display()))?;
    let src_name = src
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| anyhow::anyhow!("{} has no file name to copy", src.display()))?;
    // Into the directory `guest_path` if it is one, else as `guest_path` in its parent.
    let mut session = Session::copy_in(paths, guest_path)?;
    let (mut session, name) = match session.wait_started()? {
        None => (session, src_name),
        Some(_) => {
            let parent = Path::new(guest_path)
                .parent()
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_else(|| "/".into());
            let mut retry = Session::copy_in(paths, &parent)?;
            if let Some(end) = retry.wait_started()? {
                return report_end(&end);
            }
            (retry, base_name(guest_path)?)
        }
    };
    let mut input = session.input()?;
    let src = src.to_path_buf();
    let is_dir = meta.is_dir();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let (reader, writer) = std::io::pipe()?;
        let builder = std::thread::spawn(move || -> std::io::Result<()> {
            let mut builder = tar::Builder::new(writer);
            builder.follow_symlinks(false);
            if is_dir {
                builder.append_dir_all(&name, &src)?;
            } else {
                builder.append_path_with_name(&src, &name)?;
            }
            builder.finish()
        });
        input.pump(reader)?;
        builder
            .join()
            .map_err(|_| anyhow::anyhow!("the archiving thread panicked"))??;
        Ok(())
    });
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let end = session.wait(&mut stdout.lock(), &mut stderr.lock())?;
    if let Ok(Err(e)) = sender.join() {
        if end.code() == 0 {
            return Err(e.context("sending the archive"));
        }
    }
    report_end(&end)
}

#[cfg(test)]
mod tests {
    use super::{printable, tail_start};

    #[test]
    fn tail_finds_the_last_lines_across_chunks() {
        let a: &[u8] = b"one\ntwo\nthr";
        let b: &[u8] = b"ee\nfour\n";
        assert_eq!(tail_start(&[a, b], 1), (1, 3));
        assert_eq!(tail_start(&[a, b], 2), (0, 8));
        assert_eq!(tail_start(&[a, b], 3), (0, 4));
        assert_eq!(tail_start(&[a, b], 10), (0, 0));
        assert_eq!(tail_start(&[b"x\ny".as_slice()], 1), (0, 2));
        assert_eq!(tail_start(&[a, b], 0), (1, 8));
    }

    #[test]
    fn guest_text_cannot_smuggle_terminal_escapes() {
        assert_eq!(printable("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(printable("\u{1b}[2Jgone"), "\\u{1b}[2Jgone");
    }
}
