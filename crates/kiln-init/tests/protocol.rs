//! The agent's protocol service, end to end: the real `kiln-init` binary serving on a Unix
//! socket (`--listen-unix`), driven the way the host drives it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{
    read_message, write_message, Error as ProtoError, ExitStatus, GuestMessage, HostMessage,
    ProcessSpec, SessionId, Stream, MAX_CHUNK, PROTOCOL_VERSION, WINDOW,
};

/// How long any single expected message may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running `kiln-init --listen-unix`; killed on drop.
struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-init"))
            .arg("--listen-unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kiln-init");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the agent's ready line");
        assert!(line.contains("listening"), "agent said {line:?}");
        Agent {
            child,
            sock,
            _dir: dir,
        }
    }

    /// Connects and checks the Hello.
    fn connect(&self) -> Conn {
        let mut conn = self.connect_raw();
        match conn.recv() {
            GuestMessage::Hello { version, agent, .. } => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert!(agent.starts_with("kiln-init"), "{agent}");
            }
            other => panic!("expected Hello first, got {other:?}"),
        }
        conn
    }

    fn connect_raw(&self) -> Conn {
        let stream = UnixStream::connect(&self.sock).expect("connect");
        let mut reader = stream.try_clone().expect("clone");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || loop {
            let m = read_message::<_, GuestMessage>(&mut reader);
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        });
        Conn { stream, rx }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One host connection: messages arrive through a reader thread, so a test never blocks on a
/// read with a write pending.
struct Conn {
    stream: UnixStream,
    rx: Receiver<Result<GuestMessage, ProtoError>>,
}

/// What a session produced.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
    failed: Option<(i32, String)>,
}

impl Conn {
    fn send(&mut self, m: &HostMessage) {
        write_message(&mut self.stream, m).expect("send");
    }

