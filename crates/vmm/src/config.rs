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
            cpu_template: update
                .cpu_template
                .clone()
                .or_else(|| self.cpu_template.clone()),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update
                .huge_pages
                .clone()
                .or_else(|| self.huge_pages.clone()),
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
    /// Limits on the drive's bytes and requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
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
    /// New rate limits, applied at once.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
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
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
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
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// Network interfaces, in attachment order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// The metadata service's configuration.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<mmds::MmdsConfig>,
}

/// A network interface (`PUT /network-interfaces/{iface_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// Unique name of the interface.
    pub iface_id: String,
    /// Existing host tap device the interface is attached to.
    pub host_dev_name: String,
    /// The guest's MAC address, "06:00:AC:10:00:02" style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// New rate limits for an interface after boot (`PATCH /network-interfaces/{iface_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The interface to change.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Parses a MAC address written as six two-digit hex bytes separated by colons.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "guest_mac {text:?} is not a MAC address like 06:00:AC:10:00:02."
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::Invalid(format!(
            "guest_mac {text} is a multicast address; a guest needs a unicast one."
        )));
    }
    Ok(mac)
}

impl NetworkInterfaceConfig {
    /// Checks the id, the MAC, and that the tap exists on the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("network interface", &self.iface_id)?;
        if let Some(mac) = &self.guest_mac {
            parse_mac(mac)?;
        }
        crate::devices::virtio::net::tap::check_name(&self.host_dev_name)
            .map_err(|e| ConfigError::Invalid(format!("host_dev_name: {e}.")))?;
        if !crate::devices::virtio::net::tap::exists(&self.host_dev_name) {
            return Err(ConfigError::Invalid(format!(
                "The tap device {:?} does not exist on the host; create it first (ip tuntap add dev {} mode tap).",
                self.host_dev_name, self.host_dev_name
            )));
        }
        Ok(())
    }
}

/// The entropy device (`PUT /entropy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits on the bytes and requests the guest may draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// One token bucket, in Firecracker's shape. A size or refill time of 0 disables it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens (bytes or operations) the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start, and never refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds for an empty bucket to fill up again.
    pub refill_time: u64,
}

/// A device's rate limits: bytes per time and operations per time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Limit on bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Limit on operations (requests or packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// The vsock device (`PUT /vsock`): the guest's context id and the host-side Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id; 0-2 are reserved (hypervisor, local, host).
    pub guest_cid: u32,
    /// Host Unix socket: host processes connect here; guest connections to port P reach
    /// `{uds_path}_{P}`.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker, accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl VsockConfig {
    /// Checks the context id and that the socket path is free and its directory exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return Err(ConfigError::Invalid(format!(
                "guest_cid {} is reserved; use 3 or more.",
                self.guest_cid
            )));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("uds_path must not be empty.".into()));
        }
        if std::fs::symlink_metadata(&self.uds_path).is_ok() {
            return Err(ConfigError::Invalid(format!(
                "The vsock socket path {} already exists; remove it or choose another.",
                self.uds_path.display()
            )));
        }
        let parent = self
            .uds_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            return Err(ConfigError::Invalid(format!(
                "The directory of the vsock socket path {} does not exist.",
                self.uds_path.display()
            )));
        }
        Ok(())
    }
}

