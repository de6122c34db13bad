//! The protocol between kiln on the host and `kiln-init`, the agent that is PID 1 in every
//! microVM.
//!
//! One byte stream carries everything, so the same protocol runs over any transport that gives
//! a reliable stream: a virtio-vsock connection (kiln-vmm) or a virtio-console port (QEMU on
//! hosts without vhost-vsock). Many process sessions share the stream; each message names its
//! session.
//!
//! # Framing
//! A frame is a 4-byte little-endian payload length followed by the payload, a
//! [postcard](https://docs.rs/postcard)-encoded message. Frames larger than [`MAX_FRAME`] are
//! refused before anything is allocated: either side may be hostile (a guest is, by
//! definition), so a reader never trusts a length or a decoded value.
//!
//! # Sessions
//! The host picks a [`SessionId`] for each process it starts ([`HostMessage::Exec`]) or file
//! copy ([`HostMessage::CopyOut`], [`HostMessage::CopyIn`]); the agent answers with
//! [`GuestMessage::Started`] or [`GuestMessage::Failed`], streams
//! [`GuestMessage::Output`], and ends the session with [`GuestMessage::Exited`].
//!
//! # Flow control
//! Output of one session must not stall the others, and neither side may be made to buffer
//! without bound. So both directions use a per-session credit window of [`WINDOW`] bytes: the
//! agent sends at most that much [`GuestMessage::Output`] data that the host has not
//! acknowledged with [`HostMessage::Ack`], and the host sends at most that much
//! [`HostMessage::Stdin`] data that the agent has not acknowledged with
//! [`GuestMessage::StdinAck`].
//!
//! # The main process
//! The process started with [`ProcessSpec::main`] set is the VM's reason to exist: when it
//! exits the agent reports [`GuestMessage::Exited`] and waits for [`HostMessage::Shutdown`]
//! (or [`SHUTDOWN_GRACE_MS`] at most) before it syncs the disks and powers the VM off.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Bumped on any incompatible change; both sides check it in [`GuestMessage::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest payload either side accepts in one frame.
pub const MAX_FRAME: usize = 1 << 20;

/// The most data one [`GuestMessage::Output`] or [`HostMessage::Stdin`] carries, so that
/// sessions interleave fairly on the shared stream.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Unacknowledged data allowed in flight per session and direction.
pub const WINDOW: u32 = 256 * 1024;

/// The AF_VSOCK port the agent listens on (kiln-vmm backend).
pub const VSOCK_PORT: u32 = 1024;

/// The name of the virtio-console port the agent opens (QEMU backend).
pub const SERIAL_PORT_NAME: &str = "kiln.agent";

/// How long the agent waits for [`HostMessage::Shutdown`] after the main process exited
/// before it powers the VM off on its own.
pub const SHUTDOWN_GRACE_MS: u64 = 5000;

/// Names one process or copy for the lifetime of the connection; chosen by the host.
pub type SessionId = u32;

/// How the guest's main process and its environment are set up, sent once before the main
/// process starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// The VM's hostname; also written to `/etc/hostname` and `/etc/hosts`.
    pub hostname: String,
    /// Extra `/etc/hosts` lines (`"ADDRESS NAME..."`).
    pub hosts: Vec<String>,
    /// Name servers for `/etc/resolv.conf`; empty leaves the image's file alone.
    pub nameservers: Vec<String>,
    /// DNS search domains for `/etc/resolv.conf`.
    pub search: Vec<String>,
    /// Network interfaces to configure, in order.
    pub interfaces: Vec<InterfaceConfig>,
}

/// Static IPv4 configuration of one guest network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// The interface's name in the guest (`eth0`).
    pub name: String,
    /// `ADDRESS/PREFIX`, for example `10.0.2.15/24`.
    pub address: String,
    /// The default gateway, if this interface carries the default route.
    pub gateway: Option<String>,
    /// The MTU; `None` keeps the driver's.
    pub mtu: Option<u32>,
}

