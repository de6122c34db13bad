//! The initramfs kiln generates for a kernel: the virtio modules the guest needs (with their
//! dependencies, decompressed, in load order) and an `/init` that loads them, mounts the root
//! disk and hands over to the image's init.
//!
//! Until kiln's guest agent exists, `/init` is a busybox shell script ([`INIT_SCRIPT`]) run by
//! Debian's static busybox. The agent will replace it through
//! [`InitramfsBuilder::with_init`]: the archive then carries the agent as `/init` and the same
//! module list (`/etc/kiln/modules`) for it to load.
//!
//! Archive layout:
//!
//! | path | what |
//! |---|---|
//! | `/init` | the script (0755) or the program given to `with_init` |
//! | `/bin/busybox`, `/bin/sh` | static busybox and its `sh` link (script mode) |
//! | `/dev/console`, `/dev/null` | device nodes the kernel needs before devtmpfs is mounted |
//! | `/lib/modules/<release>/<path>.ko` | the modules, at their `modules.dep` paths, decompressed |
//! | `/etc/kiln/modules` | their paths relative to `/lib/modules/<release>`, in load order |
//! | `/etc/kiln/release` | the kernel release |

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::error::{Error, Result};
use crate::modules::{
    decompressed_path, default_module_requests, read_module, ModuleIndex, ModuleRequest,
    ResolvedModule,
};
use crate::util::read_error;

/// The `/init` script of a generated initramfs (busybox `sh`).
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Version of the generated initramfs' layout and script. Stored in each record, so
/// [`crate::KernelStore::ensure_default`] regenerates the default kernel's initramfs when a newer
/// kiln changes it.
pub const INITRAMFS_VERSION: u32 = 1;

/// Where busybox is looked for: `$KILN_BUSYBOX`, then Debian's busybox-static paths.
pub fn busybox_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_BUSYBOX").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// What runs as `/init`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InitProgram {
    /// [`INIT_SCRIPT`] under busybox.
    Script,
    /// A program from the host (kiln's guest agent, later).
    Binary(PathBuf),
}

/// Whether busybox goes into the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Busybox {
    /// Found by [`busybox_path`] in script mode; left out with a custom init.
    Auto,
    /// This file.
    Path(PathBuf),
    /// Left out.
    None,
}

/// Builds a gzip-compressed `newc` initramfs for one kernel.
#[derive(Debug, Clone)]
pub struct InitramfsBuilder {
    modules_dir: Option<PathBuf>,
    release: Option<String>,
    requests: Vec<ModuleRequest>,
    init: InitProgram,
    busybox: Busybox,
    files: Vec<(String, u32, Vec<u8>)>,
}

impl Default for InitramfsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A built initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The gzip-compressed archive.
    pub data: Vec<u8>,
    /// Modules it loads, in order.
    pub modules: Vec<ResolvedModule>,
    /// Requested modules that are built into the kernel.
    pub builtin: Vec<String>,
    /// Optional requested modules the kernel lacks.
    pub missing: Vec<String>,
}

impl InitramfsBuilder {
    /// The default: [`INIT_SCRIPT`] with the host's static busybox, no modules until
    /// [`InitramfsBuilder::modules_dir`] is given, then [`default_module_requests`].
    pub fn new() -> Self {
        InitramfsBuilder {
            modules_dir: None,
            release: None,
            requests: default_module_requests(),
            init: InitProgram::Script,
            busybox: Busybox::Auto,
            files: Vec::new(),
        }
    }

