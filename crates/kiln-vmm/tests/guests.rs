//! Boots the test guests of `crates/test-guests` in the real `kiln-vmm` binary, configured the
//! way a Firecracker client would (API socket, or `--config-file --no-api`), and checks what
//! each guest reports over the serial console against what the host configured.
//!
//! Every test skips (and says why) when `/dev/kvm` cannot be opened.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{json, kvm_or_skip, TempDir, Vmm};
use serde_json::json;

/// The boot arguments a Firecracker user would pass to a Linux guest.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// How long a guest that ends by resetting may take; generous, since kernel-mode guest code
/// may be emulated one instruction at a time.
const EXIT_TIMEOUT: Duration = common::GUEST_TIMEOUT;
const SECTOR: usize = 512;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Starts kiln-vmm with an API socket and configures and starts `guest` over the API.
fn boot(
    id: &str,
    guest: &str,
    boot_args: &str,
    vcpus: u8,
    mem_mib: u64,
    drives: &[serde_json::Value],
    extra_args: &[&str],
) -> Vmm {
    let vmm = Vmm::with_api(id, extra_args);
    vmm.put_ok(
        "/machine-config",
        &json(&json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib})),
    );
    vmm.put_ok(
        "/boot-source",
        &json(&json!({
            "kernel_image_path": test_guests::guest(guest),
            "boot_args": boot_args,
        })),
    );
    for drive in drives {
        let drive_id = drive["drive_id"].as_str().expect("drive_id in drive JSON");
        vmm.put_ok(&format!("/drives/{drive_id}"), &json(drive));
    }
    vmm.put_ok("/actions", &json(&json!({"action_type": "InstanceStart"})));
    vmm
}

/// Waits for a guest that ends by resetting; returns its exit status and serial lines.
fn run_to_exit(vmm: &mut Vmm) -> (ExitStatus, Vec<String>) {
    let status = vmm.expect_exit(EXIT_TIMEOUT);
    (status, vmm.stdout.lines())
}

/// The value of `key=` in a guest line (up to the next space), if present.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=");
    let mut search = 0;
    while let Some(pos) = line[search..].find(&pattern) {
        let start = search + pos;
        if start == 0 || line.as_bytes()[start - 1] == b' ' {
            let value = &line[start + pattern.len()..];
            return Some(value.split(' ').next().unwrap_or(""));
        }
        search = start + pattern.len();
    }
    None
}

/// The value of `key="..."` in a guest line (up to the last quote).
fn quoted<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}=\""))? + key.len() + 2;
    let end = line.rfind('"')?;
    (end >= start).then(|| &line[start..end])
}

/// Parses a guest number: decimal or 0x-prefixed hex.
fn num(text: &str) -> u64 {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("guest printed {text:?} where a number was expected"))
}

fn num_field(line: &str, key: &str) -> u64 {
    num(field(line, key).unwrap_or_else(|| panic!("no {key}= in guest line {line:?}")))
}

/// The one line starting with `prefix`; panics (with the output) if there is none.
fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "guest printed no line starting with {prefix:?}; output:\n{}",
                lines.join("\n")
            )
        })
}

