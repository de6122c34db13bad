//! Applying layers into a directory: metadata, whiteouts, compression, and hostile layers.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use kiln_rootfs::{EntryError, Error, LayerSource, Rootfs};

fn meta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// A `security.capability` value granting cap_net_raw (v2, effective).

#[test]
fn keeps_modes_owners_links_nodes_times_and_xattrs() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("meta");
    let mut l = Layer::new();
    l.entry(b"./", Kind::Dir, 0o750, 0, 0, &[])
        .entry(b"./bin/", Kind::Dir, 0o755, 0, 0, &[])
        .entry(
            b"./bin/ping",
            Kind::File(b"ping!"),
            0o4755,
            0,
            0,
            &[("security.capability", CAP_NET_RAW)],
        )
        .entry(
            b"./home/user/",
            Kind::Dir,
            0o700,
            1000,
            1001,
            &[("user.note", b"hi")],
        )
        .entry(
            b"./home/user/data",
            Kind::File(b"data"),
            0o640,
            1000,
            1001,
            &[],
        )
        .entry(b"./tmp/", Kind::Dir, 0o1777, 0, 0, &[])
        .entry(
            b"./bin/sh",
            Kind::Symlink(b"/bin/busybox"),
            0o777,
            0,
            0,
            &[],
        )
        .entry(
            b"./bin/rel",
            Kind::Symlink(b"../../../../outside"),
            0o777,
            0,
            0,
            &[],
        )
        .entry(
            b"./bin/ping2",
            Kind::Hardlink(b"bin/ping"),
            0o644,
            0,
            0,
            &[],
        )
        .entry(b"./dev/null", Kind::Char(1, 3), 0o666, 0, 0, &[])
        .entry(b"./dev/sda", Kind::Block(8, 0), 0o660, 0, 6, &[])
        .entry(b"./run/fifo", Kind::Fifo, 0o600, 0, 0, &[])
        .entry(b"./sgid", Kind::File(b""), 0o2711, 5, 7, &[]);
    let layers = plain_layers(tmp.path(), vec![l.tar()]);
    let dest = tmp.join("rootfs");
    let rootfs = Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(rootfs.path(), dest);
    assert_eq!(rootfs.stats().layers, 1);

    let root = meta(&dest);
    assert_eq!(root.permissions().mode() & 0o7777, 0o750);
    assert_eq!(root.mtime(), MTIME as i64);

    let ping = meta(&dest.join("bin/ping"));
    assert_eq!(
        ping.permissions().mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!(ping.mtime(), MTIME as i64);
    assert_eq!(ping.nlink(), 2);
    assert_eq!(ping.ino(), meta(&dest.join("bin/ping2")).ino());
    assert_eq!(
        xattr(&dest.join("bin/ping"), "security.capability").as_deref(),
        Some(CAP_NET_RAW)
    );
    assert_eq!(
        std::fs::read(dest.join("bin/ping")).expect("read"),
        b"ping!"
    );

    let user = meta(&dest.join("home/user"));
    assert_eq!(
        (user.uid(), user.gid(), user.permissions().mode() & 0o7777),
        (1000, 1001, 0o700)
    );
    assert_eq!(
        user.mtime(),
        MTIME as i64,
        "directory times set after its children"
    );
    // No entry describes /home: it takes the time of the entry that needed it, not the time
    // of the unpack, so the same layers always give the same tree.
    let home = meta(&dest.join("home"));
    assert_eq!(home.permissions().mode() & 0o7777, 0o755);
    assert_eq!(home.mtime(), MTIME as i64, "implicit directory time");
    assert_eq!(
        xattr(&dest.join("home/user"), "user.note").as_deref(),
        Some(&b"hi"[..])
    );
    let data = meta(&dest.join("home/user/data"));
    assert_eq!(
        (data.uid(), data.gid(), data.permissions().mode() & 0o7777),
        (1000, 1001, 0o640)
    );
    // Implicit parent of home/user.
    assert_eq!(
        meta(&dest.join("home")).permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        meta(&dest.join("tmp")).permissions().mode() & 0o7777,
        0o1777
    );

    assert_eq!(
        std::fs::read_link(dest.join("bin/sh")).expect("readlink"),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        std::fs::read_link(dest.join("bin/rel")).expect("readlink"),
        Path::new("../../../../outside"),
        "escaping symlink targets are stored verbatim: they are resolved in the guest"
    );

    let null = meta(&dest.join("dev/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let sda = meta(&dest.join("dev/sda"));
    assert!(sda.file_type().is_block_device());
    assert_eq!((sda.rdev(), sda.gid()), (rustix::fs::makedev(8, 0), 6));
    assert!(meta(&dest.join("run/fifo")).file_type().is_fifo());
    let sgid = meta(&dest.join("sgid"));
    assert_eq!(
        (sgid.uid(), sgid.gid(), sgid.permissions().mode() & 0o7777),
        (5, 7, 0o2711)
    );

    // Nothing but the destination is left next to it.
    assert_eq!(host_ls(tmp.path()), vec!["layer0", "rootfs"]);
    rootfs.remove().expect("remove");
    assert!(!dest.exists());
}

#[test]
fn whiteouts_and_opaque_directories_across_three_layers() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("whiteout");
    let l0 = Layer::new()
        .dir("a/")
        .file("a/x", "x0")
        .file("a/y", "y0")
        .dir("b/")
        .file("b/old", "old")
        .dir("b/sub/")
        .file("b/sub/deep", "deep")
        .file("c", "c0")
        .dir("d/")
        .dir("d/sub/")
        .file("d/sub/gone", "gone")
        .file("keep", "k")
        .file("lower-only", "l")
        .tar();
    let l1 = Layer::new()
        // .wh.NAME removes a lower file.
        .marker(".wh.c")
        // ... and a lower file in a subdirectory.
        .dir("a/")
        .marker("a/.wh.x")
        // Opaque: b's lower contents vanish, b/new (this layer) stays.
        .dir("b/")
        .marker("b/.wh..wh..opq")
        .file("b/new", "new")
        // Whiteout of a directory, then the same name created anew in this layer.
        .dir("d/")
        .marker("d/.wh.sub")
        .dir("d/sub/")
        .file("d/sub/fresh", "fresh")
        // A whiteout never removes what its own layer wrote, whatever the order.
        .file("mine", "m")
        .marker(".wh.mine")
        // aufs bookkeeping is ignored.
        .marker(".wh..wh.plnk")
        .tar();
    let l2 = Layer::new()
        // A name whited out in layer 1 comes back as a directory.
        .dir("c/")
        .file("c/inside", "i")
        // Opaque marker after this layer's own entries: a/z stays, a/y (lower) goes, and
        // a/zdir keeps only this layer's child.
        .dir("a/")
        .file("a/z", "z")
        .file("a/zdir/mine", "m")
        .marker("a/.wh..wh..opq")
        // Whiteout of a path that never existed is harmless.
        .marker("nowhere/.wh.nothing")
        .marker(".wh.keep")
        // A lower directory replaced by a file (type change across layers).
        .file("d", "now a file")
        .tar();
    let layers = write_layers(
        tmp.path(),
        vec![
            (l0, Compress::None),
            (l1, Compress::Gzip),
            (l2, Compress::Zstd),
        ],
    );
    let dest = tmp.join("rootfs");
    let rootfs = Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(rootfs.stats().layers, 3);
    assert_eq!(
        host_ls(&dest),
        vec!["a", "b", "c", "d", "lower-only", "mine", "nowhere"]
    );
    assert_eq!(host_ls(&dest.join("a")), vec!["z", "zdir"]);
    assert_eq!(host_ls(&dest.join("a/zdir")), vec!["mine"]);
    assert_eq!(host_ls(&dest.join("b")), vec!["new"]);
    assert_eq!(host_ls(&dest.join("c")), vec!["inside"]);
    assert_eq!(
        std::fs::read_to_string(dest.join("d")).expect("read d"),
        "now a file"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("mine")).expect("read mine"),
        "m"
    );
    assert!(host_ls(&dest.join("nowhere")).is_empty());
}

