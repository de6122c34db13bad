//! The per-VM supervisor: one process per running VM that outlives the CLI that started it.
//!
//! It owns the hypervisor process (which dies with it: parent-death signal), the serial
//! console (`console.log`, and `kiln attach` clients), the connection to kiln-init, the main
//! process's output (`output.log`), and the control socket the CLI talks to. It holds an
//! exclusive lock on `supervisor.lock` for its whole life: a CLI that can take that lock knows
//! the supervisor is gone, whatever happened to it (even `kill -9`).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{
    read_message, write_message, ExitStatus, GuestConfig, GuestMessage, HostMessage, SessionId,
    Stream, MAX_CHUNK, PROTOCOL_VERSION, WINDOW,
};

use crate::backend::{backend, LaunchSpec, Launched, NetworkMode};
use crate::control::{self, log_tag, ControlEvent, ControlRequest};
use crate::error::{EngineError, Result};
use crate::logfile::RotatingLog;
use crate::state::{now_ms, StateStore, VmStatus};
use crate::vm::{VmPaths, VmSpec};

/// The main process's session id.
const MAIN_SESSION: SessionId = 1;

/// How long a booting guest may take to reach its agent (TCG boots on a loaded host are slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A client attached to the main session may lag this much before it is dropped, so a stuck
/// client cannot make the supervisor buffer without bound.
const MAX_CLIENT_BACKLOG: usize = 16 << 20;

/// Events the supervisor's main thread waits for.
enum Event {
    MainExited(ExitStatus),
    MainFailed { message: String, code: i32 },
    AgentLost(String),
    HypervisorExited(String),
    Stop { timeout: Duration, done: Sender<()> },
}

/// A session's consumer: a CLI connection's writer.
struct Sink {
    tx: Sender<ControlEvent>,
    /// Bytes queued and not yet written by the writer (main-session clients only).
    backlog: Arc<AtomicU32>,
}

/// State shared by the supervisor's threads.
struct Shared {
    agent: Mutex<Option<UnixStream>>,
    sessions: Mutex<HashMap<SessionId, Sink>>,
    main_clients: Mutex<Vec<Sink>>,
    attached: (Mutex<bool>, Condvar),
    stdin_credit: Mutex<HashMap<SessionId, u32>>,
    credit_changed: Condvar,
    next_session: AtomicU32,
    console_clients: Mutex<Vec<Sender<ControlEvent>>>,
    console_input: Mutex<Option<ChildStdin>>,
    output_log: Mutex<RotatingLog>,
    events: Mutex<Sender<Event>>,
    replies: Mutex<HashMap<&'static str, Sender<GuestMessage>>>,
    main_running: AtomicBool,
    main_ever_started: AtomicBool,
    /// Client writer threads still running (they must get their last event out before the
    /// supervisor exits).
    writers: AtomicU32,
    main_stdin: bool,
}

impl Shared {
    fn send_agent(&self, message: &HostMessage) -> Result<()> {
        let mut agent = lock(&self.agent);
        match agent.as_mut() {
            Some(stream) => write_message(stream, message).map_err(EngineError::from),
            None => Err(EngineError::Agent(
                "the guest agent is not connected".into(),
            )),
        }
    }

    /// Whether the main process was started at some point (it may have ended since).
    fn main_started(&self) -> bool {
        self.main_ever_started.load(Ordering::SeqCst)
    }

