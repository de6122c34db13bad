//! The kiln-vmm backend: kiln's own VMM on hardware KVM, configured with a Firecracker-style
//! config file; the agent talks over virtio-vsock (Firecracker's hybrid design: the host
//! connects to a Unix socket and sends `CONNECT <port>`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{GuestConfig, VSOCK_PORT};

use super::{
    die_with_parent, find_program, kvm_support, require_program, retry_until, AgentTransport,
    Backend, BackendKind, KvmSupport, LaunchSpec, Launched, NetworkMode, BASE_CMDLINE,
};
use crate::error::{EngineError, Result};

/// Drives the kiln-vmm binary.
#[derive(Debug, Clone)]
pub struct VmmBackend {
    program: Option<PathBuf>,
}

impl VmmBackend {
    /// The backend using `KILN_VMM`, `kiln-vmm` next to the running program, or in `PATH`.
    pub fn from_env() -> Self {
        VmmBackend {
            program: find_program("KILN_VMM", "kiln-vmm"),
        }
    }

    fn program(&self) -> Result<&PathBuf> {
        require_program(
            &self.program,
            "kiln-vmm not found: put it next to kiln or in PATH (or set KILN_VMM)",
        )
    }
}

impl Backend for VmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vmm
    }

    fn check(&self) -> Result<()> {
        self.program()?;
        match kvm_support() {
            KvmSupport::Hardware => Ok(()),
            KvmSupport::NoHardwareVirtualization => Err(EngineError::Backend(
                "the vmm backend needs hardware virtualization (vmx/svm): this host's /dev/kvm \
                 has none, so a stock Linux kernel cannot boot under it; use --backend qemu"
                    .into(),
            )),
            KvmSupport::Unavailable(why) => Err(EngineError::Backend(format!(
                "the vmm backend needs /dev/kvm ({why}); use --backend qemu"
            ))),
        }
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched> {
        let program = self.program()?;
        let vsock_socket = spec.dir.join("vsock.sock");
        let _ = std::fs::remove_file(&vsock_socket);
        let mut boot_args = format!("{BASE_CMDLINE} i8042.noprobe kiln.transport=vsock");
        if !spec.extra_cmdline.is_empty() {
            boot_args.push(' ');
            boot_args.push_str(&spec.extra_cmdline);
        }
        let mut guest_config = GuestConfig::default();
        let mut network_interfaces = Vec::new();
        if spec.network == NetworkMode::Bridge {
            let bridge = spec.bridge.as_ref().ok_or_else(|| {
                EngineError::Backend("bridge network without a tap device".into())
            })?;
            network_interfaces.push(serde_json::json!({
                "iface_id": "eth0",
                "host_dev_name": bridge.tap,
                "guest_mac": bridge.mac,
            }));
            bridge.configure_guest(&mut guest_config);
        }
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": spec.kernel,
                "initrd_path": spec.initrd,
                "boot_args": boot_args,
            },
            "drives": [{
                "drive_id": "rootfs",
                "path_on_host": spec.disk,
                "is_root_device": false,
                "is_read_only": false,
            }],
            "machine-config": {
                "vcpu_count": spec.vcpus,
                "mem_size_mib": spec.memory_mib,
            },
            "vsock": {
                "guest_cid": 3,
                "uds_path": vsock_socket,
            },
            "entropy": {},
            "network-interfaces": network_interfaces,
        });
        let config_path = spec.dir.join("vmm.json");
        let text = serde_json::to_vec_pretty(&config)
            .map_err(|e| EngineError::Invalid(format!("VM config: {e}")))?;
        std::fs::write(&config_path, text)
            .map_err(|e| EngineError::io("write", &config_path, e))?;
        let stderr = std::fs::File::create(spec.dir.join("hypervisor.log"))
            .map_err(|e| EngineError::io("create", spec.dir.join("hypervisor.log"), e))?;
        let mut command = Command::new(program);
        command
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| EngineError::Backend(format!("starting {}: {e}", program.display())))?;
        Ok(Launched {
            child,
            transport: Box::new(VsockTransport {
                socket: vsock_socket,
                port: VSOCK_PORT,
            }),
            guest_config,
        })
    }
}

/// The host side of kiln-vmm's vsock device.
struct VsockTransport {
    socket: PathBuf,
    port: u32,
}

impl VsockTransport {
    fn try_connect(&self) -> std::io::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.write_all(format!("CONNECT {}\n", self.port).as_bytes())?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        // Read the answer byte by byte: the agent's first frame may follow it at once.
        let mut line = Vec::new();
        let mut reader = BufReader::with_capacity(1, &stream);
        reader.read_until(b'\n', &mut line)?;
        stream.set_read_timeout(None)?;
        if line.starts_with(b"OK ") {
            Ok(stream)
        } else {
            Err(std::io::Error::other(format!(
                "vsock CONNECT refused ({:?})",
                String::from_utf8_lossy(&line).trim()
            )))
        }
    }
}

impl AgentTransport for VsockTransport {
    fn connect(&self, deadline: Instant) -> Result<UnixStream> {
        retry_until(deadline, Duration::from_millis(20), || self.try_connect()).map_err(|e| {
            EngineError::Agent(format!(
                "could not reach the agent on vsock port {} through {}: {e}",
                self.port,
                self.socket.display()
            ))
        })
    }

    fn describe(&self) -> String {
        format!("vsock port {} via {}", self.port, self.socket.display())
    }
}