    fn try_recv(&mut self) -> Result<GuestMessage, ProtoError> {
        match self.rx.recv_timeout(PATIENCE) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => panic!("no message from the agent in {PATIENCE:?}"),
            Err(RecvTimeoutError::Disconnected) => Err(ProtoError::Closed),
        }
    }

    fn recv(&mut self) -> GuestMessage {
        self.try_recv().expect("message from the agent")
    }

    fn exec(&mut self, session: SessionId, process: ProcessSpec) -> u32 {
        self.send(&HostMessage::Exec { session, process });
        match self.recv() {
            GuestMessage::Started { session: s, pid } if s == session => pid,
            other => panic!("expected Started for session {session}, got {other:?}"),
        }
    }

    /// Collects a session's messages until it ends, acknowledging output and checking that
    /// the agent never has more than a window of it unacknowledged.
    fn finish(&mut self, session: SessionId) -> Outcome {
        let mut out = Outcome::default();
        loop {
            match self.recv() {
                GuestMessage::Output {
                    session: s,
                    stream,
                    data,
                } if s == session => {
                    assert!(data.len() <= MAX_CHUNK, "chunk of {} bytes", data.len());
                    self.send(&HostMessage::Ack {
                        session,
                        bytes: data.len() as u32,
                    });
                    match stream {
                        Stream::Stdout => out.stdout.extend(data),
                        Stream::Stderr => out.stderr.extend(data),
                    }
                }
                GuestMessage::Exited { session: s, status } if s == session => {
                    out.status = Some(status);
                    return out;
                }
                GuestMessage::Failed {
                    session: s,
                    code,
                    message,
                } if s == session => {
                    out.failed = Some((code, message));
                    return out;
                }
                other => panic!("unexpected message for session {session}: {other:?}"),
            }
        }
    }

    fn run(&mut self, session: SessionId, process: ProcessSpec) -> Outcome {
        self.exec(session, process);
        self.finish(session)
    }

    fn expect_failed(&mut self, session: SessionId) -> (i32, String) {
        match self.recv() {
            GuestMessage::Failed {
                session: s,
                code,
                message,
            } if s == session => (code, message),
            other => panic!("expected Failed for session {session}, got {other:?}"),
        }
    }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Deterministic, incompressible-looking test data.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `data` as the session's stdin within the agent's window, collecting (and
/// acknowledging) output meanwhile, then closes stdin and waits for the end.
fn stream_stdin(conn: &mut Conn, session: SessionId, data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let mut sent = 0usize;
    let mut acked = 0usize;
    let mut closed = false;
    let mut out_unacked = 0usize;
    loop {
        while sent < data.len() && sent - acked < WINDOW as usize {
            let n = (data.len() - sent)
                .min(MAX_CHUNK)
                .min(WINDOW as usize - (sent - acked));
            conn.send(&HostMessage::Stdin {
                session,
                data: data[sent..sent + n].to_vec(),
            });
            sent += n;
        }
        if sent == data.len() && !closed {
            conn.send(&HostMessage::CloseStdin { session });
            closed = true;
        }
        match conn.recv() {
            GuestMessage::StdinAck { session: s, bytes } if s == session => {
                acked += bytes as usize;
                assert!(acked <= sent, "agent acknowledged more stdin than was sent");
            }
            GuestMessage::Output {
                session: s,
                stream,
                data,
            } if s == session => {
                out_unacked += data.len();
                assert!(
                    out_unacked <= WINDOW as usize,
                    "agent sent {out_unacked} unacknowledged bytes"
                );
                conn.send(&HostMessage::Ack {
                    session,
                    bytes: data.len() as u32,
                });
                out_unacked -= data.len();
                match stream {
                    Stream::Stdout => out.stdout.extend(data),
                    Stream::Stderr => out.stderr.extend(data),
                }
            }
            GuestMessage::Exited { session: s, status } if s == session => {
                out.status = Some(status);
                return out;
            }
            GuestMessage::Failed {
                session: s,
                code,
                message,
            } if s == session => {
                out.failed = Some((code, message));
                return out;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn hello_comes_first_and_ping_is_answered() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&HostMessage::Ping { nonce: 0xfeed });
    assert_eq!(conn.recv(), GuestMessage::Pong { nonce: 0xfeed });
}

#[test]
fn exit_code_is_reported() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let out = conn.run(1, sh("exit 7"));
    assert_eq!(out.status, Some(ExitStatus::Code(7)));
}

#[test]
fn stdout_and_stderr_are_separate_streams() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let out = conn.run(1, sh("echo to-out; echo to-err >&2"));
    assert_eq!(out.stdout, b"to-out\n");
    assert_eq!(out.stderr, b"to-err\n");
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
}

#[test]
fn env_and_a_missing_cwd_are_honoured_and_path_home_default() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path().join("not/yet/there");
    let mut spec = sh("echo \"$FOO\"; pwd; echo \"$PATH\"; echo \"$HOME\"");
    spec.env = vec!["FOO=bar baz".into()];
    spec.cwd = Some(cwd.display().to_string());
    let out = conn.run(1, spec);
    let text = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "bar baz");
    assert_eq!(Path::new(lines[1]), cwd.as_path());
    assert_eq!(
        lines[2],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert!(lines[3].starts_with('/'), "HOME={:?}", lines[3]);
    assert!(cwd.is_dir());
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
}

#[test]
fn user_by_name_and_by_uid_and_unknown_names_fail() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.connect();
    let mut spec = sh("id -u; id -g; echo \"$HOME\"");
    spec.user = Some("nobody".into());
    let out = conn.run(1, spec);
    let text = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..2], &["65534", "65534"], "{text}");
    assert_eq!(lines[2], "/nonexistent");

    let mut spec = sh("id -u; id -g; id -G");
    spec.user = Some("4242:4343".into());
    let out = conn.run(2, spec);
    assert_eq!(
        String::from_utf8(out.stdout).expect("utf8"),
        "4242\n4343\n4343\n"
    );

    let mut spec = sh("true");
    spec.user = Some("no-such-user-kiln".into());
    conn.send(&HostMessage::Exec {
        session: 3,
        process: spec,
    });
    let (code, message) = conn.expect_failed(3);
    assert_eq!(code, 125);
    assert_eq!(
        message,
        "unable to find user no-such-user-kiln: no matching entries in passwd file"
    );
}