#[test]
fn directories_a_layer_changes_without_describing_keep_their_times() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("kept-times");
    let l0 = Layer::new()
        .dir("./")
        .dir("etc/")
        .file("etc/a", "a")
        .file("etc/sub/f", "f")
        .tar();
    // No entry for ./, etc/ or etc/sub/: files added and whited out in each.
    let l1 = Layer::new()
        .file("top", "t")
        .file("etc/b", "b")
        .marker("etc/.wh.a")
        .file("etc/sub/g", "g")
        .tar();
    let layers = write_layers(tmp.path(), vec![(l0, Compress::None), (l1, Compress::None)]);
    let dest = tmp.join("rootfs");
    Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(host_ls(&dest.join("etc")), vec!["b", "sub"]);
    assert_eq!(meta(&dest).mtime(), MTIME as i64, "the root");
    // Not the time of the unpack: the same layers always give the same tree.
    assert_eq!(meta(&dest.join("etc")).mtime(), MTIME as i64, "etc");
    assert_eq!(meta(&dest.join("etc/sub")).mtime(), MTIME as i64, "etc/sub");
}

#[test]
fn directory_replaced_by_file_across_layers_then_back() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("retype");
    let l0 = Layer::new().dir("lib/").file("lib/libc.so", "elf").tar();
    // Merged /usr: the directory becomes a symlink in a later layer (legitimate across layers).
    let l1 = Layer::new()
        .dir("usr/lib/")
        .file("usr/lib/libc.so", "elf2")
        .symlink("lib", "usr/lib")
        .tar();
    let layers = plain_layers(tmp.path(), vec![l0, l1]);
    let dest = tmp.join("rootfs");
    Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(
        std::fs::read_link(dest.join("lib")).expect("readlink"),
        Path::new("usr/lib")
    );
    assert_eq!(host_ls(&dest.join("usr/lib")), vec!["libc.so"]);
}

