//! Shared harness for the integration tests that drive the real `kiln-vmm` binary.
//!
//! It does what a Firecracker client does: start the process, wait for its API socket, talk
//! HTTP/1.1 over the Unix socket, and watch the process's output and exit. Everything has a
//! timeout and the process is killed when the handle is dropped, so a hung VMM fails a test
//! instead of wedging the run. When a test panics, the VMM's stdout and stderr are printed to
//! help diagnose it.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test.
pub const VMM_BIN: &str = env!("CARGO_BIN_EXE_kiln-vmm");

/// How long a VMM gets to create its API socket.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one API request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a test guest may take to reach a line or to end (by resetting); generous, since
/// kernel-mode guest code may be emulated one instruction at a time, at a speed that follows
/// the host's load. A timeout is for a hung guest, not a measure of speed.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Why KVM cannot be used here, or `None` when `/dev/kvm` opens read-write.
pub fn kvm_unavailable() -> Option<String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(err) => Some(format!("cannot open /dev/kvm read-write: {err}")),
    }
}

/// Returns true when the test can run; otherwise prints why it is skipped and returns false.
///
/// Use as `if !common::kvm_or_skip("test_name") { return; }`.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_unavailable() {
        None => true,
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A directory under the system temp dir, removed on drop (kept if `KILN_KEEP_TMP` is set).
///
/// Paths stay short so that a Unix socket inside fits in `sun_path` (108 bytes).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, uniquely named directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "kiln-{prefix}-{}-{n}-{nanos:x}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create temporary directory");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KILN_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Everything a child process wrote to one stream, collected by a background thread.
pub struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutputState {
    bytes: Vec<u8>,
    closed: bool,
}

impl Output {
    fn new() -> Arc<Output> {
        Arc::new(Output {
            state: Mutex::new(OutputState::default()),
            changed: Condvar::new(),
        })
    }

    fn collect(self: Arc<Self>, mut stream: impl Read + Send + 'static) {
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let mut state = self.state.lock().expect("output lock");
                if n == 0 {
                    state.closed = true;
                } else {
                    state.bytes.extend_from_slice(&buf[..n]);
                }
                self.changed.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
    }

    /// Everything received so far, lossily decoded, with `\r` removed.
    pub fn text(&self) -> String {
        let state = self.state.lock().expect("output lock");
        String::from_utf8_lossy(&state.bytes).replace('\r', "")
    }

    /// How many bytes have been received so far.
    pub fn len(&self) -> usize {
        self.state.lock().expect("output lock").bytes.len()
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The complete lines received so far (a trailing partial line is left out).
    pub fn lines(&self) -> Vec<String> {
        let text = self.text();
        match text.rfind('\n') {
            Some(end) => text[..end].split('\n').map(str::to_string).collect(),
            None => Vec::new(),
        }
    }

    /// Whether the stream has ended (the process closed it or exited).
    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("output lock").closed
    }

    /// Waits until a complete line satisfies `pred` and returns it, or `None` on timeout or
    /// end of stream.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("output lock");
        loop {
            let text = String::from_utf8_lossy(&state.bytes).replace('\r', "");
            if let Some(end) = text.rfind('\n') {
                if let Some(line) = text[..end].split('\n').find(|line| pred(line)) {
                    return Some(line.to_string());
                }
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("output lock")
                .0;
        }
    }

    /// Waits for a complete line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_line(timeout, |line| line.contains(needle))
    }

    /// Waits until the stream ends, or the timeout passes; returns whether it ended.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("output lock");
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("output lock")
                .0;
        }
        true
    }
}

/// A running `kiln-vmm` process; killed (SIGKILL) and reaped when dropped.
pub struct Vmm {
    child: Child,
    exit: Option<ExitStatus>,
    /// The VMM's standard output: the guest's serial console unless redirected.
    pub stdout: Arc<Output>,
    /// The VMM's standard error: its log unless redirected.
    pub stderr: Arc<Output>,
    /// The API socket, when started with one.
    pub api_sock: Option<PathBuf>,
    /// Scratch directory for sockets, disks and config files; removed after the process.
    pub dir: TempDir,
}