/// Why a configuration was refused. The `Display` text is what API clients see as
/// `fault_message`, so every message names the offending field, value or path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that is wrong for a reason the message spells out.
    #[error("{0}")]
    Invalid(String),
    /// A VM needs at least one vCPU to run anything.
    #[error("vcpu_count must be at least 1, but 0 was requested.")]
    VcpuCountZero,
    /// The MADT and CPUID topology are only built for [`MAX_VCPUS`] vCPUs.
    #[error("vcpu_count {0} is more than the maximum of {MAX_VCPUS}.")]
    VcpuCountTooLarge(u8),
    /// The CPU topology kiln-vmm builds has two vCPUs per core, except for a single vCPU.
    #[error("vcpu_count {0} is invalid: it must be 1 or an even number up to {MAX_VCPUS}.")]
    VcpuCountOdd(u8),
    /// Two threads per core cannot be shown with an odd number of vCPUs.
    #[error("vcpu_count {0} is invalid with smt enabled: SMT needs an even number of vCPUs.")]
    SmtNeedsEvenVcpus(u8),
    /// A guest without RAM cannot boot.
    #[error("mem_size_mib must be greater than 0.")]
    MemSizeZero,
    /// More guest RAM than the host has would only fail later, at a worse time.
    #[error("mem_size_mib {requested} is more than the {host_mib} MiB of memory this host has.")]
    MemSizeTooLarge {
        /// What the client asked for, in MiB.
        requested: usize,
        /// The host's physical memory, in MiB.
        host_mib: u64,
    },
    /// CPU templates are accepted by name for Firecracker clients, but none is implemented.
    #[error("cpu_template \"{0}\" is not supported: only \"None\" is accepted.")]
    CpuTemplateUnsupported(String),
    /// Huge pages are accepted by name for Firecracker clients, but not implemented.
    #[error("huge_pages \"{0}\" is not supported: only \"None\" is accepted.")]
    HugePagesUnsupported(String),
    /// A host file the VM needs could not be found or opened.
    #[error("The {what} {} cannot be opened: {source}.", path.display())]
    FileUnusable {
        /// Which file this is ("kernel image", "initrd", "drive backing file").
        what: &'static str,
        /// The path the client gave.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A host path names something that cannot back the VM's resource (a directory, a FIFO...).
    #[error("The {what} {} is a {kind}, not a regular file.", path.display())]
    NotAFile {
        /// Which file this is.
        what: &'static str,
        /// The path the client gave.
        path: PathBuf,
        /// What the path actually is.
        kind: &'static str,
    },
    /// Resource ids appear in paths and the guest; an empty one is always a client mistake.
    #[error("The {kind} ID cannot be empty.")]
    EmptyId {
        /// Which resource ("drive").
        kind: &'static str,
    },
    /// Ids are restricted so that they are safe in URLs, logs and the guest's view.
    #[error(
        "The {kind} ID \"{id}\" is invalid: IDs may only contain ASCII letters, digits, '_' and '-'."
    )]
    InvalidId {
        /// Which resource ("drive").
        kind: &'static str,
        /// The id as given.
        id: String,
    },
    /// The command line is handed to the guest as a C string.
    #[error("boot_args cannot contain a NUL character.")]
    BootArgsNul,
}

/// Checks a resource id (a drive's, for example) as Firecracker clients expect: non-empty and
/// made of `[A-Za-z0-9_-]` only. `kind` names the resource in the error message.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() {
        return Err(ConfigError::EmptyId { kind });
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ConfigError::InvalidId {
            kind,
            id: id.to_string(),
        });
    }
    Ok(())
}

/// The host's physical memory in MiB, or `None` if the OS does not say.
fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf only reads system information and has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page_size <= 0 {
        return None;
    }
    let bytes = u64::try_from(pages)
        .ok()?
        .checked_mul(u64::try_from(page_size).ok()?)?;
    Some(bytes >> 20)
}

impl MachineConfig {
    /// Checks that the VM can be built with this shape on this host, so that a bad value is
    /// refused when it is sent rather than when the VM starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_host_memory(host_memory_mib())
    }

    /// [`MachineConfig::validate`] against a given host memory size (`None`: no limit known).
    pub fn validate_with_host_memory(&self, host_mib: Option<u64>) -> Result<(), ConfigError> {
        let vcpus = self.vcpu_count;
        if vcpus == 0 {
            return Err(ConfigError::VcpuCountZero);
        }
        if vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCountTooLarge(vcpus));
        }
        // As in Firecracker, a single vCPU is allowed with SMT (one core, one thread).
        if self.smt && vcpus > 1 && !vcpus.is_multiple_of(2) {
            return Err(ConfigError::SmtNeedsEvenVcpus(vcpus));
        }
        if vcpus > 1 && !vcpus.is_multiple_of(2) {
            return Err(ConfigError::VcpuCountOdd(vcpus));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        if let Some(host_mib) = host_mib {
            if u64::try_from(self.mem_size_mib).map_or(true, |mib| mib > host_mib) {
                return Err(ConfigError::MemSizeTooLarge {
                    requested: self.mem_size_mib,
                    host_mib,
                });
            }
        }
        if let Some(template) = self.cpu_template.as_deref() {
            if template != "None" {
                return Err(ConfigError::CpuTemplateUnsupported(template.to_string()));
            }
        }
        if let Some(huge_pages) = self.huge_pages.as_deref() {
            if huge_pages != "None" {
                return Err(ConfigError::HugePagesUnsupported(huge_pages.to_string()));
            }
        }
        Ok(())
    }
}