fn assert_reset_exit(status: ExitStatus, lines: &[String]) {
    assert!(
        status.success(),
        "kiln-vmm should exit with status 0 after the guest's i8042 reset, got {status}; output:\n{}",
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// hello

#[test]
fn hello_guest_greets_over_serial_and_its_reset_exits_with_status_0() {
    if !kvm_or_skip("hello_guest_greets_over_serial_and_its_reset_exits_with_status_0") {
        return;
    }
    let mut vmm = boot("hello", "hello", BOOT_ARGS, 1, 128, &[], &[]);
    let (status, lines) = run_to_exit(&mut vmm);
    assert!(
        lines.iter().any(|l| l == "Hello from a kiln test guest!"),
        "no greeting on the serial console:\n{}",
        lines.join("\n")
    );
    let booted = line(&lines, "hello: booted");
    let cmdline = booted
        .split_once('"')
        .and_then(|(_, rest)| rest.rsplit_once('"'))
        .map(|(inside, _)| inside)
        .expect("quoted command line");
    assert!(
        cmdline.starts_with(BOOT_ARGS),
        "guest command line {cmdline:?}"
    );
    assert_reset_exit(status, &lines);
}

// ---------------------------------------------------------------------------------------------
// bootinfo

/// What the bootinfo guest reported.
struct BootInfo {
    lines: Vec<String>,
    status: ExitStatus,
}

impl BootInfo {
    fn run(id: &str, boot_args: &str, vcpus: u8, mem_mib: u64) -> BootInfo {
        let mut vmm = boot(id, "bootinfo", boot_args, vcpus, mem_mib, &[], &[]);
        let (status, lines) = run_to_exit(&mut vmm);
        BootInfo { lines, status }
    }

    fn from_output(status: ExitStatus, lines: Vec<String>) -> BootInfo {
        BootInfo { lines, status }
    }

    fn line(&self, prefix: &str) -> &str {
        line(&self.lines, prefix)
    }

    /// All e820 entries as (start, end, type).
    fn e820(&self) -> Vec<(u64, u64, u64)> {
        let lines: Vec<&String> = self
            .lines
            .iter()
            .filter(|l| l.starts_with("bootinfo: e820 addr="))
            .collect();
        let count = num_field(self.line("bootinfo: e820 entries="), "entries");
        assert_eq!(
            lines.len() as u64,
            count,
            "e820 entry lines vs e820_entries"
        );
        lines
            .iter()
            .map(|l| {
                let addr = num_field(l, "addr");
                (addr, addr + num_field(l, "size"), num_field(l, "type"))
            })
            .collect()
    }

    /// The RAM ranges of the e820 map, merged where adjacent.
    fn ram(&self) -> Vec<(u64, u64)> {
        let mut ram: Vec<(u64, u64)> = self
            .e820()
            .into_iter()
            .filter(|e| e.2 == 1)
            .map(|e| (e.0, e.1))
            .collect();
        ram.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ram {
            match merged.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => merged.push((start, end)),
            }
        }
        merged
    }

    fn cmdline(&self) -> &str {
        quoted(self.line("bootinfo: cmdline="), "bootinfo: cmdline").expect("quoted cmdline")
    }

    fn lapics(&self) -> (u64, u64) {
        let madt = self.line("bootinfo: madt ");
        assert_eq!(field(madt, "checksum"), Some("ok"), "MADT checksum: {madt}");
        (num_field(madt, "lapics"), num_field(madt, "enabled"))
    }
}

#[test]
fn bootinfo_guest_sees_zero_page_cmdline_e820_rsdp_and_kvm_cpuid() {
    if !kvm_or_skip("bootinfo_guest_sees_zero_page_cmdline_e820_rsdp_and_kvm_cpuid") {
        return;
    }
    let info = BootInfo::run("bootinfo", BOOT_ARGS, 1, 128);
    let header = info.line("bootinfo: zero_page=");
    assert_eq!(
        num_field(header, "zero_page"),
        0x7000,
        "RSI should point at the zero page"
    );
    assert_eq!(
        num_field(header, "boot_flag"),
        0xaa55,
        "boot_flag: {header}"
    );
    assert_eq!(
        num_field(header, "header"),
        u64::from(u32::from_le_bytes(*b"HdrS")),
        "setup header magic: {header}"
    );

    let ptr = info.line("bootinfo: cmd_line_ptr=");
    assert_eq!(num_field(ptr, "cmd_line_ptr"), 0x20000, "{ptr}");
    let cmdline = info.cmdline();
    assert!(
        cmdline.starts_with(BOOT_ARGS),
        "command line {cmdline:?} should start with the boot_args"
    );
    assert!(
        num_field(ptr, "cmdline_size") >= cmdline.len() as u64,
        "{ptr} vs {cmdline:?}"
    );

    assert_eq!(
        info.ram(),
        vec![(0, 0x9fc00), (0x10_0000, 128 * MIB)],
        "RAM in the e820 map of a 128 MiB guest: {:#x?}",
        info.e820()
    );

    assert_eq!(
        num_field(info.line("bootinfo: acpi_rsdp_addr="), "acpi_rsdp_addr"),
        0xe0000
    );
    let rsdp = info.line("bootinfo: rsdp ");
    assert_eq!(field(rsdp, "found"), Some("yes"), "{rsdp}");
    assert_eq!(field(rsdp, "checksum"), Some("ok"), "{rsdp}");
    assert_eq!(num_field(rsdp, "revision"), 2, "{rsdp}");
    let xsdt = info.line("bootinfo: xsdt ");
    assert_eq!(field(xsdt, "checksum"), Some("ok"), "{xsdt}");
    assert_eq!(info.lapics(), (1, 1), "one enabled local APIC for one vCPU");

    let cpuid = info.line("bootinfo: cpuid ");
    assert_eq!(
        num_field(cpuid, "hypervisor_bit"),
        1,
        "CPUID.1:ECX[31]: {cpuid}"
    );
    assert_eq!(
        quoted(cpuid, "signature").map(|s| s.split('"').next().unwrap_or("")),
        Some("KVMKVMKVM"),
        "{cpuid}"
    );
    assert!(info.lines.iter().any(|l| l == "bootinfo: done"));
    assert_reset_exit(info.status, &info.lines);
}

#[test]
fn e820_splits_ram_around_the_mmio_gap_for_a_4_gib_guest() {
    if !kvm_or_skip("e820_splits_ram_around_the_mmio_gap_for_a_4_gib_guest") {
        return;
    }
    let info = BootInfo::run("bootinfo-4g", BOOT_ARGS, 1, 4096);
    let ram = info.ram();
    assert_eq!(
        ram,
        vec![
            (0, 0x9fc00),
            (0x10_0000, 0xc000_0000),
            (0x1_0000_0000, 0x1_0000_0000 + GIB)
        ],
        "RAM of a 4 GiB guest: 3 GiB below the MMIO gap, the last 1 GiB above 4 GiB; e820: {:#x?}",
        info.e820()
    );
    assert_reset_exit(info.status, &info.lines);
}

#[test]
fn madt_lists_one_enabled_local_apic_per_vcpu() {
    if !kvm_or_skip("madt_lists_one_enabled_local_apic_per_vcpu") {
        return;
    }
    let info = BootInfo::run("bootinfo-2cpu", BOOT_ARGS, 2, 128);
    assert_eq!(
        info.lapics(),
        (2, 2),
        "two vCPUs -> two enabled local APICs in the MADT"
    );
    assert_reset_exit(info.status, &info.lines);
}

/// Writes `config` to `vm.json` in `dir` and returns the arguments that boot it without an
/// API socket, as Firecracker's `--config-file ... --no-api` does.
fn no_api_args(dir: &TempDir, config: &serde_json::Value) -> [OsString; 3] {
    let path = dir.join("vm.json");
    fs::write(&path, json(config)).expect("write config file");
    [
        OsString::from("--config-file"),
        path.into_os_string(),
        OsString::from("--no-api"),
    ]
}

#[test]
fn config_file_with_no_api_boots_the_configured_guest() {
    if !kvm_or_skip("config_file_with_no_api_boots_the_configured_guest") {
        return;
    }
    let dir = TempDir::new("config-file");
    let boot_args = "console=ttyS0 kiln.from_config_file=1";
    let config = json!({
        "boot-source": {
            "kernel_image_path": test_guests::guest("bootinfo"),
            "boot_args": boot_args,
        },
        "drives": [],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
    });
    let args = no_api_args(&dir, &config);
    let mut vmm = Vmm::spawn(dir, args);
    let (status, lines) = run_to_exit(&mut vmm);
    let info = BootInfo::from_output(status, lines);
    assert!(
        info.cmdline().starts_with(boot_args),
        "command line {:?}",
        info.cmdline()
    );
    assert_eq!(
        info.ram().last().map(|r| r.1),
        Some(256 * MIB),
        "RAM should end at the configured 256 MiB"
    );
    assert_eq!(info.lapics(), (2, 2), "vcpu_count 2 from the config file");
    assert_reset_exit(info.status, &info.lines);
}

// ---------------------------------------------------------------------------------------------
// virtio discovery and virtio-blk

/// Makes a backing file of `size` bytes (sparse) with `sector0` at its start.
fn disk(dir: &TempDir, name: &str, size: u64, sector0: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, sector0).expect("write disk image");
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open disk image");
    file.set_len(size).expect("size disk image");
    path
}