/// A process to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// The program and its arguments; `args[0]` is looked up in `PATH` from `env` (or the
    /// default `PATH`) unless it contains a `/`.
    pub args: Vec<String>,
    /// The whole environment as `KEY=VALUE`; `PATH` and `HOME` are filled in if missing.
    pub env: Vec<String>,
    /// The working directory; `None` is `/`. Created if it does not exist, as Docker does.
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved against the guest's `/etc/passwd`
    /// and `/etc/group`; `None` is root.
    pub user: Option<String>,
    /// Run on a new pseudo-terminal (stdout and stderr merge into [`Stream::Stdout`]).
    pub tty: bool,
    /// Initial terminal size (rows, columns) when `tty` is set.
    pub window: Option<(u16, u16)>,
    /// Keep stdin open for [`HostMessage::Stdin`]; otherwise it reads from `/dev/null`.
    pub stdin: bool,
    /// The VM's main process: its exit powers the VM off.
    pub main: bool,
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output (and everything, on a tty).
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The status as a shell reports it: the code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// Messages from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Liveness check; answered by [`GuestMessage::Pong`] with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Set up hostname, hosts, DNS and interfaces; answered by [`GuestMessage::Configured`].
    Configure(GuestConfig),
    /// Start a process.
    Exec {
        /// The new session.
        session: SessionId,
        /// What to run.
        process: ProcessSpec,
    },
    /// Bytes for a session's stdin (at most [`MAX_CHUNK`]).
    Stdin {
        /// The session.
        session: SessionId,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of a session's stdin.
    CloseStdin {
        /// The session.
        session: SessionId,
    },
    /// The host consumed this much of a session's output: the window opens again.
    Ack {
        /// The session.
        session: SessionId,
        /// Bytes consumed.
        bytes: u32,
    },
    /// The terminal of a tty session changed size.
    Resize {
        /// The session.
        session: SessionId,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to a session's process (its process group, for a tty session).
    Signal {
        /// The session.
        session: SessionId,
        /// The signal number.
        signal: i32,
    },
    /// Stream `path` out of the guest as a tar archive ([`Stream::Stdout`] output), then
    /// [`GuestMessage::Exited`] with code 0.
    CopyOut {
        /// The new session.
        session: SessionId,
        /// An absolute path in the guest.
        path: String,
    },
    /// Unpack the tar archive sent as this session's stdin into the directory `path`, then
    /// [`GuestMessage::Exited`] with code 0.
    CopyIn {
        /// The new session.
        session: SessionId,
        /// An absolute path of a directory in the guest.
        path: String,
    },
    /// Stop everything: signal all processes, sync, power the VM off.
    Shutdown,
}

/// Messages from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// First message on every connection.
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
        /// The agent's build version, for humans.
        agent: String,
        /// Milliseconds since the guest kernel started (CLOCK_BOOTTIME), for boot timing.
        boot_ms: u64,
    },
    /// Answer to [`HostMessage::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// [`HostMessage::Configure`] was applied.
    Configured,
    /// A session's process started.
    Started {
        /// The session.
        session: SessionId,
        /// Its PID in the guest.
        pid: u32,
    },
    /// A session could not start (or a copy failed); the session is over.
    Failed {
        /// The session.
        session: SessionId,
        /// What went wrong, for the user.
        message: String,
        /// The exit code a shell would give: 127 for a missing command, 126 for one that
        /// cannot be executed, 125 otherwise.
        code: i32,
    },
    /// Output of a session (at most [`MAX_CHUNK`] bytes).
    Output {
        /// The session.
        session: SessionId,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The agent consumed this much of a session's stdin: the window opens again.
    StdinAck {
        /// The session.
        session: SessionId,
        /// Bytes consumed.
        bytes: u32,
    },
    /// A session's process ended and all its output was sent.
    Exited {
        /// The session.
        session: SessionId,
        /// How it ended.
        status: ExitStatus,
    },
    /// A message the agent could not act on (unknown session, malformed request).
    Error {
        /// What was wrong.
        message: String,
    },
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream between frames.
    #[error("agent connection closed")]
    Closed,
    /// A frame announced more than [`MAX_FRAME`] bytes.
    #[error("agent frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// A frame did not decode as a message.
    #[error("malformed agent message: {0}")]
    Malformed(String),
}

/// Encodes `message` as one frame (length prefix and payload).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, Error> {
    let mut frame =
        postcard::to_extend(message, vec![0u8; 4]).map_err(|e| Error::Malformed(e.to_string()))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Writes `message` as one frame and flushes.
