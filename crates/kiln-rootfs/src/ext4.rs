//! ext4 images from a directory tree, without mounting anything or using loop devices.
//!
//! [`MkfsExt4`] drives e2fsprogs (`mkfs.ext4 -d`, `e2fsck`, `debugfs`, `resize2fs`,
//! `dumpe2fs`) behind the [`FsImageBuilder`] trait so that a pure-Rust ext4 writer can take its
//! place later without touching callers.
//!
//! Sizing: the tree is measured (data blocks of each inode once, directory blocks, long
//! symlinks, xattr blocks, inodes) and ext4's own overhead is added on top (inode tables,
//! bitmaps, group descriptors and their backups, the journal), then the requested free space.
//! The result is checked against what `dumpe2fs` reports and grown if the estimate fell short.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fs::{AtFlags, FileType, Mode};

use crate::error::{Error, Result};
use crate::fsops::{self, MAX_DEPTH};

/// ext4 block size used for every image (the kernel's page size: no 1 KiB "small" profile).
pub const BLOCK_SIZE: u64 = 4096;
/// On-disk inode size: room for nanosecond timestamps and small in-inode xattrs.
const INODE_SIZE: u64 = 256;
const BLOCKS_PER_GROUP: u64 = 32768;
/// First non-reserved inode number minus one: inodes 1-10 are reserved, 11 is lost+found.
const RESERVED_INODES: u64 = 11;
/// Inode density kept for growth: one inode per 16 KiB, mke2fs's default ratio.
const BYTES_PER_INODE: u64 = 16384;
/// ext4 can address at most 2^32 inodes.
const MAX_INODES: u64 = u32::MAX as u64;

/// Turns a directory tree into a filesystem image file, and grows such images.
///
/// The seam for replacing e2fsprogs with a pure-Rust writer: callers ([`crate::DiskCache`])
/// only use these three operations.
pub trait FsImageBuilder: Send + Sync {
    /// Writes a new image at `out` holding `src` (owners, modes, times, xattrs, hard links,
    /// device nodes kept) with at least `free_space` bytes left free. `out` must not exist.
    fn build(&self, src: &Path, out: &Path, free_space: u64) -> Result<()>;

    /// [`FsImageBuilder::build`] that calls `src_done` once `src` will not be read again, so
    /// the caller can remove the tree while the image is still being checked. `src_done` is
    /// called at most once, and not at all if the build fails before it is done reading.
    /// The default calls it after `build` succeeded.
    fn build_then_release(
        &self,
        src: &Path,
        out: &Path,
        free_space: u64,
        src_done: &mut dyn FnMut(),
    ) -> Result<()> {
        self.build(src, out, free_space)?;
        src_done();
        Ok(())
    }

    /// Grows the image file to `size` bytes and the filesystem inside to fill it.
    fn grow(&self, image: &Path, size: u64) -> Result<()>;

    /// Checks the image read-only and fails if it is not clean.
    fn check(&self, image: &Path) -> Result<()>;
}

/// [`FsImageBuilder`] on e2fsprogs: `mkfs.ext4 -d`, `debugfs -w` for the root inode's
/// metadata, `e2fsck -fn` to verify, `e2fsck -fyD` to index directories, `resize2fs` to grow.
///
/// Known cost: e2fsprogs 1.47's `-d` adds each name with a linear scan of its directory, so
/// build time is quadratic in the size of the largest directory (about 45 s for 18 000 man
/// pages in one directory, under a second for 2 500). A pure-Rust writer behind
/// [`FsImageBuilder`] is the way out.
#[derive(Debug, Clone)]
pub struct MkfsExt4 {
    label: String,
}

impl Default for MkfsExt4 {
    fn default() -> Self {
        Self {
            label: "kiln-root".to_owned(),
        }
    }
}

impl MkfsExt4 {
    /// Builder with the default volume label `kiln-root`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the volume label (at most 16 bytes; longer labels are cut by mke2fs).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Finds every e2fsprogs tool this builder uses, so a missing package is reported before
    /// minutes of unpacking rather than after.
    pub fn check_tools() -> Result<()> {
        for tool in ["mkfs.ext4", "e2fsck", "debugfs", "resize2fs", "dumpe2fs"] {
            find_tool(tool)?;
        }
        Ok(())
    }