fn drive(id: &str, path: &Path, root: bool, read_only: bool) -> serde_json::Value {
    json!({
        "drive_id": id,
        "path_on_host": path,
        "is_root_device": root,
        "is_read_only": read_only,
        "cache_type": "Writeback",
    })
}

/// One virtio-mmio device as the discover guest printed it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FoundDevice {
    base: u64,
    size: u64,
    irq: u64,
    magic: u64,
    version: u64,
    device_id: u64,
}

impl FoundDevice {
    fn parse(line: &str) -> FoundDevice {
        FoundDevice {
            base: num_field(line, "base"),
            size: num_field(line, "size"),
            irq: num_field(line, "irq"),
            magic: num_field(line, "magic"),
            version: num_field(line, "version"),
            device_id: num_field(line, "device-id"),
        }
    }
}

#[test]
fn virtio_devices_in_cmdline_and_acpi_dsdt_agree_and_match_the_slots() {
    if !kvm_or_skip("virtio_devices_in_cmdline_and_acpi_dsdt_agree_and_match_the_slots") {
        return;
    }
    let disks = TempDir::new("discover-disks");
    let drives: Vec<serde_json::Value> = ["rootfs", "data1", "data2"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            drive(
                id,
                &disk(&disks, &format!("{id}.img"), MIB, b"disk"),
                i == 0,
                false,
            )
        })
        .collect();
    let mut vmm = boot(
        "discover",
        "virtio-discover",
        BOOT_ARGS,
        1,
        128,
        &drives,
        &[],
    );
    let (status, lines) = run_to_exit(&mut vmm);
    let output = lines.join("\n");

    for prefix in [
        "discover: rsdp=",
        "discover: xsdt=",
        "discover: fadt=",
        "discover: dsdt length=",
    ] {
        assert_eq!(
            field(line(&lines, prefix), "checksum"),
            Some("ok"),
            "{prefix}...: {output}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("incomplete")),
        "a LNRO0005 device without _UID/Memory32Fixed/Extended Interrupt:\n{output}"
    );

    let from_cmdline: Vec<FoundDevice> = lines
        .iter()
        .filter(|l| l.starts_with("discover: cmdline dev "))
        .map(|l| FoundDevice::parse(l))
        .collect();
    let acpi_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("discover: acpi dev "))
        .collect();
    let from_acpi: Vec<FoundDevice> = acpi_lines.iter().map(|l| FoundDevice::parse(l)).collect();

    let expected: BTreeSet<FoundDevice> = (0..3u64)
        .map(|slot| FoundDevice {
            base: 0xc000_1000 + slot * 0x1000,
            size: 0x1000,
            irq: 5 + slot,
            magic: 0x7472_6976,
            version: 2,
            device_id: 2,
        })
        .collect();
    assert_eq!(
        from_cmdline.len(),
        3,
        "three virtio_mmio.device= entries:\n{output}"
    );
    assert_eq!(
        from_acpi.len(),
        3,
        "three LNRO0005 devices in the DSDT:\n{output}"
    );
    assert_eq!(
        from_cmdline.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "command line devices:\n{output}"
    );
    assert_eq!(
        from_acpi.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "ACPI devices:\n{output}"
    );
    let cmdline_bases: Vec<u64> = from_cmdline.iter().map(|d| d.base).collect();
    assert_eq!(
        cmdline_bases,
        vec![0xc000_1000, 0xc000_2000, 0xc000_3000],
        "the command line lists the devices in slot order"
    );
    for l in &acpi_lines {
        let uid = num_field(l, "uid");
        assert_eq!(
            num_field(l, "base"),
            0xc000_1000 + uid * 0x1000,
            "_UID n is slot n: {l}"
        );
    }
    assert_reset_exit(status, &lines);
}

