//! The API server over a real Unix socket, with a stand-in VMM.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{format_request, raw, read_reply, send, FakeVmm, Scratch};
use vmm::rpc::VmmAction;

#[test]
fn start_refuses_an_existing_path_and_leaves_it_alone() {
    let scratch = Scratch::new("exists");
    let path = scratch.file("api.sock", b"not a socket");
    let (handle, _inbox) = vmm::rpc::channel().expect("channel");
    let err = match vmm_api::start(&path, handle) {
        Ok(_) => panic!("started on an existing file"),
        Err(err) => err,
    };
    assert!(matches!(err, vmm_api::ApiError::SocketExists(_)), "{err:?}");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(&path).expect("file still there"),
        b"not a socket"
    );

    // A live socket is not taken over either.
    let socket = scratch.0.join("live.sock");
    let first = FakeVmm::start(&socket);
    let (handle, _inbox) = vmm::rpc::channel().expect("channel");
    assert!(matches!(
        vmm_api::start(&socket, handle),
        Err(vmm_api::ApiError::SocketExists(_))
    ));
    assert_eq!(send(&socket, "GET", "/version", None).status, 200);
    drop(first);
}

#[test]
fn start_reports_paths_that_cannot_be_bound() {
    let scratch = Scratch::new("unbindable");
    let (handle, _inbox) = vmm::rpc::channel().expect("channel");
    let path = scratch.0.join("no-such-dir").join("api.sock");
    let err = match vmm_api::start(&path, handle) {
        Ok(_) => panic!("bound in a missing directory"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(
        message.contains("no-such-dir") && message.contains("No such file"),
        "{message}"
    );
}

#[test]
fn socket_accepts_on_return_and_is_removed_on_stop_and_drop() {
    let scratch = Scratch::new("lifecycle");
    let socket = scratch.socket();
    for round in 0..3 {
        let (handle, _inbox) = vmm::rpc::channel().expect("channel");
        let started = Instant::now();
        let server = vmm_api::start(&socket, handle).expect("start");
        let elapsed = started.elapsed();
        // Connecting right away must work: the socket is bound and listening.
        let reply = send(&socket, "GET", "/version", None);
        assert_eq!(reply.status, 200);
        eprintln!("round {round}: start() took {elapsed:?}");
        if round % 2 == 0 {
            server.stop();
        } else {
            drop(server);
        }
        assert!(!socket.exists(), "socket left behind after round {round}");
        assert!(UnixStream::connect(&socket).is_err());
    }
}

#[test]
fn answers_in_firecracker_shapes() {
    let scratch = Scratch::new("shapes");
    let socket = scratch.socket();
    let vmm = FakeVmm::start(&socket);

    let reply = send(&socket, "GET", "/", None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let info = reply.json();
    assert_eq!(info["app_name"], "kiln-vmm");
    assert_eq!(info["state"], "Not started");

    let reply = send(&socket, "GET", "/version", None);
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") })
    );

    let reply = send(
        &socket,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
    );
    assert_eq!(reply.status, 204);
    assert_eq!(reply.body, "");
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let reply = send(&socket, "GET", "/nope", None);
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.fault(),
        "Invalid request method and/or path: GET /nope."
    );

    // The query string is not part of the route.
    assert_eq!(
        send(&socket, "GET", "/machine-config?x=1", None).status,
        200
    );

    let received = vmm.received();
    assert!(
        received.contains(&VmmAction::GetInstanceInfo),
        "{received:?}"
    );
    assert!(received.contains(&VmmAction::FlushMetrics), "{received:?}");
    // Refused requests never reach the VMM; /version is answered locally.
    assert_eq!(received.len(), 3, "{received:?}");
}

#[test]
fn vmm_errors_become_400_and_500() {
    let scratch = Scratch::new("errors");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);

    let reply = send(
        &socket,
        "PUT",
        "/logger",
        Some(r#"{"log_path":"/fail/bad"}"#),
    );
    assert_eq!(
        (reply.status, reply.fault().as_str()),
        (400, "refused by the fake VMM")
    );
    let reply = send(
        &socket,
        "PUT",
        "/logger",
        Some(r#"{"log_path":"/fail/internal"}"#),
    );
    assert_eq!(
        (reply.status, reply.fault().as_str()),
        (500, "broken in the fake VMM")
    );
    let reply = send(
        &socket,
        "PUT",
        "/logger",
        Some(r#"{"log_path":"/fail/drop"}"#),
    );
    assert_eq!(reply.status, 500);
    assert!(
        reply.fault().contains("without answering"),
        "{}",
        reply.body
    );
    assert_eq!(send(&socket, "GET", "/", None).status, 200);
}

/// (method, path, body, words the fault message must contain)
type Case = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

/// Requests refused by the server itself, before the VMM sees them.
#[rustfmt::skip]
const MALFORMED: &[Case] = &[
    ("PUT", "/machine-config", Some("{"), "could not be parsed"),
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":1,"mem_size_mib":1,"x":1}"#), "unknown field `x`"),
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":true,"mem_size_mib":1}"#), "invalid type"),
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":1}"#), "missing field `mem_size_mib`"),
    ("PUT", "/machine-config", None, "Empty PUT request"),
    ("PATCH", "/machine-config", Some("{}"), "Empty PATCH request"),
    ("PUT", "/drives/a.b", Some(r#"{"drive_id":"a.b","path_on_host":"/x","is_root_device":false}"#), "invalid"),
    ("PUT", "/drives/a", Some(r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#), "does not match"),
    ("PUT", "/drives/", Some(r#"{"drive_id":"","path_on_host":"/x","is_root_device":false}"#), "cannot be empty"),
    ("PUT", "/actions", Some(r#"{"action_type":"Reboot"}"#), "unknown variant"),
    ("PATCH", "/vm", Some(r#"{"state":"Stopped"}"#), "unknown variant"),
    ("GET", "/", Some("{}"), "cannot have a body"),
    ("POST", "/actions", Some(r#"{"action_type":"InstanceStart"}"#), "Invalid request method and/or path"),
    ("DELETE", "/drives/rootfs", None, "Invalid request method and/or path"),
    ("GET", "/balloon", None, "Invalid request method and/or path"),
];

/// Well-formed requests whose values the VMM refuses (here the fake one, which uses the same
/// `validate()` methods as the real event loop).
#[rustfmt::skip]
const INVALID_VALUES: &[Case] = &[
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":0,"mem_size_mib":128}"#), "vcpu_count"),
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":3,"mem_size_mib":128}"#), "even"),
    ("PUT", "/machine-config", Some(r#"{"vcpu_count":1,"mem_size_mib":0}"#), "mem_size_mib"),
    ("PUT", "/boot-source", Some(r#"{"kernel_image_path":"/no/such/kernel"}"#), "/no/such/kernel"),
];

#[test]
fn bad_requests_get_400_with_a_fault_message() {
    let scratch = Scratch::new("bad");
    let socket = scratch.socket();
    let vmm = FakeVmm::start(&socket);
    for (method, path, body, expected) in MALFORMED.iter().chain(INVALID_VALUES) {
        let reply = send(&socket, method, path, *body);
        assert_eq!(
            reply.status, 400,
            "{method} {path} {body:?}: {}",
            reply.body
        );
        let fault = reply.fault();
        assert!(
            fault.contains(expected),
            "{method} {path} {body:?}: {fault}"
        );
        assert_eq!(send(&socket, "GET", "/", None).status, 200);
    }
    let forwarded = vmm
        .received()
        .into_iter()
        .filter(|a| *a != VmmAction::GetInstanceInfo)
        .count();
    assert_eq!(
        forwarded,
        INVALID_VALUES.len(),
        "malformed requests reached the VMM"
    );
}

#[test]
fn bodies_over_the_limit_are_refused() {
    let scratch = Scratch::new("limit");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);
    let limit = vmm_api::MAX_BODY_SIZE;

    // Declared too large: refused without waiting for the body.
    let head = format!(
        "PUT /logger HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        limit + 1
    );
    let reply = raw(&socket, head.as_bytes()).expect("reply");
    assert_eq!(reply.status, 400);
    assert!(
        reply
            .fault()
            .contains("larger than the limit of 51200 bytes"),
        "{}",
        reply.body
    );

    // Actually sent, with a matching length.
    let body = format!(r#"{{"module":"{}"}}"#, "m".repeat(limit));
    let reply = send(&socket, "PUT", "/logger", Some(&body));
    assert_eq!(reply.status, 400);
    assert!(
        reply.fault().contains("larger than the limit"),
        "{}",
        reply.body
    );

    // Chunked, so the size is only known while reading.
    let mut chunked = b"PUT /logger HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..8 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 8000, "a".repeat(8000)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(&socket, &chunked).expect("reply");
    assert_eq!(reply.status, 400);
    assert!(
        reply.fault().contains("larger than the limit"),
        "{}",
        reply.body
    );

    // Exactly at the limit is fine as far as size goes (the JSON is then checked).
    let padding = limit - r#"{"module":""}"#.len();
    let body = format!(r#"{{"module":"{}"}}"#, "m".repeat(padding));
    assert_eq!(body.len(), limit);
    assert_eq!(send(&socket, "PUT", "/logger", Some(&body)).status, 204);
    assert_eq!(send(&socket, "GET", "/", None).status, 200);
}

#[test]
fn keep_alive_and_half_close() {
    let scratch = Scratch::new("conn");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);

    let mut stream = UnixStream::connect(&socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for _ in 0..3 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        assert_eq!(read_reply(&mut stream).expect("reply").status, 200);
        stream
            .write_all(b"PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"FlushMetrics\"} ")
            .expect("write");
        assert_eq!(read_reply(&mut stream).expect("reply").status, 204);
    }

    // A client that shuts down its side after the request still gets the answer.
    let mut stream = UnixStream::connect(&socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(read_reply(&mut stream).expect("reply").status, 200);
}

#[test]
fn a_slow_vmm_answer_does_not_block_other_connections() {
    let scratch = Scratch::new("slow");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);
    let slow_socket = socket.clone();
    let slow = std::thread::spawn(move || {
        send(
            &slow_socket,
            "PUT",
            "/logger",
            Some(r#"{"log_path":"/slow"}"#),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(50));
    // Both a locally answered request and one the VMM answers get through meanwhile.
    assert_eq!(send(&socket, "GET", "/version", None).status, 200);
    assert_eq!(send(&socket, "GET", "/", None).status, 200);
    assert!(
        !slow.is_finished(),
        "the slow request finished first, so this proves nothing"
    );
    assert_eq!(slow.join().expect("slow request"), 204);
}

#[test]
fn garbage_never_stops_the_server() {
    let scratch = Scratch::new("garbage");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);

    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\r\n\r\n".to_vec(),
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"PUT /actions HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
        b"GET /\0/ HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n".to_vec(),
        huge_header.into_bytes(),
        many_headers.into_bytes(),
        vec![0u8; 70_000],
        (0..=255u8).cycle().take(10_000).collect(),
    ];
    // Deterministic pseudo-random noise, some of it starting like a real request.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..40 {
        let mut bytes = if i % 2 == 0 {
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n".to_vec()
        } else {
            Vec::new()
        };
        for _ in 0..(64 + i * 37) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        inputs.push(bytes);
    }

    for input in &inputs {
        if let Ok(mut stream) = UnixStream::connect(&socket) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // The server may close early; write errors are fine.
            let _ = stream.write_all(input);
            let _ = stream.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
            if sink.starts_with(b"HTTP/1.1 ") {
                let status = &sink[9..12];
                assert!(
                    status.starts_with(b"4"),
                    "{:?}",
                    String::from_utf8_lossy(&sink)
                );
            }
        }
        let reply = send(&socket, "GET", "/", None);
        assert_eq!(
            reply.status,
            200,
            "after {:?}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
    }

    // Connections that are opened and dropped, mid-request or not.
    for i in 0..300 {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        if i % 3 == 0 {
            let _ = stream
                .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");
        }
    }
    // Many connections held open at once, idle or half-way through a request.
    let held: Vec<UnixStream> = (0..100)
        .map(|i| {
            let mut stream = UnixStream::connect(&socket).expect("connect");
            if i % 2 == 0 {
                let _ = stream.write_all(b"GET / HTTP/1.1\r\nHos");
            }
            stream
        })
        .collect();
    let started = Instant::now();
    assert_eq!(send(&socket, "GET", "/", None).status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    assert_eq!(send(&socket, "GET", "/", None).status, 200);
    let reply = raw(&socket, &format_request("GET", "/version", None)).expect("reply");
    assert_eq!(reply.status, 200);
}
