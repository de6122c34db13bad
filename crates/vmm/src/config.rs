//! The VM's configuration, in the JSON shapes of Firecracker's API.
//!
//! These types are both what API clients send and what `GET /vm/config` and `--config-file`
//! use, so every field name matches Firecracker's exactly. Unknown fields are refused so that a
//! client's typo is reported instead of silently ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest vCPU count a microVM may have (the MADT and CPUID topology are built for this many).
pub const MAX_VCPUS: u8 = 32;

/// Default guest memory when a client never sets it, as in Firecracker.
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;

/// Guest CPU and memory shape (`/machine-config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs: 1, or an even number up to [`MAX_VCPUS`].
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: usize,
    /// Expose two threads per core to the guest.
    #[serde(default)]
    pub smt: bool,
    /// Kept for Firecracker clients; only "None" (no template) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Log guest memory writes so that diff snapshots become possible.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Kept for Firecracker clients; only "None" (no huge pages) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: None,
        }
    }
}

/// A partial machine configuration (`PATCH /machine-config`): only the fields present change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// New guest RAM in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    /// New SMT setting.
    #[serde(default)]
    pub smt: Option<bool>,
    /// New CPU template ("None" only).
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// New dirty-page tracking setting.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// New huge pages setting ("None" only).
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl MachineConfig {
    /// Applies a partial update, returning the merged configuration (not yet validated).
    pub fn merged(&self, update: &MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            cpu_template: update.cpu_template.clone().or_else(|| self.cpu_template.clone()),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.clone().or_else(|| self.huge_pages.clone()),
        }
    }
}

/// What to boot (`/boot-source`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// ELF vmlinux (64-bit or PVH entry) or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; kiln-vmm appends its device descriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// How the host caches a drive's writes, as in Firecracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests from the guest are acknowledged without syncing the host file.
    #[default]
    Unsafe,
    /// Flush requests from the guest sync the host file.
    Writeback,
}

/// How drive I/O is performed; kiln-vmm does synchronous I/O only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the event loop.
    #[default]
    Sync,
}

/// A block device (`/drives/{drive_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique name of the drive; also what VIRTIO_BLK_T_GET_ID returns.
    pub drive_id: String,
    /// Host file backing the drive.
    pub path_on_host: PathBuf,
    /// Whether this drive is the guest's root device (`root=` is added to the command line).
    pub is_root_device: bool,
    /// Whether the guest may only read the drive.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition UUID, used for `root=PARTUUID=` instead of `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Host caching of guest writes.
    #[serde(default)]
    pub cache_type: CacheType,
    /// I/O engine ("Sync" only).
    #[serde(default)]
    pub io_engine: IoEngine,
}

/// A change to a drive after boot (`PATCH /drives/{drive_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive to change.
    pub drive_id: String,
    /// New backing file; the guest sees a config-change interrupt with the new capacity.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
}

/// Verbosity of the VMM's log, with Firecracker's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing is logged.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    #[default]
    Warning,
    /// Informational messages too.
    Info,
    /// Debugging detail.
    Debug,
    /// Everything.
    Trace,
}

/// Where and how the VMM logs (`PUT /logger`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe the log lines go to; stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Verbosity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with the source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Where metrics go (`PUT /metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe that receives one JSON object per flush.
    pub metrics_path: PathBuf,
}

/// The whole VM description: `GET /vm/config` and the `--config-file` format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel to boot.
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSourceConfig>,
    /// Block devices, in attachment order.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Logger settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// Metrics sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}