    fn event(&self, event: Event) {
        let _ = lock(&self.events).send(event);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the supervisor of VM `id` until the VM has stopped. `wait_attach`: hold the main
/// process until a client attaches (a foreground `kiln run`), so it sees all output.
pub fn run(kiln_root: &Path, id: &str, wait_attach: bool) -> Result<()> {
    let state = StateStore::open(kiln_root)?;
    let record = state.get(id)?;
    let paths = VmPaths::new(&record.dir);
    let spec: VmSpec = serde_json::from_value(record.spec.clone())
        .map_err(|e| EngineError::Invalid(format!("VM {id}: stored spec unreadable: {e}")))?;

    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(|e| EngineError::io("open", &paths.lock, e))?;
    if rustix::fs::flock(
        &lock_file,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .is_err()
    {
        return Err(EngineError::Conflict(format!(
            "VM {} already has a running supervisor",
            record.short_id()
        )));
    }
    let result = supervise(kiln_root, &state, &record.id, &paths, &spec, wait_attach);
    let (exit_code, reason) = match &result {
        Ok(outcome) => outcome.clone(),
        Err(e) => (None, format!("failed: {e}")),
    };
    if let Err(e) = &result {
        append_kiln_message(&paths.output, &format!("kiln: {e}\n"));
    }
    let _ = std::fs::remove_file(&paths.control);
    if spec.auto_remove {
        remove_vm_dir(&paths.dir);
        let _ = state.remove(&record.id);
    } else {
        state.update(&record.id, |r| {
            r.status = VmStatus::Exited;
            r.exit_code = exit_code;
            r.status_reason = Some(reason.clone());
            r.finished_at = Some(now_ms());
            r.supervisor_pid = None;
            r.vmm_pid = None;
        })?;
    }
    drop(lock_file);
    result.map(|_| ())
}

/// Removes a `--rm` VM's directory. A file still being created in it (by a thread of ours
/// finishing up) makes one pass fail with "directory not empty": a few more passes, a moment
/// apart, finish the job.
fn remove_vm_dir(dir: &Path) {
    for attempt in 0..10 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 9 => {
                tracing::warn!(dir = %dir.display(), "cannot remove the VM directory: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Appends a message from kiln itself to the main output log, as stderr.
fn append_kiln_message(path: &Path, message: &str) {
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = file.write_all(&log_record(log_tag::STDERR, message.as_bytes()));
    }
}

/// A record of `output.log` stamped with the time now.
fn log_record(tag: u8, data: &[u8]) -> Vec<u8> {
    let time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    control::encode_log_record(tag, time_ns, data)
}

/// Boots the VM, runs it to the end and returns (exit code, reason).
fn supervise(
    kiln_root: &Path,
    state: &StateStore,
    id: &str,
    paths: &VmPaths,
    spec: &VmSpec,
    wait_attach: bool,
) -> Result<(Option<i32>, String)> {
    state.update(id, |r| {
        r.status = VmStatus::Starting;
        r.supervisor_pid = Some(std::process::id());
        r.exit_code = None;
        r.status_reason = None;
        r.started_at = Some(now_ms());
        r.finished_at = None;
    })?;
    let _ = std::fs::remove_file(&paths.control);
    let listener = UnixListener::bind(&paths.control)
        .map_err(|e| EngineError::io("bind", &paths.control, e))?;
    let output_log = RotatingLog::open(&paths.output, spec.log_max_size)
        .map_err(|e| EngineError::io("open", &paths.output, e))?;
    let (events_tx, events) = mpsc::channel();
    let shared = Arc::new(Shared {
        agent: Mutex::new(None),
        sessions: Mutex::new(HashMap::new()),
        main_clients: Mutex::new(Vec::new()),
        attached: (Mutex::new(false), Condvar::new()),
        stdin_credit: Mutex::new(HashMap::new()),
        credit_changed: Condvar::new(),
        next_session: AtomicU32::new(MAIN_SESSION + 1),
        console_clients: Mutex::new(Vec::new()),
        console_input: Mutex::new(None),
        output_log: Mutex::new(output_log),
        events: Mutex::new(events_tx),
        replies: Mutex::new(HashMap::new()),
        main_running: AtomicBool::new(false),
        main_ever_started: AtomicBool::new(false),
        writers: AtomicU32::new(0),
        main_stdin: spec.process.stdin,
    });
    {
        let shared = shared.clone();
        std::thread::spawn(move || accept_loop(listener, shared));
    }

    let result = (|| -> Result<(Option<i32>, String)> {
        let backend = backend(spec.backend);
        backend.check()?;
        // The tap lives until this function returns, after the hypervisor has ended.
        let (_tap, bridge) = match spec.network {
            NetworkMode::Bridge => {
                let address = spec.address.as_deref().ok_or_else(|| {
                    EngineError::Invalid(format!("VM {id} has no leased address: recreate it"))
                })?;
                let (tap, attachment) = crate::network::attach(kiln_root, id, address)?;
                (Some(tap), Some(attachment))
            }
            _ => (None, None),
        };
        let launch = LaunchSpec {
            dir: paths.dir.clone(),
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            extra_cmdline: spec.extra_cmdline.clone(),
            disk: paths.disk.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            network: spec.network,
            bridge,
        };
        // Launched from this (the main) thread: the hypervisor's parent-death signal fires when
        // the thread that forked it ends, and this one lives as long as the process.
        let Launched {
            mut child,
            transport,
            guest_config,
        } = backend.launch(&launch)?;
        let vmm_pid = child.id();
        state.update(id, |r| r.vmm_pid = Some(vmm_pid))?;
        let outcome = run_vm(
            &shared,
            &mut child,
            transport.as_ref(),
            guest_config,
            spec,
            paths,
            wait_attach,
            &events,
            state,
            id,
        );
        // Whatever happened, the hypervisor does not outlive this function.
        if wait_child(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        outcome
    })();
    // A foreground `kiln run` that has not attached yet (the VM failed right away) still
    // gets to hear why before everything is cleaned up.
    if result.is_err() && wait_attach {
        let (attached, cv) = &shared.attached;
        let guard = lock(attached);
        let _ = cv.wait_timeout_while(guard, Duration::from_secs(5), |a| !*a);
    }
    // Tell everyone still connected that the VM is gone.
    for sink in lock(&shared.main_clients).drain(..) {
        let event = match &result {
            Ok((Some(code), _)) => ControlEvent::Exited {
                status: ExitStatus::Code(*code),
            },
            Ok((None, reason)) => ControlEvent::Failed {
                message: reason.clone(),
                code: 125,
            },
            Err(e) => ControlEvent::Failed {
                message: e.to_string(),
                code: 125,
            },
        };
        let _ = sink.tx.send(event);
    }
    for (_, sink) in lock(&shared.sessions).drain() {
        let _ = sink.tx.send(ControlEvent::Failed {
            message: "the VM stopped".into(),
            code: 137,
        });
    }
    lock(&shared.console_clients).clear();
    // Let the writers deliver those last events (their channels are closed now).
    let deadline = Instant::now() + Duration::from_secs(2);
    while shared.writers.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    result
}

/// Why the VM ended before its agent answered: the hypervisor's own last words (QEMU says
/// "cannot set up guest memory", kiln-vmm names a bad config), else the console's.
fn hypervisor_died(status: std::process::ExitStatus, paths: &VmPaths) -> EngineError {
    let tail = |path: &Path| -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let last = lines[lines.len().saturating_sub(3)..].join(" | ");
        (!last.is_empty()).then_some(last)
    };
    let hypervisor_log = paths.dir.join("hypervisor.log");
    match tail(&hypervisor_log).or_else(|| tail(&paths.console)) {
        Some(words) => EngineError::Backend(format!(
            "the VM stopped before its agent answered (hypervisor {status}): {words}"
        )),
        None => EngineError::Backend(format!(
            "the VM stopped before its agent answered (hypervisor {status}); see {}",
            paths.console.display()
        )),
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_vm(
    shared: &Arc<Shared>,
    child: &mut Child,
    transport: &dyn crate::backend::AgentTransport,
    mut guest_config: GuestConfig,
    spec: &VmSpec,
    paths: &VmPaths,
    wait_attach: bool,
    events: &Receiver<Event>,
    state: &StateStore,
    id: &str,
) -> Result<(Option<i32>, String)> {
    // The console: hypervisor stdout → console.log and console clients; clients → stdin.
    if let Some(stdout) = child.stdout.take() {
        let shared = shared.clone();
        // Opened here, not in the thread: a thread that ran late could create the file while
        // a failed `--rm` VM's directory is being removed, and leave the directory behind.
        let log = RotatingLog::open(&paths.console, spec.log_max_size).ok();
        std::thread::spawn(move || console_loop(stdout, log, &shared));
    }
    *lock(&shared.console_input) = child.stdin.take();

    // Reach the agent.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut stream = loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(hypervisor_died(status, paths));
        }
        let slice = (Instant::now() + Duration::from_secs(1)).min(deadline);
        match transport.connect(slice) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    };
    // The agent says hello once the guest has booted: wait for it while watching the
    // hypervisor.
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| EngineError::Agent(format!("agent socket: {e}")))?;
    let hello = loop {
        match read_message::<_, GuestMessage>(&mut stream) {
            Ok(message) => break message,
            Err(kiln_agent_protocol::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(status) = child.try_wait().ok().flatten() {
                    return Err(hypervisor_died(status, paths));
                }
                if Instant::now() >= deadline {
                    return Err(EngineError::Agent(format!(
                        "the guest agent did not answer within {} s ({}); see {}",
                        BOOT_TIMEOUT.as_secs(),
                        transport.describe(),
                        paths.console.display()
                    )));
                }
            }
            Err(e) => {
                // A hypervisor that dies takes the agent's socket with it: say why it died.
                if let Some(status) = wait_child(child, Duration::from_secs(1)) {
                    return Err(hypervisor_died(status, paths));
                }
                return Err(EngineError::Agent(format!(
                    "reading the agent's hello: {e}; see {}",
                    paths.console.display()
                )));
            }
        }
    };
    match hello {
        GuestMessage::Hello { version, .. } if version == PROTOCOL_VERSION => {}
        GuestMessage::Hello { version, agent, .. } => {
            return Err(EngineError::Agent(format!(
                "the guest agent {agent} speaks protocol {version}, kiln speaks \
                 {PROTOCOL_VERSION}: rebuild the initramfs"
            )))
        }
        other => {
            return Err(EngineError::Agent(format!(
                "the guest agent did not start with hello: {other:?}"
            )))
        }
    }
    let _ = stream.set_read_timeout(None);
    let reader = stream
        .try_clone()
        .map_err(|e| EngineError::Agent(format!("agent socket: {e}")))?;
    *lock(&shared.agent) = Some(stream);
    {
        let shared = shared.clone();
        std::thread::spawn(move || agent_loop(reader, &shared));
    }

    // Hostname, hosts, DNS, network.
    guest_config.hostname = spec.hostname.clone();
    let (tx, rx) = mpsc::channel();
    lock(&shared.replies).insert("configured", tx);
    shared.send_agent(&HostMessage::Configure(guest_config))?;
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(GuestMessage::Configured) => {}
        Ok(GuestMessage::Error { message }) => {
            return Err(EngineError::Agent(format!(
                "configuring the guest: {message}"
            )))
        }
        _ => {
            return Err(EngineError::Agent(
                "the guest agent did not configure the guest".into(),
            ))
        }
    }

    if wait_attach {
        let (attached, cv) = &shared.attached;
        let guard = lock(attached);
        let _ = cv
            .wait_timeout_while(guard, Duration::from_secs(60), |a| !*a)
            .map_err(|_| EngineError::Agent("attach wait".into()))?;
    }

    let mut process = spec.process.clone();
    process.main = true;
    lock(&shared.stdin_credit).insert(MAIN_SESSION, WINDOW);
    {
        // Exec goes out before anything an attached client sends for the main session.
        let mut agent = lock(&shared.agent);
        let stream = agent
            .as_mut()
            .ok_or_else(|| EngineError::Agent("the guest agent is not connected".into()))?;
        write_message(
            stream,
            &HostMessage::Exec {
                session: MAIN_SESSION,
                process,
            },
        )?;
        shared.main_running.store(true, Ordering::SeqCst);
        shared.main_ever_started.store(true, Ordering::SeqCst);
    }
    state.update(id, |r| r.status = VmStatus::Running)?;

    // Run until the main process ends, the VM dies or a stop is asked for.
    let mut stop_done: Vec<Sender<()>> = Vec::new();
    let outcome = loop {
        let event = match events.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = child.try_wait().ok().flatten() {
                    Event::HypervisorExited(status.to_string())
                } else {
                    continue;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Event::AgentLost("internal channel closed".into())
            }
        };
        match event {
            Event::MainExited(status) => {
                let reason = match status {
                    ExitStatus::Code(code) => format!("exited ({code})"),
                    ExitStatus::Signal(signal) => format!("killed by signal {signal}"),
                };
                break (Some(status.code()), reason);
            }
            Event::MainFailed { message, code } => break (Some(code), message),
            Event::AgentLost(why) => {
                break (None, format!("lost the guest agent: {why}"));
            }
            Event::HypervisorExited(status) => {
                break (
                    None,
                    format!("the VM stopped unexpectedly (hypervisor {status})"),
                );
            }
            Event::Stop { timeout, done } => {
                stop_done.push(done);
                let _ = state.update(id, |r| r.status = VmStatus::Stopping);
                match stop_main(shared, events, timeout, &mut stop_done) {
                    Some(outcome) => break outcome,
                    None => break (None, "stopped (the main process did not exit)".into()),
                }
            }
        }
    };
    let _ = state.update(id, |r| r.status = VmStatus::Stopping);
    // Power off: the agent syncs the disk and resets the VM, which ends the hypervisor.
    let _ = shared.send_agent(&HostMessage::Shutdown);
    if wait_child(child, Duration::from_secs(15)).is_none() {
        tracing::warn!("the VM did not power off; killing the hypervisor");
        let _ = child.kill();
        let _ = child.wait();
    }
    for done in stop_done {
        let _ = done.send(());
    }
    Ok(outcome)
}

/// SIGTERM to the main process, SIGKILL after `timeout`; returns its outcome if it exited.
fn stop_main(
    shared: &Shared,
    events: &Receiver<Event>,
    timeout: Duration,
    stop_done: &mut Vec<Sender<()>>,
) -> Option<(Option<i32>, String)> {
    if !shared.main_running.load(Ordering::SeqCst) {
        return None;
    }
    for (signal, wait) in [
        (libc::SIGTERM, timeout),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        if shared
            .send_agent(&HostMessage::Signal {
                session: MAIN_SESSION,
                signal,
            })
            .is_err()
        {
            return None;
        }
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Ok(Event::MainExited(status)) => {
                    return Some((Some(status.code()), format!("stopped ({})", status.code())))
                }
                Ok(Event::MainFailed { message, code }) => return Some((Some(code), message)),
                Ok(Event::Stop { done, .. }) => stop_done.push(done),
                Ok(Event::AgentLost(_)) | Ok(Event::HypervisorExited(_)) => return None,
                Err(_) => break,
            }
        }
    }
    None
}

