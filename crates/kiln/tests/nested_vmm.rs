//! `kiln run --backend vmm` end to end, with `tests/nested/run.sh --kiln-run`.
//!
//! run.sh builds static kiln and kiln-vmm, warms a KILN_ROOT on the host (default kernel,
//! kiln-init initramfs, default image disk: `kiln run --backend qemu --rm kiln/default true`),
//! then runs `kiln run --backend vmm --rm kiln/default echo hi` (stdout `hi`, exit 0),
//! `kiln run --backend vmm --rm kiln/default sh -c 'exit 7'` (exit 7) and, with
//! `--network bridge`, `sh -c 'ip -4 addr show eth0; ip route; ping -c 1 -W 5 10.88.0.1'`: the
//! guest's own virtio-net driver on kiln-vmm, a 10.88.x.y/16 address on eth0, the default route
//! via the kiln0 bridge, a ping of it answered, and no kiln-* tap left afterwards.
//!
//! On a host without vmx/svm (kvm_pvm) both runs happen inside an outer VM, QEMU TCG with
//! `-cpu EPYC`, where Debian's kvm_amd gives a nested /dev/kvm; the KILN_ROOT, kiln, kiln-vmm,
//! resize2fs, ip and nft (with their libraries) and the tun, bridge and nftables modules travel
//! in its initramfs. On a host with vmx/svm they run directly on the host (the bridge case only
//! as root with ip, nft and /dev/net/tun; run.sh says when it skips it).
//!
//! Skips (printing `SKIPPED:` and the reason) when a prerequisite is missing. Extra run.sh
//! arguments (e.g. `--timeout 400`) can be given in `KILN_NESTED_VMM_ARGS`.

#[path = "../../../tests/nested/harness.rs"]
mod harness;

use std::path::Path;
use std::time::Instant;

use harness::{cloud_kernels, host_has_vmx_or_svm, missing_tools, run, timing, Run};

/// Why the test cannot run here, if it cannot.
fn missing_prerequisites(direct: bool) -> Option<String> {
    let mut tools = vec![
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
        ("tar", "tar"),
        ("timeout", "coreutils"),
        ("bash", "bash"),
        ("cargo", "cargo (rustup)"),
    ];
    if !direct {
        tools.push(("qemu-system-x86_64", "qemu-system-x86"));
        // Copied (with their libraries) into the outer VM for --network bridge.
        tools.push(("ip", "iproute2"));
        tools.push(("nft", "nftables"));
    }
    let mut missing = missing_tools(&tools);
    let kernel = cloud_kernels();
    if kernel.is_empty() {
        missing.push(
            "/boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)".to_string(),
        );
    } else if kernel.iter().all(|k| std::fs::File::open(k).is_err()) {
        missing.push(format!(
            "a readable kernel ({} is mode 0600: run as root or chmod 0644 it)",
            kernel[0].display()
        ));
    }
    if direct && !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm (the host has vmx/svm but no kvm module loaded)".to_string());
    }
    if missing.is_empty() {
        None
    } else {
        Some(missing.join(", "))
    }
}

/// Whether `line` (from `ip -4 addr show eth0`) has an address 10.88.x.y/16.
fn has_bridge_address(line: &str) -> bool {
    let mut words = line.split_whitespace();
    if words.next() != Some("inet") {
        return false;
    }
    let Some((address, prefix)) = words.next().and_then(|w| w.split_once('/')) else {
        return false;
    };
    let octets: Vec<&str> = address.split('.').collect();
    prefix == "16"
        && octets.len() == 4
        && octets[0] == "10"
        && octets[1] == "88"
        && octets[2..].iter().all(|o| o.parse::<u8>().is_ok())
}

/// The `--network bridge` case: exit 0, eth0 10.88.x.y/16, default route via 10.88.0.1, the
/// gateway answered the ping, a kiln-* tap was on kiln0 while the VM ran and none is left.
fn check_bridge(run: &Run) {
    let stderr = run.after("KILN-RUN-STDERR bridge: ").join(" | ");
    let stderr = if stderr.is_empty() {
        "nothing".to_string()
    } else {
        stderr
    };
    run.expect(
        "KILN-RUN-END bridge ",
        "`kiln run --backend vmm --network bridge ...` did not finish",
    );
    let rc = run
        .after("KILN-RUN-RC bridge ")
        .first()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let stdout = run.after("KILN-RUN-STDOUT bridge: ");
    if rc != "0" {
        run.fail(&format!(
            "`kiln run --backend vmm --network bridge --rm kiln/default sh -c 'ip -4 addr show \
             eth0; ip route; ping -c 1 -W 5 10.88.0.1'` exited {rc:?}, not 0; kiln's stderr: \
             {stderr}; the guest printed {stdout:?} (diagnostics in KILN-RUN-NETDIAG lines)"
        ));
    }
    if !stdout.iter().any(|l| has_bridge_address(l)) {
        run.fail(&format!(
            "the guest's eth0 has no 10.88.x.y/16 address: it printed {stdout:?}"
        ));
    }
    if !stdout
        .iter()
        .any(|l| l.trim_start().starts_with("default via 10.88.0.1 dev eth0"))
    {
        run.fail(&format!(
            "the guest's default route is not via 10.88.0.1 (kiln0): it printed {stdout:?}"
        ));
    }
    if !stdout.iter().any(|l| l.contains(", 0% packet loss")) {
        run.fail(&format!(
            "the guest's ping of the gateway 10.88.0.1 got no answer: it printed {stdout:?}"
        ));
    }
    let seen = run.expect(
        "KILN-RUN-TAPS-SEEN ",
        "kiln-run.sh did not report the taps seen during the bridge run",
    );
    if !(seen.contains("[kiln-") && seen.ends_with("master=kiln0")) {
        run.fail(&format!(
            "no kiln-* tap on the kiln0 bridge was seen while the VM ran: {seen}"
        ));
    }
    run.expect(
        "KILN-RUN-TAPS-LEFT []",
        "`kiln run --network bridge --rm` left a kiln-* tap behind",
    );
}

