//! Boots Debian's stock cloud kernel through kiln-vmm, end to end, with `tests/nested/run.sh`.
//!
//! On a host without vmx/svm (this project's kvm_pvm machines) run.sh starts an outer VM under
//! QEMU's software emulation with `-cpu EPYC`; Debian's kvm_amd gives a nested /dev/kvm there and
//! a static kiln-vmm boots the inner kernel. On a host with vmx/svm, kiln-vmm runs directly.
//!
//! The inner guest loads virtio_mmio and virtio_blk, finds the disk through the ACPI DSDT
//! (LNRO0005), reads a file the host put on an ext4 image, writes one back (checked on the host
//! with debugfs, no mounts), and resets through the i8042 so that kiln-vmm exits 0.
//!
//! This test never skips: a missing kernel, busybox or QEMU fails it with the Debian package to
//! install, because a skip would hide a broken CI. Extra arguments for run.sh (e.g.
//! `--outer-disk copy`, `--timeout 400`) can be given in `KILN_LINUX_BOOT_ARGS`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// tests/nested/run.sh in this repository.
fn run_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/nested/run.sh")
}

/// Whether `name` is an executable in `PATH`.
fn in_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(name);
        candidate.is_file()
            && std::fs::metadata(&candidate)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                .unwrap_or(false)
    })
}

/// Whether the host CPU has hardware virtualization (then kiln-vmm runs without an outer VM).
fn host_has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Fails the test, naming the Debian package, when something run.sh needs is missing.
fn check_prerequisites(direct: bool) {
    let mut missing = Vec::new();
    let mut tools = vec![
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
        ("timeout", "coreutils"),
        ("bash", "bash"),
    ];
    if !direct {
        tools.push(("qemu-system-x86_64", "qemu-system-x86"));
    }
    for (tool, package) in tools {
        if !in_path(tool) {
            missing.push(format!("`{tool}` (apt-get install {package})"));
        }
    }
    let kernel_found = std::env::var_os("KILN_KERNEL").is_some()
        || std::fs::read_dir("/boot")
            .map(|dir| {
                dir.filter_map(Result::ok).any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
                })
            })
            .unwrap_or(false);
    if !kernel_found {
        missing.push(
            "/boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)".to_string(),
        );
    }
    assert!(
        missing.is_empty(),
        "the Linux boot test needs: {}",
        missing.join(", ")
    );
}

/// The output of one run.sh invocation.
struct Run {
    /// Console lines and run.sh's own lines (stdout), in order.
    lines: Vec<String>,
    /// run.sh's stderr (build output, errors).
    stderr: String,
    /// run.sh's exit status.
    status: std::process::ExitStatus,
    /// The reproduction command.
    command: String,
}

impl Run {
    /// The first line containing `needle`.
    fn find(&self, needle: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.contains(needle))
    }

    /// The last `n` lines, for failure messages.
    fn tail(&self, n: usize) -> String {
        let start = self.lines.len().saturating_sub(n);
        self.lines[start..].join("\n")
    }

    /// Fails with `what`, the console tail and the command to reproduce.
    fn fail(&self, what: &str) -> ! {
        let stderr_tail: Vec<&str> = self.stderr.lines().rev().take(15).collect();
        let stderr_tail: Vec<&str> = stderr_tail.into_iter().rev().collect();
        panic!(
            "{what}\n--- last console lines ---\n{}\n--- run.sh stderr (tail) ---\n{}\n\
             --- run.sh exit: {} ---\nreproduce with: {}",
            self.tail(80),
            stderr_tail.join("\n"),
            self.status,
            self.command
        );
    }

    /// The first line containing `needle`, or a failure explaining `what` is missing.
    fn expect(&self, needle: &str, what: &str) -> &str {
        match self.find(needle) {
            Some(line) => line,
            None => self.fail(&format!("{what}: no console line contains `{needle}`")),
        }
    }
}

/// Runs run.sh, echoing its output live to stderr (visible with `--nocapture`).
fn run(args: &[String]) -> Run {
    let script = run_sh();
    assert!(script.is_file(), "{} is missing", script.display());
    let command = format!("bash {} {}", script.display(), args.join(" "));
    eprintln!("linux_boot: running {command}");
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
        let mut buf = Vec::new();
        // Echo run.sh's stderr (cargo build, progress) while collecting it.
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
fn timing<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("n/a")
}

