//! PID-1 bring-up: what the busybox `/init` script did (modules, root disk, switch_root), then
//! the guest's `/dev`, `/run`, `/tmp` and `lo`, then the protocol service, then power-off.
//!
//! Any failure before the transport is up prints `kiln-init: FATAL: ...` on the console and
//! powers the VM off: kiln boots guests with `reboot=k`, and both hypervisors end the VM when
//! it resets, so that is how the host learns the VM is gone.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent_protocol::{SERIAL_PORT_NAME, VSOCK_PORT};

use crate::agent::{self, Mode};
use crate::cmdline::{self, BootOptions, TransportKind};
use crate::sys::{self, cstr, cvt};
use crate::transport::{self, Transport};

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Runs the guest: never returns (the VM powers off at the end).
pub fn run() -> ! {
    let transport = match bring_up() {
        Ok(t) => t,
        Err(e) => fatal(&e),
    };
    debug!(
        "serving the agent protocol ({} ms after boot)",
        sys::boot_ms()
    );
    match agent::serve(transport, Mode::Pid1) {
        Ok(()) => debug!("shutdown requested"),
        Err(e) => error!("the agent stopped: {e}"),
    }
    power_off()
}

/// Prints why the boot failed and powers off.
pub fn fatal(message: &str) -> ! {
    error!("FATAL: {message}");
    error!("powering off");
    power_off()
}

/// Syncs, remounts `/` read-only (best effort) and resets the VM.
pub fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if let Ok(root) = CString::new("/") {
        // SAFETY: remounting / read-only with valid strings; failure is fine (busy, or the
        // root never got mounted).
        unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            );
        }
    }
    loop {
        // SAFETY: reboot only resets the machine; as PID 1 we hold CAP_SYS_BOOT.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        // It returned: nothing else to do but not exit (PID 1 exiting panics the kernel).
        sys::sleep(Duration::from_secs(1));
    }
}

/// Everything from the first mount to an open transport.
fn bring_up() -> Result<Transport, String> {
    mount_if_needed("proc", Path::new("/proc"), "proc")?;
    mount_if_needed("sysfs", Path::new("/sys"), "sysfs")?;
    mount_if_needed("devtmpfs", Path::new("/dev"), "devtmpfs")?;

    let raw =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let words = cmdline::split(raw.trim());
    let opts = cmdline::parse(&words);
    crate::log::set_debug(opts.debug);
    for w in &opts.warnings {
        error!("WARNING: {w}");
    }
    debug!(
        "started {} ms after boot: {} root={} ({}, {})",
        sys::boot_ms(),
        crate::AGENT_VERSION,
        opts.root,
        opts.rootfstype,
        if opts.read_only { "ro" } else { "rw" }
    );

    load_modules(&words);
    let dev = wait_for_root(&opts)?;
    mount_root(&dev, &opts)?;
    switch_root()?;
    setup_guest();
    let t = open_transport(&opts)?;
    Ok(t)
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    let Some(parent) = path.parent() else {
        return true;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

fn mount_if_needed(source: &str, target: &Path, fstype: &str) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    if is_mountpoint(target) {
        return Ok(());
    }
    let mut flags = libc::MS_NOSUID;
    if fstype != "devtmpfs" {
        flags |= libc::MS_NOEXEC | libc::MS_NODEV;
    }
    sys::mount(source, target, fstype, flags, None)
        .map_err(|e| format!("cannot mount {fstype} on {}: {e}", target.display()))
}

/// Loads the modules in `/etc/kiln/modules` (dependencies first), with parameters from the
/// command line. A module that fails is reported and skipped: the disk or transport may not
/// need it, and if they do, the error that follows says which device is missing.
fn load_modules(words: &[String]) {
    let release = std::fs::read_to_string("/etc/kiln/release").unwrap_or_default();
    let release = release.trim();
    let list = std::fs::read_to_string("/etc/kiln/modules").unwrap_or_default();
    let base = Path::new("/lib/modules").join(release);
    let mut loaded = 0;
    for rel in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = cmdline::module_name(rel);
        let params = cmdline::module_params(words, &name);
        match load_module(&base.join(rel), &params) {
            Ok(()) => loaded += 1,
            Err(e) => error!("WARNING: loading module {name}: {e}"),
        }
    }
    debug!("loaded {loaded} modules");
}

fn load_module(path: &Path, params: &str) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::new(params)?;
    // SAFETY: finit_module reads the module from the open fd and the NUL-terminated params.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Waits up to `kiln.rootwait` for the root disk and returns its device node.
