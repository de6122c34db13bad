//! The default kernel for real: Debian's linux-image-cloud-amd64 (installed by
//! scripts/setup.sh) imported with a generated initramfs, the initramfs checked against the
//! kernel's own modules.dep, then booted under QEMU TCG on q35 with an ext4 root disk.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use kiln_kernel::cpio::read_newc;
use kiln_kernel::{
    find_host_kernel, DefaultKernelOptions, InitrdKind, KernelFormat, KernelRecord, KernelStore,
    DEFAULT_KERNEL_NAME,
};

/// Modules the generated initramfs must load on Debian's cloud kernel.
const NEEDED: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

fn host_modules_dep(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let text = fs::read_to_string(dir.join("modules.dep")).expect("modules.dep");
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, deps)| {
            (
                kiln_kernel::modules::module_name(m),
                deps.split_whitespace()
                    .map(kiln_kernel::modules::module_name)
                    .collect(),
            )
        })
        .collect()
}

/// Boots under QEMU TCG q35; returns the console output and whether QEMU exited by itself.
fn boot(kernel: &Path, initrd: &Path, disk: &Path, append: &str) -> (String, bool) {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "5", "120", "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-M", "q35", "-cpu", "max", "-m", "512"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .arg("-drive")
        .arg(format!(
            "if=none,id=d,file={},format=raw,cache=unsafe",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d"])
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-system-x86_64 (Debian package qemu-system-x86)");
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    eprintln!(
        "--- boot ({append}) took {:.1}s, status {:?} ---\n{console}\n--- stderr ---\n{}",
        start.elapsed().as_secs_f64(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (console, out.status.success())
}

/// A small ext4 root disk (built with mkfs.ext4 -d, no mounts) whose /sbin/init prints
/// markers and powers off.
fn root_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("disk-root");
    fs::create_dir_all(tree.join("bin")).expect("mkdir");
    fs::create_dir_all(tree.join("sbin")).expect("mkdir");
    fs::copy(busybox(), tree.join("bin/busybox")).expect("busybox");
    let init = "#!/bin/busybox sh\n\
        export PATH=/bin\n\
        /bin/busybox echo \"KILN-TEST-ROOT-INIT pid=$$\"\n\
        /bin/busybox grep -q ' / ext4 ' /proc/mounts && /bin/busybox echo KILN-TEST-ROOT-IS-EXT4\n\
        [ -c /dev/null ] && [ -d /sys/class ] && /bin/busybox echo KILN-TEST-DEV-SYS-OK\n\
        /bin/busybox echo \"KILN-TEST-MODULES $(/bin/busybox cut -d' ' -f1 /proc/modules | /bin/busybox tr '\\n' ' ')\"\n\
        /bin/busybox sync\n\
        /bin/busybox reboot -f\n";
    fs::write(tree.join("sbin/init"), init).expect("init");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tree.join("sbin/init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let disk = dir.join("disk.ext4");
    let f = fs::File::create(&disk).expect("disk");
    f.set_len(32 << 20).expect("size");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "kiln-test", "-d"])
        .arg(&tree)
        .arg(&disk)
        .status()
        .expect("mkfs.ext4 (Debian package e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 -d failed");
    disk
}

fn check_record(rec: &KernelRecord, opts: &DefaultKernelOptions) {
    let host =
        find_host_kernel(opts).expect("Debian's cloud kernel is installed (scripts/setup.sh)");
    assert_eq!(rec.name, DEFAULT_KERNEL_NAME);
    assert_eq!(rec.format, KernelFormat::BzImage);
    assert_eq!(rec.release.as_deref(), Some(host.release.as_str()));
    let version = rec.version.clone().expect("version string");
    assert!(
        version.starts_with(&format!("{} (", host.release)),
        "{version}"
    );
    assert_eq!(
        fs::read(&rec.kernel_path).expect("stored kernel"),
        fs::read(&host.kernel).expect("host kernel")
    );
    let mdir = rec.modules_dir.clone().expect("modules dir");
    assert!(mdir.ends_with(&host.release));
    assert!(mdir.join("modules.dep").is_file());
    assert_eq!(
        fs::read(mdir.join("modules.dep")).expect("stored"),
        fs::read(host.modules_dir.join("modules.dep")).expect("host")
    );
    let info = rec.initrd.clone().expect("initrd");
    assert_eq!(info.kind, InitrdKind::Generated);
    assert!(
        info.builtin.contains(&"ext4".to_string()),
        "{:?}",
        info.builtin
    );

    // The initramfs: a valid newc archive with every needed module, each after its deps.
    let data = fs::read(rec.initrd_path.as_ref().expect("initrd path")).expect("initrd");
    let entries = read_newc(&gunzip(&data)).expect("valid newc archive");
    let list = entries
        .iter()
        .find(|e| e.name == "etc/kiln/modules")
        .expect("module list");
    let order: Vec<String> = String::from_utf8_lossy(&list.data)
        .lines()
        .map(kiln_kernel::modules::module_name)
        .collect();
    assert_eq!(order, info.modules);
    let deps = host_modules_dep(&host.modules_dir);
    for needed in NEEDED {
        assert!(
            order.iter().any(|m| m == needed),
            "{needed} missing from {order:?}"
        );
    }
    for (i, m) in order.iter().enumerate() {
        for d in deps.get(m).expect("module in modules.dep") {
            let at = order.iter().position(|x| x == d);
            assert!(
                at.is_some_and(|at| at < i),
                "{m} needs {d} loaded first: {order:?}"
            );
        }
    }
    for line in String::from_utf8_lossy(&list.data).lines() {
        let path = format!("lib/modules/{}/{line}", host.release);
        let e = entries
            .iter()
            .find(|e| e.name == path)
            .unwrap_or_else(|| panic!("{path} not in the initramfs"));
        assert!(
            e.data.starts_with(b"\x7fELF"),
            "{path} is a decompressed module"
        );
    }
    for f in [
        "init",
        "bin/busybox",
        "bin/sh",
        "dev/console",
        "etc/kiln/release",
    ] {
        assert!(entries.iter().any(|e| e.name == f), "{f} missing");
    }
}

#[test]
fn debian_cloud_kernel_imports_and_boots() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let opts = DefaultKernelOptions {
        busybox: Some(busybox()),
        ..DefaultKernelOptions::default()
    };
    let store = KernelStore::open(&root).expect("open");
    let t = Instant::now();
    let rec = store
        .ensure_default(&opts)
        .expect("import the default kernel");
    eprintln!(
        "default kernel imported in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    check_record(&rec, &opts);
    // A second ensure reuses it.
    let again = store.ensure_default(&opts).expect("ensure again");
    assert_eq!(again, rec);
    assert_eq!(store.list().expect("list"), vec![rec.clone()]);

    // Boot it: once with the root disk (switch_root into the disk's init), and once with a root
    // that never appears (a clear failure and power-off, not a hang). In parallel: 2 cores.
    let disk = root_disk(tmp.path());
    let disk2 = tmp.path().join("disk2.ext4");
    fs::copy(&disk, &disk2).expect("second disk (QEMU locks each image)");
    let kernel = rec.kernel_path.clone();
    let initrd = rec.initrd_path.clone().expect("initrd");
    let (good, bad) = std::thread::scope(|s| {
        let good = s.spawn(|| {
            boot(
                &kernel,
                &initrd,
                &disk,
                "console=ttyS0 panic=-1 root=/dev/vda quiet",
            )
        });
        let bad = s.spawn(|| {
            boot(
                &kernel,
                &initrd,
                &disk2,
                "console=ttyS0 panic=-1 root=/dev/vdz kiln.rootwait=2 quiet",
            )
        });
        (
            good.join().expect("boot thread"),
            bad.join().expect("boot thread"),
        )
    });

    let (console, exited) = good;
    assert!(exited, "QEMU did not exit by itself (timeout?)");
    for marker in [
        "kiln-initramfs: started: kernel ",
        "kiln-initramfs: loaded ",
        "kiln-initramfs: root disk /dev/vda is ready",
        "kiln-initramfs: mounted /dev/vda on / (ext4, rw)",
        "kiln-initramfs: switching to the root filesystem, running /sbin/init",
        "KILN-TEST-ROOT-INIT pid=1",
        "KILN-TEST-ROOT-IS-EXT4",
        "KILN-TEST-DEV-SYS-OK",
    ] {
        assert!(
            console.contains(marker),
            "missing {marker:?} in the console"
        );
    }
    let modules_line = console
        .lines()
        .find(|l| l.starts_with("KILN-TEST-MODULES"))
        .expect("module list from the root's init");
    for needed in NEEDED {
        assert!(
            modules_line.contains(needed),
            "{needed} not loaded: {modules_line}"
        );
    }
    assert!(
        !console.contains("WARNING: insmod"),
        "a module failed to load"
    );
    assert!(!console.contains("FATAL"));

    let (console, exited) = bad;
    assert!(exited, "QEMU did not exit by itself after the failure");
    assert!(
        console.contains("kiln-initramfs: FATAL: root disk /dev/vdz did not appear within 2s"),
        "missing the failure message"
    );
    assert!(console.contains("kiln-initramfs: powering off"));
    assert!(!console.contains("KILN-TEST-ROOT-INIT"));
}
