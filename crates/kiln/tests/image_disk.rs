//! `kiln image disk`: the real binary against a private kiln root (`KILN_ROOT` in a temporary
//! directory) and the offline default image, checked with e2fsprogs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use kiln_image::Store;

/// A kiln root in a fresh temporary directory, removed on drop.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new(name: &str) -> TempRoot {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-image-disk-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp root");
        TempRoot(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `kiln ARGS` with `KILN_ROOT=root`.
fn kiln(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_ROOT", root)
        .output()
        .expect("run kiln")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs an e2fsprogs tool (also found in /usr/sbin and /sbin when PATH lacks them).
fn e2fs(tool: &str, args: &[&str]) -> Output {
    let path = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(tool));
    Command::new(path)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("run {tool} (install e2fsprogs): {e}"))
}

fn assert_fsck_clean(image: &Path) {
    let out = e2fs("e2fsck", &["-fn", image.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}\n{}",
        image.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `debugfs -R 'stat /bin/busybox'`: must show a regular file of busybox's size.
fn assert_has_busybox(image: &Path) {
    let out = e2fs(
        "debugfs",
        &[
            "-R",
            "stat /bin/busybox",
            image.to_str().expect("utf-8 path"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Type: regular"),
        "debugfs stat /bin/busybox in {}: {stdout}\n{}",
        image.display(),
        text(&out.stderr)
    );
    if let Ok(meta) = std::fs::metadata("/bin/busybox") {
        assert!(
            stdout.contains(&format!("Size: {}", meta.len())),
            "busybox size {} not in: {stdout}",
            meta.len()
        );
    }
}

/// Block count and block size from `dumpe2fs -h`.
fn fs_bytes(image: &Path) -> u64 {
    let out = e2fs("dumpe2fs", &["-h", image.to_str().expect("utf-8 path")]);
    let stdout = text(&out.stdout);
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("dumpe2fs: no {name}: {stdout}"))
    };
    field("Block count") * field("Block size")
}

/// The stdout lines of a successful run.
fn lines(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "kiln failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout).lines().map(str::to_owned).collect()
}

/// Entries of a directory (names), empty if it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn disk_of_the_default_image_is_built_once_and_clean() {
    let root = TempRoot::new("build");
    let record = Store::open(root.path())
        .expect("open store")
        .ensure_default_image()
        .expect("default image");
    let hex = record
        .config_digest
        .strip_prefix("sha256:")
        .expect("sha256 config digest");
    let expected = root
        .path()
        .join("rootfs")
        .join("sha256")
        .join(format!("{hex}.ext4"));

    let first = lines(&kiln(root.path(), &["image", "disk", "kiln/default"]));
    assert_eq!(first, vec![expected.display().to_string()]);
    assert!(expected.is_file());
    assert_fsck_clean(&expected);
    assert_has_busybox(&expected);
    let built = std::fs::metadata(&expected).expect("stat disk");

    // The second call is a cache hit: same path, same file, no rebuild.
    let started = Instant::now();
    let second = kiln(
        root.path(),
        &[
            "image",
            "disk",
            "localhost/kiln/busybox:latest",
            "--format",
            "json",
        ],
    );
    let elapsed = started.elapsed();
    let json = lines(&second).join("\n");
    assert!(json.contains("\"cached\": true"), "{json}");
    assert!(
        json.contains(&format!("\"disk\": \"{}\"", expected.display())),
        "{json}"
    );
    assert!(
        json.contains(&format!("\"image_id\": \"{}\"", record.config_digest)),
        "{json}"
    );
    // Its speed is bench/images.py's to measure; here the same inode shows nothing was rebuilt.
    eprintln!("cache hit took {elapsed:?}");
    let again = std::fs::metadata(&expected).expect("stat disk");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(built.ino(), again.ino(), "the disk was rebuilt");
    assert_eq!(
        built.mtime_nsec(),
        again.mtime_nsec(),
        "the disk was rewritten"
    );

    // The plain form prints the same path.
    let third = lines(&kiln(root.path(), &["image", "disk", "kiln/default"]));
    assert_eq!(third, first);
}

#[test]
fn vm_disk_is_a_grown_clean_copy() {
    let root = TempRoot::new("vm");
    let vm = root.path().join("vm1.ext4");
    let vm_str = vm.to_str().expect("utf-8 path");
    let out = lines(&kiln(
        root.path(),
        &[
            "image",
            "disk",
            "kiln/default",
            "--vm-disk",
            vm_str,
            "--size",
            "64M",
        ],
    ));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[1], vm.display().to_string());
    let image = PathBuf::from(&out[0]);
    assert_eq!(
        std::fs::metadata(&vm).expect("stat vm disk").len(),
        64 << 20
    );
    assert_fsck_clean(&vm);
    assert_has_busybox(&vm);
    assert_eq!(fs_bytes(&vm), 64 << 20, "filesystem not grown to the disk");
    assert!(fs_bytes(&image) < 64 << 20);
    // The cached image is untouched by the VM disk's growth.
    assert_fsck_clean(&image);

    // An existing destination is refused and left alone.
    let before = std::fs::read(&vm).expect("read vm disk");
    let again = kiln(
        root.path(),
        &[
            "image",
            "disk",
            "kiln/default",
            "--vm-disk",
            vm_str,
            "--size",
            "64M",
        ],
    );
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    assert!(std::fs::read(&vm).expect("read vm disk") == before);

    // A second VM from the cached image gets its own disk, in JSON too.
    let vm2 = root.path().join("vm2.ext4");
    let json = lines(&kiln(
        root.path(),
        &[
            "image",
            "disk",
            "kiln/default",
            "--vm-disk",
            vm2.to_str().expect("utf-8 path"),
            "--size",
            "1G",
            "--format",
            "json",
        ],
    ))
    .join("\n");
    assert!(json.contains("\"cached\": true"), "{json}");
    assert!(json.contains("\"size\": 1073741824"), "{json}");
    assert_eq!(fs_bytes(&vm2), 1 << 30);
    assert_fsck_clean(&vm2);
}

