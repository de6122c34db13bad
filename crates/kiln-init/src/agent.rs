//! The protocol service: one single-threaded `poll` loop over the host connection, every
//! session's pipes, and a self-pipe woken by SIGCHLD and by the copy threads.
//!
//! Everything is non-blocking, so no child, however slow, can stall the loop:
//! - output is read from a session's pipe only while its credit window is open (the host's
//!   `Ack`s reopen it): a process that writes faster than the host reads blocks on its own
//!   full pipe, which is the backpressure;
//! - stdin from the host is queued per session (at most [`WINDOW`] bytes, which an honest host
//!   never exceeds) and written as the pipe takes it, each write answered with a `StdinAck`;
//! - frames for the host are queued and written as the connection takes them; host messages
//!   are not read while much is queued, so a host that stops reading cannot make the agent
//!   buffer without bound.
//!
//! # Connections
//! One host connection at a time. A new connection (an accepted socket, or the serial port's
//! host side coming back) gets `Hello` and replaces the old one; sessions live on, and what
//! they produce goes to whoever is connected. With nobody connected, each session's output is
//! buffered up to its window. Messages that only made sense to the old connection (`Pong`,
//! `StdinAck`, `Error`, `Configured`) are dropped on a disconnect; session messages (`Started`,
//! `Output`, `Exited`, `Failed`) are delivered to the next one. Session ids therefore stay in
//! use across connections: a new host must pick fresh ones.
//!
//! # Sessions
//! `Started` answers `Exec`, and also `CopyOut` and `CopyIn` (with pid 0), so that every
//! session starts with `Started` or `Failed`. `Exited` comes only after the process exited and
//! its stdout and stderr reached end of file, so all output precedes it. A process whose
//! background children keep its pipes open is given [`EXIT_DRAIN`] after it exited; then
//! what is readable is sent and the pipes are closed.
//!
//! A tty session has one pty for stdin and output, so `CloseStdin` cannot close its stdin
//! without losing the output: it is ignored (send `^D` as stdin to end a line-mode reader).
//!
//! Messages for a session that just ended (an `Ack` for its last output, say) are ignored;
//! messages for a session that never existed get `Error`.
//!
//! Children are reaped only by this loop (`waitpid(-1)` after SIGCHLD wakes it), and a pid is
//! recorded in the same iteration that forked it, so a child that exits at once cannot be
//! reaped before the agent knows whose it is. Exits of pids that are no session's (orphans
//! reparented to PID 1) are reaped and ignored.
//!
//! # The serial port's connection state
//! A virtio-console port tells only through `POLLHUP` that the host side is gone. If the host
//! disconnects and reconnects within a few milliseconds, the guest kernel may process both
//! changes before the agent polls, and the agent then never sees the new connection: no new
//! `Hello` is sent, and the half-written frame QEMU discarded on the disconnect is not
//! restarted. Seen with QEMU under TCG when a client reconnects at once; a host must wait a
//! little (50 ms was enough there) before reconnecting, and reconnect again (after a pause)
//! if no `Hello` arrives.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_agent_protocol::{
    encode, ExitStatus, FrameBuffer, GuestMessage, HostMessage, ProcessSpec, SessionId, Stream,
    MAX_CHUNK, PROTOCOL_VERSION, SHUTDOWN_GRACE_MS, WINDOW,
};

use crate::copy::{self, CopyResult};
use crate::spawn;
use crate::sys::{self, Waker};
use crate::transport::{self, Transport};

/// Whether the agent is the guest's PID 1 or an ordinary process (tests, debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest: `Configure` changes the machine, every orphan is reaped, shutdown
    /// signals every process.
    Pid1,
    /// An ordinary process: `Configure` only answers `Configured` (it must not reconfigure the
    /// machine it runs on), and shutdown signals only the sessions' processes.
    Local,
}

/// How long after a process exited the agent waits for end of file on its pipes before it
/// stops waiting for background children that hold them open.
pub const EXIT_DRAIN: Duration = Duration::from_millis(100);

/// How often the serial port is checked for the host side to connect (it polls `POLLHUP`
/// until then, so it cannot be waited for with `poll`).
const SERIAL_RETRY: Duration = Duration::from_millis(20);

/// Host messages are not read while this much is queued for the host.
const HOST_READ_LIMIT: usize = 4 << 20;

