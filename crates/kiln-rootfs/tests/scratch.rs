//! Scratch space: trees unpacked on tmpfs (or a chosen directory) while their image is built,
//! the fallback next to the cache, and the clean-up of what killed builders left.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::*;
use kiln_rootfs::{DiskCache, FsImageBuilder, MkfsExt4};

const DIGEST: &str = "sha256:5e2bf57d3f40c4b6df69daf1936cb766f832374b4fc0259a7cbff06e2f70f269";

/// Records which tree each build read, then builds for real.
struct Recording {
    inner: MkfsExt4,
    sources: Arc<Mutex<Vec<PathBuf>>>,
}

impl FsImageBuilder for Recording {
    fn build(&self, src: &Path, out: &Path, free_space: u64) -> kiln_rootfs::Result<()> {
        self.sources.lock().expect("lock").push(src.to_path_buf());
        self.inner.build(src, out, free_space)
    }
    fn grow(&self, image: &Path, size: u64) -> kiln_rootfs::Result<()> {
        self.inner.grow(image, size)
    }
    fn check(&self, image: &Path) -> kiln_rootfs::Result<()> {
        self.inner.check(image)
    }
}

fn recording_cache(root: &Path, scratch: Option<PathBuf>) -> (DiskCache, Arc<Mutex<Vec<PathBuf>>>) {
    let sources = Arc::new(Mutex::new(Vec::new()));
    let cache = DiskCache::open(root)
        .expect("open cache")
        .with_builder(Box::new(Recording {
            inner: MkfsExt4::new(),
            sources: Arc::clone(&sources),
        }))
        .with_scratch_dir(scratch);
    (cache, sources)
}

fn only_source(sources: &Mutex<Vec<PathBuf>>) -> PathBuf {
    let sources = sources.lock().expect("lock");
    assert_eq!(sources.len(), 1, "{sources:?}");
    sources[0].clone()
}

const PATHS: &[&str] = &[
    "/",
    "/bin",
    "/bin/ping",
    "/bin/ping2",
    "/bin/sh",
    "/lib",
    "/home/user",
    "/home/user/notes",
    "/dev/null",
    "/dev/vda",
    "/run/initctl",
    "/tmp",
    "/etc",
    "/etc/hostname",
    "/var/cache",
    "/var/cache/b",
];

/// What the image holds at `path`, inode numbers aside (they follow the source directory's
/// order, which differs between filesystems).
fn describe(image: &Path, path: &str) -> String {
    let st = stat(image, path);
    let device = st
        .raw
        .lines()
        .find(|l| l.contains("Device major/minor"))
        .unwrap_or_default()
        .to_owned();
    let mut out = format!(
        "{path}: {} {:o} {}:{} size {} links {} mtime {} {device}\n",
        st.kind, st.mode, st.uid, st.gid, st.size, st.links, st.mtime
    );
    out += &debugfs(image, &format!("ea_list \"{path}\""));
    match st.kind.as_str() {
        "regular" | "symlink" => out += &cat(image, path),
        "directory" => out += &ls(image, path).join(" "),
        _ => {}
    }
    out
}

