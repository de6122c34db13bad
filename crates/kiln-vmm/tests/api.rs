//! The API of the real `kiln-vmm` binary, driven the way a Firecracker client drives
//! Firecracker: over HTTP/1.1 on the Unix socket given with `--api-sock`.
//!
//! Tests that boot a guest say so in their name (`boot_...`) and are skipped, with the reason
//! printed, when `/dev/kvm` cannot be opened.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{http_request, kvm_or_skip, TempDir, Vmm, GUEST_TIMEOUT};
use serde_json::{json, Value};

/// Firecracker's getting-started kernel command line.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Largest body the API accepts.
const MAX_BODY: usize = 51200;

/// Starts kiln-vmm as the tests in the brief do: `--api-sock <tmp>/api.sock --id test`.
fn start_vmm() -> Vmm {
    Vmm::with_api("test", &[])
}

/// Writes a file of `len` zero bytes in the VMM's scratch directory.
fn scratch_file(vmm: &Vmm, name: &str, len: usize) -> PathBuf {
    let path = vmm.dir.join(name);
    std::fs::write(&path, vec![0u8; len]).expect("write scratch file");
    path
}

/// The `fault_message` of an error body, which must be the body's only field.
fn fault_message(body: &str) -> String {
    let value: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?}: {e}"));
    let object = value.as_object().expect("error body is an object");
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["fault_message"],
        "error body {body}"
    );
    object["fault_message"]
        .as_str()
        .expect("fault_message is a string")
        .to_string()
}

/// Sends a request that must be refused with 400 and a fault message containing `needle`,
/// then checks that the VMM still answers `GET /`. Returns the fault message.
fn expect_400(vmm: &Vmm, method: &str, path: &str, body: Option<&str>, needle: &str) -> String {
    let (status, answer) = vmm.api(method, path, body);
    assert_eq!(
        status, 400,
        "{method} {path} {body:?} answered {status}: {answer}"
    );
    let message = fault_message(&answer);
    assert!(
        message.contains(needle),
        "{method} {path} {body:?}: fault message {message:?} does not mention {needle:?}"
    );
    let (status, info) = vmm.get("/");
    assert_eq!(
        status, 200,
        "GET / after {method} {path} answered {status}: {info}"
    );
    message
}