fn wait_for_root(opts: &BootOptions) -> Result<PathBuf, String> {
    let root = opts.root.as_str();
    let by_id = root.starts_with("UUID=") || root.starts_with("LABEL=");
    if !by_id && !root.starts_with("/dev/") {
        return Err(format!(
            "unsupported root={root} (use /dev/NAME, UUID=... or LABEL=...)"
        ));
    }
    let end = Instant::now() + opts.rootwait;
    loop {
        let found = if by_id {
            find_by_id(root)
        } else {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(root)
                .ok()
                .filter(|m| m.file_type().is_block_device())
                .map(|_| PathBuf::from(root))
        };
        if let Some(dev) = found {
            debug!("root disk {} is ready", dev.display());
            return Ok(dev);
        }
        if Instant::now() >= end {
            let devices: Vec<String> = std::fs::read_dir("/sys/class/block")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "root disk {root} did not appear within {}s (block devices: {})",
                opts.rootwait.as_secs(),
                if devices.is_empty() {
                    "none".to_string()
                } else {
                    devices.join(" ")
                }
            ));
        }
        sys::sleep(Duration::from_millis(10));
    }
}

/// The block device whose ext2/3/4 superblock has the `UUID=` or `LABEL=` of `spec`.
fn find_by_id(spec: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/block").ok()?;
    for entry in dir.flatten() {
        let dev = Path::new("/dev").join(entry.file_name());
        let Ok(mut f) = std::fs::File::open(&dev) else {
            continue;
        };
        let mut sb = [0u8; 1024];
        use std::io::{Read, Seek, SeekFrom};
        if f.seek(SeekFrom::Start(1024)).is_err() || f.read_exact(&mut sb).is_err() {
            continue;
        }
        if ext_matches(&sb, spec) {
            return Some(dev);
        }
    }
    None
}

/// Whether an ext2/3/4 superblock (the 1024 bytes at offset 1024) has the `UUID=`/`LABEL=`
/// of `spec`.
pub fn ext_matches(sb: &[u8], spec: &str) -> bool {
    if sb.len() < 0x88 || sb[0x38..0x3a] != [0x53, 0xef] {
        return false;
    }
    if let Some(uuid) = spec.strip_prefix("UUID=") {
        let u = &sb[0x68..0x78];
        let text = format!(
            "{}-{}-{}-{}-{}",
            hex(&u[0..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..16])
        );
        return text.eq_ignore_ascii_case(uuid);
    }
    if let Some(label) = spec.strip_prefix("LABEL=") {
        let l = &sb[0x78..0x88];
        let end = l.iter().position(|&b| b == 0).unwrap_or(l.len());
        return &l[..end] == label.as_bytes();
    }
    false
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Mount flags for the generic options among `rootflags` (which `mount(2)` takes as flags,
/// not as file system data) and the rest as the data string.
pub fn split_mount_options(options: &str) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "lazytime" => flags |= libc::MS_LAZYTIME,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => flags |= libc::MS_DIRSYNC,
            "defaults" | "atime" | "suid" | "dev" | "exec" | "async" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn mount_root(dev: &Path, opts: &BootOptions) -> Result<(), String> {
    let (mut flags, data) = split_mount_options(&opts.rootflags);
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    let newroot = Path::new("/newroot");
    std::fs::create_dir_all(newroot).map_err(|e| format!("mkdir /newroot: {e}"))?;
    let source = dev.to_string_lossy();
    sys::mount(
        &source,
        newroot,
        &opts.rootfstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| {
        format!(
            "cannot mount {source} ({}, {}): {e}",
            opts.rootfstype,
            if opts.rootflags.is_empty() {
                "no flags"
            } else {
                &opts.rootflags
            }
        )
    })?;
    debug!("mounted {source} on / ({})", opts.rootfstype);
    Ok(())
}

/// Moves `/dev`, `/proc` and `/sys` into `/newroot`, empties the initramfs and makes
/// `/newroot` the root, as busybox `switch_root` does. This program keeps running from
/// memory: its file was in the initramfs.
fn switch_root() -> Result<(), String> {
    let newroot = Path::new("/newroot");
    for d in ["dev", "proc", "sys"] {
        let from = Path::new("/").join(d);
        let to = newroot.join(d);
        if !to.is_dir() && std::fs::create_dir_all(&to).is_err() {
            error!(
                "WARNING: no /{d} in the read-only root file system; leaving it unmounted there"
            );
            if let Ok(c) = cstr(&from) {
                // SAFETY: lazy unmount of our own mount with a valid path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            continue;
        }
        sys::mount_move(&from, &to)
            .map_err(|e| format!("cannot move /{d} into the root file system: {e}"))?;
    }

    delete_initramfs();

    std::env::set_current_dir(newroot).map_err(|e| format!("chdir /newroot: {e}"))?;
    sys::mount_move(Path::new("."), Path::new("/"))
        .map_err(|e| format!("cannot move the root file system to /: {e}"))?;
    let dot = CString::new(".").map_err(|e| e.to_string())?;
    // SAFETY: chroot with a valid path.
    cvt(unsafe { libc::chroot(dot.as_ptr()) }).map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    debug!("switched to the root file system");
    Ok(())
}

/// Frees the initramfs' memory by deleting its files, but only if `/` really is the
/// initramfs (ramfs or tmpfs), and never crossing into another mount (`/newroot`).
fn delete_initramfs() {
    // SAFETY: a zeroed statfs is valid for statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let Ok(root) = CString::new("/") else { return };
    // SAFETY: valid path and buffer.
    if unsafe { libc::statfs(root.as_ptr(), &mut st) } != 0 {
        return;
    }
    let magic = st.f_type as i64;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        error!("WARNING: / is not the initramfs; not deleting its files");
        return;
    }
    let Ok(m) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_tree_on(Path::new("/"), m.dev());
}

fn remove_tree_on(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            remove_tree_on(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The guest's `/dev/pts`, `/dev/shm`, `/dev` symlinks, `/run`, `/tmp` and `lo`. Failures are
/// warnings: a read-only image without `/run` still runs.
fn setup_guest() {
    let warn = |what: &str, e: &dyn std::fmt::Display| error!("WARNING: {what}: {e}");
    let mount = |src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str| {
        let t = Path::new(target);
        if !t.is_dir() {
            if let Err(e) = std::fs::create_dir_all(t) {
                warn(&format!("mkdir {target}"), &e);
                return;
            }
        }
        if is_mountpoint(t) {
            return;
        }
        if let Err(e) = sys::mount(src, t, fstype, flags, Some(data)) {
            warn(&format!("mount {fstype} on {target}"), &e);
        }
    };
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    );
    if std::fs::symlink_metadata("/dev/ptmx").is_err() {
        if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
            warn("/dev/ptmx", &e);
        }
    }
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                warn(link, &e);
            }
        }
    }
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    // tmpfs honours mode=, but an existing /tmp directory we could not mount over keeps its
    // own; make sure the mount point is what programs expect either way.
    let _ = std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777));
    if let Err(e) = crate::net::interface_up("lo") {
        warn("bringing up lo", &e);
    }
}