#[test]
fn gzip_and_zstd_layers_and_wrong_labels() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("compress");
    let big = "0123456789abcdef".repeat(100_000);
    let l0 = Layer::new().file("gz", &big).tar();
    let l1 = Layer::new().file("zst", "zstd data").tar();
    let l2 = Layer::new()
        .file("plain", "labelled gzip, really plain")
        .tar();
    let mut layers = write_layers(
        tmp.path(),
        vec![
            (l0, Compress::Gzip),
            (l1, Compress::Zstd),
            (l2, Compress::None),
        ],
    );
    // Docker's media type; and a plain tar mislabelled as gzip: the magic bytes decide.
    layers[0].media_type = DOCKER_GZIP.to_owned();
    layers[2].media_type = TAR_GZIP.to_owned();
    // No media type at all (a `docker save` layer.tar): sniffed.
    layers[1].media_type = String::new();
    let dest = tmp.join("rootfs");
    let rootfs = Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(std::fs::read_to_string(dest.join("gz")).expect("gz"), big);
    assert_eq!(
        std::fs::read_to_string(dest.join("zst")).expect("zst"),
        "zstd data"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("plain")).expect("plain"),
        "labelled gzip, really plain"
    );
    assert_eq!(rootfs.stats().bytes, big.len() as u64 + 9 + 27);
}

#[test]
fn unsupported_media_type_and_corrupt_layer() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("mediatype");
    let tar = Layer::new().file("f", "x").tar();
    let mut layers = plain_layers(tmp.path(), vec![tar]);
    layers[0].media_type = "application/vnd.oci.image.config.v1+json".to_owned();
    let dest = tmp.join("rootfs");
    match Rootfs::unpack(&layers, &dest) {
        Err(Error::UnsupportedMediaType { layer: 0, .. }) => {}
        other => panic!("expected UnsupportedMediaType, got {other:?}"),
    }
    // gzip magic followed by garbage.
    std::fs::write(tmp.join("bad"), [0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]).expect("write");
    let layers = vec![LayerSource::new(tmp.join("bad"), TAR_GZIP)];
    match Rootfs::unpack(&layers, &dest) {
        Err(Error::Layer { layer: 0, .. }) => {}
        other => panic!("expected Layer error, got {other:?}"),
    }
    assert!(!dest.exists());
    assert_eq!(host_ls(tmp.path()), vec!["bad", "layer0"]);
}

