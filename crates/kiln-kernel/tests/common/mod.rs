//! Helpers shared by kiln-kernel's integration tests: synthetic kernels and module trees,
//! and checks that a store directory holds nothing but its empty skeleton.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A minimal x86 bzImage: a setup header whose `kernel_version` points at `version`.
pub fn fake_bzimage(version: &str) -> Vec<u8> {
    let mut img = vec![0u8; 0x4000];
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let at = 0x1000usize;
    img[0x20e..0x210].copy_from_slice(&((at - 0x200) as u16).to_le_bytes());
    img[at..at + version.len()].copy_from_slice(version.as_bytes());
    img
}

/// A minimal x86-64 ELF executable carrying a `Linux version` banner, like a vmlinux.
pub fn fake_vmlinux(version: &str) -> Vec<u8> {
    let mut img = vec![0u8; 0x2000];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2; // 64-bit
    img[5] = 1; // little-endian
    img[6] = 1;
    img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    let banner = format!("Linux version {version} (kiln@test) #1 SMP\n\0");
    img[0x1000..0x1000 + banner.len()].copy_from_slice(banner.as_bytes());
    img
}

/// The content of a fake module: an ELF header plus its name, so tests can tell modules apart.
pub fn fake_module(name: &str) -> Vec<u8> {
    let mut m = b"\x7fELF\x02\x01\x01".to_vec();
    m.extend_from_slice(&[0u8; 9]);
    m.extend_from_slice(format!("module {name}").as_bytes());
    m
}

/// How a synthetic module file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Xz,
    Zst,
}

/// Writes a module file (compressed as asked) and returns its path relative to `dir`.
pub fn write_module(dir: &Path, rel_stem: &str, comp: Comp) -> String {
    let name = rel_stem.rsplit('/').next().expect("stem");
    let data = fake_module(&name.replace('-', "_"));
    let (rel, bytes) = match comp {
        Comp::None => (format!("{rel_stem}.ko"), data),
        Comp::Xz => {
            let mut out = Vec::new();
            lzma_rs::xz_compress(&mut &data[..], &mut out).expect("xz");
            (format!("{rel_stem}.ko.xz"), out)
        }
        Comp::Zst => (
            format!("{rel_stem}.ko.zst"),
            zstd::encode_all(&data[..], 3).expect("zstd"),
        ),
    };
    let path = dir.join(&rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(&path, bytes).expect("write module");
    rel
}

/// A synthetic `lib/modules/<release>` with the virtio modules kiln asks for, Debian-like
/// dependencies, and ext4 built in. Returns the directory.
pub fn fake_modules_tree(parent: &Path, release: &str, comp: Comp) -> PathBuf {
    let dir = parent.join(release);
    fs::create_dir_all(&dir).expect("mkdir");
    let m = |stem: &str| write_module(&dir, stem, comp);
    let ring = m("kernel/drivers/virtio/virtio_ring");
    let virtio = m("kernel/drivers/virtio/virtio");
    let mmio = m("kernel/drivers/virtio/virtio_mmio");
    let blk = m("kernel/drivers/block/virtio_blk");
    let failover = m("kernel/net/core/failover");
    let net_failover = m("kernel/drivers/net/net_failover");
    let net = m("kernel/drivers/net/virtio_net");
    let rng = m("kernel/drivers/char/hw_random/virtio-rng");
    let vsock = m("kernel/net/vmw_vsock/vsock");
    let common = m("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common");
    let transport = m("kernel/net/vmw_vsock/vmw_vsock_virtio_transport");
    let unrelated = m("kernel/fs/unrelated");
    let dep = format!(
        "{unrelated}:\n\
         {virtio}: {ring}\n\
         {ring}:\n\
         {mmio}: {virtio} {ring}\n\
         {blk}: {virtio} {ring}\n\
         {net}: {net_failover} {failover} {virtio} {ring}\n\
         {net_failover}: {failover}\n\
         {failover}:\n\
         {rng}: {virtio} {ring}\n\
         {vsock}:\n\
         {transport}: {common} {vsock} {virtio} {ring}\n\
         {common}: {vsock}\n"
    );
    fs::write(dir.join("modules.dep"), dep).expect("modules.dep");
    fs::write(
        dir.join("modules.builtin"),
        "kernel/fs/ext4/ext4.ko\nkernel/drivers/char/virtio_console.ko\n",
    )
    .expect("modules.builtin");
    dir
}

/// Every file under `dir` (relative paths), sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).expect("prefix").display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts the kernel store holds no kernels, blobs, module trees or scratch files (lock files
/// may exist).
pub fn assert_store_empty(root: &Path) {
    let kernels = root.join("kernels");
    let leftovers: Vec<String> = files_under(&kernels)
        .into_iter()
        .filter(|f| !f.ends_with(".lock"))
        .filter(|f| {
            f != "kernels.json"
                || fs::read_to_string(kernels.join(f))
                    .map(|s| s.contains("\"kernels\": {}"))
                    .map(|empty| !empty)
                    .unwrap_or(true)
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "the kernel store should be empty, but holds {leftovers:?}"
    );
    for sub in ["blobs/sha256", "modules", "tmp"] {
        let d = kernels.join(sub);
        if let Ok(rd) = fs::read_dir(&d) {
            assert_eq!(rd.count(), 0, "{} should be empty", d.display());
        }
    }
}

/// Decompresses a gzip initramfs.
pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("gunzip initramfs");
    out
}

/// The host's static busybox (installed by scripts/setup.sh).
pub fn busybox() -> PathBuf {
    kiln_kernel::busybox_path()
        .filter(|p| p.is_file())
        .expect("no busybox: install Debian's busybox-static (scripts/setup.sh)")
}

/// A tiny static "busybox" (an ELF header without program headers): enough for archive
/// tests that never boot, and much faster to compress than the real 2 MiB one.
pub fn fake_busybox(dir: &Path) -> PathBuf {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    // Written under a unique name and renamed, so a test thread that finds the
    // file never reads it half-written while another thread creates it.
    let path = dir.join("fake-busybox");
    let staging = tempfile::NamedTempFile::new_in(dir).expect("fake busybox staging");
    fs::write(staging.path(), elf).expect("fake busybox");
    staging.persist(&path).expect("fake busybox rename");
    path
}
