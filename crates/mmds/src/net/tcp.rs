//! One passive-open TCP connection carrying HTTP requests to the metadata service.
//!
//! Deliberately small: in-order data only (out-of-order segments are dropped and re-ACKed),
//! no window scaling, SACK or timestamps, go-back-N retransmission with exponential backoff,
//! zero-window probing, and no TIME-WAIT (a late duplicate just draws a RST).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::{Tcp, ACK, FIN, PSH, RST, SYN};
use crate::http::{self, Parsed, MAX_REQUEST_SIZE};
use crate::Mmds;

/// The MSS we advertise and the largest we use: a full frame fits a 1514-byte RX buffer.
pub(crate) const OUR_MSS: u16 = 1460;
/// Assumed when the SYN carries no MSS option (RFC 9293).
const DEFAULT_PEER_MSS: u16 = 536;
/// Floor for a guest-advertised MSS, so a bogus tiny value cannot make us send byte by byte.
const MIN_PEER_MSS: u16 = 64;
pub(crate) const INITIAL_RTO: Duration = Duration::from_millis(200);
const MAX_RTO: Duration = Duration::from_secs(4);
/// Unanswered retransmissions before the connection is reset.
const MAX_RETRIES: u32 = 7;
/// Unanswered SYN-ACKs before a half-open connection is forgotten.
const MAX_SYN_RETRIES: u32 = 4;
/// Responses are generated only while less than this is queued, so a guest pipelining
/// requests cannot make us buffer an unbounded amount of answers.
const TX_HIGH_WATER: usize = 64 * 1024;

/// Signed distance comparison in sequence space (RFC 1982).
fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn le(a: u32, b: u32) -> bool {
    !lt(b, a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SynReceived,
    Established,
}

/// What the stack must do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Forget it silently.
    Close,
    /// Send a RST (`seq`, `ack`) and forget it.
    Abort {
        seq: u32,
        ack: u32,
    },
    /// Answer this segment with a RST but keep the connection (bad ACK in SYN-RECEIVED).
    RejectSegment,
}

/// A segment the connection wants sent; the stack adds addresses and ports.
pub(crate) struct Outgoing {
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) window: u16,
    pub(crate) mss: Option<u16>,
    pub(crate) payload: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) remote_ip: Ipv4Addr,
    pub(crate) remote_port: u16,
    pub(crate) remote_mac: [u8; 6],
    state: State,
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    snd_max: u32,
    snd_wnd: u32,
    rcv_nxt: u32,
    mss: usize,
    /// Request bytes received and not yet answered.
    rx: Vec<u8>,
    /// Response bytes not yet acknowledged; `tx[0]` is at `snd_una`.
    tx: VecDeque<u8>,
    /// A FIN follows the last queued byte.
    closing: bool,
    fin_acked: bool,
    peer_fin: bool,
    need_ack: bool,
    syn_ack_due: bool,
    probe_due: bool,
    rto: Duration,
    deadline: Option<Instant>,
    retries: u32,
    last_seen: Instant,
}

impl Connection {
    /// A connection for the SYN `syn`, answering with initial sequence number `iss`.
    pub(crate) fn accept(
        remote_ip: Ipv4Addr,
        remote_mac: [u8; 6],
        syn: &Tcp<'_>,
        iss: u32,
        now: Instant,
    ) -> Connection {
        let mss = syn
            .mss
            .unwrap_or(DEFAULT_PEER_MSS)
            .clamp(MIN_PEER_MSS, OUR_MSS);
        Connection {
            remote_ip,
            remote_port: syn.src_port,
            remote_mac,
            state: State::SynReceived,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: u32::from(syn.window),
            rcv_nxt: syn.seq.wrapping_add(1),
            mss: usize::from(mss),
            rx: Vec::new(),
            tx: VecDeque::new(),
            closing: false,
            fin_acked: false,
            peer_fin: false,
            need_ack: false,
            syn_ack_due: true,
            probe_due: false,
            rto: INITIAL_RTO,
            deadline: None,
            retries: 0,
            last_seen: now,
        }
    }

    fn rcv_wnd(&self) -> u32 {
        MAX_REQUEST_SIZE.saturating_sub(self.rx.len()) as u32
    }

    fn in_rcv_window(&self, seq: u32) -> bool {
        let wnd = self.rcv_wnd();
        wnd > 0 && le(self.rcv_nxt, seq) && lt(seq, self.rcv_nxt.wrapping_add(wnd))
    }

    /// All sequence space we will ever use has been acknowledged and the guest has closed.
    pub(crate) fn is_done(&self) -> bool {
        self.closing && self.fin_acked && self.peer_fin && !self.need_ack
    }

    /// Our side has finished (FIN acknowledged): the connection only waits for the guest's FIN,
    /// so it may be evicted when a new one needs the slot.
    pub(crate) fn is_finishing(&self) -> bool {
        self.fin_acked
    }

    /// The sequence number and ACK a RST aborting this connection carries.
    fn abort(&self) -> Verdict {
        Verdict::Abort {
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
        }
    }