/// How many ended sessions are remembered, so that late messages for them are not errors.
const FINISHED_MEMORY: usize = 4096;

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// One encoded frame for the host.
#[derive(Debug)]
struct OutFrame {
    bytes: Vec<u8>,
    /// The session whose output this is (for window accounting on reconnect).
    output_of: Option<SessionId>,
    /// Output bytes it carries.
    output: u32,
    /// Delivered to the next connection if this one goes away before it was sent.
    keep: bool,
}

/// Frames waiting for the host connection.
#[derive(Debug, Default)]
struct OutQueue {
    frames: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Total bytes queued.
    bytes: usize,
}

impl OutQueue {
    fn push_frame(&mut self, frame: OutFrame, front: bool) {
        self.bytes += frame.bytes.len();
        if front {
            self.frames.push_front(frame);
        } else {
            self.frames.push_back(frame);
        }
    }

    fn push(&mut self, message: &GuestMessage) {
        let keep = matches!(
            message,
            GuestMessage::Started { .. }
                | GuestMessage::Failed { .. }
                | GuestMessage::Output { .. }
                | GuestMessage::Exited { .. }
        );
        let (output_of, output) = match message {
            GuestMessage::Output { session, data, .. } => (Some(*session), data.len() as u32),
            _ => (None, 0),
        };
        match encode(message) {
            Ok(bytes) => self.push_frame(
                OutFrame {
                    bytes,
                    output_of,
                    output,
                    keep,
                },
                false,
            ),
            Err(e) => error!("cannot encode {message:?}: {e}"),
        }
    }

    /// Forgets what the gone connection was in the middle of and what only it cared about.
    fn on_disconnect(&mut self) {
        if self.offset > 0 {
            self.frames.pop_front();
            self.offset = 0;
        }
        self.frames.retain(|f| f.keep);
        self.bytes = self.frames.iter().map(|f| f.bytes.len()).sum();
    }

    fn queued_output(&self, session: SessionId) -> u32 {
        self.frames
            .iter()
            .filter(|f| f.output_of == Some(session))
            .map(|f| f.output)
            .sum()
    }
}

/// A session's stdin.
#[derive(Debug)]
enum Stdin {
    /// The session was started without stdin.
    None,
    /// Writable: bytes queued for it, and whether to close it once they are written.
    Open {
        fd: OwnedFd,
        queue: VecDeque<u8>,
        close_when_empty: bool,
    },
    /// Closed by `CloseStdin`, or the reader went away: more stdin is acknowledged and dropped.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Process { pid: i32, tty: bool },
    CopyOut,
    CopyIn,
}

#[derive(Debug)]
struct Session {
    kind: Kind,
    main: bool,
    stdin: Stdin,
    /// Stdin bytes the current host sent that were not acknowledged yet.
    stdin_unacked: u32,
    /// Queued stdin bytes from an earlier connection, written without an ack.
    stdin_ack_skip: usize,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    pty: Option<OwnedFd>,
    /// Output sent (or queued) that the host has not acknowledged.
    out_unacked: u32,
    status: Option<ExitStatus>,
    exited_at: Option<Instant>,
    /// Once [`EXIT_DRAIN`] passed: how much more output is read before the pipes are closed.
    drain_budget: Option<usize>,
    copy_result: Option<CopyResult>,
}

impl Session {
    fn new(kind: Kind, main: bool) -> Session {
        Session {
            kind,
            main,
            stdin: Stdin::None,
            stdin_unacked: 0,
            stdin_ack_skip: 0,
            stdout: None,
            stderr: None,
            pty: None,
            out_unacked: 0,
            status: None,
            exited_at: None,
            drain_budget: None,
            copy_result: None,
        }
    }