#[test]
fn destination_must_not_exist() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new("exists");
    let layers = plain_layers(tmp.path(), vec![Layer::new().file("f", "x").tar()]);
    let dest = tmp.join("rootfs");
    std::fs::create_dir(&dest).expect("mkdir");
    std::fs::write(dest.join("mine"), "precious").expect("write");
    match Rootfs::unpack(&layers, &dest) {
        Err(Error::DestinationExists(p)) => assert_eq!(p, dest),
        other => panic!("expected DestinationExists, got {other:?}"),
    }
    assert_eq!(host_ls(&dest), vec!["mine"]);
}

/// A sandbox for one hostile case: `outside/` holds a file the layer must not reach, and the
/// destination is `work/rootfs` (so `../../outside` from the tree's root is `outside/`).
struct Hostile {
    tmp: TempDir,
}

impl Hostile {
    fn new(tag: &str) -> Hostile {
        let tmp = TempDir::new(tag);
        std::fs::create_dir_all(tmp.join("outside/dir")).expect("mkdir outside");
        std::fs::write(tmp.join("outside/secret"), "secret").expect("write secret");
        std::fs::write(tmp.join("outside/victim"), "victim").expect("write victim");
        std::fs::create_dir_all(tmp.join("work")).expect("mkdir work");
        std::fs::create_dir_all(tmp.join("blobs")).expect("mkdir blobs");
        Hostile { tmp }
    }

    fn outside(&self) -> String {
        self.tmp.join("outside").display().to_string()
    }

    /// Unpacks `tars`, expects a refusal of `entry` in `layer`, and checks that neither the
    /// outside directory nor the work directory changed.
    fn refuse(&self, tars: Vec<Vec<u8>>, layer: usize, entry: &str) -> EntryError {
        let layers = plain_layers(&self.tmp.join("blobs"), tars);
        let dest = self.tmp.join("work/rootfs");
        let err = match Rootfs::unpack(&layers, &dest) {
            Ok(_) => panic!("hostile layer for {entry:?} was accepted"),
            Err(e) => e,
        };
        let message = err.to_string();
        let reason = match err {
            Error::Entry {
                layer: l,
                entry: e,
                reason,
            } => {
                assert_eq!((l, e.as_str()), (layer, entry), "{message}");
                reason
            }
            other => panic!("expected an entry error for {entry:?}, got {other:?}"),
        };
        assert!(message.contains(&format!("layer {layer}")), "{message}");
        assert!(message.contains(entry), "{message}");
        assert_eq!(
            host_ls(&self.tmp.join("work")),
            Vec::<String>::new(),
            "nothing partial left"
        );
        assert_eq!(
            host_ls(&self.tmp.join("outside")),
            vec!["dir", "secret", "victim"]
        );
        assert!(host_ls(&self.tmp.join("outside/dir")).is_empty());
        let read = |n: &str| {
            std::fs::read_to_string(self.tmp.join("outside").join(n)).expect("read outside")
        };
        assert_eq!(
            (read("secret").as_str(), read("victim").as_str()),
            ("secret", "victim")
        );
        let secret = meta(&self.tmp.join("outside/secret"));
        assert_eq!(
            (
                secret.uid(),
                secret.nlink(),
                secret.permissions().mode() & 0o777
            ),
            (0, 1, 0o644)
        );
        reason
    }
}

