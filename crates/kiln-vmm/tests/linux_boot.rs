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

#[path = "../../../tests/nested/harness.rs"]
mod harness;

use std::path::Path;
use std::time::Instant;

use harness::{cloud_kernels, host_has_vmx_or_svm, missing_tools, run, timing};

/// Fails the test, naming the Debian package, when something run.sh needs is missing.
fn check_prerequisites(direct: bool) {
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
    let mut missing = missing_tools(&tools);
    if std::env::var_os("KILN_KERNEL").is_none() && cloud_kernels().is_empty() {
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
    let run = run("linux_boot", &args);
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