    fn output_fd(&self, stream: Stream) -> Option<RawFd> {
        match stream {
            Stream::Stdout => self.stdout.as_ref().map(|f| f.as_raw_fd()),
            Stream::Stderr => self.stderr.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    fn close_output(&mut self, stream: Stream) {
        match stream {
            Stream::Stdout => self.stdout = None,
            Stream::Stderr => self.stderr = None,
        }
    }

    fn window_open(&self) -> bool {
        self.out_unacked < WINDOW
    }
}

/// The current host connection.
#[derive(Debug)]
struct Conn {
    fd: RawFd,
    /// The accepted socket; `None` for the serial port, which the transport owns.
    _owned: Option<OwnedFd>,
    frames: FrameBuffer,
}

/// What a pollfd entry stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    Waker,
    Listener,
    Conn,
    Output(SessionId, Stream),
    Input(SessionId),
}

/// The protocol service. Create it with [`Agent::new`] and run it with [`Agent::serve`].
#[derive(Debug)]
pub struct Agent {
    mode: Mode,
    transport: Transport,
    conn: Option<Conn>,
    out: OutQueue,
    sessions: BTreeMap<SessionId, Session>,
    pids: HashMap<i32, SessionId>,
    finished: VecDeque<SessionId>,
    finished_set: HashSet<SessionId>,
    main_done: Option<Instant>,
    has_main: bool,
    shutdown: bool,
    waker: Waker,
    copy_tx: mpsc::Sender<(SessionId, CopyResult)>,
    copy_rx: mpsc::Receiver<(SessionId, CopyResult)>,
    buf: Vec<u8>,
}

impl Agent {
    /// Prepares to serve on `transport`; installs the SIGCHLD handler (one agent per process).
    pub fn new(transport: Transport, mode: Mode) -> io::Result<Agent> {
        let waker = Waker::install()?;
        let (copy_tx, copy_rx) = mpsc::channel();
        Ok(Agent {
            mode,
            transport,
            conn: None,
            out: OutQueue::default(),
            sessions: BTreeMap::new(),
            pids: HashMap::new(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            main_done: None,
            has_main: false,
            shutdown: false,
            waker,
            copy_tx,
            copy_rx,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Serves until `Shutdown` (or [`SHUTDOWN_GRACE_MS`] after the main process exited), then
    /// stops every process and returns. Powering off is the caller's business, so that a test
    /// agent never reboots its host.
    pub fn serve(mut self) -> io::Result<()> {
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        loop {
            if self.shutdown || self.main_done.is_some_and(|t| t.elapsed() >= grace) {
                debug!("shutting down");
                self.flush_for(Duration::from_millis(500));
                self.terminate();
                return Ok(());
            }
            if self.conn.is_none() {
                if let Transport::Serial(port) = &self.transport {
                    let fd = port.as_raw_fd();
                    if transport::serial_host_connected(fd) {
                        debug!("host connected to the serial port");
                        self.connect(fd, None);
                    }
                }
            }

            let mut fds = Vec::new();
            let mut targets = Vec::new();
            self.poll_set(&mut fds, &mut targets);
            let timeout = self.timeout();
            sys::poll(&mut fds, timeout)?;

            for (pfd, target) in fds.iter().zip(targets.iter()) {
                let ev = pfd.revents;
                if ev == 0 {
                    continue;
                }
                match *target {
                    Target::Waker => self.waker.drain(),
                    Target::Listener => self.accept(),
                    Target::Conn => self.conn_event(ev),
                    Target::Output(id, stream) => self.pump_output(id, stream, false),
                    Target::Input(id) => self.pump_stdin(id),
                }
            }
            self.reap();
            self.collect_copies();
            self.drain_exited();
            self.finish_sessions();
            self.flush();
        }
    }

    fn poll_set(&self, fds: &mut Vec<libc::pollfd>, targets: &mut Vec<Target>) {
        let mut add = |fd: RawFd, events: libc::c_short, t: Target| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            targets.push(t);
        };
        add(self.waker.fd(), libc::POLLIN, Target::Waker);
        if let Transport::Listener(l) = &self.transport {
            add(l.as_raw_fd(), libc::POLLIN, Target::Listener);
        }
        if let Some(conn) = &self.conn {
            let mut events = 0;
            if self.out.bytes < HOST_READ_LIMIT {
                events |= libc::POLLIN;
            }
            if !self.out.frames.is_empty() {
                events |= libc::POLLOUT;
            }
            add(conn.fd, events, Target::Conn);
        }
        for (&id, s) in &self.sessions {
            if s.window_open() {
                for stream in [Stream::Stdout, Stream::Stderr] {
                    if let Some(fd) = s.output_fd(stream) {
                        add(fd, libc::POLLIN, Target::Output(id, stream));
                    }
                }
            }
            if let Stdin::Open { fd, queue, .. } = &s.stdin {
                if !queue.is_empty() {
                    add(fd.as_raw_fd(), libc::POLLOUT, Target::Input(id));
                }
            }
        }
    }

    fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut at = |t: Instant| {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        };
        for s in self.sessions.values() {
            if let (Some(t), None) = (s.exited_at, s.drain_budget) {
                if s.stdout.is_some() || s.stderr.is_some() {
                    at(t + EXIT_DRAIN);
                }
            }
        }
        if let Some(t) = self.main_done {
            at(t + Duration::from_millis(SHUTDOWN_GRACE_MS));
        }
        if self.conn.is_none() && matches!(self.transport, Transport::Serial(_)) {
            at(now + SERIAL_RETRY);
        }
        deadline.map(|d| d.saturating_duration_since(now))
    }

    // ---- connections -------------------------------------------------------------------

    fn connect(&mut self, fd: RawFd, owned: Option<OwnedFd>) {
        if self.conn.is_some() {
            self.disconnect("replaced by a new connection");
        }
        self.conn = Some(Conn {
            fd,
            _owned: owned,
            frames: FrameBuffer::new(),
        });
        let hello = GuestMessage::Hello {
            version: PROTOCOL_VERSION,
            agent: crate::AGENT_VERSION.to_string(),
            boot_ms: sys::boot_ms(),
        };
        match encode(&hello) {
            Ok(bytes) => self.out.push_frame(
                OutFrame {
                    bytes,
                    output_of: None,
                    output: 0,
                    keep: false,
                },
                true,
            ),
            Err(e) => error!("cannot encode Hello: {e}"),
        }
        self.flush();
    }

    fn disconnect(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        debug!("host connection gone: {why}");
        if let Transport::Serial(_) = &self.transport {
            // What the old host sent and we did not read is not for the next one.
            let mut buf = [0u8; 4096];
            while matches!(sys::read(conn.fd, &mut buf), Ok(n) if n > 0) {}
        }
        drop(conn);
        self.out.on_disconnect();
        for (&id, s) in self.sessions.iter_mut() {
            // Output sent to the old host will never be acknowledged; what is still queued
            // will be, by the next host.
            s.out_unacked = self.out.queued_output(id);
            if let Stdin::Open { queue, .. } = &s.stdin {
                s.stdin_ack_skip = queue.len();
            }
            s.stdin_unacked = 0;
        }
    }

    fn accept(&mut self) {
        let Transport::Listener(l) = &self.transport else {
            return;
        };
        match transport::accept(l.as_raw_fd()) {
            Ok(Some(fd)) => {
                debug!("host connected");
                let raw = fd.as_raw_fd();
                self.connect(raw, Some(fd));
            }
            Ok(None) => {}
            Err(e) => {
                error!("accept: {e}");
                // Do not spin on a listener that keeps failing (EMFILE, say).
                sys::sleep(Duration::from_millis(10));
            }
        }
    }

    fn conn_event(&mut self, revents: libc::c_short) {
        let hup = revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
        if revents & libc::POLLIN != 0 {
            // After a hang-up, what the host sent before it left is still its to act on (a
            // host may well send Shutdown and close): read it all, up to end of stream.
            while self.read_host() && hup {}
        }
        if hup {
            self.disconnect("hang-up");
            return;
        }
        if revents & libc::POLLOUT != 0 {
            self.flush();
        }
    }

    /// Reads once from the host and handles the complete frames; false once nothing more can
    /// be read now (or the connection ended).
    fn read_host(&mut self) -> bool {
        let Some(fd) = self.conn.as_ref().map(|c| c.fd) else {
            return false;
        };
        let n = match sys::read(fd, &mut self.buf) {
            Ok(0) => {
                self.disconnect("end of stream");
                return false;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                self.disconnect(&format!("read: {e}"));
                return false;
            }
        };
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        conn.frames.extend(&self.buf[..n]);
        let mut messages = Vec::new();
        let mut malformed = None;
        loop {
            match conn.frames.next_message::<HostMessage>() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(e) => {
                    malformed = Some(e);
                    break;
                }
            }
        }
        for m in messages {
            self.handle(m);
        }
        if let Some(e) = malformed {
            error!("bad frame from the host: {e}");
            match self.transport {
                // A socket can be closed and reopened by the host: make it start clean.
                Transport::Listener(_) => {
                    self.disconnect("malformed frame");
                    return false;
                }
                // The port stays; skip what was buffered and hope the next frame is whole.
                Transport::Serial(_) => {
                    if let Some(conn) = self.conn.as_mut() {
                        conn.frames = FrameBuffer::new();
                    }
                }
            }
        }
        true
    }

    fn flush(&mut self) {
        let Some(conn) = &self.conn else {
            return;
        };
        let fd = conn.fd;
        while let Some(front) = self.out.frames.front() {
            match sys::write(fd, &front.bytes[self.out.offset..]) {
                Ok(n) => {
                    self.out.offset += n;
                    self.out.bytes -= n;
                    if self.out.offset == front.bytes.len() {
                        self.out.frames.pop_front();
                        self.out.offset = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.disconnect(&format!("write: {e}"));
                    break;
                }
            }
        }
    }

    /// Writes what is queued for up to `limit` (before shutting down).
    fn flush_for(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.out.frames.is_empty() {
            let Some(conn) = &self.conn else { return };
            let now = Instant::now();
            if now >= end {
                return;
            }
            let mut p = [libc::pollfd {
                fd: conn.fd,
                events: libc::POLLOUT,
                revents: 0,
            }];
            if sys::poll(&mut p, Some(end - now)).is_err() {
                return;
            }
            self.flush();
        }
    }

    fn send(&mut self, message: GuestMessage) {
        self.out.push(&message);
    }

    fn send_error(&mut self, message: String) {
        debug!("error for the host: {message}");
        self.send(GuestMessage::Error { message });
    }

    // ---- host messages -----------------------------------------------------------------

    fn handle(&mut self, message: HostMessage) {
        match message {
            HostMessage::Ping { nonce } => self.send(GuestMessage::Pong { nonce }),
            HostMessage::Configure(config) => match self.mode {
                Mode::Pid1 => match crate::net::configure(&config) {
                    Ok(()) => self.send(GuestMessage::Configured),
                    Err(e) => self.send_error(format!("configure: {e}")),
                },
                Mode::Local => self.send(GuestMessage::Configured),
            },
            HostMessage::Exec { session, process } => self.exec(session, process),
            HostMessage::Stdin { session, data } => self.stdin(session, data),
            HostMessage::CloseStdin { session } => self.close_stdin(session),
            HostMessage::Ack { session, bytes } => match self.sessions.get_mut(&session) {
                Some(s) => s.out_unacked = s.out_unacked.saturating_sub(bytes),
                None => self.unknown(session, "Ack"),
            },
            HostMessage::Resize {
                session,
                rows,
                cols,
            } => self.resize(session, rows, cols),
            HostMessage::Signal { session, signal } => self.signal(session, signal),
            HostMessage::CopyOut { session, path } => self.copy_out(session, path),
            HostMessage::CopyIn { session, path } => self.copy_in(session, path),
            HostMessage::Shutdown => self.shutdown = true,
        }
    }

    fn unknown(&mut self, session: SessionId, what: &str) {
        if !self.finished_set.contains(&session) {
            self.send_error(format!("{what}: no session {session}"));
        }
    }

    /// Whether `session` may start; answers the host if not.
    fn claim(&mut self, session: SessionId) -> bool {
        if self.sessions.contains_key(&session) {
            self.send_error(format!("session {session} is already in use"));
            return false;
        }
        if self.finished_set.remove(&session) {
            self.finished.retain(|&s| s != session);
        }
        true
    }

    fn remember_finished(&mut self, session: SessionId) {
        if self.finished_set.insert(session) {
            self.finished.push_back(session);
            if self.finished.len() > FINISHED_MEMORY {
                if let Some(old) = self.finished.pop_front() {
                    self.finished_set.remove(&old);
                }
            }
        }
    }

    fn fail(&mut self, session: SessionId, code: i32, message: String) {
        debug!("session {session} failed ({code}): {message}");
        self.send(GuestMessage::Failed {
            session,
            message,
            code,
        });
        self.remember_finished(session);
    }

    fn exec(&mut self, session: SessionId, process: ProcessSpec) {
        if !self.claim(session) {
            return;
        }
        if process.args.is_empty() {
            return self.fail(session, 125, "no command given".into());
        }
        if process.main && self.has_main {
            return self.fail(session, 125, "the VM already has a main process".into());
        }
        let spawned = match spawn::spawn(&process) {
            Ok(s) => s,
            Err(e) => return self.fail(session, e.code, e.message),
        };
        debug!(
            "session {session}: started {:?} as pid {}",
            process.args, spawned.pid
        );
        for fd in [
            Some(&spawned.stdout),
            spawned.stderr.as_ref(),
            spawned.stdin.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = sys::set_nonblocking(fd.as_raw_fd(), true) {
                error!("session {session}: cannot make a pipe non-blocking: {e}");
            }
        }
        let mut s = Session::new(
            Kind::Process {
                pid: spawned.pid,
                tty: process.tty,
            },
            process.main,
        );
        s.stdout = Some(spawned.stdout);
        s.stderr = spawned.stderr;
        s.pty = spawned.pty;
        if let Some(fd) = spawned.stdin {
            s.stdin = Stdin::Open {
                fd,
                queue: VecDeque::new(),
                close_when_empty: false,
            };
        }
        self.has_main |= process.main;
        self.pids.insert(spawned.pid, session);
        self.sessions.insert(session, s);
        self.send(GuestMessage::Started {
            session,
            pid: spawned.pid as u32,
        });
    }

    fn copy_out(&mut self, session: SessionId, path: String) {
        if !self.claim(session) {
            return;
        }
        let src = match copy::check_source(&path) {
            Ok(p) => p,
            Err(message) => return self.fail(session, 1, message),
        };
        let started = sys::pipe().and_then(|(r, w)| {
            sys::set_nonblocking(r.as_raw_fd(), true)?;
            let done = self.copy_done(session)?;
            copy::spawn_copy_out(src, w, done)?;
            Ok(r)
        });
        match started {
            Ok(r) => {
                let mut s = Session::new(Kind::CopyOut, false);
                s.stdout = Some(r);
                self.sessions.insert(session, s);
                self.send(GuestMessage::Started { session, pid: 0 });
            }
            Err(e) => self.fail(session, 1, format!("cannot start the copy: {e}")),
        }
    }

    fn copy_in(&mut self, session: SessionId, path: String) {
        if !self.claim(session) {
            return;
        }
        let dst = match copy::check_destination(&path) {
            Ok(p) => p,
            Err(message) => return self.fail(session, 1, message),
        };
        let started = sys::pipe().and_then(|(r, w)| {
            sys::set_nonblocking(w.as_raw_fd(), true)?;
            let done = self.copy_done(session)?;
            copy::spawn_copy_in(dst, r, done)?;
            Ok(w)
        });
        match started {
            Ok(w) => {
                let mut s = Session::new(Kind::CopyIn, false);
                s.stdin = Stdin::Open {
                    fd: w,
                    queue: VecDeque::new(),
                    close_when_empty: false,
                };
                self.sessions.insert(session, s);
                self.send(GuestMessage::Started { session, pid: 0 });
            }
            Err(e) => self.fail(session, 1, format!("cannot start the copy: {e}")),
        }
    }

    /// The callback a copy thread reports its result with.
    fn copy_done(
        &self,
        session: SessionId,
    ) -> io::Result<impl FnOnce(CopyResult) + Send + 'static> {
        let tx = self.copy_tx.clone();
        let wake = self.waker.handle()?;
        Ok(move |result: CopyResult| {
            let _ = tx.send((session, result));
            wake.wake();
        })
    }

    fn stdin(&mut self, session: SessionId, mut data: Vec<u8>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return self.unknown(session, "Stdin");
        };
        let len = data.len() as u32;
        let mut ack_now = 0;
        let mut complaint = None;
        match &mut s.stdin {
            Stdin::None => complaint = Some(format!("session {session} has no stdin")),
            Stdin::Closed => ack_now = len,
            Stdin::Open {
                queue,
                close_when_empty,
                ..
            } => {
                if *close_when_empty {
                    complaint = Some(format!("stdin of session {session} is closed"));
                } else {
                    let room = WINDOW.saturating_sub(s.stdin_unacked);
                    if len > room {
                        complaint = Some(format!(
                            "session {session}: {} bytes of stdin beyond the {WINDOW}-byte window dropped",
                            len - room
                        ));
                        data.truncate(room as usize);
                    }
                    s.stdin_unacked += data.len() as u32;
                    queue.extend(data);
                }
            }
        }
        if ack_now > 0 {
            self.send(GuestMessage::StdinAck {
                session,
                bytes: ack_now,
            });
        }
        if let Some(message) = complaint {
            self.send_error(message);
        }
        self.pump_stdin(session);
    }