pub fn write_message<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), Error> {
    let frame = encode(message)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame and decodes it. [`Error::Closed`] means a clean end of stream between
/// frames; an end inside a frame is an I/O error.
pub fn read_message<R: Read, T: serde::de::DeserializeOwned>(reader: &mut R) -> Result<T, Error> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(Error::Closed),
            Ok(0) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(Error::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    decode(&payload)
}

/// Decodes one frame's payload (without the length prefix).
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    let (message, rest) =
        postcard::take_from_bytes(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(message)
}

/// Incremental frame decoder for non-blocking readers: feed it whatever bytes arrived and take
/// out complete messages.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived. A frame that is too large or does not
    /// decode is an error; the stream cannot be resynchronised after it.
    pub fn next_message<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let mut header = [0u8; 4];
        header.copy_from_slice(&self.buf[..4]);
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_FRAME {
            return Err(Error::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let message = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        message.map(Some)
    }

    /// Bytes buffered but not yet a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(message: T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let frame = encode(&message).expect("encode");
        let decoded: T = read_message(&mut &frame[..]).expect("decode");
        assert_eq!(decoded, message);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(HostMessage::Ping { nonce: 7 });
        round_trip(HostMessage::Configure(GuestConfig {
            hostname: "web".into(),
            hosts: vec!["10.0.0.1 db".into()],
            nameservers: vec!["1.1.1.1".into()],
            search: vec![],
            interfaces: vec![InterfaceConfig {
                name: "eth0".into(),
                address: "10.0.2.15/24".into(),
                gateway: Some("10.0.2.2".into()),
                mtu: None,
            }],
        }));
        round_trip(HostMessage::Exec {
            session: 3,
            process: ProcessSpec {
                args: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: vec!["A=b".into()],
                cwd: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                tty: true,
                window: Some((24, 80)),
                stdin: true,
                main: true,
            },
        });
        round_trip(HostMessage::Stdin {
            session: 1,
            data: vec![0, 255, 10],
        });
        round_trip(HostMessage::Shutdown);
        round_trip(GuestMessage::Output {
            session: 1,
            stream: Stream::Stderr,
            data: b"hi\n".to_vec(),
        });
        round_trip(GuestMessage::Exited {
            session: 1,
            status: ExitStatus::Signal(9),
        });
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut frame = (u32::MAX).to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let err = read_message::<_, HostMessage>(&mut &frame[..]).expect_err("too large");
        assert!(matches!(err, Error::TooLarge(_)), "{err}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [&[1u8, 0, 0, 0, 200][..], &[3, 0, 0, 0, 2, 0xff, 0xff]] {
            let err = read_message::<_, GuestMessage>(&mut &garbage[..]).expect_err("garbage");
            assert!(matches!(err, Error::Malformed(_) | Error::Io(_)), "{err}");
        }
    }

    #[test]
    fn clean_end_of_stream_is_closed_and_a_cut_frame_is_not() {
        let empty: &[u8] = &[];
        assert!(matches!(
            read_message::<_, GuestMessage>(&mut &empty[..]),
            Err(Error::Closed)
        ));
        let frame = encode(&GuestMessage::Pong { nonce: 1 }).expect("encode");
        let cut = &frame[..frame.len() - 1];
        assert!(matches!(
            read_message::<_, GuestMessage>(&mut &cut[..]),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn frame_buffer_reassembles_split_frames() {
        let mut stream = encode(&GuestMessage::Pong { nonce: 1 }).expect("encode");
        stream.extend(encode(&GuestMessage::Configured).expect("encode"));
        let mut buffer = FrameBuffer::new();
        let mut seen = Vec::new();
        for byte in stream {
            buffer.extend(&[byte]);
            while let Some(message) = buffer.next_message::<GuestMessage>().expect("decode") {
                seen.push(message);
            }
        }
        assert_eq!(
            seen,
            vec![GuestMessage::Pong { nonce: 1 }, GuestMessage::Configured]
        );
        assert_eq!(buffer.pending(), 0);
    }

    #[test]
    fn exit_status_codes_follow_the_shell() {
        assert_eq!(ExitStatus::Code(7).code(), 7);
        assert_eq!(ExitStatus::Signal(2).code(), 130);
    }
}
