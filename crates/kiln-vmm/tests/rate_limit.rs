//! Drive rate limiters, measured from outside: a guest reads its disk as fast as the device
//! lets it, and the time the whole read takes gives the rate the limiter enforced.

mod common;

use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{json, kvm_or_skip, Vmm};
use serde_json::{json, Value};

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Serialises the tests of this file: each measures a rate from wall time, and two guests
/// reading as fast as they may on a 2-core machine would compete for the CPUs.
static TIMING: Mutex<()> = Mutex::new(());

/// Takes the timing lock; a test that panicked while holding it does not stop the others.
fn timing_lock() -> MutexGuard<'static, ()> {
    TIMING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
    eprintln!(
        "{what}: measured {measured:.0}/s, configured {configured:.0}/s ({:+.1}%)",
        (measured - configured) / configured * 100.0
    );
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
    let _timing = timing_lock();
    // 64 KiB per 100 ms = 640 KiB/s; 2 MiB takes about 3 s.
    let size = 64 * 1024;
    let request = 64 * 1024;
    let bytes = 2 << 20;
    let elapsed = timed_read(
        "bw",
        json!({"bandwidth": {"size": size, "refill_time": 100}}),
        bytes,
        request,
    );
    // What the limiter lets through without waiting for a refill (vmm::rate_limiter): a
    // request passes whenever the budget is above zero and then takes its whole cost, so the
    // budget may go down to just above -request. The bucket starts full, so the first request
    // empties it and the second passes at once (after one token's refill) into a debt of
    // nearly one request; every later one waits for the budget to climb back above zero. The
    // last request therefore passes once (bytes - size - request + 1) bytes have been refilled,
    // and those bytes over the elapsed time are the rate. (Counting only `size` as free
    // reads one request too many: 31/30 of the rate, 3.3% high, here.) Host-side delays do not
    // add up over the requests: the refill follows the clock, so a late wake-up leaves the
    // budget that much fuller for the next request; only the start and done lines' own
    // latencies are in `elapsed`.
    let measured = (bytes - size - request) as f64 / elapsed.as_secs_f64();
    assert_within_10_percent(measured, size as f64 * 10.0, "bytes per second");
}

#[test]
fn drive_ops_limit_holds_within_10_percent() {
    if !kvm_or_skip("drive_ops_limit_holds_within_10_percent") {
        return;
    }
    let _timing = timing_lock();
    // 10 requests per 100 ms = 100 requests/s; 300 requests take about 2.9 s.
    let ops = 10;
    let requests = 300;
    let elapsed = timed_read(
        "ops",
        json!({"ops": {"size": ops, "refill_time": 100}}),
        requests * 4096,
        4096,
    );
    // As for bytes (see above), but every request costs one token: the first `ops` requests
    // empty the full bucket, and the last one passes once (requests - 1) - ops + 1 tokens have
    // been refilled, i.e. (requests - ops) requests' worth of refill time.
    let measured = (requests - ops) as f64 / elapsed.as_secs_f64();
    assert_within_10_percent(measured, ops as f64 * 10.0, "requests per second");
}

#[test]
fn patching_a_drive_limit_takes_effect_while_the_guest_reads() {
    if !kvm_or_skip("patching_a_drive_limit_takes_effect_while_the_guest_reads") {
        return;
    }
    let _timing = timing_lock();
    let vmm = Vmm::with_api("patch", &[]);
    let disk = vmm.dir.join("disk.img");
    fs::write(&disk, vec![0u8; 4 << 20]).expect("disk image");
    let bytes: u64 = 2 << 20;
    let request: u64 = 64 << 10;
    let old_size: u64 = 64 << 10;
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest("blk-stream"),
            "boot_args": format!("{BOOT_ARGS} kiln.blk_bytes={bytes} kiln.blk_req={request}"),
        })),
    );
    // 64 KiB/s: the 2 MiB read would take about 30 s at this rate.
    vmm.put_ok(
        "/drives/data",
        &json(&json!({
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "rate_limiter": {"bandwidth": {"size": old_size, "refill_time": 1000}},
        })),
    );
    let mut vmm = vmm;
    // No read can happen before InstanceStart, so this bounds the reading time from above.
    let started = Instant::now();
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    vmm.stdout
        .wait_for("blk-stream: start", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guest never started reading: {}", vmm.stdout.text()));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        vmm.is_running() && !vmm.stdout.text().contains("blk-stream: done"),
        "the slow limit holds the guest back at first: {}",
        vmm.stdout.text()
    );
    // 4 MiB/s from now on. The new bucket starts full and holds more than the whole read, so
    // the rest goes as fast as the guest asks for it: well under a second on an idle host.
    vmm.patch_ok(
        "/drives/data",
        &json(&json!({
            "drive_id": "data",
            "rate_limiter": {"bandwidth": {"size": 4 << 20, "refill_time": 1000}},
        })),
    );
    let patched = Instant::now();
    vmm.stdout
        .wait_for("blk-stream: done", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the guest never finished reading: {}", vmm.stdout.text()));
    let after_patch = patched.elapsed();
    // Under the old limit, by time t after the first read at most size + request + t x rate
    // bytes can have passed (a request passes whenever the budget is above zero, see
    // drive_bandwidth_limit_holds_within_10_percent), so the whole read could not finish
    // before (bytes - size - request) / rate = (2 MiB - 128 KiB) / (64 KiB/s) = 30 s after
    // the first read, nor, counting from the PATCH, before 30 s minus the time since
    // InstanceStart (about 2 s when idle: about 28 s to go). The new limit leaves only the
    // guest's own speed. Half the old-limit floor separates the two by a wide margin.
    let old_rate_floor = Duration::from_secs((bytes - old_size - request) / old_size)
        .saturating_sub(patched - started);
    eprintln!(
        "after the PATCH the read took {after_patch:?}; the old limit would have needed at \
         least {old_rate_floor:?}"
    );
    assert!(
        after_patch < old_rate_floor / 2,
        "after the PATCH the read finishes at the new rate, not the old one (took \
         {after_patch:?}; the old limit needs at least {old_rate_floor:?})"
    );
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
}
