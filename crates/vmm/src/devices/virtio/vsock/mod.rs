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
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                        tracing::warn!("vsock: cannot watch a host connection: {e:?}");
                        continue;
                    }
                    self.handshakes.insert(fd, Handshake::new(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
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
                let mut conn = Connection::new(handshake.stream, local, port, State::LocalInit);
                let request = conn.header(self.cid, op::REQUEST, 0, 0);
                Self::watch(ops, fd);
                self.by_fd.insert(fd, (local, port));
                self.conns.insert((local, port), conn);
                self.control.push_back(request);
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
        if events.contains(EventSet::OUT) && matches!(conn.state, State::Draining(_)) {
            let closed = matches!(conn.flush_to_host(), SocketEvent::Closed);
            if closed || !conn.has_data_for_host() {
                let rst = self.rst(key.0, key.1);
                self.control.push_back(rst);
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
                self.control.push_back(update);
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
                self.control.push_back(shutdown);
            }
            State::LocalInit | State::Closing(_) | State::Draining(_) => {
                let rst = self.rst(key.0, key.1);
                self.control.push_back(rst);
                self.remove_conn(key, ops);
            }
        }
    }

    /// Resets connections whose guest never acknowledged our SHUTDOWN, so a silent guest
    /// cannot pin host sockets forever.
    fn reset_stale_closing(&mut self, ops: &mut EventOps) {
        let stale: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, State::Closing(since) | State::Draining(since)
                    if since.elapsed() > connection::CLOSE_TIMEOUT)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            let rst = self.rst(key.0, key.1);
            self.control.push_back(rst);
            self.remove_conn(key, ops);
        }
    }

    /// Handles one packet the guest sent.
    fn handle_tx_packet(&mut self, header: Header, payload: &[u8], ops: &mut EventOps) {
        if header.type_ != TYPE_STREAM || header.dst_cid != HOST_CID || header.src_cid != self.cid {
            self.metrics.inc_invalid();
            if header.op != op::RST {
                let rst = self.rst(header.dst_port, header.src_port);
                self.control.push_back(rst);
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
                self.control.push_back(rst);
            }
            return;
        };
        conn.update_peer_credit(&header);
        match (header.op, conn.state) {
            (op::RESPONSE, State::LocalInit) => {
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
                    self.control.push_back(rst);
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
                    self.control.push_back(update);
                }
            }
            (op::CREDIT_REQUEST, State::Established) => {
                let update = conn.header(self.cid, op::CREDIT_UPDATE, 0, 0);
                self.control.push_back(update);
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
                    self.control.push_back(rst);
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
                self.control.push_back(rst);
                self.remove_conn(key, ops);
            }
        }
    }

    /// The guest connects to a host port: reach `{uds_path}_{port}`.
    fn guest_connect(&mut self, header: Header, ops: &mut EventOps) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            let rst = self.rst(key.0, key.1);
            self.control.push_back(rst);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), header.dst_port);
        let stream = match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => stream,
            _ => {
                tracing::debug!("vsock: guest connect to {path} refused");
                let rst = self.rst(key.0, key.1);
                self.control.push_back(rst);
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
        self.control.push_back(response);
        self.metrics.inc_connection();
    }

    fn process_tx(&mut self, ops: &mut EventOps) {
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
        // The guest's sockets are gone; so are ours.
        self.control.clear();
        for (_, conn) in self.conns.drain() {
            drop(conn);
        }
        self.by_fd.clear();
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
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
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
        } else if self.handshakes.contains_key(&fd) {
            self.progress_handshake(fd, ops);
        } else {
            self.host_socket_event(fd, events.event_set(), ops);
        }
        self.reset_stale_closing(ops);
        self.process_rx(ops);
    }
}
