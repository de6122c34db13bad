//! The per-interface network endpoint of the metadata service ("dumbo" in Firecracker).
//!
//! It sits in virtio-net's TX path and claims only two kinds of guest frames: ARP requests for
//! the MMDS address, and IPv4/TCP segments to the MMDS address, port 80. Everything else is
//! handed back untouched so it reaches the tap as usual.

mod tcp;
mod wire;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use self::tcp::{Connection, Verdict};
use self::wire::{Tcp, TcpOut, ACK, ETHERTYPE_ARP, ETHERTYPE_IPV4, PROTO_TCP, RST, SYN};
use crate::Mmds;

/// The MAC the service answers with unless told otherwise (Firecracker's MMDS MAC).
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];

/// The TCP port guests reach the service on.
const HTTP_PORT: u16 = 80;
/// ARP replies kept waiting for the guest to take them; more requests than that are dropped.
const MAX_PENDING_ARP: usize = 8;

/// Resource bounds of one stack; the defaults follow Firecracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackLimits {
    /// Concurrent TCP connections; a SYN beyond this is refused with a RST.
    pub max_connections: usize,
    /// RSTs waiting to be sent; further ones are dropped, so a flood costs bounded memory.
    pub max_pending_resets: usize,
    /// A connection that hears nothing from the guest for this long is dropped.
    pub idle_timeout: Duration,
}

