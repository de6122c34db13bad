//! `kiln run` end to end: the real `kiln` binary boots Debian's cloud kernel with kiln-init
//! under QEMU (TCG on hosts without vmx/svm, which is how CI runs) from the offline default
//! image and from an image pulled from a real registry (Debian's docker-registry).
//!
//! Tests share one kiln root (kernel, initramfs and image disks are built once) except those
//! that check that nothing at all is left behind, which get their own.

#[path = "../../kiln-image/tests/common/mod.rs"]
#[allow(missing_docs, clippy::unwrap_used)]
mod registry;

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_image::oci::{ImageBuilder, LayerBuilder};
use kiln_image::Compression;

use common::{assert_fails_with, describe, missing_boot_prerequisite, text, Root};

macro_rules! require_prerequisites {
    () => {
        if let Some(why) = missing_boot_prerequisite() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// The root most tests share.
fn shared() -> &'static Root {
    static SHARED: OnceLock<Root> = OnceLock::new();
    SHARED.get_or_init(|| Root::new("kiln-run", "shared"))
}

/// A test registry with an image whose config sets Entrypoint, Cmd, Env, WorkingDir and User.
struct TestImage {
    _registry: registry::Registry,
    reference: String,
}

fn test_image() -> &'static Mutex<Option<TestImage>> {
    static IMAGE: OnceLock<Mutex<Option<TestImage>>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed");
        let base = kiln_image::build_default_image(Path::new(busybox)).expect("busybox layer");
        let mut app = LayerBuilder::new();
        app.dir("etc/", 0o755).expect("dir");
        app.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .expect("passwd");
        app.file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")
            .expect("group");
        app.dir("home/", 0o755).expect("dir");
        app.dir("home/app/", 0o755).expect("dir");
        app.dir("srv/", 0o755).expect("dir");
        app.file("srv/greeting.txt", 0o644, b"greetings from the image\n")
            .expect("file");
        let app = app.finish(Compression::Gzip).expect("layer");
        let image = ImageBuilder::new()
            .layer(base.layers[0].clone())
            .layer(app)
            .entrypoint(&["/bin/sh", "-c"])
            .cmd(&["echo \"$GREETING from $(pwd) as $(id -u)\""])
            .env(&[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "GREETING=hello",
            ])
            .working_dir("/srv")
            .user("app")
            .build()
            .expect("image");
        let registry = registry::Registry::start();
        registry.push("kiln-e2e/app", "v1", &image);
        let reference = registry.reference("kiln-e2e/app:v1");
        Mutex::new(Some(TestImage {
            _registry: registry,
            reference,
        }))
    })
}

fn image_reference() -> String {
    test_image()
        .lock()
        .expect("image lock")
        .as_ref()
        .expect("image")
        .reference
        .clone()
}

