//! Metrics: the counters kiln-vmm writes as JSON lines to the metrics path reflect what a
//! guest actually did with its drive.

mod common;

use std::fs;
use std::time::Duration;

use common::{kvm_or_skip, TempDir, Vmm};
use serde_json::{json, Value};

#[test]
fn block_metrics_count_the_guests_reads_writes_and_flushes() {
    if !kvm_or_skip("block_metrics_count_the_guests_reads_writes_and_flushes") {
        return;
    }
    let dir = TempDir::new("metrics");
    let disk = dir.join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let metrics = dir.join("metrics.json");
    let config = dir.join("vm.json");
    let vm = json!({
        "boot-source": {
            "kernel_image_path": test_guests::guest("blk"),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        },
        "drives": [{
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
            "cache_type": "Writeback",
        }],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "metrics": {"metrics_path": metrics},
    });
    fs::write(&config, vm.to_string()).expect("config file");
    let config_arg = config.to_string_lossy().into_owned();
    let mut vmm = Vmm::spawn(dir, ["--no-api", "--config-file", config_arg.as_str()]);
    let status = vmm.expect_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "the blk guest resets when done");

    let text = fs::read_to_string(&metrics).expect("metrics file written");
    let last: Value = text
        .lines()
        .last()
        .map(|line| serde_json::from_str(line).expect("each metrics line is JSON"))
        .expect("at least one metrics line, written when the VM ends");
    let block = &last["block"]["data"];
    // The blk guest writes sectors 8..12 once, flushes once, and reads sector 0 and the four
    // sectors back.
    assert_eq!(block["write_bytes"], 4 * 512, "{last}");
    assert_eq!(block["flush_count"], 1, "{last}");
    assert!(
        block["read_bytes"].as_u64().unwrap_or(0) >= 5 * 512,
        "{last}"
    );
    assert_eq!(block["io_errors"], 0, "{last}");
    assert!(last["utc_timestamp_ms"].as_u64().unwrap_or(0) > 0, "{last}");
}