/// The bytes the blk guest writes into `sector` (same formula as `pattern_byte` in blk.c).
fn guest_pattern(sector: u64) -> Vec<u8> {
    (0..SECTOR as u64)
        .map(|i| (sector * 31 + i * 7 + 0x5a) as u8)
        .collect()
}

/// A recognisable sector 0 prepared by the host.
fn host_sector0() -> Vec<u8> {
    let mut sector = b"kiln host pattern in sector 0, read by the blk guest".to_vec();
    sector.extend((sector.len()..SECTOR).map(|i| (i * 3 + 1) as u8));
    sector
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the guest read the host's sector 0.
fn assert_saw_host_sector0(lines: &[String]) {
    let read = line(lines, "blk: read sector=0 ");
    let sector0 = host_sector0();
    assert_eq!(field(read, "status"), Some("0"), "{read}");
    assert_eq!(
        field(read, "head"),
        Some(hex(&sector0[..16]).as_str()),
        "{read}"
    );
    assert_eq!(num_field(read, "fnv"), u64::from(fnv1a(&sector0)), "{read}");
}

#[test]
fn blk_guest_gets_drive_id_reads_host_data_and_its_writes_and_flush_reach_the_file() {
    if !kvm_or_skip(
        "blk_guest_gets_drive_id_reads_host_data_and_its_writes_and_flush_reach_the_file",
    ) {
        return;
    }
    let disks = TempDir::new("blk-disks");
    let path = disk(&disks, "blk.img", MIB, &host_sector0());
    let mut vmm = boot(
        "blk",
        "blk",
        BOOT_ARGS,
        1,
        128,
        &[drive("scratch-disk", &path, false, false)],
        &[],
    );
    let (status, lines) = run_to_exit(&mut vmm);

    let features = line(&lines, "blk: features ");
    assert_eq!(
        num_field(features, "capacity"),
        MIB / SECTOR as u64,
        "{features}"
    );
    assert_eq!(field(features, "ro"), Some("0"), "{features}");
    assert_eq!(
        field(features, "flush"),
        Some("1"),
        "Writeback drives offer VIRTIO_BLK_F_FLUSH: {features}"
    );
    let get_id = line(&lines, "blk: get-id ");
    assert_eq!(field(get_id, "status"), Some("0"), "{get_id}");
    assert_eq!(
        quoted(get_id, "id"),
        Some("scratch-disk"),
        "GET_ID returns the drive_id: {get_id}"
    );
    assert_saw_host_sector0(&lines);
    for prefix in ["blk: write ", "blk: flush ", "blk: read-back "] {
        let l = line(&lines, prefix);
        assert_eq!(field(l, "status"), Some("0"), "{l}");
    }
    assert_eq!(field(line(&lines, "blk: read-back "), "match"), Some("yes"));
    assert_reset_exit(status, &lines);

    let image = fs::read(&path).expect("read back disk image");
    assert_eq!(image.len() as u64, MIB, "the file keeps its size");
    assert_eq!(&image[..SECTOR], &host_sector0()[..], "sector 0 unchanged");
    for sector in 8..12u64 {
        let at = sector as usize * SECTOR;
        assert_eq!(
            &image[at..at + SECTOR],
            &guest_pattern(sector)[..],
            "sector {sector} holds what the guest wrote"
        );
    }
    assert!(
        image[12 * SECTOR..].iter().all(|&b| b == 0),
        "nothing written past sector 11"
    );
}

#[test]
fn blk_guest_on_read_only_drive_sees_ro_feature_and_write_fails_with_ioerr() {
    if !kvm_or_skip("blk_guest_on_read_only_drive_sees_ro_feature_and_write_fails_with_ioerr") {
        return;
    }
    let disks = TempDir::new("blk-ro-disks");
    let path = disk(&disks, "ro.img", MIB, &host_sector0());
    let before = fs::read(&path).expect("read disk image");
    let mut vmm = boot(
        "blk-ro",
        "blk",
        BOOT_ARGS,
        1,
        128,
        &[drive("ro-disk", &path, false, true)],
        &[],
    );
    let (status, lines) = run_to_exit(&mut vmm);

    let features = line(&lines, "blk: features ");
    assert_eq!(
        field(features, "ro"),
        Some("1"),
        "VIRTIO_BLK_F_RO offered and accepted: {features}"
    );
    assert_saw_host_sector0(&lines);
    let write = line(&lines, "blk: write ");
    assert_eq!(
        field(write, "status"),
        Some("1"),
        "a write to a read-only drive fails with VIRTIO_BLK_S_IOERR: {write}"
    );
    assert_reset_exit(status, &lines);
    assert!(
        fs::read(&path).expect("read disk image") == before,
        "the read-only backing file changed"
    );
}

#[test]
fn blk_guest_on_sparse_backing_file_reads_holes_as_zeros_and_writes_at_the_end() {
    if !kvm_or_skip("blk_guest_on_sparse_backing_file_reads_holes_as_zeros_and_writes_at_the_end") {
        return;
    }
    let disks = TempDir::new("blk-sparse-disks");
    let size = 64 * MIB;
    let path = disk(&disks, "sparse.img", size, &host_sector0());
    let sectors = size / SECTOR as u64;
    let last4 = sectors - 4;
    let hole = sectors / 2;
    let args = format!("{BOOT_ARGS} kiln.blk_write={last4} kiln.blk_zero={hole}");
    let mut vmm = boot(
        "blk-sparse",
        "blk",
        &args,
        1,
        128,
        &[drive("sparse", &path, false, false)],
        &[],
    );
    let (status, lines) = run_to_exit(&mut vmm);

    assert_eq!(
        num_field(line(&lines, "blk: features "), "capacity"),
        sectors
    );
    assert_saw_host_sector0(&lines);
    let write = line(&lines, "blk: write ");
    assert_eq!(field(write, "status"), Some("0"), "{write}");
    let read_back = line(&lines, "blk: read-back ");
    assert_eq!(
        (field(read_back, "status"), field(read_back, "match")),
        (Some("0"), Some("yes")),
        "{read_back}"
    );
    let zero = line(&lines, &format!("blk: read sector={hole} "));
    assert_eq!(
        (field(zero, "status"), field(zero, "all-zero")),
        (Some("0"), Some("yes")),
        "{zero}"
    );
    assert_reset_exit(status, &lines);

    let meta = fs::metadata(&path).expect("stat disk image");
    assert_eq!(meta.len(), size, "the file keeps its size");
    assert!(
        meta.blocks() * 512 < size / 2,
        "the backing file should stay sparse ({} bytes allocated of {size})",
        meta.blocks() * 512
    );
    let image = fs::read(&path).expect("read disk image");
    for sector in last4..sectors {
        let at = sector as usize * SECTOR;
        assert_eq!(
            &image[at..at + SECTOR],
            &guest_pattern(sector)[..],
            "sector {sector}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// hostile-blk

/// One run of the hostile-blk guest, shared by the tests that check different aspects of it.
struct HostileRun {
    lines: Vec<String>,
    /// Every failure of the VMM-liveness checks made while the guest ran.
    liveness_failures: Vec<String>,
}

fn hostile_run() -> &'static HostileRun {
    static RUN: OnceLock<HostileRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let disks = TempDir::new("hostile-disks");
        let path = disk(&disks, "hostile.img", MIB, &host_sector0());
        let mut vmm = boot(
            "hostile",
            "hostile-blk",
            BOOT_ARGS,
            1,
            128,
            &[drive("hostile", &path, false, false)],
            &[],
        );
        let mut liveness_failures = common::watch_liveness(
            &mut vmm,
            "hostile-blk: finished",
            Instant::now() + EXIT_TIMEOUT,
            Duration::from_millis(500),
        );
        if !liveness_failures.is_empty() {
            liveness_failures.push(format!("stderr:\n{}", vmm.stderr.text()));
        }
        HostileRun {
            lines: vmm.stdout.lines(),
            liveness_failures,
        }
    })
}

fn hostile_case<'a>(run: &'a HostileRun, name: &str) -> &'a str {
    let needle = format!(" {name}: ");
    run.lines
        .iter()
        .find(|l| l.starts_with("hostile: case ") && l.contains(&needle))
        .unwrap_or_else(|| panic!("no report of case {name}:\n{}", run.lines.join("\n")))
}