#[test]
fn hostile_dotdot_path() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("dotdot");
    let tar = Layer::new()
        .file("ok", "fine")
        .entry(
            b"../../outside/dir/evil",
            Kind::File(b"x"),
            0o644,
            0,
            0,
            &[],
        )
        .tar();
    let reason = h.refuse(vec![tar], 0, "../../outside/dir/evil");
    assert!(matches!(reason, EntryError::DotDot), "{reason:?}");
    // Also in the middle of a path.
    let tar = Layer::new()
        .entry(b"a/../../../outside/dir/evil", Kind::Dir, 0o755, 0, 0, &[])
        .tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "a/../../../outside/dir/evil"),
        EntryError::DotDot
    ));
}

#[test]
fn pax_paths_are_used_and_checked() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("pax");
    let long = format!("{}/file", "directory-name/".repeat(12));
    let tar = Layer::new().pax_file(long.as_bytes(), b"long").tar();
    let layers = plain_layers(&h.tmp.join("blobs"), vec![tar]);
    let dest = h.tmp.join("work/ok");
    Rootfs::unpack(&layers, &dest).expect("unpack");
    assert_eq!(std::fs::read(dest.join(&long)).expect("read"), b"long");
    assert!(!dest.join("decoy").exists());
    Rootfs::unpack(&[], &h.tmp.join("unused"))
        .expect("empty")
        .remove()
        .expect("remove");
    std::fs::remove_dir_all(&dest).expect("clean");
    let tar = Layer::new().pax_file(b"../../outside/dir/evil", b"x").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "../../outside/dir/evil"),
        EntryError::DotDot
    ));
}

#[test]
fn hostile_absolute_path() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("absolute");
    let path = format!("{}/dir/evil", h.outside());
    let tar = Layer::new()
        .entry(path.as_bytes(), Kind::File(b"x"), 0o644, 0, 0, &[])
        .tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, &path),
        EntryError::Absolute
    ));
}

#[test]
fn hostile_write_through_symlink_in_same_layer() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("symlink-same");
    // The classic: a -> /etc-like directory, then a/passwd.
    let tar = Layer::new()
        .symlink("a", &h.outside())
        .file("a/secret", "pwned")
        .tar();
    let reason = h.refuse(vec![tar], 0, "a/secret");
    assert!(
        matches!(&reason, EntryError::ThroughSymlink(p) if p == "a"),
        "{reason:?}"
    );
}

#[test]
fn hostile_write_through_symlink_from_earlier_layer() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("symlink-lower");
    let l0 = Layer::new()
        .dir("etc/")
        .symlink("etc/conf", "../../../outside")
        .tar();
    let l1 = Layer::new().file("etc/conf/victim", "pwned").tar();
    let reason = h.refuse(vec![l0, l1], 1, "etc/conf/victim");
    assert!(
        matches!(&reason, EntryError::ThroughSymlink(p) if p == "etc/conf"),
        "{reason:?}"
    );
    // A directory entry through it is refused the same way.
    let l0 = Layer::new().symlink("x", "../../outside").tar();
    let l1 = Layer::new().dir("x/dir/new/").tar();
    assert!(matches!(
        h.refuse(vec![l0, l1], 1, "x/dir/new/"),
        EntryError::ThroughSymlink(_)
    ));
}

#[test]
fn hostile_whiteout_through_symlink() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("whiteout-symlink");
    let l0 = Layer::new().symlink("s", &h.outside()).tar();
    let l1 = Layer::new().marker("s/.wh.victim").tar();
    assert!(matches!(
        h.refuse(vec![l0.clone(), l1], 1, "s/.wh.victim"),
        EntryError::ThroughSymlink(_)
    ));
    let l1 = Layer::new().marker("s/.wh..wh..opq").tar();
    assert!(matches!(
        h.refuse(vec![l0, l1], 1, "s/.wh..wh..opq"),
        EntryError::ThroughSymlink(_)
    ));
}

