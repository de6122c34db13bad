//! Shared pieces for the server tests: a stand-in VMM that answers requests the way the real
//! event loop would, and a tiny HTTP client over a Unix socket.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::config::{
    BootSourceConfig, CacheType, DriveConfig, IoEngine, LogLevel, LoggerConfig, MachineConfig,
    MetricsConfig, VmConfig,
};
use vmm::rpc::{ActionError, InstanceInfo, InstanceState, VmmAction, VmmData};

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory unique to this process and `name`.
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// Writes a file in the directory and returns its path.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write scratch file");
        path
    }

    /// Where a socket in this directory goes.
    pub fn socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the fake VMM answers, chosen by the test through the request itself.
///
/// `PUT /logger` with `log_path` `/fail/bad` is refused (400), `/fail/internal` fails (500),
/// `/fail/drop` is dropped without an answer, and `/slow` is answered after 2 s (from
/// another thread, so that the fake VMM keeps answering other requests meanwhile).
pub struct FakeVmm {
    /// Every action received, in order.
    pub received: Arc<Mutex<Vec<VmmAction>>>,
    /// The API server under test.
    pub server: Option<vmm_api::ApiServer>,
}

/// The configuration the fake VMM reports: every optional part filled in, so that schema
/// checks see every field.
pub fn full_vm_config() -> VmConfig {
    VmConfig {
        boot_source: Some(BootSourceConfig {
            kernel_image_path: "/srv/vmlinux".into(),
            initrd_path: Some("/srv/initrd".into()),
            boot_args: Some("console=ttyS0".into()),
        }),
        drives: vec![DriveConfig {
            drive_id: "rootfs".into(),
            path_on_host: "/srv/rootfs.ext4".into(),
            is_root_device: true,
            is_read_only: false,
            partuuid: Some("0eaa91a0-01".into()),
            cache_type: CacheType::Writeback,
            io_engine: IoEngine::Sync,
            rate_limiter: Some(vmm::config::RateLimiterConfig {
                bandwidth: Some(vmm::config::TokenBucketConfig {
                    size: 1 << 20,
                    one_time_burst: Some(1 << 20),
                    refill_time: 100,
                }),
                ops: Some(vmm::config::TokenBucketConfig {
                    size: 100,
                    one_time_burst: None,
                    refill_time: 100,
                }),
            }),
        }],
        machine_config: MachineConfig {
            cpu_template: Some("None".into()),
            huge_pages: Some("None".into()),
            ..MachineConfig::default()
        },
        logger: Some(LoggerConfig {
            log_path: Some("/srv/log".into()),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: Some(false),
            module: Some("vmm".into()),
        }),
        metrics: Some(MetricsConfig {
            metrics_path: "/srv/metrics".into(),
        }),
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: "/srv/v.sock".into(),
            vsock_id: Some("vsock0".into()),
        }),
        entropy: Some(vmm::config::EntropyConfig { rate_limiter: None }),
        network_interfaces: vec![vmm::config::NetworkInterfaceConfig {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:AC:10:00:02".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }],
        mmds_config: Some(mmds::MmdsConfig {
            version: mmds::MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: Some(std::net::Ipv4Addr::new(169, 254, 169, 254)),
            imds_compat: false,
        }),
    }
}

impl FakeVmm {
    /// Starts an API server on `socket` backed by a thread that plays the VMM.
    pub fn start(socket: &Path) -> FakeVmm {
        let (handle, inbox) = vmm::rpc::channel().expect("rpc channel");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        std::thread::spawn(move || {
            // Ends when the server (the last handle) is gone.
            while let Ok(request) = inbox.receiver.recv() {
                log.lock().expect("log").push(request.action.clone());
                let answer = match &request.action {
                    VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                        app_name: "kiln-vmm".into(),
                        id: "fake".into(),
                        state: InstanceState::NotStarted,
                        vmm_version: env!("CARGO_PKG_VERSION").into(),
                    })),
                    VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(full_vm_config()))),
                    VmmAction::GetMmds => Ok(VmmData::Json(serde_json::json!({"latest": {}}))),
                    VmmAction::GetMachineConfig => {
                        Ok(VmmData::MachineConfig(full_vm_config().machine_config))
                    }
                    VmmAction::PutLogger(logger) => {
                        match logger.log_path.as_deref().and_then(Path::to_str) {
                            Some("/fail/bad") => {
                                Err(ActionError::BadRequest("refused by the fake VMM".into()))
                            }
                            Some("/fail/internal") => {
                                Err(ActionError::Internal("broken in the fake VMM".into()))
                            }
                            Some("/fail/drop") => {
                                drop(request.respond);
                                continue;
                            }
                            Some("/slow") => {
                                let respond = request.respond;
                                std::thread::spawn(move || {
                                    std::thread::sleep(Duration::from_secs(2));
                                    respond(Ok(VmmData::Empty));
                                });
                                continue;
                            }
                            _ => Ok(VmmData::Empty),
                        }
                    }
                    // Values are judged by the VMM, as the real event loop does.
                    VmmAction::PutMachineConfig(config) => checked(config.validate()),
                    VmmAction::PatchMachineConfig(update) => {
                        checked(MachineConfig::default().merged(update).validate())
                    }
                    VmmAction::PutBootSource(boot) => checked(boot.validate()),
                    VmmAction::PutDrive(drive) => checked(drive.validate()),
                    VmmAction::PatchDrive(update) => checked(update.validate()),
                    _ => Ok(VmmData::Empty),
                };
                (request.respond)(answer);
            }
        });
        let server = vmm_api::start(socket, handle).expect("start the API server");
        FakeVmm {
            received,
            server: Some(server),
        }
    }

    /// The actions received so far.
    pub fn received(&self) -> Vec<VmmAction> {
        self.received.lock().expect("log").clone()
    }
}

/// The fake VMM's answer to a request whose values were checked.
fn checked(result: Result<(), vmm::config::ConfigError>) -> Result<VmmData, ActionError> {
    result
        .map(|()| VmmData::Empty)
        .map_err(|e| ActionError::BadRequest(e.to_string()))
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The `fault_message` of an error reply.
    pub fn fault(&self) -> String {
        let json = self.json();
        let keys: Vec<&String> = json.as_object().expect("error object").keys().collect();
        assert_eq!(keys, ["fault_message"], "error body: {}", self.body);
        json["fault_message"]
            .as_str()
            .expect("fault_message is a string")
            .to_string()
    }
}

/// Sends raw bytes on a new connection and reads one response (the connection is closed by
/// the request's `Connection: close` or by the server).
pub fn raw(socket: &Path, bytes: &[u8]) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(bytes)?;
    read_reply(&mut stream)
}

/// Reads one HTTP/1.1 response from `stream` (using Content-Length, or EOF).
pub fn read_reply(stream: &mut UnixStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a full response: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None if status == 204 || status == 304 => {}
        None => {
            stream.read_to_end(&mut body)?;
        }
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

/// Formats a request with `Connection: close` and an optional JSON body.
pub fn format_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    request.into_bytes()
}

/// Sends one request and returns the reply.
pub fn send(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
    raw(socket, &format_request(method, path, body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