impl Vmm {
    /// Starts `kiln-vmm` with exactly `args`, capturing stdout and stderr.
    pub fn spawn<I, S>(dir: TempDir, args: I) -> Vmm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(VMM_BIN);
        cmd.args(args);
        Vmm::start(dir, cmd, Stdio::null())
    }

    /// Like [`Vmm::spawn`], but with the VMM's standard input (the guest's serial input) a
    /// pipe whose writing end is returned.
    pub fn spawn_with_stdin<I, S>(dir: TempDir, args: I) -> (Vmm, ChildStdin)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(VMM_BIN);
        cmd.args(args);
        let mut vmm = Vmm::start(dir, cmd, Stdio::piped());
        let stdin = vmm.child.stdin.take().expect("piped stdin");
        (vmm, stdin)
    }

    /// Starts `cmd` with the given standard input, capturing stdout and stderr.
    fn start(dir: TempDir, mut cmd: Command, stdin: Stdio) -> Vmm {
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {cmd:?}: {err}"));
        let stdout = Output::new();
        let stderr = Output::new();
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        let err: ChildStderr = child.stderr.take().expect("piped stderr");
        stdout.clone().collect(out);
        stderr.clone().collect(err);
        Vmm {
            child,
            exit: None,
            stdout,
            stderr,
            api_sock: None,
            dir,
        }
    }

    /// Starts `kiln-vmm --api-sock <tmp>/api.sock --id <id> <extra...>` and waits until the
    /// socket accepts connections.
    ///
    /// # Panics
    ///
    /// If the process exits or the socket does not appear within [`SOCKET_TIMEOUT`].
    pub fn with_api(id: &str, extra: &[&str]) -> Vmm {
        let dir = TempDir::new(id);
        let sock = dir.join("api.sock");
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--api-sock"),
            sock.as_os_str(),
            OsStr::new("--id"),
            OsStr::new(id),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let mut vmm = Vmm::spawn(dir, args);
        vmm.api_sock = Some(sock.clone());
        vmm.wait_for_socket(&sock);
        vmm
    }

    fn wait_for_socket(&mut self, sock: &Path) {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            if UnixStream::connect(sock).is_ok() {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "kiln-vmm exited ({status}) before its API socket {} appeared\nstderr:\n{}",
                    sock.display(),
                    self.stderr.text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "kiln-vmm's API socket {} did not accept connections within {SOCKET_TIMEOUT:?}\nstderr:\n{}",
                    sock.display(),
                    self.stderr.text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, e.g. for sending signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, which
        // has not been reaped yet (we hold its `Child`), so it cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait on kiln-vmm");
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit; returns its status, or `None` if it is
    /// still running. Also waits (briefly) for its output to be fully collected.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                self.stdout.wait_closed(Duration::from_secs(5));
                self.stderr.wait_closed(Duration::from_secs(5));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Vmm::wait_exit`], but panics with the VMM's output if it does not exit in time.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "kiln-vmm did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout.text(),
                self.stderr.text()
            ),
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Sends one API request; see [`http_request`].
    ///
    /// # Panics
    ///
    /// If the VMM was started without an API socket or the request fails at the transport
    /// level (connection refused, timeout, malformed response).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let sock = self
            .api_sock
            .as_ref()
            .expect("this kiln-vmm was started without --api-sock");
        http_request(sock, method, path, body).unwrap_or_else(|err| {
            panic!(
                "{method} {path} failed: {err}\nstderr so far:\n{}",
                self.stderr.text()
            )
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.api("GET", path, None)
    }

    /// `PUT path` with a JSON body.
    pub fn put(&self, path: &str, body: &str) -> (u16, String) {
        self.api("PUT", path, Some(body))
    }

    /// `PATCH path` with a JSON body.
    pub fn patch(&self, path: &str, body: &str) -> (u16, String) {
        self.api("PATCH", path, Some(body))
    }

    /// `PUT path` that must answer 204 No Content (what Firecracker answers on success).
    pub fn put_ok(&self, path: &str, body: &str) {
        let (status, answer) = self.put(path, body);
        assert_eq!(status, 204, "PUT {path} {body} answered {status}: {answer}");
    }

    /// `PATCH path` that must answer 204 No Content.
    pub fn patch_ok(&self, path: &str, body: &str) {
        let (status, answer) = self.patch(path, body);
        assert_eq!(
            status, 204,
            "PATCH {path} {body} answered {status}: {answer}"
        );
    }

    /// `GET /` parsed as JSON (the instance info), asserting 200.
    pub fn instance_info(&self) -> serde_json::Value {
        let (status, body) = self.get("/");
        assert_eq!(status, 200, "GET / answered {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("GET / body {body:?}: {err}"))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "---- kiln-vmm stdout ----\n{}\n---- kiln-vmm stderr ----\n{}\n---- exit: {:?} ----",
                self.stdout.text(),
                self.stderr.text(),
                self.exit
            );
        }
    }
}

/// Sends one HTTP/1.1 request over the Unix socket at `sock` and returns (status, body).
///
/// The request carries `Connection: close`; the body is read by Content-Length, chunked
/// encoding, or until the server closes, so it works whatever framing the server picks.
pub fn http_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() || matches!(method, "PUT" | "PATCH" | "POST") {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    stream.flush()?;

    let mut raw = Vec::new();
    let header_end = loop {
        if let Some(pos) = find(&raw, b"\r\n\r\n") {
            break pos;
        }
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(bad_response(format!(
                "connection closed inside the response head: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_string();
    let mut rest = raw[header_end + 4..].to_vec();

    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad_response(format!("bad status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad_response(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }

    let body = if status == 204 || status == 304 || method == "HEAD" {
        Vec::new()
    } else if chunked {
        stream.read_to_end(&mut rest)?;
        dechunk(&rest)?
    } else if let Some(len) = content_length {
        while rest.len() < len {
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(bad_response(format!(
                    "body shorter ({}) than Content-Length {len}",
                    rest.len()
                )));
            }
            rest.extend_from_slice(&buf[..n]);
        }
        rest.truncate(len);
        rest
    } else {
        stream.read_to_end(&mut rest)?;
        rest
    };
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn bad_response(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or_else(|| bad_response("truncated chunk".into()))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| bad_response(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err(bad_response("truncated chunk body".into()));
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Serialises `value` as the JSON body of an API request.
pub fn json(value: &serde_json::Value) -> String {
    value.to_string()
}

/// The value of `key=` in a guest's serial line (up to the next space), if present; `key` must
/// start the line or follow a space.
pub fn line_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=");
    let mut search = 0;
    while let Some(pos) = line[search..].find(&pattern) {
        let start = search + pos;
        if start == 0 || line.as_bytes()[start - 1] == b' ' {
            let value = &line[start + pattern.len()..];
            return Some(value.split(' ').next().unwrap_or(""));
        }
        search = start + pattern.len();
    }
    None
}

/// The numeric value (decimal or 0x-prefixed hex) of `key=` in a guest line.
///
/// # Panics
///
/// If the line has no such field or its value is not a number.
pub fn line_num(line: &str, key: &str) -> u64 {
    let text = line_field(line, key).unwrap_or_else(|| panic!("no {key}= in guest line {line:?}"));
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("{key}={text:?} in guest line {line:?} is not a number"))
}

impl Vmm {
    /// Starts `cmd` (which must exec `kiln-vmm` in place, as `ip netns exec` does, so that the
    /// child's pid is the VMM's) capturing stdout and stderr.
    pub fn spawn_command(dir: TempDir, cmd: Command) -> Vmm {
        Vmm::start(dir, cmd, Stdio::null())
    }

    /// Like [`Vmm::with_api`], but runs `kiln-vmm` inside the network namespace `netns` through
    /// `ip netns exec`, which also mounts that namespace's `/sys` (where kiln-vmm looks taps
    /// up).
    pub fn with_api_in_netns(netns: &str, id: &str, extra: &[&str]) -> Vmm {
        let dir = TempDir::new(id);
        let sock = dir.join("api.sock");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(VMM_BIN)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", id])
            .args(extra);
        let mut vmm = Vmm::spawn_command(dir, cmd);
        vmm.api_sock = Some(sock.clone());
        vmm.wait_for_socket(&sock);
        vmm
    }
}

/// Runs a hostile guest to its `final_line` while checking that the VMM stays up and keeps
/// answering `GET /` (every `poll`); returns what went wrong (empty when all was well).
pub fn watch_liveness(
    vmm: &mut Vmm,
    final_line: &str,
    deadline: Instant,
    poll: Duration,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut finished = false;
    while Instant::now() < deadline {
        if vmm.stdout.wait_for(final_line, poll).is_some() {
            finished = true;
            break;
        }
        if !vmm.is_running() {
            failures.push(format!(
                "kiln-vmm exited while the guest ran: {:?}",
                vmm.try_wait()
            ));
            break;
        }
        let (status, body) = vmm.get("/");
        if status != 200 {
            failures.push(format!(
                "GET / answered {status} {body} while the guest ran"
            ));
        }
    }
    if !finished && failures.is_empty() {
        failures.push("the guest did not reach its final line in time".to_string());
    }
    if vmm.is_running() {
        let (status, body) = vmm.get("/");
        if status != 200 || !body.contains("Running") {
            failures.push(format!(
                "after the guest finished, GET / answered {status} {body}"
            ));
        }
    } else {
        failures.push(format!(
            "kiln-vmm is not running after the guest finished: {:?}",
            vmm.try_wait()
        ));
    }
    failures
}
