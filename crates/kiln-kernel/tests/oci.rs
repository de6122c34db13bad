//! Kernels from OCI images (Weave Ignite's layout), built with kiln-image's OCI writer into
//! a test store: layering, whiteouts, links, and hostile images.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use kiln_image::oci::{BuiltLayer, ImageBuilder, LayerBuilder};
use kiln_image::{Compression, PullOptions, Store};
use kiln_kernel::{Error, ImportOptions, InitrdKind, KernelFormat, KernelStore};

/// Adds every file and directory under `src` to `layer` below `prefix`.
fn add_tree(layer: &mut LayerBuilder, src: &Path, prefix: &str) {
    let mut entries: Vec<_> = fs::read_dir(src)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = format!(
            "{prefix}/{}",
            p.file_name().expect("name").to_string_lossy()
        );
        if p.is_dir() {
            layer.dir(&name, 0o755).expect("dir");
            add_tree(layer, &p, &name);
        } else {
            layer
                .file(&name, 0o644, &fs::read(&p).expect("read"))
                .expect("file");
        }
    }
}

fn store_image(root: &Path, reference: &str, layers: Vec<BuiltLayer>) {
    let mut image = ImageBuilder::new();
    for l in layers {
        image = image.layer(l);
    }
    let image = image.build().expect("build image");
    Store::open(root)
        .expect("image store")
        .store_built(&image, reference)
        .expect("store image");
}

fn import(
    root: &Path,
    reference: &str,
    scratch: &Path,
) -> Result<kiln_kernel::KernelRecord, Error> {
    KernelStore::open(root).expect("kernel store").import_oci(
        reference,
        &PullOptions::default(),
        &ImportOptions {
            busybox: Some(fake_busybox(scratch)),
            ..ImportOptions::default()
        },
    )
}

#[test]
fn ignite_style_kernel_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let release = "5.10.77-ignite";
    let modules = fake_modules_tree(&tmp.path().join("m"), release, Comp::None);
    let mut layer = LayerBuilder::new();
    layer.dir("boot", 0o755).expect("dir");
    layer
        .file("boot/vmlinux", 0o644, &fake_vmlinux(release))
        .expect("vmlinux");
    layer
        .file("boot/config-5.10.77-ignite", 0o644, b"CONFIG_VIRTIO=y\n")
        .expect("config");
    layer.dir("lib", 0o755).expect("dir");
    layer.dir("lib/modules", 0o755).expect("dir");
    layer
        .dir(&format!("lib/modules/{release}"), 0o755)
        .expect("dir");
    add_tree(&mut layer, &modules, &format!("lib/modules/{release}"));
    // Links out of the tree (like Debian's build -> /usr/src/...) are dropped, never created.
    layer
        .symlink(&format!("lib/modules/{release}/build"), "/usr/src/linux")
        .expect("symlink");
    layer
        .file("etc/os-release", 0o644, b"ID=test\n")
        .expect("etc");
    let layer = layer.finish(Compression::Gzip).expect("layer");
    store_image(&root, "localhost/kiln-test/ignite-kernel:5.10", vec![layer]);

    let rec = import(&root, "localhost/kiln-test/ignite-kernel:5.10", tmp.path()).expect("import");
    assert_eq!(rec.name, release);
    assert_eq!(rec.format, KernelFormat::Elf);
    assert_eq!(rec.release.as_deref(), Some(release));
    assert!(
        rec.source
            .starts_with("oci://localhost/kiln-test/ignite-kernel:5.10@sha256:"),
        "{}",
        rec.source
    );
    assert_eq!(
        fs::read(&rec.kernel_path).expect("kernel"),
        fake_vmlinux(release)
    );
    let mdir = rec.modules_dir.clone().expect("modules");
    assert_eq!(files_under(&mdir), files_under(&modules));
    let initrd = rec.initrd.clone().expect("initrd");
    assert_eq!(initrd.kind, InitrdKind::Generated);
    assert!(initrd.modules.contains(&"virtio_blk".to_string()));
    // The scratch extraction is gone.
    assert_eq!(
        fs::read_dir(root.join("kernels/tmp")).expect("tmp").count(),
        0
    );
}

