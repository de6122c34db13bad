//! Module resolution, compressed modules, the generated initramfs and the store, on synthetic
//! kernels and module trees (fast; no real kernel needed).

mod common;

use std::fs;
use std::path::Path;

use common::*;
use kiln_kernel::cpio::{read_newc, S_IFCHR, S_IFLNK, S_IFREG};
use kiln_kernel::{
    default_module_requests, Error, ImportOptions, InitramfsBuilder, InitrdChoice, InitrdKind,
    KernelFormat, KernelStore, ModuleIndex, ModuleRequest,
};

fn names(order: &[kiln_kernel::ResolvedModule]) -> Vec<&str> {
    order.iter().map(|m| m.name.as_str()).collect()
}

fn pos(list: &[&str], name: &str) -> usize {
    list.iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("{name} missing from {list:?}"))
}

#[test]
fn modules_dep_resolution_orders_dependencies_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::None);
    let index = ModuleIndex::load(&dir).expect("load index");
    let res = index
        .resolve(&default_module_requests())
        .expect("resolve the default modules");
    let order = names(&res.order);
    // Every module after all of its dependencies, each once.
    assert_eq!(
        order,
        [
            "virtio_ring",
            "virtio",
            "virtio_mmio",
            "virtio_blk",
            "failover",
            "net_failover",
            "virtio_net",
            "virtio_rng",
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
        ]
    );
    assert!(pos(&order, "virtio_ring") < pos(&order, "virtio"));
    assert!(pos(&order, "failover") < pos(&order, "net_failover"));
    // Built in: nothing to load; not present at all and optional: reported as missing.
    assert_eq!(res.builtin, ["virtio_console", "ext4"]);
    assert_eq!(res.missing, ["virtio_pci"]);
    assert!(!order.contains(&"unrelated"));
}

#[test]
fn modules_dep_resolution_errors() {
    let dir = Path::new("/synthetic");
    // A required module in neither form.
    let index = ModuleIndex::parse(dir, "a.ko:\n", "").expect("parse");
    let err = index
        .resolve(&[ModuleRequest::required("virtio_blk")])
        .expect_err("missing required module");
    assert!(matches!(err, Error::ModuleNotFound { .. }), "{err}");
    assert!(err.to_string().contains("virtio_blk"), "{err}");
    // A cycle is reported, not looped on.
    let index = ModuleIndex::parse(dir, "x/a.ko: x/b.ko\nx/b.ko: x/a.ko\n", "").expect("parse");
    let err = index
        .resolve(&[ModuleRequest::required("a")])
        .expect_err("cycle");
    assert!(err.to_string().contains("cycle"), "{err}");
    // A dependency without its own line.
    let index = ModuleIndex::parse(dir, "x/a.ko: x/gone.ko\n", "").expect("parse");
    let err = index
        .resolve(&[ModuleRequest::required("a")])
        .expect_err("dangling dependency");
    assert!(err.to_string().contains("gone"), "{err}");
    // `-` and `_` name the same module; deep chains resolve fully.
    let index = ModuleIndex::parse(
        dir,
        "k/top-mod.ko: k/mid.ko k/base.ko\nk/mid.ko: k/base.ko\nk/base.ko:\n",
        "",
    )
    .expect("parse");
    let res = index
        .resolve(&[ModuleRequest::required("top_mod")])
        .expect("resolve");
    assert_eq!(names(&res.order), ["base", "mid", "top_mod"]);
    assert_eq!(res.order[2].path, "k/top-mod.ko");
}

fn build_initramfs(dir: &Path, busybox: &Path) -> kiln_kernel::Initramfs {
    InitramfsBuilder::new()
        .modules_dir(dir)
        .busybox(Some(busybox.to_path_buf()))
        .build()
        .expect("build initramfs")
}

#[test]
fn compressed_modules_are_stored_decompressed() {
    for comp in [Comp::Xz, Comp::Zst, Comp::None] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = fake_modules_tree(tmp.path(), "6.6.6-test", comp);
        let built = build_initramfs(&dir, &fake_busybox(tmp.path()));
        let entries = read_newc(&gunzip(&built.data)).expect("valid newc");
        let list = entries
            .iter()
            .find(|e| e.name == "etc/kiln/modules")
            .expect("module list");
        let list = String::from_utf8(list.data.clone()).expect("utf-8");
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), built.modules.len());
        for (line, m) in lines.iter().zip(&built.modules) {
            assert!(line.ends_with(".ko"), "{comp:?}: {line}");
            let entry = entries
                .iter()
                .find(|e| e.name == format!("lib/modules/6.6.6-test/{line}"))
                .unwrap_or_else(|| panic!("{comp:?}: {line} not in the archive"));
            assert_eq!(entry.data, fake_module(&m.name), "{comp:?}: {line} content");
        }
    }
}