    /// Processes one segment from the guest (RFC 9293 §3.10.7, trimmed to what we need).
    pub(crate) fn on_segment(
        &mut self,
        seg: &Tcp<'_>,
        now: Instant,
        mmds: &Mutex<Mmds>,
    ) -> Verdict {
        if self.state == State::SynReceived {
            if seg.has(RST) {
                return if seg.seq == self.rcv_nxt {
                    Verdict::Close
                } else {
                    Verdict::Keep
                };
            }
            if seg.has(SYN) {
                // A retransmitted SYN: our SYN-ACK was lost.
                if !seg.has(ACK) && seg.seq.wrapping_add(1) == self.rcv_nxt {
                    self.syn_ack_due = true;
                }
                return Verdict::Keep;
            }
            if !seg.has(ACK) {
                return Verdict::Keep;
            }
            if seg.ack != self.iss.wrapping_add(1) {
                return Verdict::RejectSegment;
            }
            self.state = State::Established;
            self.snd_una = seg.ack;
            self.snd_nxt = seg.ack;
            self.snd_max = seg.ack;
            self.snd_wnd = u32::from(seg.window);
            self.deadline = None;
            self.retries = 0;
            self.rto = INITIAL_RTO;
        }

        let len = seg.payload.len() as u32 + u32::from(seg.has(FIN));
        let acceptable = seg.seq == self.rcv_nxt
            || self.in_rcv_window(seg.seq)
            || (len > 0 && self.in_rcv_window(seg.seq.wrapping_add(len - 1)));
        if !acceptable {
            if !seg.has(RST) {
                self.need_ack = true;
            }
            return Verdict::Keep;
        }
        if seg.has(RST) {
            // RFC 5961: only an exact match resets; in-window guesses draw a challenge ACK.
            if seg.seq == self.rcv_nxt {
                return Verdict::Close;
            }
            self.need_ack = true;
            return Verdict::Keep;
        }
        if seg.has(SYN) {
            self.need_ack = true;
            return Verdict::Keep;
        }
        if !seg.has(ACK) {
            return Verdict::Keep;
        }
        self.last_seen = now;

        if lt(self.snd_max, seg.ack) {
            // Acknowledges something never sent.
            self.need_ack = true;
            return Verdict::Keep;
        }
        if lt(self.snd_una, seg.ack) {
            let acked = seg.ack.wrapping_sub(self.snd_una) as usize;
            let data = acked.min(self.tx.len());
            self.tx.drain(..data);
            if acked > data && self.closing {
                self.fin_acked = true;
            }
            self.snd_una = seg.ack;
            if lt(self.snd_nxt, self.snd_una) {
                self.snd_nxt = self.snd_una;
            }
            self.retries = 0;
            self.rto = INITIAL_RTO;
            self.deadline = (self.snd_una != self.snd_max).then(|| now + self.rto);
        }
        if le(self.snd_una, seg.ack) {
            if self.snd_wnd == 0 && seg.window > 0 && seg.ack == self.snd_una {
                // The window reopened without covering our probe: a closed window dropped
                // it, so resume from the first unacknowledged byte rather than after it.
                self.snd_nxt = self.snd_una;
            }
            self.snd_wnd = u32::from(seg.window);
        }

        self.receive_data(seg);
        self.serve(now, mmds);
        if self.is_done() {
            return Verdict::Close;
        }
        Verdict::Keep
    }