    fn close_stdin(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return self.unknown(session, "CloseStdin");
        };
        if matches!(s.kind, Kind::Process { tty: true, .. }) {
            return;
        }
        if let Stdin::Open {
            close_when_empty, ..
        } = &mut s.stdin
        {
            *close_when_empty = true;
        }
        self.pump_stdin(session);
    }

    fn resize(&mut self, session: SessionId, rows: u16, cols: u16) {
        let Some(s) = self.sessions.get(&session) else {
            return self.unknown(session, "Resize");
        };
        let result = match &s.pty {
            Some(pty) => spawn::set_window(pty.as_raw_fd(), rows, cols)
                .map_err(|e| format!("resize of session {session}: {e}")),
            None => Err(format!("session {session} has no terminal to resize")),
        };
        if let Err(message) = result {
            self.send_error(message);
        }
    }

    fn signal(&mut self, session: SessionId, signal: i32) {
        let Some(s) = self.sessions.get(&session) else {
            return self.unknown(session, "Signal");
        };
        let Kind::Process { pid, tty } = s.kind else {
            return self.send_error(format!("session {session} is a copy, not a process"));
        };
        if s.status.is_some() {
            return; // It already exited; its Exited is on the way.
        }
        if !(1..=64).contains(&signal) {
            return self.send_error(format!("signal {signal} is not a signal number"));
        }
        // SAFETY: kill/killpg only send a signal; the pid is our own child's, which is not
        // reaped yet (status is None), so it cannot have been reused.
        let r = unsafe {
            if tty {
                libc::killpg(pid, signal)
            } else {
                libc::kill(pid, signal)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                self.send_error(format!("signal {signal} to session {session}: {e}"));
            }
        }
    }