#[test]
fn bad_compressed_modules_are_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::Xz);
    let busybox = fake_busybox(tmp.path());
    // Corrupt one xz module.
    let blk = dir.join("kernel/drivers/block/virtio_blk.ko.xz");
    fs::write(&blk, b"\xfd7zXZ\0garbage").expect("corrupt");
    let err = InitramfsBuilder::new()
        .modules_dir(&dir)
        .busybox(Some(busybox.clone()))
        .build()
        .expect_err("corrupt xz");
    assert!(matches!(err, Error::Decompress { .. }), "{err}");
    assert!(err.to_string().contains("virtio_blk.ko.xz"), "{err}");
    // An unknown compression.
    let dep = "kernel/a.ko.bz2:\n";
    fs::write(dir.join("modules.dep"), dep).expect("dep");
    fs::write(dir.join("kernel/a.ko.bz2"), b"BZh").expect("module");
    let err = InitramfsBuilder::new()
        .modules_dir(&dir)
        .modules(vec![ModuleRequest::required("a")])
        .busybox(Some(busybox))
        .build()
        .expect_err("bz2");
    assert!(
        err.to_string().contains("unknown module compression"),
        "{err}"
    );
}

#[test]
fn initramfs_layout_and_cpio_listing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::Zst);
    let built = build_initramfs(&dir, &busybox());
    let cpio = gunzip(&built.data);
    let entries = read_newc(&cpio).expect("valid newc");
    let find = |n: &str| {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let init = find("init");
    assert_eq!(init.kind(), S_IFREG);
    assert_eq!(init.mode & 0o777, 0o755);
    assert!(String::from_utf8_lossy(&init.data).contains("switch_root"));
    assert_eq!(find("dev/console").kind(), S_IFCHR);
    assert_eq!(find("dev/console").rdev, (5, 1));
    assert_eq!(find("bin/sh").kind(), S_IFLNK);
    assert_eq!(
        find("bin/busybox").data,
        fs::read(busybox()).expect("busybox")
    );
    assert_eq!(find("etc/kiln/release").data, b"6.6.6-test\n");
    // Parents always come before their children (the kernel creates entries in order).
    for (i, e) in entries.iter().enumerate() {
        if let Some((parent, _)) = e.name.rsplit_once('/') {
            let p = entries.iter().position(|x| x.name == parent);
            assert!(p.is_some_and(|p| p < i), "{} before its parent", e.name);
        }
    }
    // Debian's cpio reads it too.
    let mut child = std::process::Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run cpio (Debian package cpio)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&cpio).expect("feed cpio");
    }
    let out = child.wait_with_output().expect("cpio -t");
    assert!(out.status.success(), "cpio -t failed");
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let ours: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(listed, ours);
    // Deterministic: the same inputs give the same bytes.
    assert_eq!(build_initramfs(&dir, &busybox()).data, built.data);
}

#[test]
fn custom_init_replaces_the_script() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::None);
    let built = InitramfsBuilder::new()
        .modules_dir(&dir)
        .with_init(fake_busybox(tmp.path()))
        .build()
        .expect("build");
    let entries = read_newc(&gunzip(&built.data)).expect("newc");
    let init = entries.iter().find(|e| e.name == "init").expect("init");
    assert_eq!(
        init.data,
        fs::read(tmp.path().join("fake-busybox")).expect("busybox")
    );
    assert!(!entries.iter().any(|e| e.name == "bin/busybox"));
    assert!(entries.iter().any(|e| e.name == "etc/kiln/modules"));
    // A dynamically linked program cannot be an initramfs init.
    if Path::new("/bin/ls").exists() {
        let err = InitramfsBuilder::new()
            .with_init("/bin/ls")
            .build()
            .expect_err("dynamic init");
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }
}

fn synthetic_options(modules: &Path) -> ImportOptions {
    let busybox = modules.with_file_name("fake-busybox");
    if !busybox.exists() {
        fake_busybox(modules.parent().expect("parent"));
    }
    ImportOptions {
        modules_dir: Some(modules.to_path_buf()),
        busybox: Some(busybox),
        ..ImportOptions::default()
    }
}

