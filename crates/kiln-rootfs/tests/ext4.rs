//! ext4 images from unpacked trees, inspected with debugfs and checked with e2fsck.

mod common;

use common::*;
use kiln_rootfs::{fs_usage, FsImageBuilder, MkfsExt4, Rootfs, TreeUsage, BLOCK_SIZE};

#[test]
fn image_keeps_everything_the_layers_said() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("ext4-meta");
    let long_target = LONG_SYMLINK_TARGET;
    let layers = rich_layers(tmp.path());
    let tree = tmp.join("tree");
    Rootfs::unpack(&layers, &tree).expect("unpack");

    let image = tmp.join("root.ext4");
    let free = 32 << 20;
    MkfsExt4::new().build(&tree, &image, free).expect("mkfs");
    fsck(&image);
    let usage = fs_usage(&image).expect("usage");
    assert!(usage.free_blocks * BLOCK_SIZE >= free, "{usage:?}");

    let root = stat(&image, "/");
    assert_eq!(
        (root.kind.as_str(), root.mode, root.uid),
        ("directory", 0o751, 0),
        "{}",
        root.raw
    );
    assert_eq!(root.mtime, MTIME as i64, "{}", root.raw);

    let ping = stat(&image, "/bin/ping");
    assert_eq!(
        (ping.kind.as_str(), ping.mode, ping.size, ping.links),
        ("regular", 0o4755, 5, 2)
    );
    assert_eq!(ping.mtime, MTIME as i64);
    assert_eq!(
        stat(&image, "/bin/ping2").inode,
        ping.inode,
        "hard link shares the inode"
    );
    assert_eq!(cat(&image, "/bin/ping"), "ping!");
    let ea = debugfs(&image, "ea_list /bin/ping");
    assert!(ea.contains("security.capability"), "{ea}");
    assert!(ea.contains("(20)"), "capability value is 20 bytes: {ea}");

    let sh = stat(&image, "/bin/sh");
    assert_eq!((sh.kind.as_str(), sh.mtime), ("symlink", MTIME as i64));
    assert_eq!(stat(&image, "/dev/null").mtime, MTIME as i64);
    assert!(sh.raw.contains("Fast link dest: \"busybox\""), "{}", sh.raw);
    let lib = stat(&image, "/lib");
    assert_eq!(
        (lib.kind.as_str(), lib.size),
        ("symlink", long_target.len() as u64)
    );
    assert_eq!(
        cat(&image, "/lib"),
        long_target,
        "slow symlink target stored in a block"
    );

    let user = stat(&image, "/home/user");
    assert_eq!((user.mode, user.uid, user.gid), (0o700, 1000, 1001));
    assert!(debugfs(&image, "ea_list /home/user").contains("user.note (5) = \"hello\""));
    let notes = stat(&image, "/home/user/notes");
    assert_eq!((notes.mode, notes.uid, notes.gid), (0o600, 1000, 1001));
    assert_eq!(cat(&image, "/home/user/notes"), "user data\n");

    let null = stat(&image, "/dev/null");
    assert_eq!((null.kind.as_str(), null.mode), ("character", 0o666));
    assert!(
        null.raw.contains("Device major/minor number: 01:03"),
        "{}",
        null.raw
    );
    let vda = stat(&image, "/dev/vda");
    assert_eq!((vda.kind.as_str(), vda.gid), ("block", 6));
    assert!(
        vda.raw.contains("Device major/minor number: 254:00"),
        "{}",
        vda.raw
    );
    assert_eq!(stat(&image, "/run/initctl").kind, "FIFO");
    assert_eq!(stat(&image, "/tmp").mode, 0o1777);

    assert_eq!(ls(&image, "/etc"), vec!["hostname"]);
    assert_eq!(
        ls(&image, "/var/cache"),
        vec!["b"],
        "the opaque directory hides the lower layer's entries"
    );
    assert_eq!(
        ls(&image, "/"),
        vec![
            "bin",
            "dev",
            "etc",
            "home",
            "lib",
            "lost+found",
            "run",
            "tmp",
            "var"
        ]
    );
}

