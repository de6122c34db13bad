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
/// a sequence of `[tag u8][length u32 LE][bytes]` records.
pub mod log_tag {
    /// Standard output.
    pub const STDOUT: u8 = 1;
    /// Standard error.
    pub const STDERR: u8 = 2;
}

/// Reads the records of an `output.log` from `data`, calling `f(tag, bytes)` for each whole
/// record; returns how many bytes were consumed (a partial record at the end is left).
pub fn parse_output_log(data: &[u8], mut f: impl FnMut(u8, &[u8])) -> usize {
    let mut at = 0;
    while data.len() - at >= 5 {
        let tag = data[at];
        let mut len = [0u8; 4];
        len.copy_from_slice(&data[at + 1..at + 5]);
        let len = u32::from_le_bytes(len) as usize;
        if data.len() - at - 5 < len {
            break;
        }
        f(tag, &data[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    at
}