#[test]
fn import_file_records_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let kernel = tmp.path().join("vmlinuz-6.6.6-test");
    fs::write(&kernel, fake_bzimage("6.6.6-test (kiln@test) #1 SMP")).expect("kernel");
    let modules = fake_modules_tree(&tmp.path().join("lib/modules"), "6.6.6-test", Comp::Xz);
    let store = KernelStore::open(&root).expect("open");
    // --modules may name lib/modules/<release>, lib/modules, or the directory holding lib/.
    let rec = store
        .import_file(&kernel, &synthetic_options(&tmp.path().join("lib/modules")))
        .expect("import");
    assert_eq!(rec.name, "6.6.6-test", "default name is the release");
    assert_eq!(rec.format, KernelFormat::BzImage);
    assert_eq!(rec.release.as_deref(), Some("6.6.6-test"));
    assert_eq!(
        rec.version.as_deref(),
        Some("6.6.6-test (kiln@test) #1 SMP")
    );
    assert_eq!(
        fs::read(&rec.kernel_path).expect("kernel"),
        fs::read(&kernel).expect("src")
    );
    let mdir = rec.modules_dir.clone().expect("modules dir");
    assert!(mdir.ends_with("6.6.6-test"));
    assert_eq!(files_under(&mdir), files_under(&modules));
    let initrd = rec.initrd.clone().expect("initrd");
    assert_eq!(initrd.kind, InitrdKind::Generated);
    assert_eq!(
        initrd.modules.first().map(String::as_str),
        Some("virtio_ring")
    );
    assert!(rec.initrd_path.as_ref().is_some_and(|p| p.is_file()));
    assert_eq!(store.get("6.6.6-test").expect("get"), rec);

    let again = store
        .import_file(
            &kernel,
            &synthetic_options(&tmp.path().join("lib/modules/6.6.6-test")),
        )
        .expect_err("name in use");
    assert!(matches!(again, Error::NameInUse { .. }), "{again}");

    // The same content under another name shares every file.
    let rec2 = store
        .import_file(
            &kernel,
            &ImportOptions {
                name: Some("other".into()),
                ..synthetic_options(tmp.path())
            },
        )
        .expect("import again");
    assert_eq!(rec2.kernel_path, rec.kernel_path);
    assert_eq!(rec2.modules_dir, rec.modules_dir);
    assert_eq!(rec2.initrd_path, rec.initrd_path);

    // A provided initramfs is stored as is; no initramfs and no modules is allowed too.
    let mine = tmp.path().join("my-initrd.img");
    fs::write(&mine, b"not really an initrd").expect("initrd");
    let rec3 = store
        .import_file(
            &kernel,
            &ImportOptions {
                name: Some("provided".into()),
                initrd: InitrdChoice::File(mine.clone()),
                ..ImportOptions::default()
            },
        )
        .expect("import with --initrd");
    assert_eq!(
        rec3.initrd.as_ref().map(|i| i.kind),
        Some(InitrdKind::Provided)
    );
    assert_eq!(
        fs::read(rec3.initrd_path.expect("path")).expect("read"),
        b"not really an initrd"
    );
    assert!(rec3.modules_dir.is_none());
    let elf = tmp.path().join("vmlinux");
    fs::write(&elf, fake_vmlinux("5.10.77-ignite")).expect("vmlinux");
    let rec4 = store
        .import_file(&elf, &ImportOptions::default())
        .expect("import ELF without modules");
    assert_eq!(rec4.format, KernelFormat::Elf);
    assert_eq!(rec4.name, "5.10.77-ignite");
    assert!(rec4.initrd.is_none() && rec4.modules.is_none());

    let names: Vec<String> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["5.10.77-ignite", "6.6.6-test", "other", "provided"]);
    for n in &names {
        store.remove(n).expect("rm");
    }
    assert_store_empty(&root);
}

#[test]
fn import_errors_leave_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let store = KernelStore::open(&root).expect("open");
    let err = store
        .import_file(&tmp.path().join("missing"), &ImportOptions::default())
        .expect_err("missing file");
    assert!(err.to_string().contains("missing"), "{err}");
    let junk = tmp.path().join("junk");
    fs::write(&junk, b"hello, not a kernel").expect("junk");
    let err = store
        .import_file(&junk, &ImportOptions::default())
        .expect_err("junk");
    assert!(matches!(err, Error::NotAKernel { .. }), "{err}");
    let kernel = tmp.path().join("vmlinuz");
    fs::write(&kernel, fake_bzimage("6.6.6-test #1")).expect("kernel");
    let err = store
        .import_file(
            &kernel,
            &ImportOptions {
                modules_dir: Some(tmp.path().join("nope")),
                ..ImportOptions::default()
            },
        )
        .expect_err("missing modules dir");
    assert!(err.to_string().contains("nope"), "{err}");
    // Modules that lack a required driver: fails after blobs were written; they are removed.
    let modules = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::None);
    fs::write(modules.join("modules.dep"), "kernel/fs/unrelated.ko:\n").expect("dep");
    let err = store
        .import_file(&kernel, &synthetic_options(&modules))
        .expect_err("no virtio_mmio");
    assert!(matches!(err, Error::ModuleNotFound { .. }), "{err}");
    let err = store
        .import_file(
            &kernel,
            &ImportOptions {
                name: Some("../evil".into()),
                ..ImportOptions::default()
            },
        )
        .expect_err("bad name");
    assert!(matches!(err, Error::InvalidName { .. }), "{err}");
    let err = store.remove("nothing").expect_err("unknown name");
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_store_empty(&root);
}