#[test]
fn kiln_run_backend_vmm_echo_and_exit_status() {
    let direct = host_has_vmx_or_svm();
    if let Some(why) = missing_prerequisites(direct) {
        eprintln!("SKIPPED: kiln run --backend vmm end to end needs {why}");
        return;
    }

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nested-vmm");
    let mut args = vec![
        "--kiln-run".to_string(),
        "--keep".to_string(),
        work.display().to_string(),
    ];
    if let Ok(extra) = std::env::var("KILN_NESTED_VMM_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_string));
    }

    let started = Instant::now();
    let run = run("nested_vmm", &args);
    let elapsed = started.elapsed();

    if run.status.code() == Some(2) || run.find("KILN-MODE").is_none() {
        run.fail("run.sh could not set the test up (see its error above)");
    }
    let mode = run
        .expect("KILN-MODE ", "run.sh did not say which mode it ran")
        .trim_start_matches("KILN-MODE ")
        .to_string();
    run.expect(
        "KILN-ROOT-WARM ok",
        "warming the KILN_ROOT on the host failed",
    );

    if mode == "kiln-run-nested" {
        run.expect("KILN-OUTER-INIT", "the outer VM did not reach its /init");
        if let Some(line) = run.find("KILN-OUTER-KVM-MISSING") {
            run.fail(&format!("the outer VM has no nested /dev/kvm: {line}"));
        }
        run.expect(
            "KILN-OUTER-KVM-READY",
            "the outer VM did not get /dev/kvm from kvm_amd",
        );
    } else {
        assert_eq!(mode, "kiln-run-direct", "unexpected run.sh mode");
    }

    // kiln run --backend vmm --rm kiln/default echo hi
    run.expect(
        "KILN-RUN-END echo ",
        "`kiln run --backend vmm ... echo hi` did not finish",
    );
    let echo_rc = run
        .after("KILN-RUN-RC echo ")
        .first()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if echo_rc != "0" {
        run.fail(&format!(
            "`kiln run --backend vmm --rm kiln/default echo hi` exited {echo_rc}, not 0 \
             (its stderr is in the KILN-RUN-STDERR echo lines, diagnostics in KILN-RUN-DIAG)"
        ));
    }
    let stdout = run.after("KILN-RUN-STDOUT echo: ");
    if stdout != ["hi"] {
        run.fail(&format!(
            "`kiln run --backend vmm ... echo hi` printed {stdout:?} on stdout, not [\"hi\"]"
        ));
    }

    // kiln run --backend vmm --rm kiln/default sh -c 'exit 7'
    let exit7_rc = run
        .after("KILN-RUN-RC exit7 ")
        .first()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if exit7_rc != "7" {
        run.fail(&format!(
            "`kiln run --backend vmm --rm kiln/default sh -c 'exit 7'` exited {exit7_rc:?}, not 7"
        ));
    }
    run.expect(
        "KILN-RUN-LEFTOVER-VMS []",
        "`kiln run --rm` left VM directories behind",
    );

    // kiln run --backend vmm --network bridge --rm kiln/default sh -c 'ip ...; ping 10.88.0.1'
    let bridge_ran = run.find("KILN-RUN-BRIDGE-SKIPPED").is_none();
    if bridge_ran {
        check_bridge(&run);
    } else {
        eprintln!("nested_vmm: the --network bridge case was skipped (see run.sh's log)");
    }

    run.expect("KILN-NESTED-RESULT PASS", "run.sh's own checks failed");
    if !run.status.success() {
        run.fail("run.sh exited non-zero");
    }

    let timings = run.find("KILN-RUN-TIMING").unwrap_or("KILN-RUN-TIMING n/a");
    let warm = run.find("KILN-ROOT-WARM").unwrap_or("");
    eprintln!(
        "nested_vmm: mode {mode}; warm-up on the host {} s; outer VM boot to /init {} s; \
         kiln run echo hi {} s; kiln run exit 7 {} s; kiln run --network bridge {} s; VM run {} s; \
         whole test (with build) {:.1} s",
        timing(warm, "secs"),
        timing(timings, "outer_boot_s"),
        timing(timings, "run_echo_s"),
        timing(timings, "run_exit7_s"),
        if bridge_ran {
            timing(timings, "run_bridge_s")
        } else {
            "skipped"
        },
        timing(timings, "total_s"),
        elapsed.as_secs_f64()
    );
}