#[test]
fn boots_debian_cloud_kernel_with_virtio_blk_over_acpi() {
    let direct = host_has_vmx_or_svm();
    check_prerequisites(direct);

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-boot");
    // Two vCPUs, so every run also proves SMP: the guest finds both in the MADT and starts the
    // second through the in-kernel LAPIC (INIT/SIPI).
    let mut args = vec![
        "--keep".to_string(),
        work.display().to_string(),
        "--vcpus".to_string(),
        "2".to_string(),
    ];
    if direct {
        // kiln-vmm runs on the host: the binary cargo just built will do.
        args.push("--kiln-vmm".to_string());
        args.push(env!("CARGO_BIN_EXE_kiln-vmm").to_string());
    }
    if let Ok(extra) = std::env::var("KILN_LINUX_BOOT_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_string));
    }

    let started = Instant::now();
    let run = run(&args);
    let elapsed = started.elapsed();

    if run.status.code() == Some(2) || run.find("KILN-MODE").is_none() {
        run.fail("run.sh could not set the boot up (see its error above)");
    }
    let mode = run
        .expect("KILN-MODE ", "run.sh did not say which mode it ran")
        .trim_start_matches("KILN-MODE ")
        .to_string();
    let nonce = run
        .expect("KILN-HOST-NONCE ", "run.sh did not print the host's nonce")
        .trim_start_matches("KILN-HOST-NONCE ")
        .to_string();

    // The outer VM (nested mode only).
    if mode == "nested" {
        run.expect("KILN-OUTER-INIT", "the outer VM did not reach its /init");
        if let Some(line) = run.find("KILN-OUTER-KVM-MISSING") {
            run.fail(&format!("the outer VM has no nested /dev/kvm: {line}"));
        }
        run.expect(
            "KILN-OUTER-KVM-READY",
            "the outer VM did not get /dev/kvm from kvm_amd",
        );
        run.expect(
            "Nested Virtualization enabled",
            "kvm_amd in the outer VM did not enable nested virtualization",
        );
        run.expect(
            "KILN-OUTER-DISK-READY",
            "the outer VM does not see the ext4 image as /dev/vda (virtio-blk-pci)",
        );
        run.expect("KILN-VMM-START", "kiln-vmm was not started in the outer VM");
    } else {
        assert_eq!(mode, "direct", "unexpected run.sh mode");
    }

    // The inner guest booted by kiln-vmm.
    let init = run.expect(
        "KILN-INNER-INIT",
        "the inner Linux kernel never reached the initramfs /init (kernel hang or panic; \
         see the console)",
    );
    if !init.split_whitespace().any(|field| field == "cpus=2") {
        run.fail(&format!(
            "the inner guest did not bring up both vCPUs (SMP through the MADT): {init}"
        ));
    }
    for module in ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"] {
        if let Some(line) = run.find(&format!("KILN-INNER-MODULE-FAIL {module}:")) {
            run.fail(&format!("the inner guest could not load {module}: {line}"));
        }
        let ok = format!("KILN-INNER-MODULE-OK {module}");
        if !run.lines.iter().any(|l| l.trim_end() == ok) {
            run.fail(&format!("the inner guest did not load module {module}"));
        }
    }
    let acpi = run.expect(
        "KILN-INNER-ACPI-DEV LNRO0005:",
        "no virtio-mmio device (LNRO0005) in the inner guest's ACPI DSDT",
    );
    assert!(
        acpi.contains("driver=virtio-mmio"),
        "the ACPI virtio-mmio device is not bound to virtio_mmio: {acpi}\nreproduce with: {}",
        run.command
    );
    run.expect(
        "device=0x0002 driver=virtio_blk",
        "no virtio block device (id 2) bound to virtio_blk in the inner guest",
    );
    let disk = run.expect(
        "KILN-INNER-DISK-FOUND /dev/vda",
        "the inner guest has no /dev/vda",
    );
    if disk.contains("sectors=0 ") {
        run.fail(&format!(
            "the inner guest's /dev/vda has capacity 0 (the VMM reported no disk size): {disk}"
        ));
    }
    if let Some(line) = run.find("KILN-INNER-FAIL") {
        run.fail(&format!("the inner guest's /init failed: {line}"));
    }
    run.expect(
        "KILN-INNER-MOUNTED",
        "the inner guest could not mount /dev/vda",
    );
    run.expect(
        &format!("KILN-INNER-FROM-HOST: {nonce}"),
        "the inner guest did not read the host's /from-host.txt",
    );
    run.expect(
        "KILN-INNER-DONE",
        "the inner guest did not finish writing /from-guest.txt",
    );
    run.expect(
        &format!("KILN-HOST-FROM-GUEST-OK kiln-guest-wrote: {nonce}"),
        "the host did not find the guest's /from-guest.txt in the ext4 image (debugfs)",
    );

    // virtio-net on a tap, and the metadata service the VMM answers itself.
    run.expect(
        "KILN-INNER-NET-UP mac=06:00:ac:10:00:02",
        "the inner guest has no eth0 with the configured MAC (virtio-net)",
    );
    run.expect(
        "KILN-INNER-PING-OK",
        "the inner guest's ping of the tap's far side (172.16.0.1) got no answer",
    );
    run.expect(
        &format!("KILN-INNER-MMDS-NONCE: {nonce}"),
        "the inner guest could not read the metadata document with a V2 session token",
    );
    run.expect(
        "KILN-INNER-MMDS-NO-TOKEN: HTTP/1.1 401",
        "the metadata service (V2) answered a request without a token",
    );
    let exit = run.expect("KILN-VMM-EXIT ", "kiln-vmm's exit status was not reported");
    if !exit.starts_with("KILN-VMM-EXIT 0") {
        run.fail(&format!(
            "kiln-vmm did not exit 0 after the guest's i8042 reset: {exit}"
        ));
    }
    run.expect("KILN-NESTED-RESULT PASS", "run.sh's own checks failed");
    if !run.status.success() {
        run.fail("run.sh exited non-zero");
    }

    // Timings: information, not assertions.
    let timings = run.find("KILN-TIMING").unwrap_or("KILN-TIMING n/a");
    eprintln!(
        "linux_boot: mode {mode}; outer VM boot to /init {} s; kiln-vmm start to inner /init {} s \
         (inner kernel uptime at /init {} s); kiln-vmm run {} s; VM run {} s; \
         whole test (with build) {:.1} s",
        timing(timings, "outer_boot_s"),
        timing(timings, "inner_boot_s"),
        timing(timings, "inner_kernel_uptime_at_init_s"),
        timing(timings, "vmm_total_s"),
        timing(timings, "total_s"),
        elapsed.as_secs_f64()
    );
}