#[test]
fn bad_sizes_are_refused_clearly_and_leave_nothing() {
    let root = TempRoot::new("sizes");
    let vm = root.path().join("vm.ext4");
    let vm_str = vm.to_str().expect("utf-8 path");
    for (flag, size) in [
        ("--size", "4X"),
        ("--size", "1.5G"),
        ("--size", "-1"),
        ("--size", ""),
        ("--size", "G"),
        ("--size", "0"),
        ("--size", "99999999999T"),
        ("--free-space", "lots"),
    ] {
        // `--flag=value`, so that "-1" is a value and not an option.
        let arg = format!("{flag}={size}");
        let mut args = vec!["image", "disk", "kiln/default", arg.as_str()];
        if flag == "--size" {
            args.extend(["--vm-disk", vm_str]);
        }
        let out = kiln(root.path(), &args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{flag} {size:?} accepted");
        assert!(
            stderr.contains("invalid size") || stderr.contains("invalid value"),
            "{flag} {size:?}: {stderr}"
        );
        assert!(!vm.exists());
    }
    // Smaller than the image: refused after the image's disk exists, with both sizes named
    // and no temporary file left behind.
    let out = kiln(
        root.path(),
        &[
            "image",
            "disk",
            "kiln/default",
            "--vm-disk",
            vm_str,
            "--size",
            "4K",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("smaller than the image"), "{stderr}");
    let left: Vec<String> = entries(root.path())
        .into_iter()
        .filter(|n| n != "images" && n != "rootfs")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // --vm-disk and --size go together.
    let out = kiln(
        root.path(),
        &["image", "disk", "kiln/default", "--vm-disk", vm_str],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--size"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_image_that_cannot_be_had_fails_without_a_disk() {
    let root = TempRoot::new("missing");
    // Port 1 on loopback: nothing listens, the pull fails at once.
    let out = kiln(
        root.path(),
        &["image", "disk", "-q", "127.0.0.1:1/nothing/here:v1"],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1/nothing/here:v1"), "{stderr}");
    let disks = entries(&root.path().join("rootfs").join("sha256"));
    assert!(disks.is_empty(), "disks: {disks:?}");
}