#[test]
fn hostile_blk_chains_leave_the_vmm_running_and_the_device_usable_after_reset() {
    if !kvm_or_skip("hostile_blk_chains_leave_the_vmm_running_and_the_device_usable_after_reset") {
        return;
    }
    let run = hostile_run();
    let output = run.lines.join("\n");
    assert!(
        run.liveness_failures.is_empty(),
        "{}\nguest output:\n{output}",
        run.liveness_failures.join("\n")
    );
    let header = line(&run.lines, "hostile: device base=");
    let cases = num_field(header, "cases");
    let reported = run
        .lines
        .iter()
        .filter(|l| l.starts_with("hostile: case ") && l.contains(" used="))
        .count();
    assert_eq!(
        reported as u64, cases,
        "every hostile case ran and was reported:\n{output}"
    );
    assert!(
        !run.lines
            .iter()
            .any(|l| l.contains("did not initialise") || l.contains("did not reset")),
        "the device must reset and re-initialise after every case:\n{output}"
    );
    let sanity = line(&run.lines, "hostile: sanity read");
    assert_eq!(
        field(sanity, "status"),
        Some("0"),
        "a well-formed read works after the hostile cases:\n{output}"
    );
    assert!(run
        .lines
        .iter()
        .any(|l| l.starts_with("hostile-blk: finished")));
}