#[test]
fn stdin_streams_megabytes_through_cat_within_both_windows() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let data = pattern(5 << 20);
    conn.exec(
        1,
        ProcessSpec {
            args: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        },
    );
    let out = stream_stdin(&mut conn, 1, &data);
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat echoed different bytes");
}

#[test]
fn missing_command_fails_with_127_like_docker() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&HostMessage::Exec {
        session: 1,
        process: ProcessSpec {
            args: vec!["nosuch-kiln-command".into()],
            ..Default::default()
        },
    });
    assert_eq!(
        conn.expect_failed(1),
        (
            127,
            "exec: \"nosuch-kiln-command\": executable file not found in $PATH".to_string()
        )
    );
}

#[test]
fn non_executable_file_fails_with_126() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "echo hi\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    conn.send(&HostMessage::Exec {
        session: 1,
        process: ProcessSpec {
            args: vec![file.display().to_string()],
            ..Default::default()
        },
    });
    let (code, message) = conn.expect_failed(1);
    assert_eq!(code, 126);
    assert_eq!(
        message,
        format!("exec: \"{}\": permission denied", file.display())
    );
}

#[test]
fn empty_args_fail_with_125() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&HostMessage::Exec {
        session: 1,
        process: ProcessSpec::default(),
    });
    assert_eq!(conn.expect_failed(1).0, 125);
}

#[test]
fn tty_session_is_a_terminal_and_sees_resize() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let mut spec =
        sh("test -t 0 && test -t 1 && test -t 2 && echo isatty; stty size; read x; stty size");
    spec.tty = true;
    spec.stdin = true;
    spec.window = Some((24, 80));
    conn.exec(1, spec);
    let mut seen = Vec::new();
    let mut resized = false;
    let status = loop {
        match conn.recv() {
            GuestMessage::Output {
                session: 1,
                stream,
                data,
            } => {
                assert_eq!(
                    stream,
                    Stream::Stdout,
                    "a tty merges everything into stdout"
                );
                conn.send(&HostMessage::Ack {
                    session: 1,
                    bytes: data.len() as u32,
                });
                seen.extend(data);
                let text = String::from_utf8_lossy(&seen).into_owned();
                if !resized && text.contains("24 80") {
                    resized = true;
                    conn.send(&HostMessage::Resize {
                        session: 1,
                        rows: 50,
                        cols: 132,
                    });
                    conn.send(&HostMessage::Stdin {
                        session: 1,
                        data: b"\n".to_vec(),
                    });
                }
            }
            GuestMessage::StdinAck { session: 1, .. } => {}
            GuestMessage::Exited { session: 1, status } => break status,
            other => panic!("unexpected {other:?}"),
        }
    };
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.contains("isatty"), "{text:?}");
    assert!(text.contains("24 80"), "{text:?}");
    assert!(text.contains("50 132"), "{text:?}");
    assert_eq!(status, ExitStatus::Code(0));
}

#[test]
fn sigterm_ends_sleep_with_signal_status() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.exec(
        1,
        ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        },
    );
    conn.send(&HostMessage::Signal {
        session: 1,
        signal: libc::SIGTERM,
    });
    assert_eq!(
        conn.finish(1).status,
        Some(ExitStatus::Signal(libc::SIGTERM))
    );
}

#[test]
fn all_output_precedes_exited() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    // Several windows' worth on both streams, then an immediate exit.
    let out = conn.run(
        1,
        sh("head -c 1500000 /dev/zero; head -c 700000 /dev/zero >&2; exit 3"),
    );
    assert_eq!(out.stdout.len(), 1_500_000);
    assert_eq!(out.stderr.len(), 700_000);
    assert_eq!(out.status, Some(ExitStatus::Code(3)));
}

#[test]
fn background_child_holding_the_pipe_does_not_hold_up_exited() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let start = Instant::now();
    let out = conn.run(1, sh("sleep 20 & echo started"));
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "Exited took {:?}",
        start.elapsed()
    );
}

