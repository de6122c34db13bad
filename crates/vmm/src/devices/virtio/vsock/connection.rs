//! One host↔guest stream: its Unix socket, its state, and credit-based flow control in both
//! directions.
//!
//! Credit rules (virtio spec 5.10.6.3): the guest may have at most our `buf_alloc` bytes in
//! flight towards us; we may send it at most `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`.
//! Data from the guest that the Unix socket cannot take yet waits in `to_host`, which the
//! credit we advertise keeps below [`CONN_BUF_ALLOC`].

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{Header, TYPE_STREAM};

/// How long a closing connection waits for the guest's RST before the VMM resets it.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a host CONNECT waits for the guest's answer once the guest has been handed the
/// request and has then fallen silent. A guest kernel answers at once (RST when nothing
/// listens); one that never answers would otherwise leave the host process waiting forever.
/// Longer than Firecracker's 2 s: guests whose kernel code is emulated, or nested, are slow.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Receive buffer each connection advertises to the guest.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host side asked (CONNECT); waiting for the guest's RESPONSE. Holds when the guest
    /// took the REQUEST from its RX queue (none while it waits for a buffer): the
    /// [`CONNECT_TIMEOUT`] counts from there, so a guest still booting is not held to it.
    LocalInit(Option<std::time::Instant>),
    /// Data may flow.
    Established,
    /// The host closed its socket; SHUTDOWN sent at the given time, waiting for the guest's
    /// RST (a guest that never answers is reset after [`CLOSE_TIMEOUT`]).
    Closing(std::time::Instant),
    /// The guest closed both directions while data for the host was still buffered: the data
    /// is still delivered, then the connection is reset (or after [`CLOSE_TIMEOUT`], if the
    /// host stops reading).
    Draining(std::time::Instant),
}

/// What went wrong on the host socket.
pub enum SocketEvent {
    /// Nothing to do.
    Idle,
    /// The host side closed or failed.
    Closed,
}

/// A stream between a host Unix socket and a guest port.
pub struct Connection {
    /// Host socket.
    pub stream: UnixStream,
    /// Our (host-side) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Lifecycle state.
    pub state: State,
    /// The host socket may have data to read.
    pub readable: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    to_host: VecDeque<u8>,
    /// The guest will send no more data: close our write side once `to_host` drains.
    guest_done_sending: bool,
    /// Our write side is already shut: shutting it again would wake both ends' epoll (and so
    /// this device) for nothing, in a loop.
    host_write_shut: bool,
}

impl Connection {
    /// A connection over `stream` between our `local_port` and the guest's `peer_port`.
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            readable: state == State::Established,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_host: VecDeque::new(),
            guest_done_sending: false,
            host_write_shut: false,
        }
    }

    /// A header from us to the guest for this connection.
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: super::HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Records the guest's window from any packet it sent.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// How many bytes we may send the guest now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Counts bytes sent to the guest.
    pub fn sent_to_guest(&mut self, bytes: u32) {
        self.rx_cnt += Wrapping(bytes);
    }

    /// Whether the guest should hear our window again (we consumed a lot since we last told it).
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2
    }

    /// Takes data the guest sent; false if the guest overran the credit we gave it.
    pub fn push_from_guest(&mut self, data: &[u8]) -> bool {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return false;
        }
        self.to_host.extend(data);
        true
    }

    /// The guest closed its sending side.
    pub fn guest_shut_send(&mut self) {
        self.guest_done_sending = true;
    }

    /// Whether guest data is still waiting for the host socket.
    pub fn has_data_for_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Writes as much buffered guest data to the host socket as it takes.
    pub fn flush_to_host(&mut self) -> SocketEvent {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return SocketEvent::Closed,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return SocketEvent::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return SocketEvent::Closed,
            }
        }
        if self.guest_done_sending && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        SocketEvent::Idle
    }

    /// Reads up to `max` bytes from the host socket. `Ok(None)`: nothing now; `Err`: closed.
    pub fn read_from_host(&mut self, max: usize) -> Result<Option<Vec<u8>>, ()> {
        let mut buffer = vec![0u8; max];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    buffer.truncate(n);
                    return Ok(Some(buffer));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
    }
}

/// A host process that connected to the vsock socket and has not finished its
/// `CONNECT PORT\n` line yet.
pub struct Handshake {
    /// Its socket.
    pub stream: UnixStream,
    /// When it was accepted: the oldest gives way when too many are pending.
    pub accepted: std::time::Instant,
    line: Vec<u8>,
}

/// Longest CONNECT line accepted.
const MAX_CONNECT_LINE: usize = 32;

impl Handshake {
    /// A fresh handshake on `stream`.
    pub fn new(stream: UnixStream) -> Self {
        Handshake {
            stream,
            accepted: std::time::Instant::now(),
            line: Vec::new(),
        }
    }

    /// Reads what has arrived: `Ok(Some(port))` once the line is complete, `Ok(None)` if more
    /// is needed, `Err` if the line is malformed or the peer went away.
    pub fn poll(&mut self) -> Result<Option<u32>, String> {
        let mut byte = [0u8; 1];
        loop {
            // One byte at a time: nothing after the newline may be consumed, it is stream data.
            match self.stream.read(&mut byte) {
                Ok(0) => return Err("closed before CONNECT".into()),
                Ok(_) => {
                    if byte[0] == b'\n' {
                        return parse_connect(&self.line).map(Some);
                    }
                    self.line.push(byte[0]);
                    if self.line.len() > MAX_CONNECT_LINE {
                        return Err("CONNECT line too long".into());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text".to_string())?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected \"CONNECT <port>\", got {text:?}"))?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| format!("bad port in {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Ok(1024));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT -1").is_err());
        assert!(parse_connect(b"HELLO 52").is_err());
    }

    #[test]
    fn credit_accounting_limits_what_we_send() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let mut conn = Connection::new(a, 1, 2, State::Established);
        conn.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Default::default()
        });
        assert_eq!(conn.peer_credit(), 1000);
        conn.sent_to_guest(600);
        assert_eq!(conn.peer_credit(), 400);
        conn.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 500,
            ..Default::default()
        });
        assert_eq!(conn.peer_credit(), 900);
        assert!(!conn.push_from_guest(&vec![0; CONN_BUF_ALLOC as usize + 1]));
    }
}
