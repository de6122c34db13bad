//! The CLI side of a session with a VM's supervisor: attach to the main process, exec, copy.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use kiln_agent_protocol::{read_message, write_message, ProcessSpec, Stream, MAX_CHUNK};

use crate::control::{ControlEvent, ControlRequest};
use crate::error::{EngineError, Result};
use crate::vm::{connect_control, VmPaths};

/// One session (a process or a copy) through the supervisor.
pub struct Session {
    events: UnixStream,
}

/// The half of a session that sends: stdin, resizes, signals. Clones share one lock, so
/// frames from different threads never interleave.
#[derive(Debug, Clone)]
pub struct SessionInput {
    stream: std::sync::Arc<std::sync::Mutex<UnixStream>>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The process ended; a shell-style exit code.
    Exited(i32),
    /// It could not start or the VM went away.
    Failed {
        /// Why.
        message: String,
        /// The exit code to report.
        code: i32,
    },
}

impl SessionEnd {
    /// The exit code to report.
    pub fn code(&self) -> i32 {
        match self {
            SessionEnd::Exited(code) => *code,
            SessionEnd::Failed { code, .. } => *code,
        }
    }
}

impl Session {
    fn open(paths: &VmPaths, request: ControlRequest) -> Result<Session> {
        Ok(Session {
            events: connect_control(paths, &request)?,
        })
    }

    /// Follows the VM's main process.
    pub fn attach(paths: &VmPaths, stdin: bool) -> Result<Session> {
        Session::open(paths, ControlRequest::Attach { stdin })
    }

    /// Runs `process` in the VM.
    pub fn exec(paths: &VmPaths, process: ProcessSpec) -> Result<Session> {
        Session::open(paths, ControlRequest::Exec { process })
    }

    /// Streams `path` out of the VM as a tar archive.
    pub fn copy_out(paths: &VmPaths, path: &str) -> Result<Session> {
        Session::open(
            paths,
            ControlRequest::CopyOut {
                path: path.to_string(),
            },
        )
    }

    /// Unpacks a tar archive sent as stdin into the VM directory `path`.
    pub fn copy_in(paths: &VmPaths, path: &str) -> Result<Session> {
        Session::open(
            paths,
            ControlRequest::CopyIn {
                path: path.to_string(),
            },
        )
    }

    /// Attaches to the serial console.
    pub fn console(paths: &VmPaths) -> Result<Session> {
        Session::open(paths, ControlRequest::Console)
    }

    /// The sending half.
    pub fn input(&self) -> Result<SessionInput> {
        Ok(SessionInput {
            stream: std::sync::Arc::new(std::sync::Mutex::new(
                self.events
                    .try_clone()
                    .map_err(|e| EngineError::Agent(format!("control socket: {e}")))?,
            )),
        })
    }

    /// The next event; `None` when the supervisor closed the connection.
    pub fn next_event(&mut self) -> Result<Option<ControlEvent>> {
        match read_message(&mut self.events) {
            Ok(event) => Ok(Some(event)),
            Err(kiln_agent_protocol::Error::Closed) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the session to its end, writing output to `stdout`/`stderr` (console output goes to
    /// `stdout` too).
    pub fn wait(&mut self, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<SessionEnd> {
        loop {
            match self.next_event()? {
                Some(ControlEvent::Output { stream, data }) => {
                    // A closed local stdout (`| head`) must not stop the VM's process.
                    let _ = match stream {
                        Stream::Stdout => stdout.write_all(&data).and_then(|_| stdout.flush()),
                        Stream::Stderr => stderr.write_all(&data).and_then(|_| stderr.flush()),
                    };
                }
                Some(ControlEvent::Console { data }) => {
                    let _ = stdout.write_all(&data).and_then(|_| stdout.flush());
                }
                Some(ControlEvent::Started { .. }) | Some(ControlEvent::Done) => {}
                Some(ControlEvent::Exited { status }) => {
                    return Ok(SessionEnd::Exited(status.code()))
                }
                Some(ControlEvent::Failed { message, code }) => {
                    return Ok(SessionEnd::Failed { message, code })
                }
                Some(ControlEvent::Error { message }) => {
                    return Ok(SessionEnd::Failed { message, code: 125 })
                }
                None => {
                    return Ok(SessionEnd::Failed {
                        message: "the VM's supervisor went away".into(),
                        code: 125,
                    })
                }
            }
        }
    }

    /// Waits for the session to start: `Ok(None)` once started, `Ok(Some(end))` if it failed
    /// or ended before.
    pub fn wait_started(&mut self) -> Result<Option<SessionEnd>> {
        match self.next_event()? {
            Some(ControlEvent::Started { .. }) => Ok(None),
            Some(ControlEvent::Exited { status }) => Ok(Some(SessionEnd::Exited(status.code()))),
            Some(ControlEvent::Failed { message, code }) => {
                Ok(Some(SessionEnd::Failed { message, code }))
            }
            Some(ControlEvent::Error { message }) => {
                Ok(Some(SessionEnd::Failed { message, code: 125 }))
            }
            Some(other) => Err(EngineError::Agent(format!(
                "unexpected event before start: {other:?}"
            ))),
            None => Ok(Some(SessionEnd::Failed {
                message: "the VM's supervisor went away".into(),
                code: 125,
            })),
        }
    }
}

impl SessionInput {
    /// Another handle on the same session.
    pub fn try_clone(&self) -> Result<SessionInput> {
        Ok(self.clone())
    }

    fn send(&mut self, request: &ControlRequest) -> Result<()> {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        Ok(write_message(&mut *stream, request)?)
    }

    /// Sends stdin bytes.
    pub fn stdin(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.send(&ControlRequest::Stdin {
                data: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// Ends stdin.
    pub fn close_stdin(&mut self) -> Result<()> {
        self.send(&ControlRequest::CloseStdin)
    }

    /// Resizes the tty.
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.send(&ControlRequest::Resize { rows, cols })
    }

    /// Sends a signal.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        self.send(&ControlRequest::Signal { signal })
    }

    /// Leaves the session without ending it (detach): the process in the VM runs on.
    pub fn detach(&mut self) {
        let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    /// Copies `reader` to the session's stdin, then ends it.
    pub fn pump(&mut self, mut reader: impl Read) -> Result<()> {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EngineError::Agent(format!("reading input: {e}"))),
            };
            self.stdin(&buf[..n])?;
        }
        self.close_stdin()
    }
}
