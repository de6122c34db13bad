//! What the Rust tests that drive `tests/nested/run.sh` share (crates/kiln-vmm's
//! `linux_boot` and crates/kiln's `nested_vmm`, each including this file with `#[path]`):
//! finding tools, the host's virtualization, running run.sh with its output echoed live, and
//! reading its console lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// tests/nested/run.sh in this repository.
pub fn run_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/nested/run.sh")
}

/// Whether `name` is an executable in `PATH` (or /usr/sbin, /sbin).
pub fn in_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|dir| {
            let candidate = dir.join(name);
            candidate.is_file()
                && std::fs::metadata(&candidate)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                    .unwrap_or(false)
        })
}

/// The `(tool, Debian package)` pairs whose tool is not installed, as messages.
pub fn missing_tools(tools: &[(&str, &str)]) -> Vec<String> {
    tools
        .iter()
        .filter(|(tool, _)| !in_path(tool))
        .map(|(tool, package)| format!("`{tool}` (apt-get install {package})"))
        .collect()
}

/// Debian's cloud kernels in /boot.
pub fn cloud_kernels() -> Vec<PathBuf> {
    std::fs::read_dir("/boot")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the host CPU has hardware virtualization (then kiln-vmm runs without an outer VM).
pub fn host_has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// The output of one run.sh invocation.
pub struct Run {
    /// Console lines and run.sh's own lines (stdout), in order.
    pub lines: Vec<String>,
    /// run.sh's stderr (build output, errors).
    pub stderr: String,
    /// run.sh's exit status.
    pub status: std::process::ExitStatus,
    /// The reproduction command.
    pub command: String,
}

impl Run {
    /// The first line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.contains(needle))
    }

    /// Fails with `what`, the console tail and the command to reproduce.
    pub fn fail(&self, what: &str) -> ! {
        let start = self.lines.len().saturating_sub(120);
        let stderr_tail: Vec<&str> = self.stderr.lines().rev().take(15).collect();
        let stderr_tail: Vec<&str> = stderr_tail.into_iter().rev().collect();
        panic!(
            "{what}\n--- last console lines ---\n{}\n--- run.sh stderr (tail) ---\n{}\n\
             --- run.sh exit: {} ---\nreproduce with: {}",
            self.lines[start..].join("\n"),
            stderr_tail.join("\n"),
            self.status,
            self.command
        );
    }

    /// The first line containing `needle`, or a failure explaining `what` is missing.
    pub fn expect(&self, needle: &str, what: &str) -> &str {
        match self.find(needle) {
            Some(line) => line,
            None => self.fail(&format!("{what}: no console line contains `{needle}`")),
        }
    }

    /// The lines starting with `prefix`, with it removed.
    pub fn after(&self, prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    }
}

/// Runs run.sh with `args`, echoing its output live to stderr (visible with `--nocapture`);
/// `label` names the test in that output.
pub fn run(label: &str, args: &[String]) -> Run {
    let script = run_sh();
    assert!(script.is_file(), "{} is missing", script.display());
    let command = format!("bash {} {}", script.display(), args.join(" "));
    eprintln!("{label}: running {command}");
    let mut child = Command::new("bash")
        .env("KILN_STATIC_PROFILE", "static-test")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bash tests/nested/run.sh (is bash installed?)");
    let mut stderr_pipe = child.stderr.take().expect("run.sh stderr is piped");
    let stderr_thread = std::thread::spawn(move || {
        // Echo run.sh's stderr (cargo build, progress) while collecting it.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stderr_pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    eprint!("{}", String::from_utf8_lossy(&chunk[..n]));
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    let stdout = child.stdout.take().expect("run.sh stdout is piped");
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.expect("read run.sh stdout");
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        eprintln!("{line}");
        lines.push(line);
    }
    let status = child.wait().expect("wait for run.sh");
    let stderr = stderr_thread.join().expect("stderr reader thread");
    Run {
        lines,
        stderr,
        status,
        command,
    }
}

/// Value of `key=` in a KILN-TIMING line.
pub fn timing<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("n/a")
}
