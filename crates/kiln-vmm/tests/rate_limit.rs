//! Drive rate limiters, measured from outside: a guest reads its disk as fast as the device
//! lets it, and the time the whole read takes gives the rate the limiter enforced.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{json, kvm_or_skip, Vmm};
use serde_json::{json, Value};

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Boots `blk-stream` on a 4 MiB drive with `limiter`, reading `bytes` in `request`-byte
/// requests; returns the wall time between the guest's `start` and `done` lines as they reach
/// the host (boot and reset, which a loaded host slows down, are not part of it).
fn timed_read(name: &str, limiter: Value, bytes: u64, request: u64) -> Duration {
    let vmm = Vmm::with_api(name, &[]);
    let disk = vmm.dir.join("disk.img");
    fs::write(&disk, vec![0x5au8; 4 << 20]).expect("disk image");
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest("blk-stream"),
            "boot_args": format!("{BOOT_ARGS} kiln.blk_bytes={bytes} kiln.blk_req={request}"),
        })),
    );
    vmm.put_ok(
        "/drives/data",
        &json(&json!({
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "rate_limiter": limiter,
        })),
    );
    let mut vmm = vmm;
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    vmm.stdout
        .wait_for("blk-stream: start", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guest never started reading: {}", vmm.stdout.text()));
    let started = Instant::now();
    vmm.stdout
        .wait_for("blk-stream: done", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the guest never finished reading: {}", vmm.stdout.text()));
    let elapsed = started.elapsed();
    let status = vmm.expect_exit(Duration::from_secs(120));
    let out = vmm.stdout.text();
    assert_eq!(status.code(), Some(0), "the guest resets when done: {out}");
    assert!(
        out.contains(&format!(
            "blk-stream: done requests={} bytes={bytes} errors=0",
            bytes / request
        )),
        "every read succeeded: {out}"
    );
    elapsed
}

fn assert_within_10_percent(measured: f64, configured: f64, what: &str) {
    let error = (measured - configured).abs() / configured;
    assert!(
        error <= 0.10,
        "{what}: measured {measured:.0}/s, configured {configured:.0}/s ({:.1}% off)",
        error * 100.0
    );
}

#[test]
fn drive_bandwidth_limit_holds_within_10_percent() {
    if !kvm_or_skip("drive_bandwidth_limit_holds_within_10_percent") {
        return;
    }
    // 64 KiB per 100 ms = 640 KiB/s; 2 MiB takes about 3 s.
    let size = 64 * 1024;
    let bytes = 2 << 20;
    let elapsed = timed_read(
        "bw",
        json!({"bandwidth": {"size": size, "refill_time": 100}}),
        bytes,
        64 * 1024,
    );
    // The bucket starts full, so its first `size` bytes are free.
    let measured = (bytes - size) as f64 / elapsed.as_secs_f64();
    assert_within_10_percent(measured, size as f64 * 10.0, "bytes per second");
}

#[test]
fn drive_ops_limit_holds_within_10_percent() {
    if !kvm_or_skip("drive_ops_limit_holds_within_10_percent") {
        return;
    }
    // 10 requests per 100 ms = 100 requests/s; 300 requests take about 2.9 s.
    let ops = 10;
    let requests = 300;
    let elapsed = timed_read(
        "ops",
        json!({"ops": {"size": ops, "refill_time": 100}}),
        requests * 4096,
        4096,
    );
    let measured = (requests - ops) as f64 / elapsed.as_secs_f64();
    assert_within_10_percent(measured, ops as f64 * 10.0, "requests per second");
}

#[test]
fn patching_a_drive_limit_takes_effect_while_the_guest_reads() {
    if !kvm_or_skip("patching_a_drive_limit_takes_effect_while_the_guest_reads") {
        return;
    }
    let vmm = Vmm::with_api("patch", &[]);
    let disk = vmm.dir.join("disk.img");
    fs::write(&disk, vec![0u8; 4 << 20]).expect("disk image");
    let bytes: u64 = 2 << 20;
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest("blk-stream"),
            "boot_args": format!("{BOOT_ARGS} kiln.blk_bytes={bytes} kiln.blk_req=65536"),
        })),
    );
    // 64 KiB/s: the 2 MiB read would take about 31 s at this rate.
    vmm.put_ok(
        "/drives/data",
        &json(&json!({
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "rate_limiter": {"bandwidth": {"size": 65536, "refill_time": 1000}},
        })),
    );
    let mut vmm = vmm;
    let started = Instant::now();
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        vmm.is_running(),
        "the slow limit holds the guest back at first"
    );
    // 4 MiB/s from now on: the rest takes well under a second.
    vmm.patch_ok(
        "/drives/data",
        &json(&json!({
            "drive_id": "data",
            "rate_limiter": {"bandwidth": {"size": 4 << 20, "refill_time": 1000}},
        })),
    );
    let status = vmm.expect_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(8),
        "after the PATCH the read finishes at the new rate, not the old one (took {elapsed:?})"
    );
}
