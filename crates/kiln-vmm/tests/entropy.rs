//! virtio-rng end to end: the `entropy` test guest reads from the device that `PUT /entropy`
//! adds, and reports what it got; the VMM must stay up through the guest's odd buffers.
//!
//! Every test skips (and says why) when `/dev/kvm` cannot be opened.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{json, kvm_or_skip, line_field, line_num, Vmm};
use serde_json::json;

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off kiln.end=idle";
/// How long the guest may take; generous, since guest code may be emulated slowly.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// One run of the entropy guest, shared by the tests that check different aspects of it.
struct EntropyRun {
    lines: Vec<String>,
    /// `GET /` after the guest finished: (status, body).
    api_after: (u16, String),
    running_after: bool,
}

fn entropy_run() -> &'static EntropyRun {
    static RUN: OnceLock<EntropyRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let mut vmm = Vmm::with_api("entropy", &[]);
        vmm.put_ok(
            "/machine-config",
            &json(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
        );
        vmm.put_ok(
            "/boot-source",
            &json(&json!({
                "kernel_image_path": test_guests::guest("entropy"),
                "boot_args": BOOT_ARGS,
            })),
        );
        vmm.put_ok("/entropy", "{}");
        vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
        if vmm.stdout.wait_for("entropy: done", RUN_TIMEOUT).is_none() {
            panic!(
                "the entropy guest did not finish\nstdout:\n{}\nstderr:\n{}",
                vmm.stdout.text(),
                vmm.stderr.text()
            );
        }
        let running_after = vmm.is_running();
        let api_after = if running_after {
            vmm.get("/")
        } else {
            (0, String::new())
        };
        EntropyRun {
            lines: vmm.stdout.lines(),
            api_after,
            running_after,
        }
    })
}

/// The line starting with `prefix`; panics with the output if there is none.
fn line<'a>(run: &'a EntropyRun, prefix: &str) -> &'a str {
    run.lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "the guest printed no line starting with {prefix:?}:\n{}",
                run.lines.join("\n")
            )
        })
}

#[test]
fn entropy_guest_reads_two_different_non_zero_4_kib_blocks() {
    if !kvm_or_skip("entropy_guest_reads_two_different_non_zero_4_kib_blocks") {
        return;
    }
    let run = entropy_run();
    let first = line(run, "entropy: read 1 ");
    let second = line(run, "entropy: read 2 ");
    for read in [first, second] {
        assert_eq!(line_num(read, "len"), 4096, "{read}");
        assert_eq!(line_field(read, "all-zero"), Some("no"), "{read}");
    }
    assert_ne!(
        line_field(first, "fnv"),
        line_field(second, "fnv"),
        "two reads have different digests:\n{first}\n{second}"
    );
    let differ = line(run, "entropy: reads-differ=");
    assert!(differ.ends_with("reads-differ=yes"), "{differ}");
}

#[test]
fn entropy_device_readable_buffer_is_returned_with_length_0_and_left_untouched() {
    if !kvm_or_skip("entropy_device_readable_buffer_is_returned_with_length_0_and_left_untouched") {
        return;
    }
    let readable = line(entropy_run(), "entropy: device-readable ");
    assert_eq!(line_field(readable, "len"), Some("0"), "{readable}");
    assert_eq!(line_field(readable, "untouched"), Some("yes"), "{readable}");
}

#[test]
fn entropy_odd_buffers_leave_the_vmm_up_and_the_device_serving() {
    if !kvm_or_skip("entropy_odd_buffers_leave_the_vmm_up_and_the_device_serving") {
        return;
    }
    let run = entropy_run();
    let output = run.lines.join("\n");
    println!("{output}");
    let chained = line(run, "entropy: two-descriptors ");
    assert_eq!(
        line_num(chained, "len"),
        300,
        "both writable descriptors filled: {chained}"
    );
    let big = line(run, "entropy: big-buffer ");
    let big_len = line_num(big, "len");
    assert!(
        big_len > 0 && big_len <= line_num(big, "size"),
        "a 128 KiB buffer gets some bytes, never more than its size: {big}"
    );
    let outside = line(run, "entropy: outside-ram ");
    assert_ne!(
        line_field(outside, "len"),
        Some("timeout"),
        "a buffer outside RAM is returned: {outside}"
    );
    assert_eq!(line_field(outside, "needs-reset"), Some("0"), "{outside}");
    let last = line(run, "entropy: read 3 ");
    assert_eq!(line_num(last, "len"), 4096, "{last}\n{output}");
    assert_eq!(line_field(last, "all-zero"), Some("no"), "{last}");
    assert!(run.running_after, "kiln-vmm still runs:\n{output}");
    let (status, body) = &run.api_after;
    assert_eq!(*status, 200, "GET / after the guest finished: {body}");
    assert!(body.contains("Running"), "{body}");
}