    // ---- session I/O -------------------------------------------------------------------

    /// Reads output of one stream while the window allows. `draining` (after
    /// [`EXIT_DRAIN`]) reads until nothing is left and then closes the pipe.
    fn pump_output(&mut self, session: SessionId, stream: Stream, draining: bool) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        loop {
            let Some(fd) = s.output_fd(stream) else {
                return;
            };
            let room = WINDOW.saturating_sub(s.out_unacked) as usize;
            if room == 0 {
                return;
            }
            let want = room.min(MAX_CHUNK).min(self.buf.len());
            match sys::read(fd, &mut self.buf[..want]) {
                Ok(0) => {
                    s.close_output(stream);
                    return;
                }
                Ok(n) => {
                    s.out_unacked += n as u32;
                    self.out.push(&GuestMessage::Output {
                        session,
                        stream,
                        data: self.buf[..n].to_vec(),
                    });
                    if draining {
                        let budget = s.drain_budget.get_or_insert(WINDOW as usize);
                        *budget = budget.saturating_sub(n);
                        if *budget == 0 {
                            s.close_output(stream);
                            return;
                        }
                    } else {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if draining {
                        s.close_output(stream);
                    }
                    return;
                }
                Err(e) => {
                    // EIO: the pty's last slave is closed, which is its end of file.
                    if e.raw_os_error() != Some(libc::EIO) {
                        error!("session {session}: reading output: {e}");
                    }
                    s.close_output(stream);
                    return;
                }
            }
        }
    }