/// What a host file must be to back a VM resource.
#[derive(Clone, Copy)]
enum FileUse {
    /// Read once at boot (kernel, initrd): a regular file.
    Image,
    /// Backs a drive: a regular file or a block device.
    Drive {
        /// Whether the guest may write to it.
        read_only: bool,
    },
}

/// Describes a file type for error messages.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "named pipe"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Checks that `path` exists, has the right type and opens the way the VMM will open it.
///
/// The type is checked before opening so that a FIFO or a device never blocks or changes
/// state just because a client named it; the open (non-blocking) then catches permissions.
fn check_file(
    what: &'static str,
    path: &std::path::Path,
    usage: FileUse,
) -> Result<(), ConfigError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let unusable = |source| ConfigError::FileUnusable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file_type = std::fs::metadata(path).map_err(unusable)?.file_type();
    let type_ok = match usage {
        FileUse::Image => file_type.is_file(),
        FileUse::Drive { .. } => file_type.is_file() || file_type.is_block_device(),
    };
    if !type_ok {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
            kind: file_kind(file_type),
        });
    }
    let write = matches!(usage, FileUse::Drive { read_only: false });
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(unusable)?;
    Ok(())
}

impl BootSourceConfig {
    /// Checks that the kernel (and initrd, if any) can be read now, so that a wrong path is
    /// reported to the client that sent it instead of failing `InstanceStart` later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("kernel image", &self.kernel_image_path, FileUse::Image)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("initrd", initrd, FileUse::Image)?;
        }
        if self
            .boot_args
            .as_deref()
            .is_some_and(|args| args.contains('\0'))
        {
            return Err(ConfigError::BootArgsNul);
        }
        Ok(())
    }
}

impl DriveConfig {
    /// Checks the id and that the backing file opens with the access the guest will get
    /// (read-write unless `is_read_only`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("drive", &self.drive_id)?;
        check_file(
            "drive backing file",
            &self.path_on_host,
            FileUse::Drive {
                read_only: self.is_read_only,
            },
        )
    }
}