fn get_json(vmm: &Vmm, path: &str) -> Value {
    let (status, body) = vmm.get(path);
    assert_eq!(status, 200, "GET {path} answered {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} body {body:?}: {e}"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Configures a VM the way Firecracker's getting-started guide does, with `kernel` and a
/// scratch root file system; returns the rootfs path.
fn getting_started(vmm: &Vmm, kernel: &Path) -> PathBuf {
    let rootfs = scratch_file(vmm, "rootfs.ext4", 1 << 20);
    vmm.put_ok(
        "/machine-config",
        &json!({ "vcpu_count": 1, "mem_size_mib": 512 }).to_string(),
    );
    vmm.put_ok(
        "/boot-source",
        &json!({ "kernel_image_path": path_str(kernel), "boot_args": BOOT_ARGS }).to_string(),
    );
    vmm.put_ok(
        "/drives/rootfs",
        &json!({
            "drive_id": "rootfs",
            "path_on_host": path_str(&rootfs),
            "is_root_device": true,
            "is_read_only": false,
        })
        .to_string(),
    );
    rootfs
}

#[test]
fn instance_info_and_version() {
    let vmm = start_vmm();
    let info = vmm.instance_info();
    assert_eq!(info["app_name"], "kiln-vmm");
    assert_eq!(info["id"], "test");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["vmm_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info.as_object().map(|o| o.len()), Some(4), "{info}");

    let version = get_json(&vmm, "/version");
    assert_eq!(
        version,
        json!({ "firecracker_version": env!("CARGO_PKG_VERSION") })
    );
}

#[test]
fn getting_started_sequence_is_accepted_and_reflected() {
    let vmm = start_vmm();
    let defaults = get_json(&vmm, "/machine-config");
    assert_eq!(defaults["vcpu_count"], 1);
    assert_eq!(defaults["mem_size_mib"], 128);
    assert_eq!(defaults["smt"], false);

    let kernel = scratch_file(&vmm, "vmlinux", 4096);
    let rootfs = getting_started(&vmm, &kernel);

    let config = get_json(&vmm, "/vm/config");
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);
    assert_eq!(config["machine-config"]["smt"], false);
    assert_eq!(
        config["boot-source"],
        json!({ "kernel_image_path": path_str(&kernel), "boot_args": BOOT_ARGS })
    );
    let drives = config["drives"].as_array().expect("drives array");
    assert_eq!(drives.len(), 1, "{config}");
    assert_eq!(drives[0]["drive_id"], "rootfs");
    assert_eq!(drives[0]["path_on_host"], path_str(&rootfs));
    assert_eq!(drives[0]["is_root_device"], true);
    assert_eq!(drives[0]["is_read_only"], false);

    let machine = get_json(&vmm, "/machine-config");
    assert_eq!(machine, config["machine-config"]);

    // PATCH changes only what it names; PUT again replaces.
    vmm.patch_ok("/machine-config", r#"{"vcpu_count":2}"#);
    let machine = get_json(&vmm, "/machine-config");
    assert_eq!(
        (
            machine["vcpu_count"].as_u64(),
            machine["mem_size_mib"].as_u64()
        ),
        (Some(2), Some(512))
    );
    vmm.put_ok(
        "/machine-config",
        r#"{"vcpu_count":4,"mem_size_mib":256,"smt":true}"#,
    );
    let machine = get_json(&vmm, "/machine-config");
    assert_eq!(
        (machine["vcpu_count"].as_u64(), machine["smt"].as_bool()),
        (Some(4), Some(true))
    );

    // Replacing a drive by id keeps one drive.
    vmm.put_ok(
        "/drives/rootfs",
        &json!({
            "drive_id": "rootfs",
            "path_on_host": path_str(&rootfs),
            "is_root_device": true,
            "is_read_only": true,
        })
        .to_string(),
    );
    let data = scratch_file(&vmm, "data.img", 4096);
    vmm.put_ok(
        "/drives/data_1",
        &json!({ "drive_id": "data_1", "path_on_host": path_str(&data), "is_root_device": false })
            .to_string(),
    );
    let config = get_json(&vmm, "/vm/config");
    let ids: Vec<&str> = config["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .map(|d| d["drive_id"].as_str().expect("drive_id"))
        .collect();
    assert_eq!(ids, ["rootfs", "data_1"]);
    assert_eq!(config["drives"][0]["is_read_only"], true);
    assert_eq!(vmm.instance_info()["state"], "Not started");
}

#[test]
fn malformed_requests_are_refused_with_400() {
    let vmm = start_vmm();
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        // Not JSON, or not the JSON the route takes.
        ("PUT", "/machine-config", Some("{"), "could not be parsed"),
        (
            "PUT",
            "/machine-config",
            Some("vcpu_count=1"),
            "could not be parsed",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128,"gpu":true}"#),
            "unknown field `gpu`",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":"1","mem_size_mib":128}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":-2,"mem_size_mib":128}"#),
            "could not be parsed",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1}"#),
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":42}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel":"/vmlinux"}"#),
            "unknown field `kernel`",
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id":"rootfs","is_root_device":"yes"}"#),
            "could not be parsed",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Reboot"}"#),
            "unknown variant `Reboot`",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action":"InstanceStart"}"#),
            "unknown field `action`",
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Running"}"#),
            "unknown variant `Running`",
        ),
        (
            "PUT",
            "/logger",
            Some(r#"{"level":"Loud"}"#),
            "unknown variant",
        ),
        (
            "PUT",
            "/metrics",
            Some("{}"),
            "missing field `metrics_path`",
        ),
        (
            "PUT",
            "/machine-config",
            Some("[1,2]"),
            "could not be parsed",
        ),
        // Bodies missing where one is needed, present where none is allowed.
        ("PUT", "/machine-config", None, "Empty PUT request"),
        ("PUT", "/actions", Some(""), "Empty PUT request"),
        ("PATCH", "/vm", None, "Empty PATCH request"),
        (
            "PATCH",
            "/machine-config",
            Some("{}"),
            "Empty PATCH request",
        ),
        (
            "GET",
            "/machine-config",
            Some(r#"{"vcpu_count":1}"#),
            "cannot have a body",
        ),
        // Unknown paths and methods.
        (
            "GET",
            "/no-such-thing",
            None,
            "Invalid request method and/or path: GET /no-such-thing",
        ),
        (
            "POST",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            "Invalid request method and/or path",
        ),
        (
            "DELETE",
            "/drives/rootfs",
            None,
            "Invalid request method and/or path",
        ),
        (
            "PATCH",
            "/boot-source",
            Some(r#"{"boot_args":"x"}"#),
            "Invalid request method and/or path",
        ),
        (
            "GET",
            "/drives/rootfs",
            None,
            "Invalid request method and/or path",
        ),
        // Ids.
        (
            "PUT",
            "/drives/",
            Some(r#"{"drive_id":"","path_on_host":"/x","is_root_device":false}"#),
            "cannot be empty",
        ),
        (
            "PUT",
            "/drives/root.fs",
            Some(r#"{"drive_id":"root.fs","path_on_host":"/x","is_root_device":false}"#),
            "invalid",
        ),
        (
            "PUT",
            "/drives/root%20fs",
            Some(r#"{"drive_id":"root fs","path_on_host":"/x","is_root_device":false}"#),
            "invalid",
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id":"other","path_on_host":"/x","is_root_device":false}"#),
            "does not match",
        ),
        (
            "PATCH",
            "/drives/rootfs",
            Some(r#"{"drive_id":"other"}"#),
            "does not match",
        ),
    ];
    for (method, path, body, needle) in cases {
        expect_400(&vmm, method, path, *body, needle);
    }

    // Over the size limit: declared, and actually sent.
    let big = format!(r#"{{"module":"{}"}}"#, "m".repeat(MAX_BODY));
    expect_400(
        &vmm,
        "PUT",
        "/logger",
        Some(&big),
        "larger than the limit of 51200 bytes",
    );
    let sock = vmm.api_sock.clone().expect("api socket");
    let mut stream = UnixStream::connect(&sock).expect("connect");
    stream
        .write_all(b"PUT /logger HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("larger than the limit"), "{answer}");
    assert_eq!(vmm.instance_info()["state"], "Not started");
}

#[test]
fn invalid_machine_configurations_are_refused() {
    let vmm = start_vmm();
    let before = get_json(&vmm, "/vm/config");
    for (body, needle) in [
        (r#"{"vcpu_count":0,"mem_size_mib":128}"#, "vcpu_count"),
        (r#"{"vcpu_count":3,"mem_size_mib":128}"#, "vcpu_count 3"),
        (r#"{"vcpu_count":5,"mem_size_mib":128}"#, "vcpu_count 5"),
        (r#"{"vcpu_count":31,"mem_size_mib":128}"#, "vcpu_count 31"),
        (r#"{"vcpu_count":33,"mem_size_mib":128}"#, "vcpu_count 33"),
        (r#"{"vcpu_count":34,"mem_size_mib":128}"#, "maximum"),
        (r#"{"vcpu_count":3,"mem_size_mib":128,"smt":true}"#, "smt"),
        (r#"{"vcpu_count":1,"mem_size_mib":0}"#, "mem_size_mib"),
        (
            r#"{"vcpu_count":1,"mem_size_mib":1099511627776}"#,
            "mem_size_mib",
        ),
        (
            r#"{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"T2"}"#,
            "cpu_template",
        ),
        (
            r#"{"vcpu_count":1,"mem_size_mib":128,"huge_pages":"2M"}"#,
            "huge_pages",
        ),
    ] {
        expect_400(&vmm, "PUT", "/machine-config", Some(body), needle);
    }
    for (body, needle) in [
        (r#"{"vcpu_count":0}"#, "vcpu_count"),
        (r#"{"vcpu_count":7}"#, "vcpu_count 7"),
        (r#"{"mem_size_mib":0}"#, "mem_size_mib"),
        (r#"{"vcpu_count":3,"smt":true}"#, "smt"),
    ] {
        expect_400(&vmm, "PATCH", "/machine-config", Some(body), needle);
    }
    // Refused requests change nothing.
    assert_eq!(get_json(&vmm, "/vm/config"), before);
}

#[test]
fn unusable_kernel_and_drive_files_are_refused() {
    let vmm = start_vmm();
    let missing = vmm.dir.join("missing");
    let missing = path_str(&missing);
    let dir = path_str(vmm.dir.path());

    let message = expect_400(
        &vmm,
        "PUT",
        "/boot-source",
        Some(&json!({ "kernel_image_path": missing }).to_string()),
        missing,
    );
    assert!(message.contains("No such file or directory"), "{message}");
    expect_400(
        &vmm,
        "PUT",
        "/boot-source",
        Some(&json!({ "kernel_image_path": dir }).to_string()),
        "directory",
    );
    let kernel = scratch_file(&vmm, "vmlinux", 4096);
    expect_400(
        &vmm,
        "PUT",
        "/boot-source",
        Some(
            &json!({ "kernel_image_path": path_str(&kernel), "initrd_path": missing }).to_string(),
        ),
        missing,
    );
    expect_400(
        &vmm,
        "PUT",
        "/drives/rootfs",
        Some(
            &json!({ "drive_id": "rootfs", "path_on_host": missing, "is_root_device": true })
                .to_string(),
        ),
        missing,
    );
    expect_400(
        &vmm,
        "PUT",
        "/drives/rootfs",
        Some(
            &json!({ "drive_id": "rootfs", "path_on_host": dir, "is_root_device": true })
                .to_string(),
        ),
        "directory",
    );

    if running_as_root() {
        eprintln!("unreadable/unwritable file cases skipped: root ignores file permissions");
    } else {
        use std::os::unix::fs::PermissionsExt;
        let secret = scratch_file(&vmm, "secret", 4096);
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        expect_400(
            &vmm,
            "PUT",
            "/boot-source",
            Some(&json!({ "kernel_image_path": path_str(&secret) }).to_string()),
            "Permission denied",
        );
        let read_only = scratch_file(&vmm, "ro.img", 4096);
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o444))
            .expect("chmod");
        expect_400(
            &vmm,
            "PUT",
            "/drives/rootfs",
            Some(&json!({ "drive_id": "rootfs", "path_on_host": path_str(&read_only), "is_root_device": true }).to_string()),
            "Permission denied",
        );
        vmm.put_ok(
            "/drives/rootfs",
            &json!({ "drive_id": "rootfs", "path_on_host": path_str(&read_only), "is_root_device": true, "is_read_only": true }).to_string(),
        );
    }
    let config = get_json(&vmm, "/vm/config");
    assert!(config.get("boot-source").is_none(), "{config}");
}

#[test]
fn a_second_root_device_is_refused() {
    let vmm = start_vmm();
    let a = scratch_file(&vmm, "a.img", 4096);
    let b = scratch_file(&vmm, "b.img", 4096);
    vmm.put_ok(
        "/drives/root_a",
        &json!({ "drive_id": "root_a", "path_on_host": path_str(&a), "is_root_device": true })
            .to_string(),
    );
    expect_400(
        &vmm,
        "PUT",
        "/drives/root_b",
        Some(
            &json!({ "drive_id": "root_b", "path_on_host": path_str(&b), "is_root_device": true })
                .to_string(),
        ),
        "root",
    );
    // Re-sending the same root drive is an update, not a second root.
    vmm.put_ok(
        "/drives/root_a",
        &json!({ "drive_id": "root_a", "path_on_host": path_str(&b), "is_root_device": true })
            .to_string(),
    );
    // A non-root second drive is fine.
    vmm.put_ok(
        "/drives/root_b",
        &json!({ "drive_id": "root_b", "path_on_host": path_str(&a), "is_root_device": false })
            .to_string(),
    );
    // ...but it cannot become a second root later.
    expect_400(
        &vmm,
        "PUT",
        "/drives/root_b",
        Some(
            &json!({ "drive_id": "root_b", "path_on_host": path_str(&a), "is_root_device": true })
                .to_string(),
        ),
        "root",
    );
    let config = get_json(&vmm, "/vm/config");
    let roots = config["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .filter(|d| d["is_root_device"] == true)
        .count();
    assert_eq!(roots, 1, "{config}");
}

#[test]
fn post_boot_actions_are_refused_before_instance_start() {
    let vmm = start_vmm();
    expect_400(
        &vmm,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        "kernel",
    );
    expect_400(
        &vmm,
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        "InstanceStart",
    );
    expect_400(
        &vmm,
        "PATCH",
        "/vm",
        Some(r#"{"state":"Resumed"}"#),
        "InstanceStart",
    );
    expect_400(
        &vmm,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        "InstanceStart",
    );
    let disk = scratch_file(&vmm, "disk.img", 4096);
    expect_400(
        &vmm,
        "PATCH",
        "/drives/rootfs",
        Some(&json!({ "drive_id": "rootfs", "path_on_host": path_str(&disk) }).to_string()),
        "InstanceStart",
    );
    assert_eq!(vmm.instance_info()["state"], "Not started");
}

#[test]
fn metrics_can_be_set_once_and_flushed() {
    let vmm = start_vmm();
    expect_400(
        &vmm,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        "metrics",
    );
    let metrics = vmm.dir.join("metrics.json");
    vmm.put_ok(
        "/metrics",
        &json!({ "metrics_path": path_str(&metrics) }).to_string(),
    );
    vmm.put_ok("/actions", r#"{"action_type":"FlushMetrics"}"#);
    let written = std::fs::read_to_string(&metrics).expect("metrics file");
    let last = written.lines().last().expect("a metrics line");
    serde_json::from_str::<Value>(last).unwrap_or_else(|e| panic!("metrics line {last:?}: {e}"));
    expect_400(
        &vmm,
        "PUT",
        "/metrics",
        Some(&json!({ "metrics_path": path_str(&metrics) }).to_string()),
        "",
    );
    let log = vmm.dir.join("kiln.log");
    vmm.put_ok(
        "/logger",
        &json!({ "log_path": path_str(&log), "level": "Info", "show_level": true }).to_string(),
    );
}

#[test]
fn garbage_http_does_not_stop_the_vmm() {
    let vmm = start_vmm();
    let sock = vmm.api_sock.clone().expect("api socket");
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\r\n\r\n".to_vec(),
        b"HELLO\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnothex\r\n\r\n".to_vec(),
        b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        b"GET /\x00\x01 HTTP/1.1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).into_bytes(),
        format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(1000)).into_bytes(),
        vec![b'A'; 200_000],
        (0..=255u8).cycle().take(5000).collect(),
    ];
    let mut seed: u32 = 0x1234_5678;
    for round in 0..30 {
        let mut bytes = match round % 3 {
            0 => b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 64\r\n\r\n".to_vec(),
            1 => b"GET / HTTP/1.1\r\n".to_vec(),
            _ => Vec::new(),
        };
        for _ in 0..(50 + round * 53) {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            bytes.push(seed.to_le_bytes()[0]);
        }
        inputs.push(bytes);
    }
    for input in &inputs {
        let Ok(mut stream) = UnixStream::connect(&sock) else {
            panic!("the API socket stopped accepting connections");
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.write_all(input);
        let _ = stream.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
        let shown = String::from_utf8_lossy(&input[..input.len().min(40)]).to_string();
        let (status, _) = http_request(&sock, "GET", "/", None)
            .unwrap_or_else(|e| panic!("GET / after {shown:?}: {e}"));
        assert_eq!(status, 200, "GET / after {shown:?}");
    }

    // Connections dropped at every stage, and many held open at once.
    for i in 0..200 {
        let mut stream = UnixStream::connect(&sock).expect("connect");
        if i % 2 == 0 {
            let _ =
                stream.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{");
        }
    }
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    let started = Instant::now();
    assert_eq!(vmm.instance_info()["state"], "Not started");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    // The configuration survived all of it.
    assert_eq!(get_json(&vmm, "/machine-config")["mem_size_mib"], 128);
}

#[test]
fn api_socket_accepts_connections_after_spawn() {
    let dir = TempDir::new("startup");
    let sock = dir.join("api.sock");
    let started = Instant::now();
    let mut vmm = Vmm::spawn(dir, ["--api-sock", path_str(&sock), "--id", "test"]);
    let accepted = loop {
        if UnixStream::connect(&sock).is_ok() {
            break started.elapsed();
        }
        assert!(vmm.is_running(), "kiln-vmm exited: {}", vmm.stderr.text());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no socket after 10 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    // How fast is for bench/vmm.py to measure (release build, side by side with QEMU); this
    // test only shows the socket comes up without any API call.
    eprintln!("spawn to accepting connections: {accepted:?}");
}

#[test]
fn an_existing_socket_path_is_refused_and_left_alone() {
    let dir = TempDir::new("exists");
    let sock = dir.join("api.sock");
    std::fs::write(&sock, b"precious").expect("write");
    let mut vmm = Vmm::spawn(dir, ["--api-sock", path_str(&sock), "--id", "test"]);
    let status = vmm.expect_exit(Duration::from_secs(10));
    assert!(!status.success(), "kiln-vmm started on an existing path");
    assert!(
        vmm.stderr.text().contains("already exists"),
        "{}",
        vmm.stderr.text()
    );
    assert_eq!(std::fs::read(&sock).expect("still there"), b"precious");
}

#[test]
fn the_socket_is_removed_when_the_vmm_exits() {
    let mut vmm = start_vmm();
    let sock = vmm.api_sock.clone().expect("api socket");
    assert!(sock.exists());
    vmm.signal(libc::SIGTERM);
    vmm.expect_exit(Duration::from_secs(10));
    assert!(!sock.exists(), "{} left behind", sock.display());
}

/// Boots the `counter` guest (which prints forever) through the API and waits for its output.
fn boot_counter(vmm: &Vmm) {
    let kernel = test_guests::guest("counter");
    getting_started(vmm, &kernel);
    vmm.put_ok(
        "/boot-source",
        &json!({
            "kernel_image_path": path_str(&kernel),
            "boot_args": format!("{BOOT_ARGS} kiln.delay_ticks=50000000"),
        })
        .to_string(),
    );
    vmm.put_ok("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert!(
        vmm.stdout.wait_for("counter: 1", GUEST_TIMEOUT).is_some(),
        "the counter guest did not print\nstdout:\n{}\nstderr:\n{}",
        vmm.stdout.text(),
        vmm.stderr.text()
    );
}

/// The highest `counter: N` the guest has printed so far.
fn last_count(vmm: &Vmm) -> u64 {
    vmm.stdout
        .lines()
        .iter()
        .filter_map(|line| line.strip_prefix("counter: ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn boot_pre_boot_resources_are_refused_after_instance_start() {
    if !kvm_or_skip("boot_pre_boot_resources_are_refused_after_instance_start") {
        return;
    }
    let vmm = start_vmm();
    boot_counter(&vmm);
    assert_eq!(vmm.instance_info()["state"], "Running");
    let before = get_json(&vmm, "/vm/config");

    let kernel = test_guests::guest("counter");
    let disk = scratch_file(&vmm, "late.img", 4096);
    expect_400(
        &vmm,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#),
        "after",
    );
    expect_400(
        &vmm,
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib":256}"#),
        "after",
    );
    // The state is checked before the values.
    expect_400(
        &vmm,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":3,"mem_size_mib":128}"#),
        "after",
    );
    expect_400(
        &vmm,
        "PUT",
        "/boot-source",
        Some(&json!({ "kernel_image_path": path_str(&kernel) }).to_string()),
        "after",
    );
    expect_400(
        &vmm,
        "PUT",
        "/drives/late",
        Some(&json!({ "drive_id": "late", "path_on_host": path_str(&disk), "is_root_device": false }).to_string()),
        "after",
    );
    expect_400(
        &vmm,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        "",
    );
    assert_eq!(get_json(&vmm, "/vm/config"), before);
    assert_eq!(vmm.instance_info()["state"], "Running");

    // Post-boot operations now work.
    vmm.patch_ok("/vm", r#"{"state":"Paused"}"#);
    assert_eq!(vmm.instance_info()["state"], "Paused");
    vmm.patch_ok("/vm", r#"{"state":"Resumed"}"#);
    assert_eq!(vmm.instance_info()["state"], "Running");
    let last = last_count(&vmm);
    assert!(
        vmm.stdout
            .wait_for(&format!("counter: {}", last + 2), GUEST_TIMEOUT)
            .is_some(),
        "the guest did not continue after Resumed (last count {last})\nstdout:\n{}",
        vmm.stdout.text()
    );
    let new_disk = scratch_file(&vmm, "rootfs-v2.ext4", 8192);
    vmm.patch_ok(
        "/drives/rootfs",
        &json!({ "drive_id": "rootfs", "path_on_host": path_str(&new_disk) }).to_string(),
    );
    expect_400(
        &vmm,
        "PATCH",
        "/drives/nosuch",
        Some(&json!({ "drive_id": "nosuch", "path_on_host": path_str(&new_disk) }).to_string()),
        "nosuch",
    );
    vmm.put_ok("/actions", r#"{"action_type":"SendCtrlAltDel"}"#);
    // Garbage after boot does not disturb the running VM either.
    let sock = vmm.api_sock.clone().expect("api socket");
    for junk in [
        &b"\x00\x01\x02\r\n\r\n"[..],
        b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{",
    ] {
        let mut stream = UnixStream::connect(&sock).expect("connect");
        let _ = stream.write_all(junk);
    }
    assert_eq!(vmm.instance_info()["state"], "Running");
}

#[test]
fn boot_hello_with_the_getting_started_sequence() {
    if !kvm_or_skip("boot_hello_with_the_getting_started_sequence") {
        return;
    }
    let mut vmm = start_vmm();
    getting_started(&vmm, &test_guests::guest("hello"));
    vmm.put_ok("/actions", r#"{"action_type":"InstanceStart"}"#);
    let status = vmm.expect_exit(GUEST_TIMEOUT);
    assert!(
        vmm.stdout.text().contains("Hello from a kiln test guest!"),
        "stdout:\n{}",
        vmm.stdout.text()
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr.text());
    assert!(!vmm.api_sock.as_ref().expect("sock").exists());
}

#[test]
fn boot_after_a_failed_instance_start() {
    if !kvm_or_skip("boot_after_a_failed_instance_start") {
        return;
    }
    let mut vmm = start_vmm();
    // Readable but not a kernel: accepted by PUT, refused by InstanceStart.
    let junk: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let junk_path = vmm.dir.join("junk.bin");
    std::fs::write(&junk_path, junk).expect("write");
    vmm.put_ok(
        "/boot-source",
        &json!({ "kernel_image_path": path_str(&junk_path) }).to_string(),
    );
    expect_400(
        &vmm,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        "",
    );
    assert_eq!(vmm.instance_info()["state"], "Not started");
    // The client can fix the configuration and start again.
    getting_started(&vmm, &test_guests::guest("hello"));
    vmm.put_ok("/actions", r#"{"action_type":"InstanceStart"}"#);
    let status = vmm.expect_exit(GUEST_TIMEOUT);
    assert!(
        vmm.stdout.text().contains("Hello from a kiln test guest!"),
        "stdout:\n{}",
        vmm.stdout.text()
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr.text());
}

#[test]
fn boot_uses_the_configuration_the_api_reports() {
    if !kvm_or_skip("boot_uses_the_configuration_the_api_reports") {
        return;
    }
    let mut vmm = start_vmm();
    let kernel = test_guests::guest("bootinfo");
    // Change the shape more than once, as a client correcting itself would; the VMM may have
    // prepared the default shape in the background meanwhile.
    vmm.put_ok("/machine-config", r#"{"vcpu_count":2,"mem_size_mib":256}"#);
    vmm.patch_ok("/machine-config", r#"{"vcpu_count":4}"#);
    vmm.put_ok(
        "/boot-source",
        &json!({ "kernel_image_path": path_str(&kernel), "boot_args": BOOT_ARGS }).to_string(),
    );
    let config = get_json(&vmm, "/vm/config");
    assert_eq!(config["machine-config"]["vcpu_count"], 4);
    assert_eq!(config["machine-config"]["mem_size_mib"], 256);
    vmm.put_ok("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert!(
        vmm.stdout
            .wait_for("bootinfo: done", GUEST_TIMEOUT)
            .is_some(),
        "bootinfo did not finish\nstdout:\n{}\nstderr:\n{}",
        vmm.stdout.text(),
        vmm.stderr.text()
    );
    let lines = vmm.stdout.lines();
    let cmdline = lines
        .iter()
        .find(|l| l.starts_with("bootinfo: cmdline="))
        .expect("cmdline line");
    assert!(cmdline.contains(BOOT_ARGS), "{cmdline}");
    let madt = lines
        .iter()
        .find(|l| l.starts_with("bootinfo: madt checksum="))
        .expect("madt line");
    assert!(madt.contains("enabled=4"), "{madt}");
    let ram: u64 = lines
        .iter()
        .filter(|l| l.starts_with("bootinfo: e820 addr=") && l.ends_with("type=1"))
        .filter_map(|l| {
            let size = l.split("size=0x").nth(1)?.split(' ').next()?;
            u64::from_str_radix(size, 16).ok()
        })
        .sum();
    assert!(
        ram > 250 << 20 && ram <= 256 << 20,
        "usable RAM in the e820 map is {ram:#x} bytes, not about 256 MiB\n{}",
        vmm.stdout.text()
    );
    // bootinfo resets the machine when done, which ends the VMM cleanly.
    let status = vmm.expect_exit(GUEST_TIMEOUT);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr.text());
}

#[test]
fn vsock_and_entropy_devices_are_configured_and_bad_values_refused() {
    let vmm = start_vmm();
    let sock = vmm.dir.join("v.sock");
    let sock = path_str(&sock);
    expect_400(
        &vmm,
        "PUT",
        "/vsock",
        Some(&format!(r#"{{"guest_cid":2,"uds_path":"{sock}"}}"#)),
        "guest_cid 2 is reserved",
    );
    expect_400(
        &vmm,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid":3,"uds_path":"/no/such/dir/v.sock"}"#),
        "does not exist",
    );
    let taken = scratch_file(&vmm, "taken.sock", 0);
    expect_400(
        &vmm,
        "PUT",
        "/vsock",
        Some(&format!(
            r#"{{"guest_cid":3,"uds_path":"{}"}}"#,
            path_str(&taken)
        )),
        "already exists",
    );
    expect_400(
        &vmm,
        "PUT",
        "/vsock",
        Some(&format!(r#"{{"guest_cid":"three","uds_path":"{sock}"}}"#)),
        "guest_cid",
    );
    vmm.put_ok(
        "/vsock",
        &format!(r#"{{"guest_cid":3,"uds_path":"{sock}"}}"#),
    );
    vmm.put_ok("/entropy", "{}");
    expect_400(
        &vmm,
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter":{"bandwidth":{"size":1}}}"#),
        "rate_limiter",
    );
    let config = get_json(&vmm, "/vm/config");
    assert_eq!(config["vsock"]["guest_cid"], 3, "{config}");
    assert_eq!(config["vsock"]["uds_path"], sock, "{config}");
    assert_eq!(config["entropy"], serde_json::json!({}), "{config}");
}

#[test]
fn network_interface_configuration_errors_are_refused() {
    let vmm = start_vmm();
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","host_dev_name":"kilnnosuchtap"}"#),
        "does not exist",
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","host_dev_name":"lo","guest_mac":"06:00:AC:10:00"}"#),
        "is not a MAC address",
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","host_dev_name":"lo","guest_mac":"07:00:AC:10:00:02"}"#),
        "multicast",
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth1","host_dev_name":"lo"}"#),
        "does not match the iface_id",
    );
    // `lo` exists on every host, so the configuration is accepted; a second interface on the
    // same host device is refused.
    vmm.put_ok(
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"lo","guest_mac":"06:00:AC:10:00:02"}"#,
    );
    expect_400(
        &vmm,
        "PUT",
        "/network-interfaces/eth1",
        Some(r#"{"iface_id":"eth1","host_dev_name":"lo"}"#),
        "already used",
    );
    expect_400(
        &vmm,
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#),
        "only possible after the microVM has started",
    );
    let config = get_json(&vmm, "/vm/config");
    assert_eq!(
        config["network-interfaces"][0]["guest_mac"], "06:00:AC:10:00:02",
        "{config}"
    );
}

#[test]
fn mmds_document_is_stored_patched_limited_and_configured() {
    let vmm = Vmm::with_api("mmds", &["--mmds-size-limit", "200"]);
    assert_eq!(get_json(&vmm, "/mmds"), serde_json::json!({}));
    vmm.put_ok(
        "/mmds",
        r#"{"latest":{"meta-data":{"instance-id":"i-1","zone":"a"}}}"#,
    );
    vmm.patch_ok(
        "/mmds",
        r#"{"latest":{"meta-data":{"zone":null,"tag":"x"}}}"#,
    );
    assert_eq!(
        get_json(&vmm, "/mmds"),
        serde_json::json!({"latest":{"meta-data":{"instance-id":"i-1","tag":"x"}}}),
        "PATCH is a JSON merge patch"
    );
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(300));
    let (status, body) = vmm.put("/mmds", &big);
    assert_eq!(status, 413, "a document over --mmds-size-limit: {body}");
    assert!(fault_message(&body).contains("200"), "{body}");
    assert_eq!(
        get_json(&vmm, "/mmds")["latest"]["meta-data"]["tag"],
        "x",
        "a refused PUT keeps the old document"
    );
    expect_400(&vmm, "PUT", "/mmds", Some("[1,2]"), "object");
    expect_400(
        &vmm,
        "PUT",
        "/mmds/config",
        Some(r#"{"version":"V2","network_interfaces":["eth0"]}"#),
        "eth0",
    );
    vmm.put_ok(
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"lo"}"#,
    );
    expect_400(
        &vmm,
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}"#),
        "not link local",
    );
    expect_400(
        &vmm,
        "PUT",
        "/mmds/config",
        Some(r#"{"version":"V3","network_interfaces":["eth0"]}"#),
        "version",
    );
    vmm.put_ok(
        "/mmds/config",
        r#"{"version":"V2","network_interfaces":["eth0"]}"#,
    );
    let config = get_json(&vmm, "/vm/config");
    assert_eq!(config["mmds-config"]["version"], "V2", "{config}");
    assert_eq!(
        config["mmds-config"]["network_interfaces"][0], "eth0",
        "{config}"
    );
}