#[test]
fn concurrent_imports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let kernel = tmp.path().join("vmlinuz");
    fs::write(&kernel, fake_bzimage("6.6.6-test #1")).expect("kernel");
    let modules = fake_modules_tree(tmp.path(), "6.6.6-test", Comp::Zst);
    // The shared busybox exists before the racing threads start.
    fake_busybox(tmp.path());
    let results: Vec<(String, Result<_, Error>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (root, kernel, modules) = (&root, &kernel, &modules);
                s.spawn(move || {
                    // Four distinct names and four racing for the same one.
                    let name = if i < 4 {
                        format!("k{i}")
                    } else {
                        "same".to_string()
                    };
                    let store = KernelStore::open(root).expect("open");
                    let r = store.import_file(
                        kernel,
                        &ImportOptions {
                            name: Some(name.clone()),
                            ..synthetic_options(modules)
                        },
                    );
                    (name, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (name, r) in &results {
        if name != "same" {
            assert!(r.is_ok(), "{name}: {:?}", r.as_ref().err());
        }
    }
    let same: Vec<&Result<_, Error>> = results
        .iter()
        .filter(|(n, _)| n == "same")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        same.iter().filter(|r| r.is_ok()).count(),
        1,
        "one import wins"
    );
    for r in same.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r, Error::NameInUse { .. }), "{r}");
    }
    let store = KernelStore::open(&root).expect("open");
    let list = store.list().expect("list");
    assert_eq!(list.len(), 5);
    // Identical content is stored once: one kernel, one initramfs, one modules tree.
    let blobs = fs::read_dir(root.join("kernels/blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 2);
    assert_eq!(
        fs::read_dir(root.join("kernels/modules"))
            .expect("modules")
            .count(),
        1
    );
    for r in &list {
        assert!(r.kernel_path.is_file() && r.initrd_path.as_ref().is_some_and(|p| p.is_file()));
    }
    // Concurrent removals.
    std::thread::scope(|s| {
        for r in &list {
            let root = &root;
            s.spawn(move || {
                KernelStore::open(root)
                    .expect("open")
                    .remove(&r.name)
                    .expect("rm");
            });
        }
    });
    KernelStore::open(&root).expect("open").gc().expect("gc");
    assert_store_empty(&root);
}

#[test]
fn ensure_default_picks_the_newest_and_follows_upgrades() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let boot = tmp.path().join("boot");
    let lib = tmp.path().join("lib/modules");
    fs::create_dir_all(&boot).expect("boot");
    let add = |release: &str| {
        fs::write(
            boot.join(format!("vmlinuz-{release}")),
            fake_bzimage(&format!("{release} (kiln@test) #1")),
        )
        .expect("kernel");
        fake_modules_tree(&lib, release, Comp::None);
    };
    let opts = kiln_kernel::DefaultKernelOptions {
        boot_dir: boot.clone(),
        modules_root: lib.clone(),
        busybox: Some(fake_busybox(tmp.path())),
        ..kiln_kernel::DefaultKernelOptions::default()
    };
    let store = KernelStore::open(&root).expect("open");
    let err = store
        .ensure_default(&opts)
        .expect_err("no kernel installed");
    assert!(matches!(err, Error::NoDefaultKernel(_)), "{err}");
    assert!(err.to_string().contains("linux-image-cloud-amd64"), "{err}");

    add("6.1.0-9-cloud-amd64");
    add("6.1.0-10-cloud-amd64");
    add("6.1.0-11-amd64"); // another flavour: ignored
    let rec = store.ensure_default(&opts).expect("default");
    assert_eq!(rec.name, "default");
    assert_eq!(rec.release.as_deref(), Some("6.1.0-10-cloud-amd64"));
    assert_eq!(store.ensure_default(&opts).expect("again"), rec);

    add("6.1.0-12-cloud-amd64");
    let newer = store.ensure_default(&opts).expect("upgrade");
    assert_eq!(newer.release.as_deref(), Some("6.1.0-12-cloud-amd64"));
    assert_eq!(store.list().expect("list").len(), 1);

    // The package removed: the stored default stays usable.
    fs::remove_dir_all(&boot).expect("rm boot");
    assert_eq!(store.ensure_default(&opts).expect("kept"), newer);
    assert!(newer.kernel_path.is_file());
    // The replaced kernel's files were collected.
    assert_eq!(
        fs::read_dir(root.join("kernels/blobs/sha256"))
            .expect("blobs")
            .count(),
        2
    );
}