impl DriveUpdate {
    /// Checks the id and, if a new backing file is given, that it exists and can be read.
    ///
    /// Whether it must also be writable depends on the drive's `is_read_only`, which only the
    /// VMM knows; it checks that when it applies the update.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("drive", &self.drive_id)?;
        if let Some(path) = &self.path_on_host {
            check_file(
                "drive backing file",
                path,
                FileUse::Drive { read_only: true },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A scratch directory removed at the end of the test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "kiln-config-test-{}-{}",
                std::process::id(),
                name
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }

        fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).expect("write scratch file");
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn running_as_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    fn machine(vcpu_count: u8, mem_size_mib: usize, smt: bool) -> MachineConfig {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            ..MachineConfig::default()
        }
    }

    #[test]
    fn machine_config_accepts_valid_shapes() {
        for vcpus in [1, 2, 4, 6, 30, MAX_VCPUS] {
            machine(vcpus, 128, false)
                .validate_with_host_memory(Some(1024))
                .expect("valid vcpu count");
        }
        for vcpus in [2, 8, MAX_VCPUS] {
            machine(vcpus, 128, true)
                .validate_with_host_memory(Some(1024))
                .expect("valid smt vcpu count");
        }
        MachineConfig::default()
            .validate()
            .expect("the default configuration is valid on any host");
        let named_none = MachineConfig {
            cpu_template: Some("None".into()),
            huge_pages: Some("None".into()),
            ..MachineConfig::default()
        };
        named_none
            .validate_with_host_memory(None)
            .expect("\"None\" templates are accepted");
    }

    #[test]
    fn machine_config_rejects_bad_vcpu_counts() {
        let err = machine(0, 128, false).validate_with_host_memory(None);
        assert!(matches!(err, Err(ConfigError::VcpuCountZero)), "{err:?}");
        for vcpus in [3, 5, 31] {
            let err = machine(vcpus, 128, false).validate_with_host_memory(None);
            assert!(
                matches!(err, Err(ConfigError::VcpuCountOdd(v)) if v == vcpus),
                "{err:?}"
            );
        }
        for vcpus in [MAX_VCPUS + 1, MAX_VCPUS + 2, u8::MAX] {
            let err = machine(vcpus, 128, false).validate_with_host_memory(None);
            assert!(
                matches!(err, Err(ConfigError::VcpuCountTooLarge(_))),
                "{err:?}"
            );
        }
        for vcpus in [3, 5] {
            let err = machine(vcpus, 128, true).validate_with_host_memory(None);
            assert!(
                matches!(err, Err(ConfigError::SmtNeedsEvenVcpus(_))),
                "{err:?}"
            );
        }
        assert!(machine(1, 128, true)
            .validate_with_host_memory(None)
            .is_ok());
        let message = machine(3, 128, false)
            .validate_with_host_memory(None)
            .map_err(|e| e.to_string());
        assert_eq!(
            message,
            Err("vcpu_count 3 is invalid: it must be 1 or an even number up to 32.".into())
        );
    }

    #[test]
    fn machine_config_rejects_bad_memory() {
        let err = machine(1, 0, false).validate_with_host_memory(Some(1024));
        assert!(matches!(err, Err(ConfigError::MemSizeZero)), "{err:?}");
        let err = machine(1, 2048, false).validate_with_host_memory(Some(1024));
        assert!(
            matches!(
                err,
                Err(ConfigError::MemSizeTooLarge {
                    requested: 2048,
                    host_mib: 1024
                })
            ),
            "{err:?}"
        );
        machine(1, 1024, false)
            .validate_with_host_memory(Some(1024))
            .expect("exactly the host's memory is allowed");
        let err = machine(1, usize::MAX, false).validate();
        assert!(
            matches!(err, Err(ConfigError::MemSizeTooLarge { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn machine_config_rejects_templates_and_huge_pages() {
        let config = MachineConfig {
            cpu_template: Some("T2".into()),
            ..MachineConfig::default()
        };
        let err = config
            .validate_with_host_memory(None)
            .map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("cpu_template \"T2\" is not supported: only \"None\" is accepted.".into())
        );
        let config = MachineConfig {
            huge_pages: Some("2M".into()),
            ..MachineConfig::default()
        };
        let err = config.validate_with_host_memory(None);
        assert!(
            matches!(err, Err(ConfigError::HugePagesUnsupported(ref s)) if s == "2M"),
            "{err:?}"
        );
    }

    fn boot(kernel: &Path, initrd: Option<&Path>) -> BootSourceConfig {
        BootSourceConfig {
            kernel_image_path: kernel.to_path_buf(),
            initrd_path: initrd.map(Path::to_path_buf),
            boot_args: Some("console=ttyS0".into()),
        }
    }

    #[test]
    fn boot_source_accepts_readable_files() {
        let scratch = Scratch::new("boot-ok");
        let kernel = scratch.file("vmlinux", b"kernel");
        let initrd = scratch.file("initrd", b"initrd");
        boot(&kernel, None).validate().expect("kernel only");
        boot(&kernel, Some(&initrd))
            .validate()
            .expect("kernel and initrd");
    }

    #[test]
    fn boot_source_rejects_missing_and_special_files() {
        let scratch = Scratch::new("boot-bad");
        let kernel = scratch.file("vmlinux", b"kernel");
        let missing = scratch.0.join("missing");

        let err = boot(&missing, None).validate();
        assert!(
            matches!(&err, Err(ConfigError::FileUnusable { what: "kernel image", path, source })
                if path == &missing && source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
        let message = err.map_err(|e| e.to_string()).expect_err("missing kernel");
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");

        let err = boot(&scratch.0, None).validate();
        assert!(
            matches!(
                err,
                Err(ConfigError::NotAFile {
                    kind: "directory",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = boot(&kernel, Some(&missing)).validate();
        assert!(
            matches!(err, Err(ConfigError::FileUnusable { what: "initrd", .. })),
            "{err:?}"
        );
        let err = boot(Path::new("/dev/null"), None).validate();
        assert!(
            matches!(
                err,
                Err(ConfigError::NotAFile {
                    kind: "character device",
                    ..
                })
            ),
            "{err:?}"
        );
        let mut config = boot(&kernel, None);
        config.boot_args = Some("console=ttyS0\0".into());
        assert!(matches!(config.validate(), Err(ConfigError::BootArgsNul)));
    }

    #[test]
    fn boot_source_rejects_unreadable_kernel() {
        use std::os::unix::fs::PermissionsExt;
        if running_as_root() {
            eprintln!("skipped: root can read files without read permission");
            return;
        }
        let scratch = Scratch::new("boot-unreadable");
        let kernel = scratch.file("vmlinux", b"kernel");
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let err = boot(&kernel, None).validate();
        assert!(
            matches!(&err, Err(ConfigError::FileUnusable { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{err:?}"
        );
    }

    fn drive(id: &str, path: &Path, read_only: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: path.to_path_buf(),
            is_root_device: true,
            is_read_only: read_only,
            partuuid: None,
            cache_type: CacheType::default(),
            io_engine: IoEngine::default(),
            rate_limiter: None,
        }
    }

    #[test]
    fn drive_accepts_good_ids_and_files() {
        let scratch = Scratch::new("drive-ok");
        let disk = scratch.file("disk.img", &[0; 512]);
        for id in ["rootfs", "a", "scratch_2", "data-disk", "ABC123"] {
            drive(id, &disk, false).validate().expect(id);
        }
        drive("ro", &disk, true)
            .validate()
            .expect("read-only drive");
    }

    #[test]
    fn drive_rejects_bad_ids() {
        let scratch = Scratch::new("drive-ids");
        let disk = scratch.file("disk.img", &[0; 512]);
        let err = drive("", &disk, false).validate();
        assert!(
            matches!(err, Err(ConfigError::EmptyId { kind: "drive" })),
            "{err:?}"
        );
        for id in ["a b", "a/b", "a.b", "dr\u{e9}ve", "x%20", "a\0"] {
            let err = drive(id, &disk, false).validate();
            assert!(
                matches!(&err, Err(ConfigError::InvalidId { id: got, .. }) if got == id),
                "{id:?}: {err:?}"
            );
        }
    }

    #[test]
    fn drive_rejects_missing_and_special_files() {
        let scratch = Scratch::new("drive-bad");
        let missing = scratch.0.join("missing.img");
        let err = drive("rootfs", &missing, false).validate();
        assert!(
            matches!(&err, Err(ConfigError::FileUnusable { what: "drive backing file", path, .. })
                if path == &missing),
            "{err:?}"
        );
        let err = drive("rootfs", &scratch.0, true).validate();
        assert!(
            matches!(
                err,
                Err(ConfigError::NotAFile {
                    kind: "directory",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn drive_read_write_needs_write_permission() {
        use std::os::unix::fs::PermissionsExt;
        if running_as_root() {
            eprintln!("skipped: root can write files without write permission");
            return;
        }
        let scratch = Scratch::new("drive-ro-file");
        let disk = scratch.file("disk.img", &[0; 512]);
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        drive("rootfs", &disk, true)
            .validate()
            .expect("a read-only drive needs only read permission");
        let err = drive("rootfs", &disk, false).validate();
        assert!(
            matches!(&err, Err(ConfigError::FileUnusable { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied),
            "{err:?}"
        );
    }

    #[test]
    fn drive_update_checks_id_and_path() {
        let scratch = Scratch::new("drive-update");
        let disk = scratch.file("disk.img", &[0; 512]);
        let update = DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: Some(disk),
            rate_limiter: None,
        };
        update.validate().expect("valid update");
        let update = DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: None,
            rate_limiter: None,
        };
        update.validate().expect("an update without a new path");
        let update = DriveUpdate {
            drive_id: "root fs".into(),
            path_on_host: None,
            rate_limiter: None,
        };
        assert!(matches!(
            update.validate(),
            Err(ConfigError::InvalidId { .. })
        ));
        let update = DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: Some(scratch.0.join("missing")),
            rate_limiter: None,
        };
        assert!(matches!(
            update.validate(),
            Err(ConfigError::FileUnusable { .. })
        ));
    }
}
