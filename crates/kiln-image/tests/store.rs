//! The store without a registry: imports, the default image, tag/rm/prune, leases.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{blob_files, file_digest, layer, layer_paths, store};
use kiln_image::oci::{
    build_index, write_docker_save, write_image_blobs, write_layout, Flavor, ImageBuilder,
};
use kiln_image::{Compression, Error, ImportOptions};

fn tar_dir(src: &Path, dest: &Path, gzip: bool) {
    let file = std::fs::File::create(dest).expect("tar file");
    let write = |w: Box<dyn std::io::Write>| {
        let mut b = tar::Builder::new(w);
        b.append_dir_all(".", src).expect("tar dir");
        b.into_inner().expect("finish tar").flush().expect("flush");
    };
    if gzip {
        write(Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        )));
    } else {
        write(Box::new(file));
    }
}

#[test]
fn import_docker_save_tarball() {
    let image = ImageBuilder::new()
        .layer(layer("save1", Compression::None))
        .layer(layer("save2", Compression::None))
        .cmd(&["/bin/echo", "saved"])
        .flavor(Flavor::Docker)
        .build()
        .expect("image");
    let tmp = tempfile::tempdir().expect("tmp");
    let archive = tmp.path().join("save.tar");
    write_docker_save(
        &archive,
        &image,
        &["example/saved:1", "example/saved:latest"],
    )
    .expect("docker save");
    let (_dir, store) = store();
    let records = store
        .import(&archive, &ImportOptions::default())
        .expect("import");
    let names: Vec<&str> = records.iter().map(|r| r.reference.as_str()).collect();
    assert_eq!(
        names,
        [
            "docker.io/example/saved:1",
            "docker.io/example/saved:latest"
        ]
    );
    let r = &records[0];
    assert_eq!(r.config_digest, image.config.digest);
    assert_eq!(r.layers.len(), 2);
    assert_eq!(r.layers[0].compression, Compression::None);
    for (got, want) in r.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.blob.digest);
        assert_eq!(file_digest(&got.path), got.digest);
    }
    assert!(layer_paths(&r.layers[1]).contains(&"etc/seed".to_string()));
    // The scratch extraction is gone.
    let scratch = store.kiln_root().join("images/tmp");
    assert_eq!(std::fs::read_dir(scratch).expect("tmp dir").count(), 0);

    // --tag renames a single image.
    let records = store
        .import(
            &archive,
            &ImportOptions {
                tag: Some("renamed:v9".into()),
            },
        )
        .expect("import with tag");
    assert_eq!(records[0].reference, "docker.io/library/renamed:v9");
}

#[test]
fn import_oci_layout_dir_tar_and_gzip_tar() {
    let amd64 = ImageBuilder::new()
        .layer(layer("layout-a", Compression::Zstd))
        .layer(layer("layout-b", Compression::Gzip))
        .build()
        .expect("image");
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = tmp.path().join("layout");
    write_layout(&layout, &[(&amd64, Some("example.com/team/app:2.0"))]).expect("layout");
    let (_dir, store) = store();
    let records = store
        .import(&layout, &ImportOptions::default())
        .expect("import dir");
    assert_eq!(records[0].reference, "example.com/team/app:2.0");
    assert_eq!(records[0].manifest_digest, amd64.manifest.digest);
    assert_eq!(records[0].layers[0].compression, Compression::Zstd);

    for gzip in [false, true] {
        let archive = tmp.path().join(format!("layout-{gzip}.tar"));
        tar_dir(&layout, &archive, gzip);
        let records = store
            .import(
                &archive,
                &ImportOptions {
                    tag: Some(format!("from-tar:{gzip}")),
                },
            )
            .expect("import tar");
        assert_eq!(records[0].manifest_digest, amd64.manifest.digest);
    }

    // A tag-only name needs --tag.
    let tag_only = tmp.path().join("tag-only");
    write_layout(&tag_only, &[(&amd64, Some("latest"))]).expect("layout");
    let err = store
        .import(&tag_only, &ImportOptions::default())
        .expect_err("no name");
    assert!(err.to_string().contains("--tag"), "{err}");
}

#[test]
fn import_layout_with_nested_index_picks_amd64() {
    let amd64 = ImageBuilder::new()
        .layer(layer("n-amd", Compression::Gzip))
        .build()
        .expect("amd64");
    let arm64 = ImageBuilder::new()
        .layer(layer("n-arm", Compression::Gzip))
        .architecture("arm64")
        .build()
        .expect("arm64");
    let index = build_index(&[&arm64, &amd64], Flavor::Oci).expect("index");
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = tmp.path().join("layout");
    // index.json → nested index → two platform manifests.
    write_layout(&layout, &[]).expect("layout skeleton");
    write_image_blobs(&layout, &amd64).expect("amd64 blobs");
    write_image_blobs(&layout, &arm64).expect("arm64 blobs");
    let hex = &index.digest["sha256:".len()..];
    std::fs::write(layout.join("blobs/sha256").join(hex), &index.data).expect("index blob");
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": index.media_type,
            "digest": index.digest,
            "size": index.data.len(),
            "annotations": {"io.containerd.image.name": "example.com/multi:1"}
        }]
    });
    std::fs::write(layout.join("index.json"), top.to_string()).expect("index.json");
    let (_dir, store) = store();
    let records = store
        .import(&layout, &ImportOptions::default())
        .expect("import");
    assert_eq!(records[0].reference, "example.com/multi:1");
    assert_eq!(records[0].manifest_digest, amd64.manifest.digest);
    assert_eq!(
        records[0].index_digest.as_deref(),
        Some(index.digest.as_str())
    );
}