/// Copies the hypervisor's stdout (the guest's serial console) to `console.log` and to
/// attached console clients.
fn console_loop(mut stdout: impl Read, mut log: Option<RotatingLog>, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(log) = log.as_mut() {
            let _ = log.write(&buf[..n]);
        }
        lock(&shared.console_clients).retain(|client| {
            client
                .send(ControlEvent::Console {
                    data: buf[..n].to_vec(),
                })
                .is_ok()
        });
    }
}

/// Reads the agent's messages and routes them to sessions.
fn agent_loop(mut stream: UnixStream, shared: &Shared) {
    let why = loop {
        let message = match read_message::<_, GuestMessage>(&mut stream) {
            Ok(message) => message,
            Err(e) => break e.to_string(),
        };
        match message {
            GuestMessage::Output {
                session,
                stream: out,
                data,
            } => {
                let len = data.len() as u32;
                if session == MAIN_SESSION {
                    let tag = match out {
                        Stream::Stdout => log_tag::STDOUT,
                        Stream::Stderr => log_tag::STDERR,
                    };
                    let _ = lock(&shared.output_log).write(&log_record(tag, &data));
                    lock(&shared.main_clients).retain(|sink| {
                        if sink.backlog.load(Ordering::Relaxed) as usize > MAX_CLIENT_BACKLOG {
                            return false;
                        }
                        sink.backlog.fetch_add(len, Ordering::Relaxed);
                        sink.tx
                            .send(ControlEvent::Output {
                                stream: out,
                                data: data.clone(),
                            })
                            .is_ok()
                    });
                    let _ = shared.send_agent(&HostMessage::Ack {
                        session,
                        bytes: len,
                    });
                } else if lock(&shared.sessions).contains_key(&session) {
                    // The connection's writer acknowledges once it has written the bytes, so
                    // an agent that keeps to its window never has more than WINDOW queued
                    // here. One that does not (a hostile guest) loses the session rather than
                    // making the supervisor buffer without bound.
                    let mut sessions = lock(&shared.sessions);
                    let overrun = match sessions.get(&session) {
                        Some(sink) => {
                            let queued = sink.backlog.fetch_add(len, Ordering::Relaxed) + len;
                            if queued > 2 * WINDOW {
                                Some(queued)
                            } else {
                                let _ = sink.tx.send(ControlEvent::Output { stream: out, data });
                                None
                            }
                        }
                        None => None,
                    };
                    if let Some(queued) = overrun {
                        if let Some(sink) = sessions.remove(&session) {
                            let _ = sink.tx.send(ControlEvent::Failed {
                                message: format!(
                                    "the guest agent overran session {session}'s output window \
                                     ({queued} bytes unacknowledged); the session was dropped"
                                ),
                                code: 125,
                            });
                        }
                    }
                } else {
                    let _ = shared.send_agent(&HostMessage::Ack {
                        session,
                        bytes: len,
                    });
                }
            }
            GuestMessage::StdinAck { session, bytes } => {
                let mut credit = lock(&shared.stdin_credit);
                if let Some(c) = credit.get_mut(&session) {
                    *c = c.saturating_add(bytes).min(WINDOW);
                }
                shared.credit_changed.notify_all();
            }
            GuestMessage::Started { session, pid } => {
                if session == MAIN_SESSION {
                    lock(&shared.main_clients)
                        .retain(|sink| sink.tx.send(ControlEvent::Started { pid }).is_ok());
                } else if let Some(sink) = lock(&shared.sessions).get(&session) {
                    let _ = sink.tx.send(ControlEvent::Started { pid });
                }
            }
            GuestMessage::Exited { session, status } => {
                end_session(shared, session);
                if session == MAIN_SESSION {
                    shared.main_running.store(false, Ordering::SeqCst);
                    for sink in lock(&shared.main_clients).drain(..) {
                        let _ = sink.tx.send(ControlEvent::Exited { status });
                    }
                    shared.event(Event::MainExited(status));
                } else if let Some(sink) = lock(&shared.sessions).remove(&session) {
                    let _ = sink.tx.send(ControlEvent::Exited { status });
                }
            }
            GuestMessage::Failed {
                session,
                message,
                code,
            } => {
                end_session(shared, session);
                let event = ControlEvent::Failed {
                    message: message.clone(),
                    code,
                };
                if session == MAIN_SESSION {
                    shared.main_running.store(false, Ordering::SeqCst);
                    append_to_log(shared, &format!("kiln: {message}\n"));
                    for sink in lock(&shared.main_clients).drain(..) {
                        let _ = sink.tx.send(event.clone());
                    }
                    shared.event(Event::MainFailed { message, code });
                } else if let Some(sink) = lock(&shared.sessions).remove(&session) {
                    let _ = sink.tx.send(event);
                }
            }
            GuestMessage::Configured => {
                if let Some(tx) = lock(&shared.replies).remove("configured") {
                    let _ = tx.send(GuestMessage::Configured);
                }
            }
            GuestMessage::Error { message } => {
                tracing::warn!("guest agent: {message}");
                if let Some(tx) = lock(&shared.replies).remove("configured") {
                    let _ = tx.send(GuestMessage::Error { message });
                }
            }
            GuestMessage::Hello { .. } | GuestMessage::Pong { .. } => {}
        }
    };
    *lock(&shared.agent) = None;
    shared.credit_changed.notify_all();
    shared.event(Event::AgentLost(why));
}

