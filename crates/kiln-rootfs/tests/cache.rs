//! The per-digest image cache and per-VM copy-on-write disks.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use kiln_rootfs::{
    copy_disk, fs_usage, CopyMethod, DiskCache, Error, FsImageBuilder, LayerSource, MkfsExt4,
    BLOCK_SIZE,
};

const DIGEST: &str = "sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";

/// Counts builds, so a cache hit can be told from a rebuild.
struct Counting {
    inner: MkfsExt4,
    builds: Arc<AtomicUsize>,
}

impl FsImageBuilder for Counting {
    fn build(&self, src: &Path, out: &Path, free_space: u64) -> kiln_rootfs::Result<()> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        // Widen the race window for the concurrency test.
        std::thread::sleep(std::time::Duration::from_millis(200));
        self.inner.build(src, out, free_space)
    }
    fn grow(&self, image: &Path, size: u64) -> kiln_rootfs::Result<()> {
        self.inner.grow(image, size)
    }
    fn check(&self, image: &Path) -> kiln_rootfs::Result<()> {
        self.inner.check(image)
    }
}

fn counting_cache(root: &Path, builds: &Arc<AtomicUsize>) -> DiskCache {
    DiskCache::open(root)
        .expect("open cache")
        .with_builder(Box::new(Counting {
            inner: MkfsExt4::new(),
            builds: Arc::clone(builds),
        }))
}

fn image_layers(dir: &Path) -> Vec<LayerSource> {
    let payload = "payload ".repeat(50_000);
    let l0 = Layer::new()
        .dir("etc/")
        .file("etc/os-release", "ID=kiln\n")
        .file("data/blob", &payload)
        .tar();
    let l1 = Layer::new()
        .file("app", "#!/bin/sh\necho hi\n")
        .marker("data/.wh.blob")
        .tar();
    write_layers(dir, vec![(l0, Compress::Gzip), (l1, Compress::Zstd)])
}

#[test]
fn second_image_disk_is_a_cache_hit() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("cache-hit");
    let layers = image_layers(tmp.path());
    let builds = Arc::new(AtomicUsize::new(0));
    let cache = counting_cache(&tmp.join("kiln"), &builds);
    assert_eq!(cache.cached(DIGEST).expect("cached"), None);
    let image = cache.image_disk(DIGEST, &layers, 8 << 20).expect("build");
    assert_eq!(
        image,
        tmp.join("kiln/rootfs/sha256/4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945.ext4")
    );
    fsck(&image);
    assert_eq!(cat(&image, "/etc/os-release"), "ID=kiln\n");
    assert_eq!(ls(&image, "/data"), Vec::<String>::new());
    // Images hold whole guest filesystems: only root may read them.
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
    assert_eq!(mode(&image), 0o600);
    assert_eq!(mode(&tmp.join("kiln/rootfs")), 0o700);
    let first = std::fs::metadata(&image).expect("stat");

    // A second cache over the same root (another kiln process) finds it without building,
    // even with layers that no longer exist.
    let again = counting_cache(&tmp.join("kiln"), &builds);
    let gone = vec![LayerSource::new(tmp.join("missing"), TAR)];
    assert_eq!(again.image_disk(DIGEST, &gone, 0).expect("hit"), image);
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    let second = std::fs::metadata(&image).expect("stat");
    assert_eq!((first.ino(), first.mtime()), (second.ino(), second.mtime()));
    // Only the image and its lock file are left: no trees or temporaries.
    assert_eq!(
        host_ls(&tmp.join("kiln/rootfs/sha256")),
        vec![
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945.ext4",
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945.lock",
        ]
    );
    assert!(again.remove(DIGEST).expect("remove"));
    assert_eq!(again.cached(DIGEST).expect("cached"), None);
}

#[test]
fn failed_build_leaves_no_image() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("cache-fail");
    let bad = Layer::new()
        .file("ok", "x")
        .entry(b"../escape", Kind::File(b""), 0o644, 0, 0, &[])
        .tar();
    let layers = plain_layers(tmp.path(), vec![bad]);
    let cache = DiskCache::open(tmp.join("kiln")).expect("open");
    // Leftovers of a builder that was killed mid-way are cleared by the next one.
    let hex = DIGEST.trim_start_matches("sha256:");
    let dir = tmp.join("kiln/rootfs/sha256");
    std::fs::create_dir_all(dir.join(format!(".{hex}.tree-999999-0/etc"))).expect("mkdir");
    std::fs::create_dir_all(dir.join(format!("..{hex}.tree-999999-0.unpack-999999-1/usr")))
        .expect("mkdir");
    std::fs::write(dir.join(format!(".{hex}.build-999999-2")), "half an image").expect("write");
    std::os::unix::fs::symlink("/etc", dir.join(format!(".{hex}.tree-999999-0/etc/link")))
        .expect("symlink");
    match cache.image_disk(DIGEST, &layers, 0) {
        Err(Error::Entry {
            layer: 0, entry, ..
        }) => assert_eq!(entry, "../escape"),
        other => panic!("expected an entry error, got {other:?}"),
    }
    assert_eq!(cache.cached(DIGEST).expect("cached"), None);
    assert_eq!(
        host_ls(&tmp.join("kiln/rootfs/sha256")),
        vec!["4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945.lock"]
    );
}