#[test]
fn hostile_blk_device_never_writes_into_device_readable_buffers() {
    if !kvm_or_skip("hostile_blk_device_never_writes_into_device_readable_buffers") {
        return;
    }
    let run = hostile_run();
    let data = hostile_case(run, "read-only-buffer-for-in");
    assert_eq!(
        field(data, "data-written"),
        Some("no"),
        "IN into a device-readable data buffer: {data}"
    );
    let status = hostile_case(run, "read-only-status");
    assert_eq!(
        field(status, "status-byte"),
        Some("0xa5"),
        "status into a device-readable descriptor: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// boot timer, pause/resume, Ctrl+Alt+Del, PVH

#[test]
fn boot_timer_write_of_123_logs_guest_boot_time() {
    if !kvm_or_skip("boot_timer_write_of_123_logs_guest_boot_time") {
        return;
    }
    let mut vmm = boot(
        "boot-timer",
        "boot-timer",
        BOOT_ARGS,
        1,
        128,
        &[],
        &["--boot-timer"],
    );
    let (status, lines) = run_to_exit(&mut vmm);
    assert!(
        lines.iter().any(|l| l == "boot-timer: done"),
        "guest output:\n{}",
        lines.join("\n")
    );
    let log = vmm.stderr.text();
    assert!(
        log.contains("Guest-boot-time"),
        "no Guest-boot-time in kiln-vmm's log (stderr):\n{log}"
    );
    assert_reset_exit(status, &lines);
}

/// The counter values printed so far.
fn counters(vmm: &Vmm) -> Vec<u64> {
    vmm.stdout
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("counter: "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Waits until the VMM's stdout has not grown for `quiet` (or `limit` has passed); returns
/// its length then.
fn wait_until_quiet(vmm: &Vmm, quiet: Duration, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut len = vmm.stdout.len();
    let mut since = Instant::now();
    while since.elapsed() < quiet && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        let now = vmm.stdout.len();
        if now != len {
            len = now;
            since = Instant::now();
        }
    }
    len
}

#[test]
fn pause_stops_the_guest_resume_continues_it_and_sigterm_ends_the_vmm() {
    if !kvm_or_skip("pause_stops_the_guest_resume_continues_it_and_sigterm_ends_the_vmm") {
        return;
    }
    let mut vmm = boot("counter", "counter", BOOT_ARGS, 1, 128, &[], &[]);
    assert!(
        vmm.stdout
            .wait_for("counter: 2", Duration::from_secs(60))
            .is_some(),
        "the counter guest did not print three lines"
    );
    assert_eq!(vmm.instance_info()["state"], "Running");

    vmm.patch_ok("/vm", &json(&json!({"state": "Paused"})));
    assert_eq!(vmm.instance_info()["state"], "Paused");
    // Output already on its way (the VMM's stdout pipe, the collector thread) may still
    // arrive, later on a loaded host: wait until nothing has come for 200 ms (giving up after
    // 10 s, in which case the check below fails on the output that kept coming).
    let paused_len = wait_until_quiet(&vmm, Duration::from_millis(200), Duration::from_secs(10));
    let paused_at = counters(&vmm)
        .last()
        .copied()
        .expect("a counter line before the pause");
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        vmm.stdout.len(),
        paused_len,
        "serial output continued while paused: {:?}",
        &vmm.stdout.text()[paused_len.min(vmm.stdout.text().len())..]
    );

    vmm.patch_ok("/vm", &json(&json!({"state": "Resumed"})));
    assert_eq!(vmm.instance_info()["state"], "Running");
    let resumed = vmm
        .stdout
        .wait_for_line(Duration::from_secs(60), |l| {
            l.strip_prefix("counter: ")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > paused_at)
        })
        .expect("no counter line after resume");
    assert_eq!(
        resumed,
        format!("counter: {}", paused_at + 1),
        "after resume the guest continues where it stopped (it was not restarted)"
    );
    assert!(
        counters(&vmm).windows(2).all(|w| w[1] == w[0] + 1),
        "counter sequence: {:?}",
        counters(&vmm)
    );

    vmm.signal(libc::SIGTERM);
    let status = vmm.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "kiln-vmm still running 20 s after SIGTERM"
    );
}