#[test]
fn run_rm_echo_prints_hi_and_leaves_nothing() {
    require_prerequisites!();
    let root = Root::new("kiln-run", "echo");
    let out = root.kiln(&["run", "--rm", "kiln/default", "echo", "hi"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n", "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("backend"),
        "kiln says which backend it picked: {}",
        describe(&out)
    );
    let ps = root.kiln(&["ps", "-a", "-q"]);
    assert_eq!(text(&ps.stdout), "", "--rm removed the VM record");
    assert!(root.vm_dirs().is_empty(), "--rm removed the VM directory");
    assert_no_processes(&root.dir);
}

/// No process mentions `dir` (the kiln root) on its command line or as KILN_ROOT.
fn assert_no_processes(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.chars().all(|c| c.is_ascii_digit()) || name == std::process::id().to_string() {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let hay = [cmdline.as_slice(), environ.as_slice()].concat();
            if String::from_utf8_lossy(&hay).contains(&needle) {
                found.push(format!("{name}: {}", text(&cmdline).replace('\0', " ")));
            }
        }
        if found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind for {needle}: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn exit_codes_pass_through() {
    require_prerequisites!();
    let root = shared();
    let out = root.kiln(&["run", "--rm", "kiln/default", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
}

#[test]
fn a_missing_command_is_127_with_a_clear_message() {
    require_prerequisites!();
    let root = shared();
    let out = root.kiln(&["run", "--rm", "kiln/default", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("no-such-command"),
        "{}",
        describe(&out)
    );
}

#[test]
fn image_config_is_honoured_and_overridable() {
    require_prerequisites!();
    let root = shared();
    let image = image_reference();
    let out = root.kiln(&["run", "--rm", &image]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hello from /srv as 1000\n");

    // -e, -w, -u and a command replacing Cmd (the Entrypoint `sh -c` stays).
    let out = root.kiln(&[
        "run",
        "--rm",
        "-e",
        "GREETING=bye",
        "-w",
        "/tmp/work",
        "-u",
        "root",
        &image,
        "echo \"$GREETING from $(pwd) as $(id -u)\"; cat /srv/greeting.txt",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "bye from /tmp/work as 0\ngreetings from the image\n"
    );

    // --entrypoint replaces the Entrypoint.
    let out = root.kiln(&["run", "--rm", "--entrypoint", "/bin/echo", &image, "plain"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "plain\n");
}

#[test]
fn detached_vm_logs_exec_cp_stop_rm() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-detached";
    let out = root.kiln(&[
        "run",
        "-d",
        "--name",
        name,
        "kiln/default",
        "sh",
        "-c",
        "echo started; echo oops >&2; while :; do sleep 1; done",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 64, "run -d prints the full ID: {id}");
    root.wait_status(name, "running", Duration::from_secs(120));

    // logs: stdout and stderr of the main process, separated.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = root.kiln(&["logs", name]);
        if text(&logs.stdout) == "started\n" && text(&logs.stderr) == "oops\n" {
            break;
        }
        assert!(Instant::now() < deadline, "logs: {}", describe(&logs));
        std::thread::sleep(Duration::from_millis(200));
    }

    // exec: stdout, stderr, exit code, stdin.
    let out = root.kiln(&["exec", name, "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    let mut child = root
        .command(&["exec", "-i", name, "sh", "-c", "tr a-z A-Z; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec -i");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"shout\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("exec -i output");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "SHOUT\ndone\n");

    // Output far larger than the credit window flows through intact (acks keep it moving).
    let out = root.kiln(&["exec", name, "sh", "-c", "yes kiln | head -c 3000000"]);
    assert!(
        out.status.success(),
        "bulk exec: status {:?}",
        out.status.code()
    );
    assert_eq!(out.stdout.len(), 3_000_000);
    assert!(out.stdout.chunks(5).all(|c| c == b"kiln\n"));

    // cp both ways: a directory in, back out under a new name, identical.
    let host = tempfile::tempdir().expect("tempdir");
    let src = host.path().join("payload");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("sub/blob.bin"), &blob).expect("write");
    std::fs::write(src.join("note.txt"), b"note\n").expect("write");
    let out = root.kiln(&["cp", &src.to_string_lossy(), &format!("{name}:/tmp")]);
    assert!(out.status.success(), "cp in: {}", describe(&out));
    let out = root.kiln(&["exec", name, "cat", "/tmp/payload/note.txt"]);
    assert_eq!(text(&out.stdout), "note\n", "{}", describe(&out));
    let back = host.path().join("back");
    let out = root.kiln(&[
        "cp",
        &format!("{name}:/tmp/payload"),
        &back.to_string_lossy(),
    ]);
    assert!(out.status.success(), "cp out: {}", describe(&out));
    assert_eq!(
        std::fs::read(back.join("sub/blob.bin")).expect("blob"),
        blob
    );
    assert_eq!(
        std::fs::read(back.join("note.txt")).expect("note"),
        b"note\n"
    );
    let out = root.kiln(&[
        "cp",
        &format!("{name}:/no/such/file"),
        &back.to_string_lossy(),
    ]);
    assert!(!out.status.success(), "cp of a missing path fails");

    // ps lists it; stop ends it; rm removes everything.
    let ps = root.kiln(&["ps"]);
    assert!(text(&ps.stdout).contains(name), "{}", describe(&ps));
    let out = root.kiln(&["stop", "-t", "2", name]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = root.inspect(name);
    assert_eq!(record["status"], "exited", "{record}");
    let ps = root.kiln(&["ps"]);
    assert!(!text(&ps.stdout).contains(name), "ps hides stopped VMs");
    let ps = root.kiln(&["ps", "-a"]);
    assert!(text(&ps.stdout).contains(name), "ps -a shows them");
    let dir = PathBuf::from(record["dir"].as_str().expect("dir"));
    assert!(dir.exists());
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!dir.exists(), "rm removed {}", dir.display());
    let out = root.kiln(&["inspect", name]);
    assert!(!out.status.success());
}

#[test]
fn ctrl_c_is_forwarded_to_the_main_process() {
    require_prerequisites!();
    let root = shared();
    let mut child = root
        .command(&[
            "run",
            "--rm",
            "kiln/default",
            "sh",
            "-c",
            "trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut guard = KillOnDrop(child);
    let child = &mut guard.0;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = stdout.read(&mut buf).expect("read");
        assert!(n > 0, "kiln ended before the process was ready");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    stdout.read_to_end(&mut seen).expect("read rest");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(5), "output: {}", text(&seen));
    assert!(text(&seen).contains("got INT"), "{}", text(&seen));
}

/// Kills the child when a test ends early (a failed assertion), so no kiln is left behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens a pseudo-terminal pair with the given window size.
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let mut master = 0;
    let mut slave = 0;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers are valid; name and termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: openpty returned two new descriptors we now own.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// `kiln ARGS` on a pseudo-terminal of its own (its controlling terminal), as a person at a
/// terminal runs it; everything it writes is collected.
struct PtyKiln {
    child: KillOnDrop,
    master: std::fs::File,
    output: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl PtyKiln {
    fn spawn(root: &Root, args: &[&str], rows: u16, cols: u16) -> PtyKiln {
        let (master, slave) = openpty(rows, cols);
        let mut command = root.command(args);
        let slave_fd = slave.as_raw_fd();
        command
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                libc::setsid();
                libc::ioctl(slave_fd, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = KillOnDrop(command.spawn().expect("kiln on a pty"));
        let master = std::fs::File::from(master);
        let output = std::sync::Arc::new(Mutex::new(Vec::<u8>::new()));
        {
            let output = output.clone();
            let mut reader = master.try_clone().expect("dup master");
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
        PtyKiln {
            child,
            master,
            output,
        }
    }

    /// Everything on the terminal so far.
    fn seen(&self) -> String {
        text(&self.output.lock().expect("lock"))
    }

    /// Waits until `needle` is on the terminal.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.seen().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal: {}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the shell prompt, then a moment: busybox ash sets up its line editor just
    /// after printing the prompt and drops input that arrives during that (a person would not
    /// type within milliseconds either).
    fn wait_for_prompt(&self) {
        self.wait_for_prompt_after("");
    }

    /// Like [`PtyKiln::wait_for_prompt`], for the prompt that follows the last `marker` on
    /// the terminal (the shell prints the prompt after a command's output).
    fn wait_for_prompt_after(&self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let seen = self.seen();
            let after = match marker {
                "" => Some(seen.as_str()),
                _ => seen.rfind(marker).map(|at| &seen[at + marker.len()..]),
            };
            if after.is_some_and(|rest| rest.contains("# ")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no prompt after {marker:?} on the terminal: {seen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    /// Types `bytes`.
    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("type");
    }

    /// Waits for kiln to exit.
    fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln did not end {what}; the terminal shows: {}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn interactive_tty_session_through_a_pty() {
    require_prerequisites!();
    let root = shared();
    let mut pty = PtyKiln::spawn(root, &["run", "--rm", "-it", "kiln/default", "sh"], 33, 101);
    pty.wait_for_prompt();
    pty.type_in(b"tty && stty size && echo $((6*7))x\r");
    pty.wait_for("42x");
    let seen = pty.seen();
    assert!(seen.contains("/dev/pts/"), "a real tty: {seen}");
    assert!(
        seen.contains("33 101"),
        "the window size reached the guest: {seen}"
    );
    // Ctrl-C interrupts the foreground command, not the session.
    // The marker is printed only once the shell runs the line, with the terminal back in
    // cooked mode, where Ctrl-C is a signal (typed earlier, the line editor would take it).
    pty.type_in(b"echo sl$((1))eeping; sleep 100\r");
    pty.wait_for("sl1eeping");
    pty.type_in(&[3]);
    pty.wait_for_prompt_after("sl1eeping");
    pty.type_in(b"echo after-$((1+1))\r");
    pty.wait_for("after-2");
    // Ctrl-D ends the shell; its status is kiln's.
    pty.type_in(b"sh -c 'exit 4'; echo was-$?\r");
    pty.wait_for("was-4");
    pty.wait_for_prompt_after("was-4");
    pty.type_in(&[4]);
    let status = pty.wait_exit("after Ctrl-D");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn eight_vms_at_once_all_work_and_ps_lists_them() {
    require_prerequisites!();
    let root = shared();
    let names: Vec<String> = (0..8).map(|i| format!("e2e-many-{i}")).collect();
    let handles: Vec<_> = names
        .iter()
        .map(|name| {
            let name = name.clone();
            std::thread::spawn(move || {
                shared().kiln(&[
                    "run",
                    "-d",
                    "--memory",
                    "256M",
                    "--name",
                    &name,
                    "kiln/default",
                    "sleep",
                    "600",
                ])
            })
        })
        .collect();
    for handle in handles {
        let out = handle.join().expect("thread");
        assert!(out.status.success(), "{}", describe(&out));
    }
    for name in &names {
        root.wait_status(name, "running", Duration::from_secs(300));
    }
    let ps = root.kiln(&["ps", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&ps.stdout).expect("json");
    for name in &names {
        assert!(
            list.as_array()
                .expect("array")
                .iter()
                .any(|r| r["name"] == name.as_str() && r["status"] == "running"),
            "{name} in ps: {list}"
        );
        let out = root.kiln(&["exec", name, "hostname"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let mut args = vec!["rm", "-f"];
    args.extend(names.iter().map(String::as_str));
    let out = root.kiln(&args);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn killed_supervisor_leaves_consistent_state_and_rm_cleans_everything() {
    require_prerequisites!();
    let root = Root::new("kiln-run", "kill9");
    let out = root.kiln(&[
        "run",
        "-d",
        "--name",
        "victim",
        "kiln/default",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = root.wait_status("victim", "running", Duration::from_secs(180));
    let supervisor = record["supervisor_pid"].as_u64().expect("supervisor pid") as i32;
    let vmm = record["vmm_pid"].as_u64().expect("vmm pid") as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(supervisor, libc::SIGKILL);
    }
    let record = root.wait_status("victim", "exited", Duration::from_secs(10));
    assert!(
        record["status_reason"]
            .as_str()
            .unwrap_or("")
            .contains("supervisor died"),
        "{record}"
    );
    // The hypervisor dies with its supervisor.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{vmm}/cmdline")).exists()
        && !std::fs::read_to_string(format!("/proc/{vmm}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < deadline,
            "hypervisor {vmm} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = root.kiln(&["rm", "victim"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(root.vm_dirs().is_empty(), "rm removed the VM directory");
    assert_no_processes(&root.dir);
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    require_prerequisites!();
    let root = Root::new("kiln-run", "bad");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--rm", "localhost:1/no/such-image:v1", "true"],
            "no/such-image",
        ),
        (
            vec!["run", "--rm", "--kernel", "nosuch", "kiln/default", "true"],
            "nosuch",
        ),
        (
            vec!["run", "--rm", "--memory", "lots", "kiln/default", "true"],
            "--memory",
        ),
        (
            vec!["run", "--rm", "--memory", "1M", "kiln/default", "true"],
            "too small",
        ),
        (
            vec!["run", "--rm", "--memory", "64T", "kiln/default", "true"],
            "more than this host has",
        ),
        (
            vec!["run", "--rm", "-e", "=oops", "kiln/default", "true"],
            "bad environment variable",
        ),
        (
            vec!["run", "--rm", "--cpus", "0", "kiln/default", "true"],
            "--cpus",
        ),
        (
            vec!["run", "--rm", "--backend", "bochs", "kiln/default", "true"],
            "backend",
        ),
        (
            vec!["run", "--rm", "--name", "bad name!", "kiln/default", "true"],
            "name",
        ),
    ];
    for (args, needle) in cases {
        let out = root.kiln(&args);
        assert!(
            !out.status.success(),
            "{args:?} should fail: {}",
            describe(&out)
        );
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: the message names {needle:?}: {}",
            describe(&out)
        );
        assert!(
            !text(&out.stderr).contains("panicked"),
            "{}",
            describe(&out)
        );
        let ps = root.kiln(&["ps", "-a", "-q"]);
        assert_eq!(text(&ps.stdout), "", "{args:?} left a VM record");
        assert!(
            root.vm_dirs().is_empty(),
            "{args:?} left a VM directory: {:?}",
            root.vm_files()
        );
    }
    // A name in use.
    let out = root.kiln(&["create", "--name", "taken", "kiln/default", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.kiln(&["run", "--rm", "--name", "taken", "kiln/default", "true"]);
    assert_fails_with(&out, "already used");
    assert_eq!(root.vm_dirs().len(), 1, "only the first VM exists");
    let out = root.kiln(&["rm", "taken"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(root.vm_dirs().is_empty(), "left: {:?}", root.vm_files());
    // A hypervisor that cannot start: the foreground CLI says why, and --rm still cleans up.
    let out = root
        .command(&["run", "--rm", "--backend", "qemu", "kiln/default", "true"])
        .env("KILN_QEMU", "/nonexistent/qemu")
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("/nonexistent/qemu"),
        "{}",
        describe(&out)
    );
    let ps = root.kiln(&["ps", "-a", "-q"]);
    assert_eq!(text(&ps.stdout), "", "--rm removed the failed VM");
    assert!(root.vm_dirs().is_empty(), "left: {:?}", root.vm_files());
    // A hypervisor that starts and dies at once: its own words reach the user.
    let fake = root.dir.join("fake-qemu.sh");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake-qemu: cannot set up guest memory' >&2\nexit 1\n",
    )
    .expect("write fake qemu");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = root
        .command(&["run", "--rm", "--backend", "qemu", "kiln/default", "true"])
        .env("KILN_QEMU", &fake)
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("fake-qemu: cannot set up guest memory"),
        "{}",
        describe(&out)
    );
    assert!(root.vm_dirs().is_empty(), "left: {:?}", root.vm_files());
    assert_no_processes(&root.dir);
}

#[test]
fn create_then_start_attached_and_a_restart_keeps_the_disk() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-persist";
    let out = root.kiln(&[
        "create",
        "--name",
        name,
        "kiln/default",
        "sh",
        "-c",
        "cat /data.txt 2>/dev/null; echo run >> /data.txt",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(root.inspect(name)["status"], "created");
    let ps = root.kiln(&["ps"]);
    assert!(
        !text(&ps.stdout).contains(name),
        "a created VM is not running"
    );
    let out = root.kiln(&["start", "-a", name]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "", "first boot: no file yet");
    let out = root.kiln(&["start", "-a", name]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "run\n",
        "the second boot sees the first one's write"
    );
    let record = root.inspect(name);
    assert_eq!(record["status"], "exited");
    assert_eq!(record["exit_code"], 0);
    // exec needs a running VM.
    let out = root.kiln(&["exec", name, "true"]);
    assert_fails_with(&out, "not running");
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn logs_follow_streams_until_the_vm_exits() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-follow";
    let out = root.kiln(&[
        "run",
        "-d",
        "--name",
        name,
        "kiln/default",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line$i; sleep 2; done; exit 2",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.kiln(&["logs", "-f", name]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "line1\nline2\nline3\n");
    let record = root.wait_status(name, "exited", Duration::from_secs(60));
    assert_eq!(record["exit_code"], 2, "{record}");
    let out = root.kiln(&["logs", "--tail", "2", name]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "line2\nline3\n");

    // --timestamps: each line starts with the time kiln received it.
    let out = root.kiln(&["logs", "--timestamps", name]);
    assert!(out.status.success(), "{}", describe(&out));
    let stamped: Vec<(std::time::SystemTime, String)> = text(&out.stdout)
        .lines()
        .map(|line| {
            let (stamp, rest) = line.split_once(' ').expect("a time, then the line");
            let time = humantime::parse_rfc3339(stamp)
                .unwrap_or_else(|e| panic!("{stamp:?} is not an RFC 3339 time: {e}"));
            (time, rest.to_string())
        })
        .collect();
    let lines: Vec<&str> = stamped.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(lines, ["line1", "line2", "line3"]);
    let spread = stamped[2]
        .0
        .duration_since(stamped[0].0)
        .expect("times in order");
    // Stamps are taken when the host receives each line, so delivery jitter is allowed for.
    assert!(
        spread >= Duration::from_millis(2500) && spread < Duration::from_secs(60),
        "the guest slept 2 s between lines: {spread:?}"
    );
    // --since: from the second line's time on; a duration back from now covers all.
    let since = humantime::format_rfc3339_nanos(stamped[1].0).to_string();
    let out = root.kiln(&["logs", "--since", &since, name]);
    assert_eq!(text(&out.stdout), "line2\nline3\n", "{}", describe(&out));
    let out = root.kiln(&["logs", "--since", "1h", "-n", "1", name]);
    assert_eq!(text(&out.stdout), "line3\n", "{}", describe(&out));
    let out = root.kiln(&["logs", "--since", "last tuesday", name]);
    assert_fails_with(&out, "--since");

    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn logs_rotate_at_their_cap_and_a_follower_reads_across_rotations() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-logcap";
    // 4000 lines of 64 bytes (256000 bytes) against a 64 KiB cap, a pause every 1000 lines.
    let script = "i=0; while [ $i -lt 4000 ]; do \
                  printf 'line-%05d-%s\\n' $i 0123456789012345678901234567890123456789012345678; \
                  i=$((i+1)); [ $((i % 1000)) = 0 ] && sleep 1; done; true";
    let out = root.kiln(&[
        "run",
        "-d",
        "--log-max-size",
        "64K",
        "--name",
        name,
        "kiln/default",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let follow = root.kiln(&["logs", "-f", name]);
    assert!(follow.status.success(), "{}", describe(&follow));
    let expected: Vec<String> = (0..4000)
        .map(|i| format!("line-{i:05}-0123456789012345678901234567890123456789012345678"))
        .collect();
    let followed = text(&follow.stdout);
    let followed: Vec<&str> = followed.lines().collect();
    assert_eq!(
        followed.len(),
        4000,
        "the follower saw every line across the rotations"
    );
    assert!(followed.iter().zip(&expected).all(|(a, b)| a == b));
    root.wait_status(name, "exited", Duration::from_secs(60));

    // On disk: the current file and one previous part, each within the cap.
    let record = root.inspect(name);
    let dir = std::path::PathBuf::from(record["dir"].as_str().expect("dir"));
    for file in ["output.log", "output.log.1"] {
        let len = std::fs::metadata(dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .len();
        assert!(len <= 64 * 1024, "{file} is {len} bytes");
    }
    assert!(!dir.join("output.log.2").exists());
    // `logs` shows what is kept: the newest lines, in order, to the last one.
    let out = root.kiln(&["logs", name]);
    let kept = text(&out.stdout);
    let kept: Vec<&str> = kept.lines().collect();
    // The previous part alone holds at least the cap less one output record (at most the
    // protocol's 32 KiB chunk): 32 KiB of 64-byte lines, whatever the chunking was.
    assert!(
        kept.len() >= 32 * 1024 / 64 && kept.len() < 4000,
        "{} lines kept",
        kept.len()
    );
    assert!(kept
        .iter()
        .rev()
        .zip(expected.iter().rev())
        .all(|(a, b)| a == b));
    let out = root.kiln(&["logs", "-n", "2", name]);
    assert_eq!(
        text(&out.stdout),
        format!("{}\n{}\n", expected[3998], expected[3999])
    );
    let out = root.kiln(&["create", "--log-max-size", "lots", "kiln/default"]);
    assert_fails_with(&out, "--log-max-size");
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn listing_commands_end_quietly_when_their_reader_goes_away() {
    // No guest needed: an empty kiln root still prints headers and JSON.
    let root = Root::new("kiln-run", "sigpipe");
    for args in [
        &["ps", "-a"][..],
        &["ps", "--format", "json"],
        &["image", "ls"],
        &["kernel", "ls"],
    ] {
        // A pipe whose read end is already closed: the first write fails.
        let mut fds = [0; 2];
        // SAFETY: pipe fills in two new descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: both descriptors are new and ours; each is owned exactly once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let out = root
            .command(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .expect("run kiln");
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "kiln {args:?} panicked on a closed pipe: {stderr}"
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "kiln {args:?} ends as other tools do: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn attach_shows_the_serial_console() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-console";
    let out = root.kiln(&["run", "-d", "--name", name, "kiln/default", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));
    root.wait_status(name, "running", Duration::from_secs(120));
    let mut attach = KillOnDrop(
        root.command(&["attach", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("attach"),
    );
    let mut stdout = attach.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if text(&seen).contains("console-marker-42") {
                let _ = tx.send(());
                return;
            }
        }
    });
    // The attach client is registered once its connection is up; retry the write until seen.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = root.kiln(&[
            "exec",
            name,
            "sh",
            "-c",
            "echo console-marker-$((6*7)) > /dev/console",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        if rx.recv_timeout(Duration::from_secs(2)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console line never reached attach"
        );
    }
    // Closing stdin detaches.
    drop(attach.0.stdin.take());
    let status = attach.0.wait().expect("wait attach");
    assert!(status.success(), "attach ends cleanly: {status:?}");
    let out = root.kiln(&["rm", "-f", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn system_prune_removes_stopped_vms_only() {
    require_prerequisites!();
    let root = Root::new("kiln-run", "prune");
    let out = root.kiln(&["create", "--name", "idle", "kiln/default", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.kiln(&[
        "run",
        "-d",
        "--name",
        "busy",
        "kiln/default",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    root.wait_status("busy", "running", Duration::from_secs(180));
    let out = root.kiln(&["system", "prune"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !root.kiln(&["inspect", "idle"]).status.success(),
        "prune removed idle"
    );
    assert_eq!(
        root.inspect("busy")["status"],
        "running",
        "prune keeps running VMs"
    );
    assert_eq!(root.vm_dirs().len(), 1);
    let out = root.kiln(&["rm", "-f", "busy"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(root.vm_dirs().is_empty());
    assert_no_processes(&root.dir);
}

#[test]
fn kill_sends_a_signal_to_the_main_process() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-kill";
    let out = root.kiln(&["run", "-d", "--name", name, "kiln/default", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));
    root.wait_status(name, "running", Duration::from_secs(120));
    let out = root.kiln(&["kill", "-s", "NOSUCH", name]);
    assert_fails_with(&out, "unknown signal");
    let out = root.kiln(&["kill", "-s", "TERM", name]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = root.wait_status(name, "exited", Duration::from_secs(60));
    assert_eq!(record["exit_code"], 128 + 15, "{record}");
    let out = root.kiln(&["kill", name]);
    assert_fails_with(&out, "not running");
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn ctrl_p_ctrl_q_detaches_and_the_vm_runs_on() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-detach";
    let mut pty = PtyKiln::spawn(
        root,
        &["run", "-it", "--name", name, "kiln/default", "sh"],
        24,
        80,
    );
    pty.wait_for_prompt();
    pty.type_in(&[0x10, 0x11]);
    let status = pty.wait_exit("after Ctrl-P Ctrl-Q");
    assert_eq!(status.code(), Some(0));
    assert!(pty.seen().contains("detached"));
    assert_eq!(root.inspect(name)["status"], "running", "the VM runs on");
    let out = root.kiln(&["exec", name, "echo", "still-here"]);
    assert_eq!(text(&out.stdout), "still-here\n", "{}", describe(&out));
    // `attach --main` returns to the same shell, on a terminal of a new size.
    let mut pty = PtyKiln::spawn(root, &["attach", "--main", name], 30, 90);
    std::thread::sleep(Duration::from_secs(1));
    pty.type_in(b"stty size; echo back-$((20+3))\r");
    pty.wait_for("back-23");
    assert!(
        pty.seen().contains("30 90"),
        "the new window size reached the shell: {}",
        pty.seen()
    );
    // The shell's exit status is attach's, and the VM ends with its main process.
    pty.type_in(b"exit 5\r");
    let status = pty.wait_exit("after the shell exited");
    assert_eq!(status.code(), Some(5), "{}", pty.seen());
    root.wait_status(name, "exited", Duration::from_secs(60));
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn attach_main_needs_a_terminal_for_a_terminal_process() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-attach-notty";
    let out = root.kiln(&["run", "-dit", "--name", name, "kiln/default", "sh"]);
    assert!(out.status.success(), "{}", describe(&out));
    root.wait_status(name, "running", Duration::from_secs(120));
    let out = root.kiln(&["attach", "--main", name]);
    assert_fails_with(&out, "attach from a terminal");
    assert_eq!(
        root.inspect(name)["status"],
        "running",
        "the VM is untouched"
    );
    let out = root.kiln(&["rm", "-f", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn a_kernel_in_use_by_a_vm_is_not_removed() {
    require_prerequisites!();
    let root = Root::new("kiln-run", "kernel-in-use");
    let out = root.kiln(&["create", "--name", "user", "kiln/default", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.kiln(&["kernel", "rm", "default"]);
    assert_fails_with(&out, "used by VM(s) user");
    let out = root.kiln(&["kernel", "ls"]);
    assert!(text(&out.stdout).contains("default"), "{}", describe(&out));
    let out = root.kiln(&["rm", "user"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = root.kiln(&["kernel", "rm", "default"]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn kernel_args_reach_the_guest_kernel() {
    require_prerequisites!();
    let root = shared();
    let out = root.kiln(&[
        "run",
        "--rm",
        "--kernel-args",
        "kiln.test=marker42",
        "kiln/default",
        "cat",
        "/proc/cmdline",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("kiln.test=marker42"),
        "{}",
        describe(&out)
    );
    let out = root.kiln(&[
        "run",
        "--rm",
        "--kernel-args",
        "a\nb",
        "kiln/default",
        "true",
    ]);
    assert_fails_with(&out, "--kernel-args");
}

#[test]
fn stop_kills_a_process_that_ignores_sigterm() {
    require_prerequisites!();
    let root = shared();
    let name = "e2e-stubborn";
    let out = root.kiln(&[
        "run",
        "-d",
        "--name",
        name,
        "kiln/default",
        "sh",
        "-c",
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    root.wait_status(name, "running", Duration::from_secs(120));
    // Only once the shell has set its trap does SIGTERM meet a process that ignores it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while text(&root.kiln(&["logs", name]).stdout) != "ready\n" {
        assert!(Instant::now() < deadline, "the shell never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = root.kiln(&["stop", "-t", "1", name]);
    assert!(out.status.success(), "{}", describe(&out));
    let record = root.inspect(name);
    assert_eq!(record["status"], "exited", "{record}");
    assert_eq!(
        record["exit_code"],
        128 + 9,
        "SIGKILL after the timeout: {record}"
    );
    let out = root.kiln(&["rm", name]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn command_line_mistakes_are_refused_clearly() {
    // None of these reaches a VM: no QEMU or kernel needed.
    let root = Root::new("kiln-run", "cli");
    let cases: [(&[&str], &str); 5] = [
        (&["ps", "--format", "yaml"], "unknown --format"),
        (&["cp", "a", "b"], "must be VM:PATH"),
        (&["cp", "one:/a", "two:/b"], "between two VMs"),
        (&["kill", "-s", "99", "vm"], "out of range"),
        (&["logs", "no-such-vm"], "no such VM"),
    ];
    for (args, needle) in cases {
        let out = root.kiln(args);
        assert!(!out.status.success(), "{args:?}: {}", describe(&out));
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: the message names {needle:?}: {}",
            describe(&out)
        );
    }
}