    /// The kernel's `lib/modules/<release>` directory to take modules from. The release is
    /// its directory name unless set with [`InitramfsBuilder::release`].
    pub fn modules_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.modules_dir = Some(dir.into());
        self
    }

    /// The kernel release (the `lib/modules/<release>` directory name in the guest).
    pub fn release(mut self, release: impl Into<String>) -> Self {
        self.release = Some(release.into());
        self
    }

    /// Replaces the module list (default: [`default_module_requests`]).
    pub fn modules(mut self, requests: Vec<ModuleRequest>) -> Self {
        self.requests = requests;
        self
    }

    /// Uses a host program as `/init` instead of the busybox script: how kiln's guest agent
    /// takes over. busybox is then only included if set with [`InitramfsBuilder::busybox`].
    pub fn with_init(mut self, program: impl Into<PathBuf>) -> Self {
        self.init = InitProgram::Binary(program.into());
        self
    }

    /// Uses this static busybox (`None`: include none, which only suits a custom init).
    pub fn busybox(mut self, path: Option<PathBuf>) -> Self {
        self.busybox = match path {
            Some(p) => Busybox::Path(p),
            None => Busybox::None,
        };
        self
    }

    /// Adds a file to the archive (parent directories are created).
    pub fn file(mut self, path: &str, mode: u32, data: Vec<u8>) -> Self {
        self.files
            .push((path.trim_start_matches('/').to_string(), mode, data));
        self
    }

    /// Resolves the modules, reads them and writes the compressed archive.
    pub fn build(&self) -> Result<Initramfs> {
        let mut arch = Archive::new();
        for d in [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "newroot",
            "etc",
            "etc/kiln",
            "lib",
            "lib/modules",
        ] {
            arch.dir(d)?;
        }
        arch.w.char_dev("dev/console", 0o600, 5, 1)?;
        arch.w.char_dev("dev/null", 0o666, 1, 3)?;

        let busybox = match (&self.busybox, &self.init) {
            (Busybox::Path(p), _) => Some(p.clone()),
            (Busybox::None, _) => None,
            (Busybox::Auto, InitProgram::Script) => Some(busybox_path().ok_or_else(|| {
                Error::Initramfs(
                    "no busybox found for the initramfs /init: install Debian's busybox-static (or set KILN_BUSYBOX)".into(),
                )
            })?),
            (Busybox::Auto, InitProgram::Binary(_)) => None,
        };
        match (&self.init, &busybox) {
            (InitProgram::Script, None) => {
                return Err(Error::Initramfs(
                    "the script /init needs busybox; give one or use with_init".into(),
                ))
            }
            (InitProgram::Script, Some(_)) => arch.w.file("init", 0o755, INIT_SCRIPT.as_bytes())?,
            (InitProgram::Binary(p), _) => {
                let data = read_static_binary(p, "the initramfs /init program")?;
                arch.w.file("init", 0o755, &data)?;
            }
        }
        if let Some(bb) = &busybox {
            let data = read_static_binary(bb, "busybox")?;
            arch.w.file("bin/busybox", 0o755, &data)?;
            arch.w.symlink("bin/sh", "busybox")?;
        }

        let mut out = Initramfs {
            data: Vec::new(),
            modules: Vec::new(),
            builtin: Vec::new(),
            missing: Vec::new(),
        };
        let mut list = String::new();
        let mut release = self.release.clone().unwrap_or_default();
        if let Some(dir) = &self.modules_dir {
            if release.is_empty() {
                release = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
            }
            if !crate::modules::is_safe_relative(&release) || release.contains('/') {
                return Err(Error::Modules {
                    dir: dir.clone(),
                    reason: format!("cannot use {release:?} as the kernel release directory name"),
                });
            }
            let index = ModuleIndex::load(dir)?;
            let res = index.resolve(&self.requests)?;
            let base = format!("lib/modules/{release}");
            arch.dir(&base)?;
            for m in &res.order {
                let data = read_module(&dir.join(&m.path))?;
                let rel = decompressed_path(&m.path);
                arch.file(&format!("{base}/{rel}"), 0o644, &data)?;
                list.push_str(&rel);
                list.push('\n');
            }
            out.modules = res.order;
            out.builtin = res.builtin;
            out.missing = res.missing;
        }
        arch.w.file("etc/kiln/modules", 0o644, list.as_bytes())?;
        arch.w
            .file("etc/kiln/release", 0o644, format!("{release}\n").as_bytes())?;
        for (path, mode, data) in &self.files {
            arch.file(path, *mode, data)?;
        }
        let cpio = arch.w.finish()?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&cpio)
            .map_err(|e| Error::Initramfs(format!("gzip: {e}")))?;
        out.data = gz
            .finish()
            .map_err(|e| Error::Initramfs(format!("gzip: {e}")))?;
        Ok(out)
    }
}

/// A cpio writer that adds missing parent directories before each entry.
struct Archive {
    w: CpioWriter<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Archive {
    fn new() -> Self {
        Archive {
            w: CpioWriter::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        let mut cur = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if self.dirs.insert(cur.clone()) {
                self.w.dir(&cur, 0o755)?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.w.file(path, mode, data)
    }
}

/// Reads a program for the initramfs, refusing dynamically linked ones: the initramfs has no
/// libc, so a dynamic busybox (Debian's `busybox` rather than `busybox-static`) would fail only
/// at boot, with "not found".
fn read_static_binary(path: &Path, what: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(path).map_err(|e| read_error(path, e))?;
    match elf_is_dynamic(&data) {
        Some(false) => Ok(data),
        Some(true) => Err(Error::Initramfs(format!(
            "{what} {} is dynamically linked; the initramfs needs a static one (Debian: busybox-static)",
            path.display()
        ))),
        None => Err(Error::Initramfs(format!(
            "{what} {} is not a 64-bit ELF executable",
            path.display()
        ))),
    }
}

/// `Some(true)` if a 64-bit little-endian ELF has a `PT_INTERP` program header, `Some(false)`
/// if it has none, `None` if it is not such an ELF.
pub(crate) fn elf_is_dynamic(data: &[u8]) -> Option<bool> {
    if !data.starts_with(b"\x7fELF") || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return None;
    }
    let bytes = |o: usize, n: usize| data.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        bytes(o, 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 4 {
        return None;
    }
    for i in 0..phnum {
        let p_type = u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)?;
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection() {
        if let Ok(data) = std::fs::read("/bin/busybox") {
            assert_eq!(elf_is_dynamic(&data), Some(false));
        }
        if let Ok(data) = std::fs::read("/bin/ls") {
            assert_eq!(elf_is_dynamic(&data), Some(true));
        }
        assert_eq!(elf_is_dynamic(b"#!/bin/sh"), None);
    }
}