#[test]
fn tmpfs_scratch_gives_the_same_image_as_unpacking_next_to_the_cache() {
    if !is_root() {
        return;
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let tmp = TempDir::new("scratch-same");
    let layers = rich_layers(tmp.path());

    let (on_shm, shm_sources) = recording_cache(&tmp.join("a"), Some(shm.to_path_buf()));
    let a = on_shm
        .image_disk(DIGEST, &layers, 1 << 20)
        .expect("build on tmpfs");
    let src = only_source(&shm_sources);
    assert!(src.starts_with(shm), "tree unpacked in {}", src.display());
    assert!(!src.exists(), "tree removed after the build");
    assert!(
        !src.parent().expect("scratch dir").exists(),
        "scratch directory removed after the build"
    );

    let (on_disk, disk_sources) = recording_cache(&tmp.join("b"), None);
    let b = on_disk
        .image_disk(DIGEST, &layers, 1 << 20)
        .expect("build on disk");
    assert!(only_source(&disk_sources).starts_with(tmp.join("b/rootfs")));

    fsck(&a);
    fsck(&b);
    for path in PATHS {
        assert_eq!(describe(&a, path), describe(&b, path));
    }
    assert_eq!(stat(&a, "/bin/ping").inode, stat(&a, "/bin/ping2").inode);
    assert_eq!(stat(&a, "/bin/ping").links, 2);
    assert!(debugfs(&a, "ea_list /bin/ping").contains("security.capability (20)"));
    assert!(debugfs(&a, "ea_list /home/user").contains("user.note (5) = \"hello\""));
    assert_eq!(ls(&a, "/var/cache"), vec!["b"]);
    assert_eq!(ls(&a, "/etc"), vec!["hostname"]);
}

#[test]
fn trees_over_the_cap_are_unpacked_next_to_the_cache() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("scratch-cap");
    let scratch = tmp.join("scratch");
    std::fs::create_dir(&scratch).expect("mkdir");

    // The estimate (the tar's size) is already over the cap: scratch space is not even made.
    let big = "x".repeat(200_000);
    let layers = plain_layers(&tmp.join("."), vec![Layer::new().file("big", &big).tar()]);
    let (cache, sources) = recording_cache(&tmp.join("k1"), Some(scratch.clone()));
    let cache = cache.with_scratch_cap(100_000);
    let image = cache.image_disk(DIGEST, &layers, 0).expect("build");
    assert!(only_source(&sources).starts_with(tmp.join("k1/rootfs")));
    assert_eq!(cat(&image, "/big"), big);
    assert_eq!(host_ls(&scratch), Vec::<String>::new());
    let hex = DIGEST.trim_start_matches("sha256:");
    assert_eq!(
        host_ls(&tmp.join("k1/rootfs/sha256")),
        vec![format!("{hex}.ext4"), format!("{hex}.lock")],
        "the tree next to the cache is gone"
    );

    // The estimate fits but the tree does not (each small file takes a whole page): the
    // unpack stops at the cap and is redone next to the cache.
    let layer_dir = tmp.join("small");
    std::fs::create_dir(&layer_dir).expect("mkdir");
    let mut many = Layer::new();
    for i in 0..40 {
        many.file(&format!("f{i:02}"), "tiny");
    }
    let layers = write_layers(&layer_dir, vec![(many.tar(), Compress::Gzip)]);
    let (cache, sources) = recording_cache(&tmp.join("k2"), Some(scratch.clone()));
    let cache = cache.with_scratch_cap(100_000);
    let image = cache.image_disk(DIGEST, &layers, 0).expect("build");
    assert!(only_source(&sources).starts_with(tmp.join("k2/rootfs")));
    fsck(&image);
    assert_eq!(ls(&image, "/").len(), 41, "40 files and lost+found");
    assert_eq!(cat(&image, "/f39"), "tiny");
    assert_eq!(host_ls(&scratch), Vec::<String>::new());
}

#[test]
fn failed_builds_leave_no_scratch_and_dead_builders_scratch_is_removed() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("scratch-sweep");
    let scratch = tmp.join("scratch");
    std::fs::create_dir(&scratch).expect("mkdir");

    // A killed builder's directory (lock file nobody holds), one still in use (lock held
    // here), one being set up right now, and an unrelated directory.
    let dead = scratch.join("kiln-scratch-1-0-1");
    std::fs::create_dir_all(dead.join("tree/etc")).expect("mkdir");
    std::fs::write(dead.join("lock"), "").expect("lock file");
    std::os::unix::fs::symlink("/etc", dead.join("tree/etc/link")).expect("symlink");
    let live = scratch.join("kiln-scratch-2-0-2");
    std::fs::create_dir_all(live.join("tree")).expect("mkdir");
    std::fs::write(live.join("lock"), "").expect("lock file");
    let held = std::fs::File::open(live.join("lock")).expect("open lock");
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let new = scratch.join(".kiln-scratch-3-0-3");
    std::fs::create_dir(&new).expect("mkdir");
    let other = scratch.join("someone-else");
    std::fs::create_dir(&other).expect("mkdir");

    let bad = Layer::new()
        .file("ok", "x")
        .entry(b"../escape", Kind::File(b""), 0o644, 0, 0, &[])
        .tar();
    let layers = plain_layers(tmp.path(), vec![bad]);
    let cache = DiskCache::open(tmp.join("kiln"))
        .expect("open")
        .with_scratch_dir(Some(scratch.clone()));
    assert!(matches!(
        cache.image_disk(DIGEST, &layers, 0),
        Err(kiln_rootfs::Error::Entry { layer: 0, .. })
    ));
    assert_eq!(
        host_ls(&scratch),
        vec![".kiln-scratch-3-0-3", "kiln-scratch-2-0-2", "someone-else"]
    );
    assert!(
        Path::new("/etc/passwd").exists(),
        "symlinks are never followed"
    );
    drop(held);
}