#[test]
fn vm_disk_is_a_sparse_or_reflinked_copy_grown_to_size() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("cache-vm");
    let layers = image_layers(tmp.path());
    let cache = DiskCache::open(tmp.join("kiln")).expect("open");
    let image = cache.image_disk(DIGEST, &layers, 0).expect("build");
    let image_len = std::fs::metadata(&image).expect("stat").len();
    let before = std::fs::read(&image).expect("read image");

    let size: u64 = 512 << 20;
    let disk = cache
        .vm_disk(DIGEST, &tmp.join("vm1.ext4"), size)
        .expect("vm disk");
    assert_eq!(disk, tmp.join("vm1.ext4"));
    fsck(&disk);
    let meta = std::fs::metadata(&disk).expect("stat");
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 < size / 4,
        "copy is sparse: {} bytes allocated of {size}",
        meta.blocks() * 512
    );
    let usage = fs_usage(&disk).expect("usage");
    assert_eq!(
        usage.blocks * BLOCK_SIZE,
        size,
        "filesystem resized to fill the disk"
    );
    assert_eq!(cat(&disk, "/app"), "#!/bin/sh\necho hi\n");

    // The cached image is untouched by the copy and the resize.
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), image_len);
    assert_eq!(std::fs::read(&image).expect("read image"), before);

    // Size 0 keeps the image's size; two VMs get independent disks.
    let disk2 = cache
        .vm_disk(DIGEST, &tmp.join("vm2.ext4"), 0)
        .expect("vm disk 2");
    assert_eq!(std::fs::metadata(&disk2).expect("stat").len(), image_len);
    fsck(&disk2);

    // Refusals: existing destination, too small, not cached, bad digest.
    match cache.vm_disk(DIGEST, &disk, size) {
        Err(Error::DestinationExists(p)) => assert_eq!(p, disk),
        other => panic!("expected DestinationExists, got {other:?}"),
    }
    assert!(matches!(
        cache.vm_disk(DIGEST, &tmp.join("small"), 4096),
        Err(Error::SizeTooSmall { .. })
    ));
    let other = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    assert!(matches!(
        cache.vm_disk(other, &tmp.join("x"), 0),
        Err(Error::NotCached(_))
    ));
    assert!(matches!(
        cache.vm_disk("sha256:../../etc", &tmp.join("x"), 0),
        Err(Error::InvalidDigest(_))
    ));
    assert!(!tmp.join("small").exists() && !tmp.join("x").exists());
}

#[test]
fn copy_disk_keeps_holes() {
    let tmp = TempDir::new("copy");
    let src = tmp.join("src");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).expect("create");
        f.set_len(64 << 20).expect("set_len");
        f.write_all_at(b"start", 0).expect("write");
        f.write_all_at(b"middle", 32 << 20).expect("write");
        f.write_all_at(b"end", (64 << 20) - 3).expect("write");
    }
    let dst = tmp.join("dst");
    let method = copy_disk(&src, &dst).expect("copy");
    assert!(matches!(method, CopyMethod::Reflink | CopyMethod::Sparse));
    assert_eq!(
        std::fs::read(&src).expect("src"),
        std::fs::read(&dst).expect("dst")
    );
    let allocated = std::fs::metadata(&dst).expect("stat").blocks() * 512;
    assert!(allocated < 4 << 20, "{allocated} bytes allocated");
    assert!(copy_disk(&src, &dst).is_err(), "never overwrites");
}

#[test]
fn concurrent_builders_build_once() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("cache-race");
    let layers = image_layers(tmp.path());
    let builds = Arc::new(AtomicUsize::new(0));
    let root = tmp.join("kiln");
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let cache = counting_cache(&root, &builds);
                let layers = &layers;
                s.spawn(move || cache.image_disk(DIGEST, layers, 1 << 20).expect("build"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        builds.load(Ordering::SeqCst),
        1,
        "one build for four callers"
    );
    fsck(&paths[0]);
    assert_eq!(cat(&paths[0], "/etc/os-release"), "ID=kiln\n");
    // And VM disks made concurrently from it are all sound.
    std::thread::scope(|s| {
        for i in 0..3 {
            let cache = DiskCache::open(&root).expect("open");
            let dest = tmp.join(format!("vm{i}"));
            s.spawn(move || {
                let disk = cache.vm_disk(DIGEST, &dest, 128 << 20).expect("vm disk");
                fsck(&disk);
            });
        }
    });
}