/// Opens the transport `kiln.transport` names, or whichever device shows up first.
fn open_transport(opts: &BootOptions) -> Result<Transport, String> {
    let sys_root = Path::new("/sys");
    let end = Instant::now() + opts.rootwait;
    loop {
        let vsock = opts.transport != Some(TransportKind::Serial)
            && (opts.transport == Some(TransportKind::Vsock)
                || transport::vsock_device_present(sys_root));
        if vsock {
            debug!("listening on vsock port {VSOCK_PORT}");
            return transport::listen_vsock(VSOCK_PORT)
                .map_err(|e| format!("cannot listen on vsock port {VSOCK_PORT}: {e}"));
        }
        if opts.transport != Some(TransportKind::Vsock) {
            if let Some(dev) = transport::find_serial_port(sys_root, SERIAL_PORT_NAME) {
                if dev.exists() {
                    debug!("serving on {}", dev.display());
                    return transport::open_serial(&dev)
                        .map_err(|e| format!("cannot open {}: {e}", dev.display()));
                }
            }
        }
        if Instant::now() >= end {
            return Err(format!(
                "no agent transport within {}s: neither a virtio-vsock device nor a virtio-console port named {SERIAL_PORT_NAME}",
                opts.rootwait.as_secs()
            ));
        }
        sys::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_mount_options_become_flags() {
        let (flags, data) = split_mount_options("noatime,data=ordered,ro,,errors=remount-ro");
        assert_eq!(flags, libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!(data, "data=ordered,errors=remount-ro");
        assert_eq!(split_mount_options(""), (0, String::new()));
    }

    #[test]
    fn ext_superblocks_match_uuid_and_label() {
        let mut sb = vec![0u8; 1024];
        sb[0x38] = 0x53;
        sb[0x39] = 0xef;
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        sb[0x68..0x78].copy_from_slice(&uuid);
        sb[0x78..0x7c].copy_from_slice(b"root");
        assert!(ext_matches(
            &sb,
            "UUID=12345678-9abc-def0-0123-456789abcdef"
        ));
        assert!(ext_matches(
            &sb,
            "UUID=12345678-9ABC-DEF0-0123-456789ABCDEF"
        ));
        assert!(!ext_matches(
            &sb,
            "UUID=12345678-9abc-def0-0123-456789abcdee"
        ));
        assert!(ext_matches(&sb, "LABEL=root"));
        assert!(!ext_matches(&sb, "LABEL=roo"));
        sb[0x38] = 0;
        assert!(!ext_matches(&sb, "LABEL=root"));
    }
}