#[test]
fn two_sessions_interleave() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let cat = ProcessSpec {
        args: vec!["cat".into()],
        stdin: true,
        ..Default::default()
    };
    conn.exec(1, cat.clone());
    conn.exec(2, cat);
    // Session 2 answers while session 1 is still open and idle, then the other way round.
    for (session, word) in [(2, "two"), (1, "one"), (2, "deux"), (1, "un")] {
        conn.send(&HostMessage::Stdin {
            session,
            data: format!("{word}\n").into_bytes(),
        });
        let mut echoed = Vec::new();
        while echoed != format!("{word}\n").as_bytes() {
            match conn.recv() {
                GuestMessage::StdinAck { session: s, .. } => assert_eq!(s, session),
                GuestMessage::Output {
                    session: s,
                    stream: Stream::Stdout,
                    data,
                } => {
                    assert_eq!(s, session, "output of the wrong session");
                    conn.send(&HostMessage::Ack {
                        session: s,
                        bytes: data.len() as u32,
                    });
                    echoed.extend(data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    conn.send(&HostMessage::CloseStdin { session: 1 });
    conn.send(&HostMessage::CloseStdin { session: 2 });
    let mut exited = Vec::new();
    while exited.len() < 2 {
        match conn.recv() {
            GuestMessage::Exited { session, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                exited.push(session);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    exited.sort();
    assert_eq!(exited, vec![1, 2]);
}

#[test]
fn copy_out_round_trips_through_copy_in() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let src = tempfile::tempdir().expect("src");
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).expect("mkdir");
    std::fs::write(tree.join("secret"), "s3cret\n").expect("write");
    std::fs::set_permissions(tree.join("secret"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::write(tree.join("sub/tool"), "#!/bin/sh\necho tool\n").expect("write");
    std::fs::set_permissions(
        tree.join("sub/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::set_permissions(
        tree.join("sub/deeper"),
        std::fs::Permissions::from_mode(0o750),
    )
    .expect("chmod");
    let big = pattern(900_000);
    std::fs::write(tree.join("sub/deeper/big.bin"), &big).expect("write");
    std::os::unix::fs::symlink("sub/tool", tree.join("link")).expect("symlink");

    conn.send(&HostMessage::CopyOut {
        session: 1,
        path: tree.display().to_string(),
    });
    match conn.recv() {
        GuestMessage::Started { session: 1, .. } => {}
        other => panic!("expected Started, got {other:?}"),
    }
    let out = conn.finish(1);
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
    assert!(out.stdout.len() > big.len());

    let dst = tempfile::tempdir().expect("dst");
    conn.send(&HostMessage::CopyIn {
        session: 2,
        path: dst.path().display().to_string(),
    });
    match conn.recv() {
        GuestMessage::Started { session: 2, .. } => {}
        other => panic!("expected Started, got {other:?}"),
    }
    let result = stream_stdin(&mut conn, 2, &out.stdout);
    assert_eq!(result.status, Some(ExitStatus::Code(0)), "{result:?}");

    let copy = dst.path().join("tree");
    let mode = |p: &str| {
        std::fs::symlink_metadata(copy.join(p))
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        std::fs::read(copy.join("secret")).expect("read"),
        b"s3cret\n"
    );
    assert_eq!(mode("secret"), 0o600);
    assert_eq!(mode("sub/tool"), 0o755);
    assert_eq!(mode("sub/deeper"), 0o750);
    assert!(std::fs::read(copy.join("sub/deeper/big.bin")).expect("read") == big);
    assert_eq!(
        std::fs::read_link(copy.join("link")).expect("readlink"),
        PathBuf::from("sub/tool")
    );
}

#[test]
fn copies_of_missing_paths_fail_with_code_1() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&HostMessage::CopyOut {
        session: 1,
        path: "/nonexistent/kiln-init-test".into(),
    });
    let (code, message) = conn.expect_failed(1);
    assert_eq!(code, 1);
    assert!(message.contains("no such file or directory"), "{message}");

    let file = tempfile::NamedTempFile::new().expect("file");
    conn.send(&HostMessage::CopyIn {
        session: 2,
        path: file.path().display().to_string(),
    });
    let (code, message) = conn.expect_failed(2);
    assert_eq!(code, 1);
    assert!(message.contains("not a directory"), "{message}");
}

#[test]
fn session_in_use_and_unknown_sessions_are_errors() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.exec(
        1,
        ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        },
    );
    conn.send(&HostMessage::Exec {
        session: 1,
        process: sh("true"),
    });
    match conn.recv() {
        GuestMessage::Error { message } => assert!(message.contains("in use"), "{message}"),
        other => panic!("expected Error, got {other:?}"),
    }
    conn.send(&HostMessage::Signal {
        session: 99,
        signal: libc::SIGTERM,
    });
    match conn.recv() {
        GuestMessage::Error { message } => assert!(message.contains("99"), "{message}"),
        other => panic!("expected Error, got {other:?}"),
    }
    conn.send(&HostMessage::Signal {
        session: 1,
        signal: libc::SIGKILL,
    });
    assert_eq!(
        conn.finish(1).status,
        Some(ExitStatus::Signal(libc::SIGKILL))
    );
}

#[test]
fn garbage_frames_do_not_crash_the_agent() {
    let agent = Agent::start();
    for garbage in [
        &[3u8, 0, 0, 0, 0xff, 0xff, 0xff][..],
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let mut conn = agent.connect();
        use std::io::Write;
        conn.stream.write_all(garbage).expect("write garbage");
        // The agent drops a connection that sent a malformed frame.
        assert!(matches!(
            conn.try_recv(),
            Err(ProtoError::Closed | ProtoError::Io(_))
        ));
    }
    let mut conn = agent.connect();
    conn.send(&HostMessage::Ping { nonce: 9 });
    assert_eq!(conn.recv(), GuestMessage::Pong { nonce: 9 });
}

#[test]
fn a_new_connection_takes_over_running_sessions() {
    let agent = Agent::start();
    let mut first = agent.connect();
    first.exec(
        1,
        ProcessSpec {
            args: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        },
    );
    let mut second = agent.connect();
    assert!(matches!(
        first.try_recv(),
        Err(ProtoError::Closed | ProtoError::Io(_))
    ));
    let out = stream_stdin(&mut second, 1, b"still here\n");
    assert_eq!(out.stdout, b"still here\n");
    assert_eq!(out.status, Some(ExitStatus::Code(0)));
}

#[test]
fn configure_only_answers_outside_a_vm() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&HostMessage::Configure(Default::default()));
    assert_eq!(conn.recv(), GuestMessage::Configured);
}

#[test]
fn shutdown_stops_processes_and_ends_the_agent() {
    let mut agent = Agent::start();
    let mut conn = agent.connect();
    let pid = conn.exec(
        1,
        ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        },
    );
    let mut main = sh("exit 0");
    main.main = true;
    assert_eq!(conn.run(2, main).status, Some(ExitStatus::Code(0)));
    conn.send(&HostMessage::Shutdown);
    let status = agent.child.wait().expect("wait for the agent");
    assert!(status.success(), "{status}");
    // SAFETY: kill with signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "sleep survived the shutdown");
}

#[test]
fn stdin_beyond_the_window_is_refused_with_an_error() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    // sleep never reads: once its pipe is full, nothing more is acknowledged.
    conn.exec(
        1,
        ProcessSpec {
            args: vec!["sleep".into(), "100".into()],
            stdin: true,
            ..Default::default()
        },
    );
    let chunk = vec![b'x'; MAX_CHUNK];
    let chunks = 2 * WINDOW as usize / MAX_CHUNK;
    for _ in 0..chunks {
        conn.send(&HostMessage::Stdin {
            session: 1,
            data: chunk.clone(),
        });
    }
    let mut acked = 0usize;
    let message = loop {
        match conn.recv() {
            GuestMessage::StdinAck { session: 1, bytes } => acked += bytes as usize,
            GuestMessage::Error { message } => break message,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(message.contains("beyond the"), "{message}");
    assert!(
        acked < chunks * MAX_CHUNK - WINDOW as usize,
        "acked {acked}"
    );
    conn.send(&HostMessage::Signal {
        session: 1,
        signal: libc::SIGKILL,
    });
    loop {
        match conn.recv() {
            GuestMessage::Exited { session: 1, status } => {
                assert_eq!(status, ExitStatus::Signal(libc::SIGKILL));
                break;
            }
            GuestMessage::StdinAck { .. } | GuestMessage::Error { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