fn append_to_log(shared: &Shared, message: &str) {
    let _ = lock(&shared.output_log).write(&log_record(log_tag::STDERR, message.as_bytes()));
}

fn end_session(shared: &Shared, session: SessionId) {
    lock(&shared.stdin_credit).remove(&session);
    shared.credit_changed.notify_all();
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for connection in listener.incoming() {
        let Ok(connection) = connection else { continue };
        let shared = shared.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_client(connection, &shared) {
                tracing::debug!("control client: {e}");
            }
        });
    }
}

/// Spawns the thread that writes events to a client; returns its sender.
fn client_writer(
    mut stream: UnixStream,
    shared: Arc<Shared>,
    ack_session: Option<SessionId>,
    backlog: Arc<AtomicU32>,
) -> Sender<ControlEvent> {
    let (tx, rx) = mpsc::channel::<ControlEvent>();
    shared.writers.fetch_add(1, Ordering::SeqCst);
    std::thread::spawn(move || {
        for event in rx {
            let (len, last) = match &event {
                ControlEvent::Output { data, .. } | ControlEvent::Console { data } => {
                    (data.len() as u32, false)
                }
                ControlEvent::Exited { .. }
                | ControlEvent::Failed { .. }
                | ControlEvent::Done
                | ControlEvent::Error { .. } => (0, true),
                ControlEvent::Started { .. } => (0, false),
            };
            if write_message(&mut stream, &event).is_err() {
                break;
            }
            backlog.fetch_sub(len.min(backlog.load(Ordering::Relaxed)), Ordering::Relaxed);
            if let (Some(session), true) = (ack_session, len > 0) {
                let _ = shared.send_agent(&HostMessage::Ack {
                    session,
                    bytes: len,
                });
            }
            if last {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        shared.writers.fetch_sub(1, Ordering::SeqCst);
    });
    tx
}

fn serve_client(mut stream: UnixStream, shared: &Arc<Shared>) -> Result<()> {
    let first: ControlRequest = read_message(&mut stream)?;
    let writer_stream = stream
        .try_clone()
        .map_err(|e| EngineError::Agent(format!("control socket: {e}")))?;
    let backlog = Arc::new(AtomicU32::new(0));
    let session = match first {
        ControlRequest::Attach { stdin } => {
            let tx = client_writer(writer_stream, shared.clone(), None, backlog.clone());
            lock(&shared.main_clients).push(Sink { tx, backlog });
            {
                let (attached, cv) = &shared.attached;
                *lock(attached) = true;
                cv.notify_all();
            }
            if !stdin || !shared.main_stdin {
                // Nothing to forward; keep the connection until the client goes away.
                return forward_input(stream, shared, MAIN_SESSION);
            }
            MAIN_SESSION
        }
        ControlRequest::Exec { process } => {
            let mut process = process;
            process.main = false;
            let session = new_session(shared, writer_stream, backlog);
            shared.send_agent(&HostMessage::Exec { session, process })?;
            session
        }
        ControlRequest::CopyOut { path } => {
            let session = new_session(shared, writer_stream, backlog);
            shared.send_agent(&HostMessage::CopyOut { session, path })?;
            session
        }
        ControlRequest::CopyIn { path } => {
            let session = new_session(shared, writer_stream, backlog);
            shared.send_agent(&HostMessage::CopyIn { session, path })?;
            session
        }
        ControlRequest::Stop { timeout_secs } => {
            let (done_tx, done_rx) = mpsc::channel();
            shared.event(Event::Stop {
                timeout: Duration::from_secs(timeout_secs),
                done: done_tx,
            });
            let _ = done_rx.recv();
            write_message(&mut stream, &ControlEvent::Done)?;
            return Ok(());
        }
        ControlRequest::Kill { signal } => {
            let reply = if shared.main_running.load(Ordering::SeqCst) {
                match shared.send_agent(&HostMessage::Signal {
                    session: MAIN_SESSION,
                    signal,
                }) {
                    Ok(()) => ControlEvent::Done,
                    Err(e) => ControlEvent::Error {
                        message: e.to_string(),
                    },
                }
            } else {
                ControlEvent::Error {
                    message: "the main process is not running".into(),
                }
            };
            write_message(&mut stream, &reply)?;
            return Ok(());
        }
        ControlRequest::Console => {
            let tx = client_writer(writer_stream, shared.clone(), None, backlog);
            lock(&shared.console_clients).push(tx);
            loop {
                match read_message::<_, ControlRequest>(&mut stream)? {
                    ControlRequest::Stdin { data } => {
                        if let Some(input) = lock(&shared.console_input).as_mut() {
                            let _ = input.write_all(&data);
                        }
                    }
                    _ => continue,
                }
            }
        }
        other => {
            write_message(
                &mut stream,
                &ControlEvent::Error {
                    message: format!("unexpected first request {other:?}"),
                },
            )?;
            return Ok(());
        }
    };
    forward_input(stream, shared, session)
}

fn new_session(shared: &Arc<Shared>, writer: UnixStream, backlog: Arc<AtomicU32>) -> SessionId {
    let session = shared.next_session.fetch_add(1, Ordering::SeqCst);
    let tx = client_writer(writer, shared.clone(), Some(session), backlog.clone());
    lock(&shared.stdin_credit).insert(session, WINDOW);
    lock(&shared.sessions).insert(session, Sink { tx, backlog });
    session
}

/// Forwards a client's stdin, resizes and signals to `session`, honouring the agent's stdin
/// window.
fn forward_input(mut stream: UnixStream, shared: &Shared, session: SessionId) -> Result<()> {
    // An attach comes before the main process starts (the supervisor waits for it); nothing
    // may reach the agent for the main session before its Exec does.
    if session == MAIN_SESSION {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !shared.main_running.load(Ordering::SeqCst) {
            if Instant::now() >= deadline || shared.main_started() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    loop {
        let request = match read_message::<_, ControlRequest>(&mut stream) {
            Ok(request) => request,
            Err(_) => return Ok(()),
        };
        match request {
            ControlRequest::Stdin { data } => {
                for chunk in data.chunks(MAX_CHUNK) {
                    let len = chunk.len() as u32;
                    let mut credit = lock(&shared.stdin_credit);
                    loop {
                        match credit.get_mut(&session) {
                            None => return Ok(()),
                            Some(c) if *c >= len => {
                                *c -= len;
                                break;
                            }
                            Some(_) => {
                                credit = shared
                                    .credit_changed
                                    .wait(credit)
                                    .unwrap_or_else(|p| p.into_inner());
                            }
                        }
                    }
                    drop(credit);
                    shared.send_agent(&HostMessage::Stdin {
                        session,
                        data: chunk.to_vec(),
                    })?;
                }
            }
            ControlRequest::CloseStdin => {
                shared.send_agent(&HostMessage::CloseStdin { session })?;
            }
            ControlRequest::Resize { rows, cols } => {
                shared.send_agent(&HostMessage::Resize {
                    session,
                    rows,
                    cols,
                })?;
            }
            ControlRequest::Signal { signal } => {
                shared.send_agent(&HostMessage::Signal { session, signal })?;
            }
            _ => {}
        }
    }
}