impl Default for StackLimits {
    fn default() -> Self {
        StackLimits {
            max_connections: 30,
            max_pending_resets: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The metadata service's endpoint on one guest interface.
///
/// Drive it from the device's TX path with [`handle_frame`](Self::handle_frame), collect
/// answers with [`next_frame`](Self::next_frame) after every call that may have produced some,
/// and keep retransmissions going by calling [`on_timer`](Self::on_timer) once
/// [`next_timeout`](Self::next_timeout) has passed. The `_at` variants take the time
/// explicitly, for tests and for callers that already read the clock.
#[derive(Debug)]
pub struct MmdsNetworkStack {
    mac: [u8; 6],
    ipv4: Ipv4Addr,
    mmds: Arc<Mutex<Mmds>>,
    limits: StackLimits,
    arp_replies: VecDeque<Vec<u8>>,
    resets: VecDeque<Vec<u8>>,
    connections: Vec<Connection>,
    cursor: usize,
    ip_id: u16,
    isn_counter: u32,
}

impl MmdsNetworkStack {
    /// A stack answering as `mac`/`ipv4`:80 from `mmds`, with [`StackLimits::default`].
    pub fn new(mac: [u8; 6], ipv4: Ipv4Addr, mmds: Arc<Mutex<Mmds>>) -> MmdsNetworkStack {
        MmdsNetworkStack::with_limits(mac, ipv4, mmds, StackLimits::default())
    }

    /// Like [`new`](Self::new) with explicit resource bounds.
    pub fn with_limits(
        mac: [u8; 6],
        ipv4: Ipv4Addr,
        mmds: Arc<Mutex<Mmds>>,
        limits: StackLimits,
    ) -> MmdsNetworkStack {
        MmdsNetworkStack {
            mac,
            ipv4,
            mmds,
            limits,
            arp_replies: VecDeque::new(),
            resets: VecDeque::new(),
            connections: Vec::new(),
            cursor: 0,
            ip_id: 0,
            isn_counter: 0,
        }
    }

    /// The address the stack answers on.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The MAC the stack answers with.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Open connections, for metrics.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Offers a frame the guest sent (Ethernet, no virtio-net header). Returns true if it was
    /// addressed to the service (it must then not go to the tap), even if it was then dropped
    /// as malformed; false leaves it for the tap.
    pub fn handle_frame(&mut self, frame: &[u8]) -> bool {
        self.handle_frame_at(frame, Instant::now())
    }

    /// [`handle_frame`](Self::handle_frame) as of `now`.
    pub fn handle_frame_at(&mut self, frame: &[u8], now: Instant) -> bool {
        let Some(eth) = wire::parse_ethernet(frame) else {
            return false;
        };
        match eth.ethertype {
            ETHERTYPE_ARP => {
                let Some(request) = wire::parse_arp_request(eth.payload) else {
                    return false;
                };
                if request.target_ip != self.ipv4 {
                    return false;
                }
                if self.arp_replies.len() < MAX_PENDING_ARP {
                    let reply = wire::build_arp_reply(self.mac, self.ipv4, &request);
                    if !self.arp_replies.contains(&reply) {
                        self.arp_replies.push_back(reply);
                    }
                }
                true
            }
            ETHERTYPE_IPV4 => {
                let Some(peek) = wire::peek_ipv4(eth.payload) else {
                    return false;
                };
                if peek.dst != self.ipv4 || peek.protocol != PROTO_TCP {
                    return false;
                }
                let port = eth
                    .payload
                    .get(peek.header_len..)
                    .and_then(wire::peek_tcp_dst_port);
                if port != Some(HTTP_PORT) {
                    return false;
                }
                // Addressed to us from here on: drop what does not check out.
                self.run_timers(now);
                if let Some(ip) = wire::parse_ipv4(eth.payload) {
                    if let Some(seg) = wire::parse_tcp(ip.src, ip.dst, ip.payload) {
                        self.on_segment(eth.src, ip.src, &seg, now);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// The next frame for the guest, if any: ARP replies, then RSTs, then connections' segments
    /// in turn. Call until it returns `None` after each [`handle_frame`](Self::handle_frame)
    /// and [`on_timer`](Self::on_timer).
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        self.next_frame_at(Instant::now())
    }

    /// [`next_frame`](Self::next_frame) as of `now`.
    pub fn next_frame_at(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.run_timers(now);
        if let Some(frame) = self.arp_replies.pop_front() {
            return Some(frame);
        }
        if let Some(frame) = self.resets.pop_front() {
            return Some(frame);
        }
        let count = self.connections.len();
        for k in 0..count {
            let index = (self.cursor + k) % count;
            let conn = &mut self.connections[index];
            let Some(out) = conn.next_segment(now) else {
                continue;
            };
            let (mac, ip, port) = (conn.remote_mac, conn.remote_ip, conn.remote_port);
            let done = conn.is_done();
            let frame = self.build(
                mac,
                ip,
                port,
                out.seq,
                out.ack,
                out.flags,
                out.window,
                out.mss,
                &out.payload,
            );
            if done {
                self.connections.swap_remove(index);
            }
            self.cursor = (index + 1) % count;
            return Some(frame);
        }
        None
    }

    /// The earliest time [`on_timer`](Self::on_timer) has work: a retransmission, a
    /// zero-window probe or an idle connection to drop. `None` without connections.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.connections
            .iter()
            .map(|c| c.next_timeout(self.limits.idle_timeout))
            .min()
    }

    /// Runs the timers due at `now`; then drain [`next_frame`](Self::next_frame).
    ///
    /// Also run lazily by [`handle_frame`](Self::handle_frame) (for frames to the service)
    /// and [`next_frame`](Self::next_frame), so a VMM that drains after every TX batch
    /// recovers whenever the guest sends anything; a real timer only matters when the guest
    /// waits silently for a segment that was lost (e.g. dropped for lack of an RX buffer).
    pub fn on_timer(&mut self, now: Instant) {
        self.run_timers(now);
    }

    fn run_timers(&mut self, now: Instant) {
        let idle = self.limits.idle_timeout;
        let mut index = 0;
        while index < self.connections.len() {
            let verdict = self.connections[index].on_timer(now, idle);
            if self.apply(index, verdict) {
                continue;
            }
            index += 1;
        }
    }

    /// Acts on a verdict for connection `index`; returns true if it was removed.
    fn apply(&mut self, index: usize, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Keep | Verdict::RejectSegment => false,
            Verdict::Close => {
                self.connections.swap_remove(index);
                true
            }
            Verdict::Abort { seq, ack } => {
                let conn = self.connections.swap_remove(index);
                let frame = self.build(
                    conn.remote_mac,
                    conn.remote_ip,
                    conn.remote_port,
                    seq,
                    ack,
                    RST | ACK,
                    0,
                    None,
                    &[],
                );
                self.queue_reset(frame);
                true
            }
        }
    }

    fn on_segment(&mut self, mac: [u8; 6], src: Ipv4Addr, seg: &Tcp<'_>, now: Instant) {
        let existing = self
            .connections
            .iter()
            .position(|c| c.remote_ip == src && c.remote_port == seg.src_port);
        if let Some(index) = existing {
            let conn = &mut self.connections[index];
            conn.remote_mac = mac;
            let verdict = conn.on_segment(seg, now, &self.mmds);
            if verdict == Verdict::RejectSegment {
                self.reset_for(mac, src, seg);
            }
            self.apply(index, verdict);
            return;
        }
        if seg.has(RST) {
            return;
        }
        if !seg.has(SYN) || seg.has(ACK) {
            self.reset_for(mac, src, seg);
            return;
        }
        if self.connections.len() >= self.limits.max_connections {
            // Make room from a connection that only waits for the guest's FIN, if any.
            match self.connections.iter().position(Connection::is_finishing) {
                Some(index) => {
                    self.connections.swap_remove(index);
                }
                None => {
                    self.reset_for(mac, src, seg);
                    return;
                }
            }
        }
        let iss = self.initial_sequence_number();
        self.connections
            .push(Connection::accept(src, mac, seg, iss, now));
    }

    /// Answers a segment that belongs to no connection (RFC 9293 §3.10.7.1).
    fn reset_for(&mut self, mac: [u8; 6], src: Ipv4Addr, seg: &Tcp<'_>) {
        let (seq, ack, flags) = if seg.has(ACK) {
            (seg.ack, 0, RST)
        } else {
            (0, seg.seq.wrapping_add(seg.seq_len()), RST | ACK)
        };
        let frame = self.build(mac, src, seg.src_port, seq, ack, flags, 0, None, &[]);
        self.queue_reset(frame);
    }

    fn queue_reset(&mut self, frame: Vec<u8>) {
        if self.resets.len() < self.limits.max_pending_resets {
            self.resets.push_back(frame);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        mac: [u8; 6],
        ip: Ipv4Addr,
        port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        mss: Option<u16>,
        payload: &[u8],
    ) -> Vec<u8> {
        self.ip_id = self.ip_id.wrapping_add(1);
        wire::build_tcp(&TcpOut {
            src_mac: self.mac,
            dst_mac: mac,
            src_ip: self.ipv4,
            dst_ip: ip,
            src_port: HTTP_PORT,
            dst_port: port,
            seq,
            ack,
            flags,
            window,
            mss,
            payload,
            ip_id: self.ip_id,
        })
    }

    /// An unpredictable ISN (RFC 6528's goal) from the kernel, or the clock if that fails.
    fn initial_sequence_number(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        if crate::token::fill_random(&mut bytes).is_ok() {
            return u32::from_ne_bytes(bytes);
        }
        self.isn_counter = self.isn_counter.wrapping_add(0x9e37_79b9);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0);
        nanos ^ self.isn_counter
    }
}