#[test]
fn layers_whiteouts_opaque_dirs_and_relative_links() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let release = "6.6.6-test";
    let modules = fake_modules_tree(&tmp.path().join("m"), release, Comp::Zst);
    let base = format!("lib/modules/{release}");

    let mut l1 = LayerBuilder::new();
    l1.dir("boot", 0o755).expect("dir");
    l1.file("boot/vmlinux", 0o644, &fake_vmlinux("5.0.0-old"))
        .expect("old vmlinux");
    l1.dir("lib/modules", 0o755).expect("dir");
    l1.dir(&base, 0o755).expect("dir");
    add_tree(&mut l1, &modules, &base);
    l1.file(&format!("{base}/kernel/stale.ko"), 0o644, b"stale")
        .expect("stale");
    l1.file(&format!("{base}/extra-file"), 0o644, b"x")
        .expect("extra");
    let l1 = l1.finish(Compression::Gzip).expect("l1");

    let mut l2 = LayerBuilder::new();
    // vmlinux deleted; vmlinuz is a relative link to the versioned bzImage.
    l2.whiteout("boot/vmlinux").expect("whiteout");
    l2.file(
        &format!("boot/vmlinuz-{release}"),
        0o644,
        &fake_bzimage(&format!("{release} (kiln@test) #2")),
    )
    .expect("bzImage");
    l2.symlink("boot/vmlinuz", &format!("../boot/./vmlinuz-{release}"))
        .expect("link");
    // kernel/ made opaque and filled again: stale.ko from below must vanish.
    l2.opaque(&format!("{base}/kernel")).expect("opaque");
    add_tree(&mut l2, &modules.join("kernel"), &format!("{base}/kernel"));
    l2.whiteout(&format!("{base}/extra-file"))
        .expect("whiteout");
    let l2 = l2.finish(Compression::Zstd).expect("l2");
    store_image(&root, "localhost/kiln-test/layered:1", vec![l1, l2]);

    let rec = import(&root, "localhost/kiln-test/layered:1", tmp.path()).expect("import");
    assert_eq!(rec.format, KernelFormat::BzImage);
    assert_eq!(rec.release.as_deref(), Some(release));
    let stored = files_under(&rec.modules_dir.clone().expect("modules"));
    assert_eq!(
        stored,
        files_under(&modules),
        "opaque dir and whiteout applied"
    );
}

/// One raw tar entry: name, type, content, link target.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a [u8]>);

/// A layer whose tar is written header by header, so it can hold what no honest tool writes.
fn raw_layer(entries: &[RawEntry<'_>]) -> BuiltLayer {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            if let Some(link) = link {
                old.linkname[..link.len()].copy_from_slice(link);
            }
        }
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    BuiltLayer::from_tar(b.into_inner().expect("tar"), Compression::None).expect("layer")
}

#[test]
fn hostile_kernel_images_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let kernel = fake_bzimage("6.6.6-test #1");
    let cases: Vec<(&str, BuiltLayer, &str)> = vec![
        (
            "abs-symlink",
            {
                let mut l = LayerBuilder::new();
                l.file("etc/shadow", 0o600, b"root:secret").expect("shadow");
                l.dir("boot", 0o755).expect("boot");
                l.symlink("boot/vmlinuz", "/etc/shadow").expect("link");
                l.finish(Compression::Gzip).expect("layer")
            },
            "/boot/vmlinuz is a symbolic link to /etc/shadow",
        ),
        (
            "rel-symlink",
            {
                let mut l = LayerBuilder::new();
                l.symlink("boot/vmlinuz", "../../../../etc/shadow")
                    .expect("link");
                l.finish(Compression::Gzip).expect("layer")
            },
            "outside /boot and /lib/modules",
        ),
        (
            "hardlink",
            {
                let mut l = LayerBuilder::new();
                l.file("etc/shadow", 0o600, b"root:secret").expect("shadow");
                l.hardlink("boot/vmlinuz", "etc/shadow").expect("link");
                l.finish(Compression::Gzip).expect("layer")
            },
            "hard link to /etc/shadow",
        ),
        (
            "dotdot",
            raw_layer(&[
                (b"boot/vmlinuz", tar::EntryType::Regular, &kernel, None),
                (
                    b"boot/../../../evil",
                    tar::EntryType::Regular,
                    b"pwned",
                    None,
                ),
            ]),
            "'..' component",
        ),
        (
            "dotdot-link",
            raw_layer(&[
                (b"boot/vmlinuz", tar::EntryType::Regular, &kernel, None),
                (
                    b"boot/x",
                    tar::EntryType::Link,
                    b"",
                    Some(b"../../etc/shadow"),
                ),
            ]),
            "'..' component",
        ),
        (
            "absolute",
            raw_layer(&[(b"/boot/vmlinuz", tar::EntryType::Regular, &kernel, None)]),
            "absolute path",
        ),
        (
            "no-kernel",
            {
                let mut l = LayerBuilder::new();
                l.file("etc/hostname", 0o644, b"x").expect("file");
                l.finish(Compression::Gzip).expect("layer")
            },
            "no /boot/vmlinux or /boot/vmlinuz",
        ),
        (
            "not-a-kernel",
            {
                let mut l = LayerBuilder::new();
                l.file("boot/vmlinuz", 0o644, b"#!/bin/sh\necho hi\n")
                    .expect("file");
                l.finish(Compression::Gzip).expect("layer")
            },
            "is not a kernel kiln can boot",
        ),
    ];
    for (name, layer, expected) in cases {
        let reference = format!("localhost/kiln-test/hostile-{name}:1");
        store_image(&root, &reference, vec![layer]);
        let err = import(&root, &reference, tmp.path()).expect_err(name);
        let msg = err.to_string();
        assert!(matches!(err, Error::OciImage { .. }), "{name}: {msg}");
        assert!(
            msg.contains(expected),
            "{name}: {msg:?} should say {expected:?}"
        );
        assert!(msg.contains(&reference), "{name}: {msg:?} names the image");
        assert_store_empty(&root);
    }
    assert!(!tmp.path().join("evil").exists());
    assert!(!root.join("evil").exists());
    assert!(!root.join("kernels/evil").exists());
}