#[test]
fn send_ctrl_alt_del_delivers_ctrl_alt_del_scancodes_to_the_guest() {
    if !kvm_or_skip("send_ctrl_alt_del_delivers_ctrl_alt_del_scancodes_to_the_guest") {
        return;
    }
    let mut vmm = boot("ctrl-alt-del", "ctrl-alt-del", BOOT_ARGS, 1, 128, &[], &[]);
    assert!(
        vmm.stdout
            .wait_for("ctrl-alt-del: waiting", Duration::from_secs(60))
            .is_some(),
        "the guest never started waiting"
    );
    vmm.put_ok("/actions", &json(&json!({"action_type": "SendCtrlAltDel"})));
    let (status, lines) = run_to_exit(&mut vmm);
    let codes: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ctrl-alt-del: scancode "))
        .collect();
    assert_eq!(
        codes,
        ["0x14", "0x11", "0xe0", "0x71"],
        "scancodes the guest read from the i8042"
    );
    assert!(lines
        .iter()
        .any(|l| l.starts_with("ctrl-alt-del: got Ctrl+Alt+Del")));
    assert_reset_exit(status, &lines);
}

#[test]
fn pvh_guest_is_entered_in_32_bit_mode_with_hvm_start_info() {
    if !kvm_or_skip("pvh_guest_is_entered_in_32_bit_mode_with_hvm_start_info") {
        return;
    }
    let mut vmm = boot("pvh", "pvh", BOOT_ARGS, 1, 128, &[], &[]);
    let (status, lines) = run_to_exit(&mut vmm);
    let output = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l == "pvh: entered at the PVH entry point in 32-bit mode"),
        "the PVH entry was not used:\n{output}"
    );
    assert_eq!(
        num_field(line(&lines, "pvh: start_info="), "pvh: start_info"),
        0x6000,
        "EBX -> hvm_start_info"
    );
    assert_eq!(
        num_field(line(&lines, "pvh: magic="), "pvh: magic"),
        0x336e_c578
    );
    let cr0 = num_field(line(&lines, "pvh: cr0="), "pvh: cr0");
    assert_eq!(
        cr0 & 1,
        1,
        "protected mode (CR0.PE) at the PVH entry: {cr0:#x}"
    );
    assert_eq!(
        cr0 & (1 << 31),
        0,
        "paging off (CR0.PG) at the PVH entry: {cr0:#x}"
    );
    let cmdline = quoted(line(&lines, "pvh: cmdline="), "pvh: cmdline").expect("quoted cmdline");
    assert!(
        cmdline.starts_with(BOOT_ARGS),
        "PVH command line {cmdline:?}"
    );
    let ram_ends: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("pvh: memmap addr=") && field(l, "type") == Some("1"))
        .map(|l| num_field(l, "pvh: memmap addr") + num_field(l, "size"))
        .collect();
    assert!(
        ram_ends.contains(&(128 * MIB)),
        "the PVH memory map has RAM up to 128 MiB:\n{output}"
    );
    assert!(lines.iter().any(|l| l == "pvh: done"));
    assert_reset_exit(status, &lines);
}