    fn pump_stdin(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Stdin::Open {
            fd,
            queue,
            close_when_empty,
        } = &mut s.stdin
        else {
            return;
        };
        let mut written = 0usize;
        let mut broken = false;
        while !queue.is_empty() {
            let (front, _) = queue.as_slices();
            match sys::write(fd.as_raw_fd(), front) {
                Ok(n) => {
                    queue.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if e.raw_os_error() != Some(libc::EPIPE) {
                        debug!("session {session}: writing stdin: {e}");
                    }
                    // Nobody reads it any more: drop what is queued (acknowledged, so the
                    // host is not left waiting for its window) and whatever comes later.
                    written += queue.len();
                    broken = true;
                    break;
                }
            }
        }
        if broken || (queue.is_empty() && *close_when_empty) {
            s.stdin = Stdin::Closed;
        }
        let skip = written.min(s.stdin_ack_skip);
        s.stdin_ack_skip -= skip;
        let ack = (written - skip) as u32;
        if ack > 0 {
            s.stdin_unacked = s.stdin_unacked.saturating_sub(ack);
            self.out.push(&GuestMessage::StdinAck {
                session,
                bytes: ack,
            });
        }
    }

    /// Once a process has been gone for [`EXIT_DRAIN`], sends what its pipes hold and closes
    /// them, instead of waiting for background children that keep them open.
    fn drain_exited(&mut self) {
        let now = Instant::now();
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.exited_at.is_some_and(|t| now >= t + EXIT_DRAIN)
                    && (s.stdout.is_some() || s.stderr.is_some())
                    && s.window_open()
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.drain_budget.get_or_insert(WINDOW as usize);
            }
            self.pump_output(id, Stream::Stdout, true);
            self.pump_output(id, Stream::Stderr, true);
        }
    }

    fn reap(&mut self) -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid < 0 {
                return io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD);
            }
            if pid == 0 {
                return false;
            }
            let exit = if libc::WIFEXITED(status) {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                continue;
            };
            if let Some(id) = self.pids.remove(&pid) {
                debug!("session {id}: pid {pid} exited: {exit:?}");
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.status = Some(exit);
                    s.exited_at = Some(Instant::now());
                }
            }
        }
    }

    fn collect_copies(&mut self) {
        while let Ok((id, result)) = self.copy_rx.try_recv() {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.copy_result = Some(result);
            }
        }
    }

    fn finish_sessions(&mut self) {
        let done: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| match s.kind {
                Kind::Process { .. } => {
                    s.status.is_some() && s.stdout.is_none() && s.stderr.is_none()
                }
                Kind::CopyOut => s.copy_result.is_some() && s.stdout.is_none(),
                Kind::CopyIn => s.copy_result.is_some(),
            })
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let Some(s) = self.sessions.remove(&id) else {
                continue;
            };
            let message = match (s.status, s.copy_result) {
                (Some(status), _) => GuestMessage::Exited {
                    session: id,
                    status,
                },
                (None, Some(Ok(()))) => GuestMessage::Exited {
                    session: id,
                    status: ExitStatus::Code(0),
                },
                (None, Some(Err(message))) => GuestMessage::Failed {
                    session: id,
                    message,
                    code: 1,
                },
                (None, None) => continue,
            };
            debug!("session {id} ended: {message:?}");
            self.send(message);
            self.remember_finished(id);
            if s.main {
                debug!("the main process exited; waiting for Shutdown");
                self.main_done = Some(Instant::now());
            }
        }
    }

    // ---- shutdown ----------------------------------------------------------------------

    /// SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL: every process as PID 1, only the
    /// sessions' processes otherwise.
    fn terminate(&mut self) {
        let signal_all = |this: &Self, signal: i32| match this.mode {
            Mode::Pid1 => {
                // SAFETY: kill(-1) signals every process but PID 1 itself.
                unsafe { libc::kill(-1, signal) };
            }
            Mode::Local => {
                for s in this.sessions.values() {
                    if let (Kind::Process { pid, tty }, None) = (s.kind, s.status) {
                        // SAFETY: our unreaped child (or its process group, for a tty).
                        unsafe {
                            if tty {
                                libc::killpg(pid, signal);
                            } else {
                                libc::kill(pid, signal);
                            }
                        }
                    }
                }
            }
        };
        signal_all(self, libc::SIGTERM);
        if !self.wait_children(TERM_GRACE) {
            signal_all(self, libc::SIGKILL);
            self.wait_children(Duration::from_millis(500));
        }
    }

    /// Reaps until every child (PID 1) or every session process (otherwise) is gone, or for
    /// `limit`. True if they all are.
    fn wait_children(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let none_left = self.reap();
            let all_gone = match self.mode {
                Mode::Pid1 => none_left,
                Mode::Local => self.pids.is_empty(),
            };
            if all_gone {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            let mut p = [libc::pollfd {
                fd: self.waker.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let _ = sys::poll(&mut p, Some((end - now).min(Duration::from_millis(50))));
            self.waker.drain();
        }
    }
}

/// Serves the protocol on `transport` until shutdown (see [`Agent::serve`]).
pub fn serve(transport: Transport, mode: Mode) -> io::Result<()> {
    Agent::new(transport, mode)?.serve()
}
