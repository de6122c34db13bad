//! virtio-vsock with Firecracker's hybrid design: there is no vhost-vsock on the host, so the
//! VMM itself terminates guest streams on Unix sockets.
//!
//! - Guest → host: a guest connecting to CID 2, port P reaches whoever listens on the Unix
//!   socket `{uds_path}_{P}`.
//! - Host → guest: a host process connects to `uds_path`, writes `CONNECT P\n`, gets
//!   `OK HOSTPORT\n` once the guest's listener on port P accepted, and then talks to it.
//!
//! The guest is hostile: every header field is checked, packets for unknown connections get
//! RST, and a guest that overruns the credit it was given loses the connection.

mod connection;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::connection::{Connection, Handshake, SocketEvent, State};
use self::packet::{op, Header, HDR_SIZE, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::metrics::VsockMetrics;

/// Virtio device type of a vsock device.
pub const TYPE_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload accepted in one packet from the guest.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Most connections at once; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets waiting for guest RX buffers (a few per connection at most when the
/// guest behaves).
pub const MAX_CONTROL_PACKETS: usize = 4 * MAX_CONNECTIONS;
/// Most host connections still sending their `CONNECT` line. A handshake has no timeout (a
/// person typing into socat is slow), so beyond this the oldest is closed: clients that
/// connect and never write cannot hold descriptors without bound.
pub const MAX_PENDING_HANDSHAKES: usize = 128;
/// How long the listener rests after accept() ran out of descriptors or memory.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// First port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host-side socket could not be bound.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create a vsock eventfd: {0}")]
    EventFd(std::io::Error),
}

type ConnKey = (u32, u32);

struct Active {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

/// The vsock device and its connection multiplexer.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    queue_events: [EventFd; 3],
    acked_features: u64,
    active: Option<Active>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Control packets waiting for a guest RX buffer.
    control: VecDeque<Header>,
    next_local_port: u32,
    /// Host sockets of connections a driver reset cut off. `reset` runs on a vCPU thread,
    /// without the event loop's `EventOps`: closing a watched socket there would leave its
    /// descriptor number registered with the event manager, and a later connection that
    /// reuses the number could then never be watched (the manager refuses it as already
    /// registered). They are unwatched and closed on the loop's next pass.
    orphans: Vec<UnixStream>,
    /// The listener is off the epoll set: accept() failed for want of descriptors (or
    /// memory), which leaves the connection queued and the listener readable, so watching it
    /// would wake the loop again at once, forever. `accept_retry` puts it back.
    listener_paused: bool,
    accept_retry: vmm_sys_util::timerfd::TimerFd,
    /// Fires at the first connection deadline (see [`Vsock::deadline`]), so a guest that
    /// falls silent cannot pin host sockets: without it deadlines would only be looked at
    /// when some other vsock event happened to come.
    deadline_timer: vmm_sys_util::timerfd::TimerFd,
    /// When `deadline_timer` is armed for, if it is.
    armed_deadline: Option<std::time::Instant>,
    /// When the guest last notified its TX queue: its sign of life for REQUEST timeouts.
    guest_sent: std::time::Instant,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device with context id `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path, metrics: Arc<VsockMetrics>) -> Result<Vsock, VsockError> {
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: uds_path.to_path_buf(),
                source,
            })?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            queue_events: [eventfd()?, eventfd()?, eventfd()?],
            acked_features: 0,
            active: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            orphans: Vec::new(),
            listener_paused: false,
            deadline_timer: crate::rate_limiter::nonblocking_timer()
                .map_err(|e| VsockError::EventFd(std::io::Error::from_raw_os_error(e.errno())))?,
            armed_deadline: None,
            guest_sent: std::time::Instant::now(),
            accept_retry: crate::rate_limiter::nonblocking_timer()
                .map_err(|e| VsockError::EventFd(std::io::Error::from_raw_os_error(e.errno())))?,
            metrics,
        })
    }

    /// The host-side socket path (removed when the VMM ends).
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn rst(&self, local_port: u32, peer_port: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }

    fn watch(ops: &mut EventOps, fd: RawFd) {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        if let Err(e) = ops.add(Events::new_raw(fd, events)) {
            tracing::warn!("vsock: cannot watch a connection: {e:?}");
        }
    }

    fn unwatch(ops: &mut EventOps, fd: RawFd) {
        let _ = ops.remove(Events::new_raw(fd, EventSet::empty()));
    }

    fn remove_conn(&mut self, key: ConnKey, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            Self::unwatch(ops, fd);
        }
    }

    /// Unwatches and closes the sockets of connections a reset cut off.
    fn release_orphans(&mut self, ops: &mut EventOps) {
        for stream in self.orphans.drain(..) {
            Self::unwatch(ops, stream.as_raw_fd());
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn accept_host_connections(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                        self.drop_oldest_handshake(ops);
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                        tracing::warn!("vsock: cannot watch a host connection: {e:?}");
                        continue;
                    }
                    self.handshakes.insert(fd, Handshake::new(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    tracing::warn!("vsock: accept failed, retrying in {ACCEPT_RETRY:?}: {e}");
                    self.pause_listener(ops);
                    return;
                }
                Err(e) => {
                    tracing::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Closes the host connection that has waited longest without completing its CONNECT.
    fn drop_oldest_handshake(&mut self, ops: &mut EventOps) {
        let oldest = self
            .handshakes
            .iter()
            .min_by_key(|(_, h)| h.accepted)
            .map(|(fd, _)| *fd);
        if let Some(fd) = oldest {
            tracing::debug!("vsock: too many pending CONNECTs, closing the oldest");
            Self::unwatch(ops, fd);
            self.handshakes.remove(&fd);
        }
    }

    /// Stops watching the listener until `accept_retry` fires.
    fn pause_listener(&mut self, ops: &mut EventOps) {
        if self.accept_retry.reset(ACCEPT_RETRY, None).is_err() {
            // Without the timer nothing would bring the listener back: keep watching it.
            return;
        }
        if ops
            .remove(Events::new(&self.listener, EventSet::IN))
            .is_ok()
        {
            self.listener_paused = true;
        }
    }

    /// `accept_retry` fired: watch the listener again and take what is waiting.
    fn resume_listener(&mut self, ops: &mut EventOps) {
        let _ = self.accept_retry.wait();
        if !self.listener_paused {
            return;
        }
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("vsock: cannot watch its socket again: {e:?}");
            return;
        }
        self.listener_paused = false;
        self.accept_host_connections(ops);
    }

    fn progress_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match handshake.poll() {
            Ok(None) => {}
            Ok(Some(port)) => {
                let Some(handshake) = self.handshakes.remove(&fd) else {
                    return;
                };
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                if self.conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!("vsock: too many connections, refusing CONNECT {port}");
                    return;
                }
                let local = self.allocate_local_port();
                let mut conn =
                    Connection::new(handshake.stream, local, port, State::LocalInit(None));
                let request = conn.header(self.cid, op::REQUEST, 0, 0);
                Self::watch(ops, fd);
                self.by_fd.insert(fd, (local, port));
                self.conns.insert((local, port), conn);
                push_control(&mut self.control, &self.metrics, request);
            }
            Err(reason) => {
                tracing::debug!("vsock: dropping host connection: {reason}");
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                self.handshakes.remove(&fd);
            }
        }
    }

    fn host_socket_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        if matches!(conn.state, State::LocalInit(_)) && events.contains(EventSet::HANG_UP) {
            // The host process gave up before the guest answered its CONNECT. Nothing reads
            // a LocalInit socket, so this is the only notice: without it the connection would
            // hold its slot until the guest answered, which it may never do.
            self.host_closed(key, ops);
            return;
        }
        if events.contains(EventSet::OUT) && matches!(conn.state, State::Draining(_)) {
            let closed = matches!(conn.flush_to_host(), SocketEvent::Closed);
            if closed || !conn.has_data_for_host() {
                let rst = self.rst(key.0, key.1);
                push_control(&mut self.control, &self.metrics, rst);
                self.remove_conn(key, ops);
            } else {
                // Still draining: the timeout counts from the last progress.
                conn.state = State::Draining(std::time::Instant::now());
            }
            return;
        }
        if events.contains(EventSet::OUT) && conn.state == State::Established {
            if let SocketEvent::Closed = conn.flush_to_host() {
                self.host_closed(key, ops);
                return;
            }
            if conn.needs_credit_update() {
                let update = conn.header(self.cid, op::CREDIT_UPDATE, 0, 0);
                push_control(&mut self.control, &self.metrics, update);
            }
        }
    }

    /// The host side of `key` went away: tell the guest and forget the connection.
    fn host_closed(&mut self, key: ConnKey, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.state {
            State::Established => {
                let shutdown = conn.header(self.cid, op::SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
                conn.state = State::Closing(std::time::Instant::now());
                conn.readable = false;
                push_control(&mut self.control, &self.metrics, shutdown);
            }
            State::LocalInit(_) | State::Closing(_) | State::Draining(_) => {
                let rst = self.rst(key.0, key.1);
                push_control(&mut self.control, &self.metrics, rst);
                self.remove_conn(key, ops);
            }
        }
    }

    /// When `conn` must be given up on, if it waits on the guest: the guest never answered
    /// our REQUEST or never acknowledged our SHUTDOWN, or the host stopped taking the data
    /// of a connection the guest closed.
    ///
    /// A REQUEST's timeout counts from the later of its delivery and the guest's last
    /// transmission: a guest busy on other connections (or starved of CPU with them) is
    /// alive and will answer; one that has gone silent will not.
    fn deadline(conn: &Connection, guest_sent: std::time::Instant) -> Option<std::time::Instant> {
        match conn.state {
            State::LocalInit(Some(since)) => {
                Some(since.max(guest_sent) + connection::CONNECT_TIMEOUT)
            }
            State::Closing(since) | State::Draining(since) => {
                Some(since + connection::CLOSE_TIMEOUT)
            }
            State::LocalInit(None) | State::Established => None,
        }
    }

    /// Resets connections past their [`Vsock::deadline`], so a silent guest cannot pin host
    /// sockets (or leave a host process waiting on its CONNECT) forever.
    fn reset_expired(&mut self, ops: &mut EventOps) {
        let now = std::time::Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| Self::deadline(c, self.guest_sent).is_some_and(|at| now > at))
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get(&key) {
                if matches!(conn.state, State::LocalInit(_)) {
                    tracing::debug!("vsock: the guest did not answer CONNECT {} in time", key.1);
                    self.metrics.inc_conn_timeouts();
                }
            }
            let rst = self.rst(key.0, key.1);
            push_control(&mut self.control, &self.metrics, rst);
            self.remove_conn(key, ops);
        }
    }

    /// Arms `deadline_timer` for the first connection deadline (or disarms it); a timer that
    /// is already right is left alone.
    fn arm_deadline_timer(&mut self) {
        let deadline = self
            .conns
            .values()
            .filter_map(|c| Self::deadline(c, self.guest_sent))
            .min();
        if deadline == self.armed_deadline {
            return;
        }
        let armed = match deadline {
            Some(at) => {
                // Just past the deadline: a timeout is "more than" its duration.
                let wait = at.saturating_duration_since(std::time::Instant::now())
                    + std::time::Duration::from_millis(1);
                self.deadline_timer.reset(wait, None)
            }
            None => self.deadline_timer.clear(),
        };
        match armed {
            Ok(()) => self.armed_deadline = deadline,
            Err(e) => tracing::warn!("vsock: cannot arm the deadline timer: {e}"),
        }
    }

    /// Handles one packet the guest sent.
    fn handle_tx_packet(&mut self, header: Header, payload: &[u8], ops: &mut EventOps) {
        if header.type_ != TYPE_STREAM || header.dst_cid != HOST_CID || header.src_cid != self.cid {
            self.metrics.inc_invalid();
            if header.op != op::RST {
                let rst = self.rst(header.dst_port, header.src_port);
                push_control(&mut self.control, &self.metrics, rst);
            }
            return;
        }
        let key = (header.dst_port, header.src_port);
        if header.op == op::REQUEST {
            self.guest_connect(header, ops);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != op::RST {
                let rst = self.rst(key.0, key.1);
                push_control(&mut self.control, &self.metrics, rst);
            }
            return;
        };
        conn.update_peer_credit(&header);
        match (header.op, conn.state) {
            (op::RESPONSE, State::LocalInit(_)) => {
                conn.state = State::Established;
                conn.readable = true;
                let ok = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.host_closed(key, ops);
                }
            }
            (op::RW, State::Established) => {
                if !conn.push_from_guest(payload) {
                    tracing::debug!("vsock: guest overran its credit on port {}", key.0);
                    self.metrics.inc_invalid();
                    let rst = self.rst(key.0, key.1);
                    push_control(&mut self.control, &self.metrics, rst);
                    self.remove_conn(key, ops);
                    return;
                }
                self.metrics.add_tx(payload.len() as u64);
                if let SocketEvent::Closed = conn.flush_to_host() {
                    self.host_closed(key, ops);
                    return;
                }
                if conn.needs_credit_update() {
                    let update = conn.header(self.cid, op::CREDIT_UPDATE, 0, 0);
                    push_control(&mut self.control, &self.metrics, update);
                }
            }
            (op::CREDIT_REQUEST, State::Established) => {
                let update = conn.header(self.cid, op::CREDIT_UPDATE, 0, 0);
                push_control(&mut self.control, &self.metrics, update);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::SHUTDOWN, State::Established) => {
                if header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    conn.guest_shut_send();
                    let _ = conn.flush_to_host();
                    if conn.has_data_for_host() {
                        // Deliver what the guest sent before it closed; the reset follows.
                        conn.state = State::Draining(std::time::Instant::now());
                        conn.readable = false;
                        return;
                    }
                    let rst = self.rst(key.0, key.1);
                    push_control(&mut self.control, &self.metrics, rst);
                    self.remove_conn(key, ops);
                } else if header.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_shut_send();
                    let _ = conn.flush_to_host();
                }
            }
            (op::SHUTDOWN, State::Closing(_)) | (op::RST, _) => self.remove_conn(key, ops),
            (_, State::Draining(_)) => {}
            _ => {
                self.metrics.inc_invalid();
                let rst = self.rst(key.0, key.1);
                push_control(&mut self.control, &self.metrics, rst);
                self.remove_conn(key, ops);
            }
        }
    }

    /// The guest connects to a host port: reach `{uds_path}_{port}`.
    fn guest_connect(&mut self, header: Header, ops: &mut EventOps) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            let rst = self.rst(key.0, key.1);
            push_control(&mut self.control, &self.metrics, rst);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), header.dst_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(_) => {
                tracing::debug!("vsock: guest connect to {path} refused");
                let rst = self.rst(key.0, key.1);
                push_control(&mut self.control, &self.metrics, rst);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, key.0, key.1, State::Established);
        conn.update_peer_credit(&header);
        let response = conn.header(self.cid, op::RESPONSE, 0, 0);
        Self::watch(ops, fd);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        push_control(&mut self.control, &self.metrics, response);
        self.metrics.inc_connection();
    }

    fn process_tx(&mut self, ops: &mut EventOps) {
        self.guest_sent = std::time::Instant::now();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut packets = Vec::new();
        let mut broken = None;
        {
            let memory = &active.memory;
            let queue = &mut active.queues[TX];
            loop {
                let chains: Vec<_> = match queue.iter(memory) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        broken = Some(format!("tx ring: {e}"));
                        break;
                    }
                };
                if chains.is_empty() {
                    break;
                }
                for chain in chains {
                    let head = chain.head_index();
                    let parsed = match chain.reader(memory) {
                        Ok(mut reader) => read_packet(&mut reader),
                        Err(_) => None,
                    };
                    match parsed {
                        Some(packet) => packets.push(packet),
                        None => self.metrics.inc_invalid(),
                    }
                    if let Err(e) = queue.add_used(memory, head, 0) {
                        broken = Some(format!("tx used ring: {e}"));
                        break;
                    }
                }
                if broken.is_some() {
                    break;
                }
            }
            if broken.is_none() && queue.needs_notification(memory).unwrap_or(true) {
                active.interrupt.signal_used_queue();
            }
        }
        if let Some(reason) = broken {
            self.mark_broken(&reason);
            return;
        }
        for (header, payload) in packets {
            self.handle_tx_packet(header, &payload, ops);
        }
    }

    fn mark_broken(&mut self, reason: &str) {
        tracing::warn!("vsock: driver error, device needs reset: {reason}");
        self.metrics.inc_invalid();
        if let Some(active) = self.active.take() {
            active.interrupt.mark_broken();
        }
    }

    /// Fills guest RX buffers: control packets first, then data from readable connections.
    /// Host sockets found closed on the way queue a SHUTDOWN, which goes out in the same call.
    fn process_rx(&mut self, ops: &mut EventOps) {
        while self.fill_rx(ops) {}
    }

    /// One pass of [`Vsock::process_rx`]; true if it closed connections (and so queued
    /// control packets that still need a buffer).
    fn fill_rx(&mut self, ops: &mut EventOps) -> bool {
        let mut closed = Vec::new();
        let mut notify = false;
        let mut broken = None;
        'outer: loop {
            let Some(active) = self.active.as_mut() else {
                return false;
            };
            let memory = &active.memory;
            let queue = &mut active.queues[RX];
            // A control packet, or data from some connection with credit.
            let pending_control = self.control.front().copied();
            let data_key = if pending_control.is_none() {
                self.conns
                    .iter()
                    .find(|(_, c)| {
                        c.state == State::Established && c.readable && c.peer_credit() > 0
                    })
                    .map(|(key, _)| *key)
            } else {
                None
            };
            if pending_control.is_none() && data_key.is_none() {
                break;
            }
            let chain = match queue.iter(memory) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    broken = Some(format!("rx ring: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(memory) {
                Ok(writer) => writer,
                Err(_) => {
                    self.metrics.inc_invalid();
                    if let Err(e) = queue.add_used(memory, head, 0) {
                        broken = Some(format!("rx used ring: {e}"));
                        break;
                    }
                    notify = true;
                    continue;
                }
            };
            let room = writer.available_bytes();
            if room < HDR_SIZE {
                self.metrics.inc_invalid();
                if let Err(e) = queue.add_used(memory, head, 0) {
                    broken = Some(format!("rx used ring: {e}"));
                    break;
                }
                notify = true;
                continue;
            }
            let (header, payload) = if let Some(header) = pending_control {
                self.control.pop_front();
                (header, Vec::new())
            } else {
                let Some(key) = data_key else { break };
                let Some(conn) = self.conns.get_mut(&key) else {
                    break;
                };
                let max = (room - HDR_SIZE)
                    .min(conn.peer_credit() as usize)
                    .min(MAX_PKT_PAYLOAD as usize);
                if max == 0 {
                    // A buffer with room for a header only: a read of 0 bytes would return 0,
                    // which means "closed". The buffer stays for the next control packet.
                    queue.go_to_previous_position();
                    break;
                }
                match conn.read_from_host(max) {
                    Ok(Some(data)) => {
                        conn.sent_to_guest(data.len() as u32);
                        (conn.header(self.cid, op::RW, data.len() as u32, 0), data)
                    }
                    Ok(None) => {
                        queue.go_to_previous_position();
                        continue 'outer;
                    }
                    Err(()) => {
                        queue.go_to_previous_position();
                        closed.push(key);
                        conn.readable = false;
                        continue 'outer;
                    }
                }
            };
            let written = writer
                .write_all(&header.to_bytes())
                .and_then(|()| writer.write_all(&payload));
            if written.is_err() {
                self.metrics.inc_invalid();
            } else {
                self.metrics.add_rx(payload.len() as u64);
                if header.op == op::REQUEST {
                    let key = (header.src_port, header.dst_port);
                    if let Some(conn) = self.conns.get_mut(&key) {
                        if conn.state == State::LocalInit(None) {
                            conn.state = State::LocalInit(Some(std::time::Instant::now()));
                        }
                    }
                }
            }
            if let Err(e) = queue.add_used(memory, head, writer.bytes_written() as u32) {
                broken = Some(format!("rx used ring: {e}"));
                break;
            }
            notify = true;
            // Closed sockets are handled between buffers, so their SHUTDOWN goes out in order.
            for key in closed.drain(..) {
                self.host_closed(key, ops);
            }
        }
        let closed_any = !closed.is_empty();
        for key in closed {
            self.host_closed(key, ops);
        }
        if let Some(reason) = broken {
            self.mark_broken(&reason);
            return false;
        }
        if notify {
            if let Some(active) = self.active.as_mut() {
                if active.queues[RX]
                    .needs_notification(&active.memory)
                    .unwrap_or(true)
                {
                    active.interrupt.signal_used_queue();
                }
            }
        }
        closed_any && !self.control.is_empty()
    }
}

/// Connects to a host Unix socket without ever waiting: a blocking connect() to a listener
/// whose backlog is full (a host service that stopped accepting) sleeps until it accepts,
/// and on the event loop that would stall every device. A full backlog fails with EAGAIN
/// instead, and the guest gets RST as for a missing listener.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: an all-zero sockaddr_un is valid.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the path must be NUL-terminated.
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (dst, src) in address.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own alone.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `address` is a valid sockaddr_un and the length passed is its size.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &address as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// Queues a control packet for the guest, unless [`MAX_CONTROL_PACKETS`] are already waiting
/// for RX buffers: a guest that keeps sending bad packets (each answered with RST) or credit
/// requests and never posts RX buffers would otherwise grow the queue without end. Past the
/// limit the guest is not reading its control packets anyway; they are dropped and counted.
fn push_control(control: &mut VecDeque<Header>, metrics: &VsockMetrics, header: Header) {
    if control.len() >= MAX_CONTROL_PACKETS {
        metrics.inc_invalid();
        return;
    }
    control.push_back(header);
}

/// Reads a header and its payload from a TX chain; `None` if the packet is malformed.
fn read_packet(reader: &mut virtio_queue::Reader<'_>) -> Option<(Header, Vec<u8>)> {
    let mut bytes = [0u8; HDR_SIZE];
    reader.read_exact(&mut bytes).ok()?;
    let header = Header::from_bytes(&bytes);
    if header.len > MAX_PKT_PAYLOAD || header.len as usize > reader.available_bytes() {
        return None;
    }
    let mut payload = vec![0u8; header.len as usize];
    reader.read_exact(&mut payload).ok()?;
    Some((header, payload))
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("vsock: ignored config write at {offset:#x}");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::BadQueue(format!(
                "vsock needs 3 queues, got {}",
                queues.len()
            )));
        }
        self.active = Some(Active {
            memory,
            queues,
            interrupt,
        });
        // Pending requests go out on the next RX notification or host event.
        let _ = self.queue_events[RX].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The guest's sockets are gone; so are ours, once the event loop has unwatched them.
        self.control.clear();
        self.orphans
            .extend(self.conns.drain().map(|(_, conn)| conn.stream));
        self.by_fd.clear();
        // Wake the loop so the host sides see the close now, not at the next event.
        let _ = self.queue_events[RX].write(1);
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, event) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, i as u32, EventSet::IN)) {
                tracing::error!("vsock: cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("vsock: cannot watch its socket: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.accept_retry, EventSet::IN)) {
            tracing::error!("vsock: cannot watch its accept timer: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.deadline_timer, EventSet::IN)) {
            tracing::error!("vsock: cannot watch its deadline timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.release_orphans(ops);
        let fd = events.fd();
        if let Some(i) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_events[i].read();
            if i == TX {
                self.process_tx(ops);
            } else if i == EVENT {
                // kiln-vmm sends no events (transport reset only matters for snapshots).
            }
        } else if fd == self.listener.as_raw_fd() {
            self.accept_host_connections(ops);
        } else if fd == self.accept_retry.as_raw_fd() {
            self.resume_listener(ops);
        } else if fd == self.deadline_timer.as_raw_fd() {
            let _ = self.deadline_timer.wait();
            self.armed_deadline = None;
        } else if self.handshakes.contains_key(&fd) {
            self.progress_handshake(fd, ops);
        } else {
            self.host_socket_event(fd, events.event_set(), ops);
        }
        self.reset_expired(ops);
        self.process_rx(ops);
        self.arm_deadline_timer();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::devices::virtio::test_util::queue_at;

    const GUEST_CID: u64 = 3;

    /// A fresh directory for one test's sockets.
    fn scratch_dir(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-vsock-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn request(src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    /// A device on an event loop of its own, listening in a fresh scratch directory.
    struct LoopedVsock {
        dir: PathBuf,
        path: PathBuf,
        vsock: Arc<Mutex<Vsock>>,
        manager: EventManager<Arc<Mutex<Vsock>>>,
    }

    impl LoopedVsock {
        fn new(name: &str) -> LoopedVsock {
            let dir = scratch_dir(name);
            let path = dir.join("v.sock");
            let vsock = Arc::new(Mutex::new(
                Vsock::new(GUEST_CID, &path, Arc::default()).expect("vsock"),
            ));
            let mut manager = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
            manager.add_subscriber(vsock.clone());
            LoopedVsock {
                dir,
                path,
                vsock,
                manager,
            }
        }
    }

    /// Runs the event loop until `done` holds (or a few seconds pass).
    fn run_until(
        manager: &mut EventManager<Arc<Mutex<Vsock>>>,
        vsock: &Arc<Mutex<Vsock>>,
        done: impl Fn(&Vsock) -> bool,
    ) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if done(&vsock.lock().expect("vsock")) {
                return true;
            }
            manager.run_with_timeout(20).expect("event loop");
        }
        done(&vsock.lock().expect("vsock"))
    }

    fn connect_host_clients(path: &Path, n: usize) -> Vec<UnixStream> {
        (0..n)
            .map(|_| {
                let mut client = UnixStream::connect(path).expect("connect to the vsock socket");
                client.write_all(b"CONNECT 52\n").expect("CONNECT");
                client
            })
            .collect()
    }

    #[test]
    fn host_connections_after_a_guest_reset_are_still_watched() {
        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("reset");

        const N: usize = 8;
        let old = connect_host_clients(&path, N);
        assert!(
            run_until(&mut manager, &vsock, |v| v.conns.len() == N),
            "the first connections are set up"
        );
        // The driver resets the device while those connections are open (the vCPU thread
        // calls reset through the transport). Their sockets are closed, and the descriptor
        // numbers come free for the next connections.
        vsock.lock().expect("vsock").reset();
        assert!(
            run_until(&mut manager, &vsock, |v| v.orphans.is_empty()),
            "the reset wakes the event loop, which lets go of the old sockets"
        );
        for mut client in old {
            client
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let mut byte = [0u8; 1];
            assert_eq!(
                client.read(&mut byte).expect("EOF, not a timeout"),
                0,
                "a connection the reset cut off is closed on the host side"
            );
        }

        let _new = connect_host_clients(&path, N);
        assert!(
            run_until(&mut manager, &vsock, |v| v.conns.len() == N),
            "every new connection is watched and set up (got {})",
            vsock.lock().expect("vsock").conns.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Calls `guest_connect` for the given guest ports from inside the event manager, where
    /// an `EventOps` exists, and reports the control packets it queued.
    struct GuestConnects {
        vsock: Vsock,
        src_ports: Vec<u32>,
        done: std::sync::mpsc::Sender<Vec<Header>>,
    }

    impl MutEventSubscriber for GuestConnects {
        fn init(&mut self, ops: &mut EventOps) {
            for &src_port in &self.src_ports {
                self.vsock.guest_connect(request(src_port, 52), ops);
            }
            let _ = self.done.send(self.vsock.control.iter().copied().collect());
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    /// RX, TX and event queues at 0x1_0000, 0x2_0000 and 0x3_0000.
    fn vsock_queues(memory: &GuestMemoryMmap) -> Vec<Queue> {
        vec![
            queue_at(memory, 0x1_0000, QUEUE_SIZE),
            queue_at(memory, 0x2_0000, QUEUE_SIZE),
            queue_at(memory, 0x3_0000, QUEUE_SIZE),
        ]
    }

    /// The guest posts one device-writable RX buffer (at 0x8_0000) of exactly a header's size.
    fn post_header_sized_rx_buffer(memory: &GuestMemoryMmap) {
        use vm_memory::{Bytes, GuestAddress};

        let mut descriptor = [0u8; 16];
        descriptor[..8].copy_from_slice(&0x8_0000u64.to_le_bytes());
        descriptor[8..12].copy_from_slice(&(HDR_SIZE as u32).to_le_bytes());
        descriptor[12..14].copy_from_slice(&2u16.to_le_bytes());
        memory
            .write_slice(&descriptor, GuestAddress(0x1_0000))
            .expect("descriptor");
        memory
            .write_obj(0u16, GuestAddress(0x1_1004))
            .expect("ring");
        memory.write_obj(1u16, GuestAddress(0x1_1002)).expect("idx");
    }

    type WithOpsFn = Box<dyn FnMut(&mut Vsock, &mut EventOps)>;

    /// Runs `f` on the device from inside the event manager, where an `EventOps` exists.
    struct WithOps {
        vsock: Vsock,
        f: WithOpsFn,
    }

    impl MutEventSubscriber for WithOps {
        fn init(&mut self, ops: &mut EventOps) {
            (self.f)(&mut self.vsock, ops);
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    #[test]
    fn a_guest_that_posts_no_rx_buffers_cannot_grow_the_control_queue() {
        use vm_memory::{Bytes, GuestAddress};

        let dir = scratch_dir("control");
        let mut vsock = Vsock::new(GUEST_CID, &dir.join("v.sock"), Arc::default()).expect("vsock");
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        // RX: a valid ring the guest never puts a buffer in. TX: one descriptor holding data
        // for a connection that does not exist, which earns an RST each time it is sent.
        let queues = vsock_queues(&memory);
        let mut packet = request(1000, 52);
        packet.op = op::RW;
        memory
            .write_slice(&packet.to_bytes(), GuestAddress(0x8_0000))
            .expect("packet");
        let mut descriptor = [0u8; 16];
        descriptor[..8].copy_from_slice(&0x8_0000u64.to_le_bytes());
        descriptor[8..12].copy_from_slice(&(HDR_SIZE as u32).to_le_bytes());
        memory
            .write_slice(&descriptor, GuestAddress(0x2_0000))
            .expect("descriptor");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irqfd");
        vsock
            .activate(memory.clone(), queues, Arc::new(VirtioInterrupt::new(irq)))
            .expect("activate");

        let (done, finished) = std::sync::mpsc::channel();
        let mut manager = EventManager::<WithOps>::new().expect("event manager");
        manager.add_subscriber(WithOps {
            vsock,
            f: Box::new(move |vsock, ops| {
                let mut avail_idx: u16 = 0;
                for _ in 0..40 {
                    for _ in 0..QUEUE_SIZE {
                        let slot = 0x2_1004 + u64::from(avail_idx % QUEUE_SIZE) * 2;
                        memory.write_obj(0u16, GuestAddress(slot)).expect("ring");
                        avail_idx = avail_idx.wrapping_add(1);
                    }
                    memory
                        .write_obj(avail_idx, GuestAddress(0x2_1002))
                        .expect("avail idx");
                    vsock.process_tx(ops);
                    vsock.process_rx(ops);
                }
                let _ = done.send(vsock.control.len());
            }),
        });
        let queued = finished.recv().expect("result");
        assert!(
            queued <= MAX_CONTROL_PACKETS,
            "10240 bad packets and no RX buffer left {queued} control packets queued"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_rx_buffer_with_room_for_only_a_header_does_not_close_a_connection() {
        use vm_memory::GuestAddress;

        let dir = scratch_dir("small-rx");
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_52", path.display())).expect("host listener");
        let mut vsock = Vsock::new(GUEST_CID, &path, Arc::default()).expect("vsock");
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        let queues = vsock_queues(&memory);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irqfd");
        vsock
            .activate(memory.clone(), queues, Arc::new(VirtioInterrupt::new(irq)))
            .expect("activate");

        let (done, finished) = std::sync::mpsc::channel();
        let mut manager = EventManager::<WithOps>::new().expect("event manager");
        manager.add_subscriber(WithOps {
            vsock,
            f: Box::new(move |vsock, ops| {
                vsock.guest_connect(request(1000, 52), ops);
                vsock.control.clear();
                let (mut host, _) = listener.accept().expect("accept");
                host.write_all(b"hello").expect("host write");
                // The guest posts one device-writable buffer of exactly a header's size.
                post_header_sized_rx_buffer(&memory);
                vsock.process_rx(ops);
                let state = vsock.conns.get(&(52, 1000)).map(|c| c.state);
                let _ = done.send((
                    state,
                    vsock.control.iter().map(|h| h.op).collect::<Vec<_>>(),
                ));
                drop(host);
            }),
        });
        let (state, control) = finished.recv().expect("result");
        assert_eq!(
            state,
            Some(State::Established),
            "the connection stays up (control packets: {control:?})"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn running_out_of_descriptors_does_not_spin_the_event_loop() {
        const CHILD: &str = "KILN_TEST_VSOCK_EMFILE_CHILD";
        if std::env::var_os(CHILD).is_none() {
            // The descriptor limit is the whole process's: the scenario runs in a child
            // process of its own, so other tests cannot run out.
            let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "devices::virtio::vsock::tests::running_out_of_descriptors_does_not_spin_the_event_loop",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .status()
                .expect("child test process");
            assert!(
                status.success(),
                "the scenario failed in the child: {status}"
            );
            return;
        }
        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("emfile");

        let limit = libc::rlimit {
            rlim_cur: 256,
            rlim_max: 256,
        };
        // SAFETY: setrlimit reads the struct we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        // Use up every descriptor but one, which the host client takes.
        let mut spare = Vec::new();
        loop {
            // SAFETY: dup() of stdin; the copies are closed below.
            let fd = unsafe { libc::dup(0) };
            if fd < 0 {
                break;
            }
            spare.push(fd);
        }
        // SAFETY: closing one of our own copies.
        unsafe { libc::close(spare.pop().expect("a descriptor")) };
        let mut client = UnixStream::connect(&path).expect("host client");
        client.write_all(b"CONNECT 52\n").expect("CONNECT");

        // accept() now fails with EMFILE and leaves the connection queued.
        let start = Instant::now();
        let mut dispatched = 0;
        while start.elapsed() < Duration::from_millis(500) {
            dispatched += manager.run_with_timeout(50).expect("event loop");
        }
        assert!(
            dispatched < 50,
            "the event loop woke {dispatched} times in 500 ms for a connection it cannot accept"
        );

        // Descriptors come free: the connection is taken after all.
        for fd in spare.drain(..) {
            // SAFETY: closing our own copies.
            unsafe { libc::close(fd) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while vsock.lock().expect("vsock").conns.is_empty() && Instant::now() < deadline {
            manager.run_with_timeout(50).expect("event loop");
        }
        assert_eq!(
            vsock.lock().expect("vsock").conns.len(),
            1,
            "the connection was accepted once descriptors were free"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_closing_connection_is_reset_on_time_though_nothing_else_happens() {
        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("close-timeout");
        let _client = connect_host_clients(&path, 1);
        assert!(run_until(&mut manager, &vsock, |v| v.conns.len() == 1));
        // The connection is closing (the host side closed, our SHUTDOWN is out) and the
        // guest never answers; one last event (a queue notification) is handled after.
        let key = {
            let mut vsock = vsock.lock().expect("vsock");
            let key = *vsock.conns.keys().next().expect("connection");
            if let Some(conn) = vsock.conns.get_mut(&key) {
                conn.state = State::Closing(Instant::now());
            }
            vsock.queue_events[EVENT].write(1).expect("notify");
            key
        };
        manager.run_with_timeout(100).expect("event loop");
        // Then nothing happens; the timeout must still come.
        let deadline = Instant::now() + connection::CLOSE_TIMEOUT + Duration::from_secs(2);
        while vsock.lock().expect("vsock").conns.contains_key(&key) && Instant::now() < deadline {
            manager.run_with_timeout(100).expect("event loop");
        }
        let vsock = vsock.lock().expect("vsock");
        assert!(
            !vsock.conns.contains_key(&key),
            "a silent guest's closing connection is reset after CLOSE_TIMEOUT"
        );
        assert_eq!(vsock.control.back().map(|h| h.op), Some(op::RST));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connect_the_guest_took_but_never_answered_times_out_and_the_host_sees_eof() {
        use vm_memory::GuestAddress;

        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("connect-timeout");
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        let queues = vsock_queues(&memory);
        // The guest posts a single RX buffer: one REQUEST reaches it, the other waits.
        post_header_sized_rx_buffer(&memory);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irqfd");
        vsock
            .lock()
            .expect("vsock")
            .activate(memory.clone(), queues, Arc::new(VirtioInterrupt::new(irq)))
            .expect("activate");
        // Taken before the clients connect: the device delivers the REQUEST, and starts its
        // deadline, inside `run_until`, so a later start would make `waited` come out short.
        let started = Instant::now();
        let mut clients = connect_host_clients(&path, 2);
        for client in &clients {
            client
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("read timeout");
        }
        assert!(run_until(&mut manager, &vsock, |v| v.conns.len() == 2));
        // The guest never answers.
        let deadline = Instant::now() + connection::CONNECT_TIMEOUT + Duration::from_secs(3);
        while vsock.lock().expect("vsock").conns.len() == 2 && Instant::now() < deadline {
            manager.run_with_timeout(100).expect("event loop");
        }
        let waited = started.elapsed();
        {
            let vsock = vsock.lock().expect("vsock");
            assert_eq!(vsock.conns.len(), 1, "the answered-never REQUEST timed out");
            assert!(
                waited >= connection::CONNECT_TIMEOUT,
                "not before {waited:?}"
            );
            assert_eq!(
                vsock.conns.values().next().map(|c| c.state),
                Some(State::LocalInit(None)),
                "a REQUEST still waiting for a guest buffer is not held to the timeout"
            );
            assert_eq!(vsock.control.back().map(|h| h.op), Some(op::RST));
            assert_eq!(vsock.metrics.to_json()["conn_timeouts"], 1);
        }
        // The host process that was refused sees end of file, not "OK"; the other still waits.
        let mut ended = 0;
        for client in &mut clients {
            let mut byte = [0u8; 1];
            match client.read(&mut byte) {
                Ok(0) => ended += 1,
                Ok(_) => panic!("a host client got an answer from a silent guest"),
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                ),
            }
        }
        assert_eq!(
            ended, 1,
            "exactly the timed-out client sees its socket closed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_clients_that_never_send_connect_are_bounded_oldest_first() {
        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("silent-clients");
        let mut silent: Vec<UnixStream> = Vec::new();
        for _ in 0..MAX_PENDING_HANDSHAKES + 8 {
            silent.push(UnixStream::connect(&path).expect("connect"));
            manager.run_with_timeout(0).expect("event loop");
        }
        assert!(run_until(&mut manager, &vsock, |v| {
            v.handshakes.len() == MAX_PENDING_HANDSHAKES
        }));
        // The eight oldest were closed; the newest still wait for their CONNECT line.
        for (i, client) in silent.iter_mut().enumerate() {
            client.set_nonblocking(true).expect("nonblocking");
            let mut byte = [0u8; 1];
            let closed = matches!(client.read(&mut byte), Ok(0));
            assert_eq!(closed, i < 8, "client {i} closed: {closed}");
        }
        // A well-behaved client still gets through.
        let _client = connect_host_clients(&path, 1);
        assert!(run_until(&mut manager, &vsock, |v| v.conns.len() == 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_host_process_that_gives_up_before_the_guest_answers_frees_its_slot() {
        let LoopedVsock {
            dir,
            path,
            vsock,
            mut manager,
        } = LoopedVsock::new("local-init");
        // The guest does not answer (here: its driver is not even up).
        let clients = connect_host_clients(&path, 4);
        assert!(run_until(&mut manager, &vsock, |v| v.conns.len() == 4));
        drop(clients);
        assert!(
            run_until(&mut manager, &vsock, |v| v.conns.is_empty()),
            "closed host connections still hold {} slots",
            vsock.lock().expect("vsock").conns.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_guest_connecting_to_a_host_listener_that_does_not_accept_does_not_block() {
        let dir = scratch_dir("connect");
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_52", path.display())).expect("host listener");
        // A host service that has stopped accepting: a backlog of 0 holds one pending
        // connection, and a blocking connect() after that waits for accept() forever.
        // SAFETY: listen() on a socket we own; it only changes the backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let vsock = Vsock::new(GUEST_CID, &path, Arc::default()).expect("vsock");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut manager = EventManager::<GuestConnects>::new().expect("event manager");
            manager.add_subscriber(GuestConnects {
                vsock,
                src_ports: vec![1000, 1001, 1002],
                done,
            });
        });
        let control = finished
            .recv_timeout(Duration::from_secs(5))
            .expect("the event loop blocked in connect()");
        assert_eq!(control.len(), 3);
        assert_eq!(control[0].op, op::RESPONSE, "the first connect is accepted");
        assert!(
            control[1..].iter().all(|h| h.op == op::RST),
            "the others are refused: {control:?}"
        );
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