#[test]
fn size_follows_content_plus_free_space() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("ext4-size");
    let tree = tmp.join("tree");
    // 2000 small files in 20 directories, one 8 MiB file, a sparse-looking zero file.
    let mut layer = Layer::new();
    let small = "x".repeat(1500);
    for d in 0..20 {
        for f in 0..100 {
            layer.file(&format!("d{d}/file-with-a-longish-name-{f}"), &small);
        }
    }
    for f in 0..600 {
        layer.file(
            &format!("many/a-file-name-long-enough-to-fill-blocks-{f}"),
            "",
        );
    }
    let big: String = (0..8 << 20)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    layer.file("big", &big);
    let layers = plain_layers(tmp.path(), vec![layer.tar()]);
    Rootfs::unpack(&layers, &tree).expect("unpack");
    let measured = TreeUsage::measure(&tree).expect("measure");
    assert_eq!(measured.inodes, 1 + 20 + 2000 + 1 + 1 + 600);
    assert!(measured.blocks >= 2000 + 2048 + 20, "{measured:?}");

    for free in [0u64, 100 << 20] {
        let image = tmp.join(format!("img-{free}"));
        MkfsExt4::new().build(&tree, &image, free).expect("mkfs");
        fsck(&image);
        let usage = fs_usage(&image).expect("usage");
        assert!(usage.free_blocks * BLOCK_SIZE >= free, "{usage:?}");
        assert!(usage.free_inodes > 0, "{usage:?}");
        // Not wasteful either: content ~16 MiB + free + journal/metadata overhead.
        let size = usage.blocks * BLOCK_SIZE;
        eprintln!("free {free}: {usage:?} ({} MiB)", size >> 20);
        assert!(
            size < free + (64 << 20),
            "image {size} bytes for {free} free: {usage:?}"
        );
        assert_eq!(cat(&image, "/d7/file-with-a-longish-name-42"), small);
        assert_eq!(stat(&image, "/big").size, 8 << 20);
        // Multi-block directories are hashed (EXT4_INDEX_FL, 0x1000) after e2fsck -D.
        let many = stat(&image, "/many");
        let flags = many
            .raw
            .split("Flags: 0x")
            .nth(1)
            .and_then(|f| f.split_whitespace().next());
        let flags = u32::from_str_radix(flags.expect("flags"), 16).expect("hex flags");
        assert_ne!(flags & 0x1000, 0, "{}", many.raw);
        assert_eq!(ls(&image, "/many").len(), 600);
    }
}

#[test]
fn empty_tree_builds() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("ext4-empty");
    let tree = tmp.join("tree");
    Rootfs::unpack(&[], &tree).expect("unpack nothing");
    let image = tmp.join("img");
    MkfsExt4::new().build(&tree, &image, 0).expect("mkfs");
    fsck(&image);
    assert_eq!(ls(&image, "/"), vec!["lost+found"]);
}

#[test]
fn build_refuses_existing_output_and_cleans_up_failures() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("ext4-fail");
    let tree = tmp.join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    let image = tmp.join("img");
    std::fs::write(&image, "not mine to overwrite").expect("write");
    assert!(MkfsExt4::new().build(&tree, &image, 0).is_err());
    assert_eq!(
        std::fs::read_to_string(&image).expect("read"),
        "not mine to overwrite"
    );
    // A missing source directory fails without leaving an image.
    let image2 = tmp.join("img2");
    assert!(MkfsExt4::new()
        .build(&tmp.join("nope"), &image2, 0)
        .is_err());
    assert!(!image2.exists());
}

#[test]
fn grow_resizes_the_filesystem() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("ext4-grow");
    let tree = tmp.join("tree");
    let layers = plain_layers(tmp.path(), vec![Layer::new().file("hello", "world").tar()]);
    Rootfs::unpack(&layers, &tree).expect("unpack");
    let image = tmp.join("img");
    let builder = MkfsExt4::new();
    builder.build(&tree, &image, 0).expect("mkfs");
    builder.grow(&image, 300 << 20).expect("grow");
    fsck(&image);
    let usage = fs_usage(&image).expect("usage");
    assert_eq!(usage.blocks * BLOCK_SIZE, 300 << 20);
    assert_eq!(cat(&image, "/hello"), "world");
    assert!(
        builder.grow(&image, 1 << 20).is_err(),
        "shrinking is refused"
    );
}