// ---------------------------------------------------------------------------------------------
// serial output file, boot timer off, guest faults

#[test]
fn serial_out_sends_the_guest_console_to_the_file_instead_of_stdout() {
    if !kvm_or_skip("serial_out_sends_the_guest_console_to_the_file_instead_of_stdout") {
        return;
    }
    let files = TempDir::new("serial-out");
    let serial = files.join("serial.log");
    let serial_arg = serial.to_str().expect("UTF-8 temp path");
    let mut vmm = boot(
        "serial-out",
        "hello",
        BOOT_ARGS,
        1,
        128,
        &[],
        &["--serial-out", serial_arg],
    );
    let status = vmm.expect_exit(EXIT_TIMEOUT);
    let console = fs::read_to_string(&serial).expect("the --serial-out file exists");
    assert!(
        console.contains("Hello from a kiln test guest!"),
        "the greeting is in the --serial-out file: {console:?}"
    );
    assert!(
        !vmm.stdout.text().contains("Hello from a kiln test guest!"),
        "the greeting should not also go to stdout"
    );
    assert!(status.success(), "exit status {status}");
}

#[test]
fn serial_input_far_larger_than_the_fifo_reaches_the_guest_whole_and_in_order() {
    if !kvm_or_skip("serial_input_far_larger_than_the_fifo_reaches_the_guest_whole_and_in_order") {
        return;
    }
    let dir = TempDir::new("serial-echo");
    let config = json!({
        "boot-source": {
            "kernel_image_path": test_guests::guest("serial-echo"),
            "boot_args": BOOT_ARGS,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    });
    let args = no_api_args(&dir, &config);
    let (mut vmm, mut stdin) = Vmm::spawn_with_stdin(dir, args);
    // 16 KiB, 256 times the UART's FIFO, in one write before the guest even reads, then end
    // of input: the last bytes arrive together with the hang-up.
    let input: Vec<u8> = (0..16 * 1024u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 % 36) as usize])
        .chain([0x04])
        .collect();
    {
        use std::io::Write as _;
        stdin
            .write_all(&input)
            .expect("write the guest's serial input");
    }
    drop(stdin);
    let status = vmm.expect_exit(EXIT_TIMEOUT);
    let output = vmm.stdout.text();
    let sent = std::str::from_utf8(&input[..input.len() - 1]).expect("ASCII input");
    let echoed = output
        .split_once("serial-echo: ready\n")
        .and_then(|(_, rest)| rest.split_once("\nserial-echo: done"))
        .map(|(echo, _)| echo)
        .unwrap_or_else(|| {
            let tail = &output[output.len().saturating_sub(300)..];
            panic!("no echo between the guest's markers; output ends {tail:?}")
        });
    assert_eq!(echoed.len(), sent.len(), "every input byte echoed once");
    assert!(echoed == sent, "the echo differs from the input");
    assert!(
        output.contains(&format!("serial-echo: done echoed={}", sent.len())),
        "the guest counted every byte"
    );
    assert!(status.success(), "exit status {status}");
}

#[test]
fn without_boot_timer_flag_the_boot_timer_write_is_ignored_and_not_logged() {
    if !kvm_or_skip("without_boot_timer_flag_the_boot_timer_write_is_ignored_and_not_logged") {
        return;
    }
    let mut vmm = boot("no-boot-timer", "boot-timer", BOOT_ARGS, 1, 128, &[], &[]);
    let (status, lines) = run_to_exit(&mut vmm);
    assert!(
        lines.iter().any(|l| l == "boot-timer: done"),
        "the guest continues after writing to the absent boot-timer device:\n{}",
        lines.join("\n")
    );
    let log = vmm.stderr.text();
    assert!(
        !log.contains("Guest-boot-time"),
        "Guest-boot-time logged without --boot-timer:\n{log}"
    );
    assert_reset_exit(status, &lines);
}

#[test]
fn guest_exception_without_idt_ends_the_vmm_with_a_non_zero_status() {
    if !kvm_or_skip("guest_exception_without_idt_ends_the_vmm_with_a_non_zero_status") {
        return;
    }
    let mut vmm = boot("triple-fault", "triple-fault", BOOT_ARGS, 1, 128, &[], &[]);
    let (status, lines) = run_to_exit(&mut vmm);
    let output = lines.join("\n");
    assert!(
        lines.iter().any(|l| l.starts_with("triple-fault: loading")),
        "the guest ran up to the faulting load:\n{output}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("triple-fault: still alive")),
        "the load from a non-canonical address did not fault:\n{output}"
    );
    assert!(
        !status.success(),
        "a triple fault must not look like a clean reset (exit status {status})"
    );
}