#[test]
fn hostile_hardlinks() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("hardlink");
    let bad = |reason: EntryError, why: &str| match reason {
        EntryError::BadHardlink { why: w, .. } => assert!(w.contains(why), "{w}"),
        EntryError::DotDot if why == ".." => {}
        other => panic!("expected BadHardlink {why}, got {other:?}"),
    };
    // Out of the tree with `..`.
    let tar = Layer::new().hardlink("h", "../../outside/secret").tar();
    bad(h.refuse(vec![tar], 0, "h"), "'..'");
    // Absolute target.
    let target = format!("{}/secret", h.outside());
    let tar = Layer::new().hardlink("h", &target).tar();
    bad(h.refuse(vec![tar], 0, "h"), "absolute");
    // Through a symlink planted earlier.
    let tar = Layer::new()
        .symlink("s", &h.outside())
        .hardlink("h", "s/secret")
        .tar();
    bad(h.refuse(vec![tar], 0, "h"), "symlink");
    // To something that does not exist.
    let tar = Layer::new().hardlink("h", "missing/file").tar();
    bad(h.refuse(vec![tar], 0, "h"), "does not exist");
    let tar = Layer::new()
        .dir("missing/")
        .hardlink("h", "missing/file")
        .tar();
    bad(h.refuse(vec![tar], 0, "h"), "does not exist");
    // To a directory.
    let tar = Layer::new().dir("d/").hardlink("h", "d").tar();
    bad(h.refuse(vec![tar], 0, "h"), "directory");
    // To itself.
    let tar = Layer::new().file("h", "x").hardlink("h", "h").tar();
    bad(h.refuse(vec![tar], 0, "h"), "itself");
}

#[test]
fn hostile_directory_replaced_by_symlink() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("dir-to-symlink");
    let tar = Layer::new()
        .dir("d/")
        .symlink("d", &h.outside())
        .file("d/victim", "pwned")
        .tar();
    let reason = h.refuse(vec![tar], 0, "d");
    assert!(
        matches!(&reason, EntryError::ReplacesDirectory(p) if p == "d"),
        "{reason:?}"
    );
    // Also when the directory was only created implicitly, as a parent of an earlier entry.
    let tar = Layer::new()
        .file("d/f", "x")
        .symlink("d", &h.outside())
        .file("d/victim", "pwned")
        .tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "d"),
        EntryError::ReplacesDirectory(_)
    ));
}

#[test]
fn hostile_over_long_names_and_paths() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("long");
    let name = "n".repeat(256);
    let tar = Layer::new().file(&name, "x").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, &name),
        EntryError::NameTooLong
    ));
    let path = "abcdefghij/".repeat(400) + "f";
    let tar = Layer::new().file(&path, "x").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, &path),
        EntryError::PathTooLong
    ));
    let deep = "d/".repeat(300) + "f";
    let tar = Layer::new().file(&deep, "x").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, &deep),
        EntryError::TooDeep(_)
    ));
    // Symlink target longer than PATH_MAX.
    let target = "t".repeat(5000);
    let tar = Layer::new().symlink("s", &target).tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "s"),
        EntryError::BadSymlink(_)
    ));
}

#[test]
fn hostile_bad_whiteout_names() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("bad-whiteout");
    let tar = Layer::new().marker("dir/.wh.").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "dir/.wh."),
        EntryError::BadWhiteout
    ));
    let tar = Layer::new().marker("dir/.wh..").tar();
    assert!(matches!(
        h.refuse(vec![tar], 0, "dir/.wh.."),
        EntryError::BadWhiteout
    ));
}

#[test]
fn failure_in_a_later_layer_leaves_nothing() {
    if !is_root() {
        return;
    }
    let h = Hostile::new("late-failure");
    let l0 = Layer::new()
        .dir("etc/")
        .file("etc/hosts", "127.0.0.1")
        .tar();
    let l1 = Layer::new()
        .file("fine", "ok")
        .entry(b"/abs", Kind::File(b""), 0o644, 0, 0, &[])
        .tar();
    assert!(matches!(
        h.refuse(vec![l0, l1], 1, "/abs"),
        EntryError::Absolute
    ));
}