#[test]
fn import_refuses_corrupt_blobs_and_junk() {
    let image = ImageBuilder::new()
        .layer(layer("bad-layout", Compression::Gzip))
        .build()
        .expect("image");
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = tmp.path().join("layout");
    write_layout(&layout, &[(&image, Some("example.com/bad:1"))]).expect("layout");
    let digest = &image.layers[0].blob.digest;
    let path = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let mut data = std::fs::read(&path).expect("blob");
    data[10] ^= 0x55;
    std::fs::write(&path, data).expect("corrupt");
    let (_dir, store) = store();
    let err = store
        .import(&layout, &ImportOptions::default())
        .expect_err("corrupt layer");
    assert!(err.to_string().contains(digest), "{err}");
    assert!(!store.has_blob(digest));
    assert!(store.list().expect("list").is_empty());

    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar archive at all").expect("junk");
    let err = store
        .import(&junk, &ImportOptions::default())
        .expect_err("junk");
    assert!(matches!(err, Error::Import { .. }), "{err}");
}

#[test]
fn default_image_from_busybox_static() {
    if !Path::new("/bin/busybox").exists() {
        panic!(
            "/bin/busybox missing: install the Debian package busybox-static (scripts/setup.sh)"
        );
    }
    let (_dir, store) = store();
    let record = store.ensure_default_image().expect("default image");
    assert_eq!(record.reference, kiln_image::DEFAULT_IMAGE);
    let cmd = record
        .config
        .config()
        .as_ref()
        .and_then(|c| c.cmd().clone())
        .expect("cmd");
    assert_eq!(cmd, ["/bin/sh"]);
    assert_eq!(record.layers.len(), 1);
    let mut archive = tar::Archive::new(record.layers[0].open().expect("open layer"));
    let mut sh_target = None;
    let mut paths = Vec::new();
    for entry in archive.entries().expect("entries") {
        let entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        if path == "bin/sh" {
            sh_target = entry
                .link_name()
                .expect("link")
                .map(|l| l.to_string_lossy().into_owned());
        }
        if path == "tmp/" {
            assert_eq!(entry.header().mode().expect("mode") & 0o7777, 0o1777);
        }
        paths.push(path);
    }
    for want in ["bin/busybox", "etc/passwd", "etc/group", "tmp/", "proc/"] {
        assert!(paths.iter().any(|p| p == want), "{want} in {paths:?}");
    }
    assert_eq!(sh_target.as_deref(), Some("/bin/busybox"));
    // Idempotent and reachable through the pull alias, with no network.
    let again = store
        .pull(kiln_image::DEFAULT_IMAGE_ALIAS, &common::quiet())
        .expect("alias");
    assert_eq!(again.manifest_digest, record.manifest_digest);
}

#[test]
fn tag_rm_prune_and_leases() {
    let (dir, store) = store();
    let a = ImageBuilder::new()
        .layer(layer("shared", Compression::Gzip))
        .layer(layer("only-a", Compression::Gzip))
        .build()
        .expect("a");
    let b = ImageBuilder::new()
        .layer(layer("shared", Compression::Gzip))
        .build()
        .expect("b");
    store.store_built(&a, "example/a:1").expect("store a");
    store.store_built(&b, "example/b:1").expect("store b");
    store.tag("example/a:1", "example/a:copy").expect("tag");
    assert_eq!(store.list().expect("list").len(), 3);
    let json = kiln_image::list_to_json(&store.list().expect("list")).expect("json");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid json");
    assert_eq!(parsed.as_array().map(Vec::len), Some(3));

    let err = store.resolve("example/nothing").expect_err("missing");
    assert!(matches!(err, Error::NotInStore { .. }), "{err}");

    // Removing one tag keeps the image; removing the last frees only a's own blobs.
    assert_eq!(
        store.remove("example/a:1").expect("rm"),
        ["docker.io/example/a:1"]
    );
    assert!(store.prune().expect("prune").removed.is_empty());
    store.remove("example/a:copy").expect("rm copy");

    // A lease (e.g. kiln-rootfs reading layers) makes prune wait.
    let lease = store.lease().expect("lease");
    let root = dir.path().to_path_buf();
    let pruner = std::thread::spawn(move || {
        kiln_image::Store::open(&root)
            .expect("open")
            .prune()
            .expect("prune")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pruner.is_finished(), "prune must wait for the lease");
    assert!(store.has_blob(&a.layers[1].blob.digest));
    drop(lease);
    let report = pruner.join().expect("prune thread");
    let removed: Vec<&str> = report.removed.iter().map(String::as_str).collect();
    assert!(removed.contains(&a.layers[1].blob.digest.as_str()));
    assert!(removed.contains(&a.manifest.digest.as_str()));
    assert!(
        !removed.contains(&a.layers[0].blob.digest.as_str()),
        "shared with b"
    );
    let b_record = store.resolve("example/b:1").expect("b survives");
    assert!(b_record.layers.iter().all(|l| l.path.is_file()));
    let files = blob_files(&store);
    assert_eq!(files.len(), 3, "b's manifest, config and layer: {files:?}");
}