    fn mkfs(&self, src: &Path, out: &Path, plan: &Plan) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(|e| Error::io("open image", out, e))?;
        // Start from an all-hole file of the planned size (also after a failed attempt).
        file.set_len(0)
            .map_err(|e| Error::io("size image", out, e))?;
        file.set_len(plan.blocks * BLOCK_SIZE)
            .map_err(|e| Error::io("size image", out, e))?;
        drop(file);
        let mut cmd = tool("mkfs.ext4")?;
        cmd.args([
            "-F", "-q", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        .arg("-N")
        .arg(plan.inodes.to_string())
        .arg("-L")
        .arg(&self.label);
        if plan.journal_blocks > 0 {
            cmd.arg("-J")
                .arg(format!("size={}", (plan.journal_blocks * BLOCK_SIZE) >> 20));
        } else {
            cmd.args(["-O", "^has_journal"]);
        }
        cmd.arg("-d").arg(src).arg(out).arg(plan.blocks.to_string());
        run("mkfs.ext4", cmd)
    }
}

/// Free blocks and inodes of an image, as its superblock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Total blocks of [`BLOCK_SIZE`].
    pub blocks: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Total inodes.
    pub inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

/// Reads block and inode counts from an ext4 image's superblock (`dumpe2fs -h`).
pub fn fs_usage(image: &Path) -> Result<FsUsage> {
    let mut cmd = tool("dumpe2fs")?;
    cmd.arg("-h").arg(image);
    let out = output("dumpe2fs", cmd)?;
    let field = |name: &str| -> Result<u64> {
        out.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::io(
                    "read superblock",
                    image,
                    std::io::Error::other(format!("dumpe2fs: no {name:?}")),
                )
            })
    };
    Ok(FsUsage {
        blocks: field("Block count")?,
        free_blocks: field("Free blocks")?,
        inodes: field("Inode count")?,
        free_inodes: field("Free inodes")?,
    })
}

impl FsImageBuilder for MkfsExt4 {
    fn build(&self, src: &Path, out: &Path, free_space: u64) -> Result<()> {
        self.build_then_release(src, out, free_space, &mut || {})
    }