    /// Appends in-order payload (and FIN) to the request buffer.
    fn receive_data(&mut self, seg: &Tcp<'_>) {
        if seg.payload.is_empty() && !seg.has(FIN) {
            return;
        }
        self.need_ack = true;
        if self.peer_fin {
            return;
        }
        let mut payload = seg.payload;
        let mut fin = seg.has(FIN);
        let mut seq = seg.seq;
        if lt(seq, self.rcv_nxt) {
            let skip = self.rcv_nxt.wrapping_sub(seq) as usize;
            if skip > payload.len() {
                return;
            }
            payload = &payload[skip..];
            seq = self.rcv_nxt;
        }
        if seq != self.rcv_nxt {
            // Out of order: dropped; the duplicate ACK tells the guest where we are.
            return;
        }
        let take = payload.len().min(self.rcv_wnd() as usize);
        self.rx.extend_from_slice(&payload[..take]);
        self.rcv_nxt = self.rcv_nxt.wrapping_add(take as u32);
        fin &= take == payload.len();
        if fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.peer_fin = true;
        }
    }

    /// Answers every complete buffered request, in order, while the send queue has room.
    fn serve(&mut self, now: Instant, mmds: &Mutex<Mmds>) {
        let window_was_closed = self.rcv_wnd() == 0;
        while !self.closing && !self.rx.is_empty() && self.tx.len() < TX_HIGH_WATER {
            match http::serve(&self.rx, now, || crate::lock(mmds)) {
                Parsed::Incomplete => break,
                Parsed::Done { consumed, response } => {
                    self.rx.drain(..consumed.min(self.rx.len()));
                    if response.close {
                        self.closing = true;
                        self.rx.clear();
                    }
                    self.tx.extend(response.into_bytes());
                }
            }
        }
        let blocked = self.tx.len() >= TX_HIGH_WATER;
        if self.peer_fin && !self.closing && !blocked {
            // The guest sent all it will send: a leftover partial request gets a 400.
            if !self.rx.is_empty() {
                self.tx.extend(http::truncated_request().into_bytes());
                self.rx.clear();
            }
            self.closing = true;
        }
        if window_was_closed && self.rcv_wnd() > 0 {
            self.need_ack = true;
        }
    }

    /// The next segment to send, if any; arms the retransmission timer as needed.
    pub(crate) fn next_segment(&mut self, now: Instant) -> Option<Outgoing> {
        let window = self.rcv_wnd().min(u32::from(u16::MAX)) as u16;
        if self.state == State::SynReceived {
            if !self.syn_ack_due {
                return None;
            }
            self.syn_ack_due = false;
            self.snd_nxt = self.iss.wrapping_add(1);
            self.snd_max = self.snd_nxt;
            self.deadline.get_or_insert(now + self.rto);
            return Some(Outgoing {
                seq: self.iss,
                ack: self.rcv_nxt,
                flags: SYN | ACK,
                window,
                mss: Some(OUR_MSS),
                payload: Vec::new(),
            });
        }
        if !self.fin_acked {
            let data_end = self.snd_una.wrapping_add(self.tx.len() as u32);
            if lt(self.snd_nxt, data_end) {
                let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
                let usable = self.snd_wnd.saturating_sub(in_flight) as usize;
                let remaining = data_end.wrapping_sub(self.snd_nxt) as usize;
                let mut len = self.mss.min(remaining).min(usable);
                if len == 0 && self.probe_due {
                    len = 1;
                }
                self.probe_due = false;
                if len > 0 {
                    let offset = in_flight as usize;
                    let payload: Vec<u8> = self.tx.range(offset..offset + len).copied().collect();
                    let seq = self.snd_nxt;
                    self.snd_nxt = self.snd_nxt.wrapping_add(len as u32);
                    if lt(self.snd_max, self.snd_nxt) {
                        self.snd_max = self.snd_nxt;
                    }
                    self.deadline.get_or_insert(now + self.rto);
                    self.need_ack = false;
                    let push = if self.snd_nxt == data_end { PSH } else { 0 };
                    return Some(Outgoing {
                        seq,
                        ack: self.rcv_nxt,
                        flags: ACK | push,
                        window,
                        mss: None,
                        payload,
                    });
                }
                // Window closed: the timer doubles as the persist timer for a probe.
                self.deadline.get_or_insert(now + self.rto);
            } else if self.closing && self.snd_nxt == data_end {
                self.snd_nxt = data_end.wrapping_add(1);
                if lt(self.snd_max, self.snd_nxt) {
                    self.snd_max = self.snd_nxt;
                }
                self.deadline.get_or_insert(now + self.rto);
                self.need_ack = false;
                return Some(Outgoing {
                    seq: data_end,
                    ack: self.rcv_nxt,
                    flags: FIN | ACK,
                    window,
                    mss: None,
                    payload: Vec::new(),
                });
            }
        }
        if self.need_ack {
            self.need_ack = false;
            return Some(Outgoing {
                seq: self.snd_nxt,
                ack: self.rcv_nxt,
                flags: ACK,
                window,
                mss: None,
                payload: Vec::new(),
            });
        }
        None
    }

    /// When this connection next needs [`Connection::on_timer`].
    pub(crate) fn next_timeout(&self, idle: Duration) -> Instant {
        let idle_at = self.last_seen + idle;
        match self.deadline {
            Some(deadline) => deadline.min(idle_at),
            None => idle_at,
        }
    }

    /// Retransmits, probes or gives up, as the timers due at `now` require.
    pub(crate) fn on_timer(&mut self, now: Instant, idle: Duration) -> Verdict {
        if now >= self.last_seen + idle {
            return match self.state {
                State::SynReceived => Verdict::Close,
                State::Established => self.abort(),
            };
        }
        let Some(deadline) = self.deadline else {
            return Verdict::Keep;
        };
        if now < deadline {
            return Verdict::Keep;
        }
        self.deadline = None;
        self.rto = (self.rto * 2).min(MAX_RTO);
        match self.state {
            State::SynReceived => {
                self.retries += 1;
                if self.retries > MAX_SYN_RETRIES {
                    return Verdict::Close;
                }
                self.syn_ack_due = true;
            }
            State::Established => {
                let data_end = self.snd_una.wrapping_add(self.tx.len() as u32);
                if self.snd_wnd == 0 && !self.fin_acked && lt(self.snd_una, data_end) {
                    // Zero window: probe with one byte; probing never gives up by itself
                    // (the idle timeout bounds it).
                    self.snd_nxt = self.snd_una;
                    self.probe_due = true;
                } else if self.snd_una != self.snd_max {
                    self.retries += 1;
                    if self.retries > MAX_RETRIES {
                        return self.abort();
                    }
                    // Go back N: resend everything unacknowledged.
                    self.snd_nxt = self.snd_una;
                }
            }
        }
        Verdict::Keep
    }
}
