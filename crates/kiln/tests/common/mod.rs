//! What the kiln end-to-end tests share: the prerequisites for booting a real guest, a
//! private kiln root driving the real `kiln` binary, and output helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why a real guest cannot boot here (QEMU or Debian's cloud kernel missing), if it cannot.
pub fn missing_boot_prerequisite() -> Option<String> {
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    let has_kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
            })
        })
        .unwrap_or(false);
    if !has_kernel {
        return Some(
            "Debian's cloud kernel is not installed (apt-get install linux-image-cloud-amd64)"
                .into(),
        );
    }
    None
}

/// A kiln root directory under the test target directory, removed (after `rm -f` of its VMs)
/// on drop.
pub struct Root {
    /// The directory (`KILN_ROOT`).
    pub dir: PathBuf,
}

impl Root {
    /// A fresh root named after the test file (`prefix`) and `name`.
    pub fn new(prefix: &str, name: &str) -> Root {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{prefix}-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create kiln root");
        Root { dir }
    }

    /// `kiln ARGS` on this root, stdin closed, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(args)
            .env("KILN_ROOT", &self.dir)
            .env_remove("KILN_SUBNET")
            .stdin(Stdio::null());
        command
    }

    /// Runs `kiln ARGS` on this root.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kiln")
    }

    /// The VM directories under `vms/`.
    /// Every path under `vms/`, relative to it: what a test that expects none shows.
    pub fn vm_files(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                out.push(
                    path.strip_prefix(base)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, base, out);
                }
            }
        }
        let base = self.dir.join("vms");
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out
    }

    pub fn vm_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("vms"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `kiln inspect VM` as JSON.
    pub fn inspect(&self, vm: &str) -> serde_json::Value {
        let out = self.kiln(&["inspect", vm]);
        assert!(out.status.success(), "inspect {vm}: {}", describe(&out));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
        list[0].clone()
    }

    /// Waits until VM `vm` has `status`; returns its record.
    pub fn wait_status(&self, vm: &str, status: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let record = self.inspect(vm);
            if record["status"] == status {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "VM {vm} did not reach {status}: {record}\nconsole:\n{}",
                self.console(vm)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The VM's serial console log.
    pub fn console(&self, vm: &str) -> String {
        text(&self.kiln(&["logs", "--console", vm]).stdout)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let out = self.kiln(&["ps", "-a", "-q"]);
        for id in text(&out.stdout).lines() {
            let _ = self.kiln(&["rm", "-f", id]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Bytes as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a kiln command failed and that its error names `needle`.
pub fn assert_fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "{}", describe(out));
    assert!(text(&out.stderr).contains(needle), "{}", describe(out));
}

/// A command's status and output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}