    fn build_then_release(
        &self,
        src: &Path,
        out: &Path,
        free_space: u64,
        src_done: &mut dyn FnMut(),
    ) -> Result<()> {
        Self::check_tools()?;
        let usage = TreeUsage::measure(src)?;
        let want_free = free_space.div_ceil(BLOCK_SIZE);
        let mut plan = Plan::for_usage(&usage, want_free)?;
        tracing::debug!(?usage, ?plan, "ext4 plan");
        // Claim the output first: an existing file is not ours to overwrite or remove.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| Error::io("create image", out, e))?;
        let result = (|| {
            // The estimate is deliberately generous; if mke2fs still runs out of room, try
            // again bigger rather than fail an image that would fit.
            let mut attempt = 0;
            loop {
                match self.mkfs(src, out, &plan) {
                    Ok(()) => break,
                    Err(Error::ToolFailed { output, .. })
                        if attempt < 3 && looks_like_no_space(&output) =>
                    {
                        tracing::debug!(%output, "mkfs.ext4 ran out of room; retrying bigger");
                        attempt += 1;
                        plan = Plan::for_blocks(plan.blocks + plan.blocks / 2, &usage)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            set_root_meta(src, out)?;
            // Everything below reads only the image.
            src_done();
            let got = fs_usage(out)?;
            if got.free_blocks < want_free {
                let short = want_free - got.free_blocks;
                let blocks = got.blocks + short + short / 8 + 256;
                tracing::debug!(short, blocks, "ext4 estimate fell short; growing");
                self.grow(out, blocks * BLOCK_SIZE)?;
            }
            // Verify what mke2fs wrote, then index the directories (mke2fs -d leaves them
            // linear: slow lookups in big ones and at most 65000 subdirectories), then verify
            // the result again. Both checks are read-only and cheap next to mke2fs.
            self.check(out)?;
            index_directories(out)?;
            self.check(out)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(out);
        }
        result
    }

    fn grow(&self, image: &Path, size: u64) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(|e| Error::io("open image", image, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat image", image, e))?
            .len();
        if size < len {
            return Err(Error::SizeTooSmall {
                requested: size,
                image: len,
            });
        }
        file.set_len(size)
            .map_err(|e| Error::io("grow image", image, e))?;
        drop(file);
        let mut cmd = tool("resize2fs")?;
        cmd.arg(image);
        run("resize2fs", cmd)
    }

    fn check(&self, image: &Path) -> Result<()> {
        let mut cmd = tool("e2fsck")?;
        cmd.arg("-fn").arg(image);
        run("e2fsck", cmd)
    }
}

/// `e2fsck -fyD`: rebuilds every directory as a hashed (htree) one.
fn index_directories(image: &Path) -> Result<()> {
    let mut cmd = tool("e2fsck")?;
    cmd.arg("-fyD").arg(image).stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| Error::io("run e2fsck -fyD on", image, e))?;
    // 0: nothing to do; 1: directories rewritten ("errors corrected").
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(Error::ToolFailed {
            tool: "e2fsck",
            status: out.status,
            output: format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )
            .trim()
            .to_owned(),
        }),
    }
}

fn looks_like_no_space(output: &str) -> bool {
    let lower = output.to_ascii_lowercase();
    [
        "no space",
        "could not allocate",
        "no free space",
        "new_inode",
        "new_block",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// `mkfs.ext4 -d` gives the root inode mkfs's defaults (0755, now); the tree's root may
/// say otherwise (a layer's `./` entry), so copy owner, mode and times with `debugfs -w`.
fn set_root_meta(src: &Path, image: &Path) -> Result<()> {
    let st = rustix::fs::stat(src).map_err(|e| Error::io("stat", src, e))?;
    let mode = st.st_mode & 0o7777;
    let commands = format!(
        "sif / mode 0{:o}\nsif / uid {}\nsif / gid {}\nsif / mtime @{}\nsif / atime @{}\nsif / ctime @{}\n",
        0o40000 | mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime,
        st.st_atime,
        st.st_ctime,
    );
    let mut cmd = tool("debugfs")?;
    cmd.arg("-w").arg("-f").arg("-").arg(image);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("run debugfs on", image, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .map_err(|e| Error::io("write debugfs commands for", image, e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("run debugfs on", image, e))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs exits 0 even when a request fails; its complaints go to stderr after the banner.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(Error::ToolFailed {
            tool: "debugfs",
            status: out.status,
            output: complaints.join("\n"),
        });
    }
    Ok(())
}

/// What a directory tree needs from a filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Inodes (hard links counted once), the root included.
    pub inodes: u64,
    /// Data, directory, extent-index, long-symlink and xattr blocks of [`BLOCK_SIZE`].
    pub blocks: u64,
}

impl TreeUsage {
    /// Walks `root` (never following symlinks) and adds up what an ext4 copy of it needs.
    pub fn measure(root: &Path) -> Result<TreeUsage> {
        let fd = rustix::fs::open(root, fsops::DIR_FLAGS, Mode::empty())
            .map_err(|e| Error::io("open directory", root, e))?;
        let mut usage = TreeUsage {
            inodes: 1,
            blocks: 0,
        };
        let mut seen = std::collections::HashSet::new();
        let mut dir_bytes = 0;
        measure_dir(fd.as_fd(), 0, &mut usage, &mut seen, &mut dir_bytes)
            .map_err(|e| Error::io("measure", root, e))?;
        usage.blocks += dir_blocks(dir_bytes) + xattr_blocks(fd.as_fd(), None);
        Ok(usage)
    }
}

fn measure_dir(
    dir: BorrowedFd<'_>,
    depth: usize,
    usage: &mut TreeUsage,
    seen: &mut std::collections::HashSet<(u64, u64)>,
    dir_bytes: &mut u64,
) -> std::io::Result<()> {
    if depth > MAX_DEPTH * 2 {
        return Err(std::io::Error::other("directory tree too deep"));
    }
    // `.` and `..`
    *dir_bytes = 24;
    for (name, _) in fsops::list_dir(dir)? {
        *dir_bytes += 8 + (name.len() as u64).next_multiple_of(4);
        let st = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::Directory && st.st_nlink > 1 && !seen.insert((st.st_dev, st.st_ino)) {
            continue;
        }
        usage.inodes += 1;
        usage.blocks += xattr_blocks(dir, Some(&name));
        match ft {
            FileType::RegularFile => {
                let blocks = (st.st_size as u64).div_ceil(BLOCK_SIZE);
                // Four extents fit in the inode; each covers at most 32768 blocks, and an
                // index block holds 340 more.
                let extents = blocks.div_ceil(32768);
                let index = if extents > 4 {
                    extents.div_ceil(340) + 1
                } else {
                    0
                };
                usage.blocks += blocks + index;
            }
            // Targets under 60 bytes live in the inode ("fast" symlinks).
            FileType::Symlink if st.st_size >= 60 => usage.blocks += 1,
            FileType::Directory => {
                let child = fsops::open_dir(dir, &name)?;
                let mut child_bytes = 0;
                measure_dir(child.as_fd(), depth + 1, usage, seen, &mut child_bytes)?;
                usage.blocks += dir_blocks(child_bytes);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Blocks for a directory whose entries take `bytes`: entries never span blocks, each block
/// keeps a 12-byte checksum tail, and hashed (htree) directories split leaves half full.
fn dir_blocks(bytes: u64) -> u64 {
    let leaves = bytes.div_ceil(BLOCK_SIZE - 12 - 264);
    if leaves <= 1 {
        1
    } else {
        leaves * 2 + leaves.div_ceil(500) + 1
    }
}

/// One block for any inode with xattrs: small ones fit in the inode, but sizing stays safe.
fn xattr_blocks(dir: BorrowedFd<'_>, name: Option<&[u8]>) -> u64 {
    let listed = match name {
        Some(name) => {
            // The magic link is our own descriptor; the final component is not followed.
            let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            path.extend_from_slice(name);
            rustix::fs::llistxattr_query(path.as_slice())
        }
        None => rustix::fs::flistxattr_query(dir),
    };
    match listed {
        Ok(n) if n > 0 => 1,
        _ => 0,
    }
}

/// The geometry passed to mke2fs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    blocks: u64,
    inodes: u64,
    journal_blocks: u64,
}

impl Plan {
    /// Smallest geometry holding `usage` with `want_free` blocks to spare.
    fn for_usage(usage: &TreeUsage, want_free: u64) -> Result<Plan> {
        let mut blocks = usage.blocks + want_free + 1024;
        for _ in 0..32 {
            let plan = Self::for_blocks(blocks, usage)?;
            let needed = usage.blocks + want_free + plan.overhead();
            // 2% and a few blocks of slack for allocator placement.
            let needed = needed + needed / 50 + 64;
            if needed <= blocks {
                return Ok(plan);
            }
            blocks = needed;
        }
        Self::for_blocks(blocks, usage)
    }

    /// The geometry mke2fs will use for a filesystem of `blocks` blocks.
    fn for_blocks(blocks: u64, usage: &TreeUsage) -> Result<Plan> {
        let wanted = usage.inodes + RESERVED_INODES;
        let inodes = (wanted + wanted / 10 + 64).max(blocks * BLOCK_SIZE / BYTES_PER_INODE);
        if inodes > MAX_INODES || blocks > 1 << 40 {
            return Err(Error::TooLarge(format!("{inodes} inodes, {blocks} blocks")));
        }
        Ok(Plan {
            blocks,
            inodes,
            journal_blocks: default_journal_blocks(blocks),
        })
    }

    /// ext4's own blocks: inode tables, bitmaps, descriptors and reserved descriptors with
    /// their backups, the journal, lost+found and the root directory.
    fn overhead(&self) -> u64 {
        let groups = self.blocks.div_ceil(BLOCKS_PER_GROUP);
        let inodes_per_block = BLOCK_SIZE / INODE_SIZE;
        let per_group = self
            .inodes
            .div_ceil(groups)
            .next_multiple_of(inodes_per_block);
        let inode_tables = groups * per_group / inodes_per_block;
        let desc_per_block = BLOCK_SIZE / 64;
        let gdt = groups.div_ceil(desc_per_block);
        // resize_inode reserves descriptors for growth to 1024x (at most 2^32 blocks).
        let max_groups = (self.blocks.saturating_mul(1024))
            .min(u32::MAX as u64)
            .div_ceil(BLOCKS_PER_GROUP);
        let reserved_gdt = max_groups
            .div_ceil(desc_per_block)
            .min(BLOCK_SIZE / 4)
            .saturating_sub(gdt);
        let backups = backup_groups(groups);
        inode_tables + 2 * groups + backups * (1 + gdt + reserved_gdt) + self.journal_blocks + 4 + 1
    }
}

/// Groups holding a superblock backup with sparse_super: 0, 1 and powers of 3, 5 and 7.
fn backup_groups(groups: u64) -> u64 {
    let mut count = groups.min(2);
    for base in [3u64, 5, 7] {
        let mut g = base;
        while g < groups {
            count += 1;
            g *= base;
        }
    }
    count
}

/// mke2fs's default journal size (`ext2fs_default_journal_size`) in blocks.
fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// Finds an e2fsprogs program in `PATH`, then `/usr/sbin` and `/sbin` (often missing from a
/// non-root user's `PATH`).
pub(crate) fn find_tool(name: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [OsStr::new("/usr/sbin"), OsStr::new("/sbin")];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            rustix::fs::access(candidate, rustix::fs::Access::EXEC_OK).is_ok()
                && candidate.is_file()
        })
        .ok_or(Error::ToolMissing { tool: name })
}

fn tool(name: &'static str) -> Result<Command> {
    let mut cmd = Command::new(find_tool(name)?);
    // Parsed output (dumpe2fs) must not be translated.
    cmd.env("LC_ALL", "C");
    Ok(cmd)
}

/// Runs a tool; failure carries its output.
pub(crate) fn run(name: &'static str, cmd: Command) -> Result<()> {
    output(name, cmd).map(drop)
}

fn output(name: &'static str, mut cmd: Command) -> Result<String> {
    cmd.stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| Error::io("run", PathBuf::from(name), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let mut text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        stdout.trim()
    );
    if text.len() > 4000 {
        let mut cut = 4000;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Err(Error::ToolFailed {
        tool: name,
        status: out.status,
        output: text.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let err = find_tool("kiln-no-such-e2fs-tool").expect_err("must be missing");
        let text = err.to_string();
        assert!(text.contains("kiln-no-such-e2fs-tool"), "{text}");
        assert!(text.contains("apt-get install e2fsprogs"), "{text}");
        assert!(
            find_tool("mkfs.ext4").is_ok(),
            "e2fsprogs is installed on test machines"
        );
    }

    #[test]
    fn backups_follow_sparse_super() {
        assert_eq!(backup_groups(1), 1);
        assert_eq!(backup_groups(2), 2);
        // 0, 1, 3, 5, 7, 9
        assert_eq!(backup_groups(10), 6);
        // + 25, 27, 49
        assert_eq!(backup_groups(50), 9);
    }

    #[test]
    fn plan_converges_and_covers_free_space() {
        let usage = TreeUsage {
            inodes: 5000,
            blocks: 20_000,
        };
        let plan = Plan::for_usage(&usage, 10_000).expect("plan");
        assert!(plan.blocks >= 30_000 + plan.overhead());
        assert!(plan.inodes >= 5000 + RESERVED_INODES);
        assert_eq!(plan.journal_blocks, default_journal_blocks(plan.blocks));
    }
}
