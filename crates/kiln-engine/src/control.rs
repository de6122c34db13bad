//! The protocol between the kiln CLI and a VM's supervisor, on the Unix socket
//! `<vm dir>/control.sock`. Same framing as the agent protocol; one request kind per
//! connection (the first message), then a stream of events back.

use kiln_agent_protocol::{ExitStatus, ProcessSpec, Stream};
use serde::{Deserialize, Serialize};

/// What a CLI connection asks of the supervisor. The first message picks the connection's
/// purpose; [`ControlRequest::Stdin`], [`ControlRequest::CloseStdin`],
/// [`ControlRequest::Resize`] and [`ControlRequest::Signal`] then steer that session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Follow the main process: its output from now on, its exit; with `stdin`, also feed it.
    Attach {
        /// Forward stdin to the main process.
        stdin: bool,
    },
    /// Run another process in the VM.
    Exec {
        /// What to run.
        process: ProcessSpec,
    },
    /// Stream a guest path out as a tar archive.
    CopyOut {
        /// Absolute guest path.
        path: String,
    },
    /// Unpack a tar archive (sent as stdin) into a guest directory.
    CopyIn {
        /// Absolute guest directory.
        path: String,
    },
    /// Bytes for the session's stdin.
    Stdin {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of the session's stdin.
    CloseStdin,
    /// The terminal changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to the session's process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Stop the VM: SIGTERM to the main process, SIGKILL after `timeout_secs`, power off.
    Stop {
        /// Seconds to wait after SIGTERM.
        timeout_secs: u64,
    },
    /// Send a signal to the main process.
    Kill {
        /// Signal number.
        signal: i32,
    },
    /// Attach to the serial console: its output from now on; input goes to the console.
    Console,
}

/// What the supervisor sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlEvent {
    /// The session's process started.
    Started {
        /// Guest PID.
        pid: u32,
    },
    /// Output of the session.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The session ended.
    Exited {
        /// How.
        status: ExitStatus,
    },
    /// The session could not start or failed.
    Failed {
        /// Why.
        message: String,
        /// Exit code to report (125, 126, 127, ...).
        code: i32,
    },
    /// Serial console output.
    Console {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The request is done (stop, kill).
    Done,
    /// The request was refused or went wrong.
    Error {
        /// Why.
        message: String,
    },
}

/// Stream tags in `output.log`, the main process's output as the supervisor records it:
/// a sequence of `[tag u8][length u32 LE][time u64 LE, if TIMED][bytes]` records.
pub mod log_tag {
    /// Standard output.
    pub const STDOUT: u8 = 1;
    /// Standard error.
    pub const STDERR: u8 = 2;
    /// Set on records that carry the time they were written (Unix time in nanoseconds), for
    /// `kiln logs --timestamps` and `--since`; logs written before it existed have none.
    pub const TIMED: u8 = 0x10;
}

/// One record of an `output.log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord<'a> {
    /// Whether the bytes went to standard error (else standard output).
    pub stderr: bool,
    /// When the supervisor wrote the record, in Unix nanoseconds, if the record says.
    pub time_ns: Option<u64>,
    /// The output bytes.
    pub data: &'a [u8],
}

/// Encodes one timed record of `output.log` for `stream` ([`log_tag::STDOUT`] or
/// [`log_tag::STDERR`]).
pub fn encode_log_record(stream: u8, time_ns: u64, data: &[u8]) -> Vec<u8> {
    // Records are one agent chunk at most, far below 4 GiB; cut rather than mis-frame.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let data = &data[..len as usize];
    let mut record = Vec::with_capacity(13 + data.len());
    record.push(stream | log_tag::TIMED);
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&time_ns.to_le_bytes());
    record.extend_from_slice(data);
    record
}

/// Reads the records of an `output.log` from `data`, calling `f` for each whole record;
/// returns how many bytes were consumed (a partial record at the end is left).
pub fn parse_output_log<'a>(data: &'a [u8], mut f: impl FnMut(LogRecord<'a>)) -> usize {
    let mut at = 0;
    loop {
        let rest = &data[at..];
        let Some((&tag, rest)) = rest.split_first() else {
            break;
        };
        let Some((len, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let len = u32::from_le_bytes(*len) as usize;
        let (time_ns, rest, header) = if tag & log_tag::TIMED != 0 {
            let Some((time, rest)) = rest.split_first_chunk::<8>() else {
                break;
            };
            (Some(u64::from_le_bytes(*time)), rest, 13)
        } else {
            (None, rest, 5)
        };
        let Some(bytes) = rest.get(..len) else {
            break;
        };
        f(LogRecord {
            stderr: tag & !log_tag::TIMED == log_tag::STDERR,
            time_ns,
            data: bytes,
        });
        at += header + len;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_and_untimed_records_parse_and_a_partial_tail_is_left() {
        let mut log = encode_log_record(log_tag::STDOUT, 42, b"out\n");
        // A record from before records carried their time.
        log.extend_from_slice(&[log_tag::STDERR, 4, 0, 0, 0]);
        log.extend_from_slice(b"err\n");
        let whole = log.len();
        let next = encode_log_record(log_tag::STDERR, 7, b"partial");
        log.extend_from_slice(&next[..next.len() - 1]);
        let mut seen = Vec::new();
        let used = parse_output_log(&log, |r| seen.push((r.stderr, r.time_ns, r.data.to_vec())));
        assert_eq!(used, whole);
        assert_eq!(
            seen,
            vec![
                (false, Some(42), b"out\n".to_vec()),
                (true, None, b"err\n".to_vec()),
            ]
        );
    }
}
