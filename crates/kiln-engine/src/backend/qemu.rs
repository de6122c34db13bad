//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio devices described in
//! ACPI, KVM when the host has hardware virtualization, TCG otherwise. The agent talks over a
//! virtio-console port whose host side is a Unix socket.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{GuestConfig, InterfaceConfig, SERIAL_PORT_NAME};

use super::{
    die_with_parent, find_program, kvm_support, require_program, retry_until, AgentTransport,
    Backend, BackendKind, KvmSupport, LaunchSpec, Launched, NetworkMode, BASE_CMDLINE,
};
use crate::error::{EngineError, Result};

/// Drives qemu-system-x86_64.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    program: Option<PathBuf>,
}

impl QemuBackend {
    /// The backend using `KILN_QEMU` or `qemu-system-x86_64` from `PATH`.
    pub fn from_env() -> Self {
        QemuBackend {
            program: find_program("KILN_QEMU", "qemu-system-x86_64"),
        }
    }

    fn program(&self) -> Result<&PathBuf> {
        require_program(
            &self.program,
            "qemu-system-x86_64 not found: install the Debian package qemu-system-x86 \
             (or set KILN_QEMU to its path)",
        )
    }
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo.
///
/// microvm has neither HPET nor ACPI PM timer, so under TCG the guest has only the PIT to
/// calibrate its TSC against, and that calibration stalls now and then (about 1 boot in 23
/// here). TCG's TSC runs at the host's rate, so telling the kernel the rate
/// (`tsc_early_khz`) removes the calibration and the stall.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse::<f64>()
        .ok()?;
    if mhz.is_finite() && mhz > 100.0 {
        Some((mhz * 1000.0) as u64)
    } else {
        None
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn check(&self) -> Result<()> {
        self.program().map(|_| ())
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched> {
        let program = self.program()?;
        let agent_socket = spec.dir.join("agent.sock");
        let _ = std::fs::remove_file(&agent_socket);
        let kvm = kvm_support() == KvmSupport::Hardware;
        let mut cmdline = format!("{BASE_CMDLINE} kiln.transport=serial");
        if !kvm {
            if let Some(khz) = host_tsc_khz() {
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        if !spec.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.extra_cmdline);
        }
        let mut command = Command::new(program);
        command
            .arg("-accel")
            .arg(if kvm { "kvm" } else { "tcg,thread=multi" })
            // acpi=on: the virtio-mmio devices are described in the DSDT, which is how Debian's
            // cloud kernel (no virtio_mmio.device= support) finds them.
            .args(["-M", "microvm,acpi=on,rtc=on,pit=on,pic=on,isa-serial=on"])
            .args(["-cpu", if kvm { "host" } else { "max" }])
            .arg("-m")
            .arg(format!("{}M", spec.memory_mib))
            .arg("-smp")
            .arg(spec.vcpus.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .arg("-append")
            .arg(&cmdline)
            // reboot=k: the guest resets through the keyboard controller; with -no-reboot
            // that ends QEMU.
            .args(["-device", "i8042"])
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,cache=writeback,discard=unmap",
                qemu_escape(&spec.disk.to_string_lossy())
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "virtio-rng-device"])
            .args(["-device", "virtio-serial-device,max_ports=2"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                qemu_escape(&agent_socket.to_string_lossy())
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,chardev=agent,name={SERIAL_PORT_NAME}"
            ));
        let mut guest_config = GuestConfig::default();
        if spec.network == NetworkMode::User {
            command
                .args(["-netdev", "user,id=net0"])
                .args(["-device", "virtio-net-device,netdev=net0"]);
            // QEMU's user-mode network: the guest is 10.0.2.15, the gateway 10.0.2.2, and the
            // built-in DNS forwarder 10.0.2.3.
            guest_config.interfaces.push(InterfaceConfig {
                name: "eth0".into(),
                address: "10.0.2.15/24".into(),
                gateway: Some("10.0.2.2".into()),
                mtu: None,
            });
            guest_config.nameservers.push("10.0.2.3".into());
        }
        if spec.network == NetworkMode::Bridge {
            let bridge = spec.bridge.as_ref().ok_or_else(|| {
                EngineError::Backend("bridge network without a tap device".into())
            })?;
            command
                .arg("-netdev")
                .arg(format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    qemu_escape(&bridge.tap)
                ))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=net0,mac={}", bridge.mac));
            bridge.configure_guest(&mut guest_config);
        }
        let stderr = std::fs::File::create(spec.dir.join("hypervisor.log"))
            .map_err(|e| EngineError::io("create", spec.dir.join("hypervisor.log"), e))?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| EngineError::Backend(format!("starting {}: {e}", program.display())))?;
        Ok(Launched {
            child,
            transport: Box::new(ConsolePortTransport {
                socket: agent_socket,
            }),
            guest_config,
        })
    }
}

/// QEMU option values escape a comma by doubling it.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The host side of the agent's virtio-console port: QEMU listens on a Unix socket.
struct ConsolePortTransport {
    socket: PathBuf,
}

impl AgentTransport for ConsolePortTransport {
    fn connect(&self, deadline: Instant) -> Result<UnixStream> {
        retry_until(deadline, Duration::from_millis(10), || {
            UnixStream::connect(&self.socket)
        })
        .map_err(|e| {
            EngineError::Agent(format!(
                "could not connect to the agent port {}: {e}",
                self.socket.display()
            ))
        })
    }

    fn describe(&self) -> String {
        format!(
            "virtio-console port {SERIAL_PORT_NAME} at {}",
            self.socket.display()
        )
    }
}
