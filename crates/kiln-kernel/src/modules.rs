//! Kernel modules: `modules.dep` / `modules.builtin` parsing, dependency resolution into a
//! load order, and reading (decompressing) `.ko`, `.ko.xz`, `.ko.zst` and `.ko.gz` files.
//!
//! The initramfs has no `modprobe` and no `depmod` output of its own; it loads modules with
//! plain `insmod` in the order resolved here, so the order must put every dependency first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::util::read_error;

/// Largest module accepted after decompression (the largest in Debian's tree is ~10 MiB).
const MAX_MODULE_SIZE: u64 = 256 << 20;

/// A module the initramfs should load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRequest {
    /// The module name (`virtio_blk`; `-` and `_` are the same, as for modprobe).
    pub name: String,
    /// Whether the import fails when the kernel has it neither as a module nor built in.
    /// Optional modules that are missing are skipped and listed in the record.
    pub required: bool,
}

impl ModuleRequest {
    /// A module the guest cannot boot without.
    pub fn required(name: &str) -> Self {
        ModuleRequest {
            name: name.to_string(),
            required: true,
        }
    }

    /// A module loaded when the kernel has it.
    pub fn optional(name: &str) -> Self {
        ModuleRequest {
            name: name.to_string(),
            required: false,
        }
    }
}

/// The modules kiln's initramfs loads by default, in request order (dependencies are added in
/// front of each as resolved).
///
/// virtio_mmio is how kiln-vmm attaches devices; virtio_pci lets the same initramfs boot on
/// QEMU's q35 (tests); block, net, console, rng and vsock are the devices kiln guests use;
/// ext4 is listed for kernels that build it as a module (Debian's cloud kernel has it built in).
pub fn default_module_requests() -> Vec<ModuleRequest> {
    let mut v = vec![
        ModuleRequest::required("virtio_mmio"),
        ModuleRequest::optional("virtio_pci"),
        ModuleRequest::required("virtio_blk"),
    ];
    for name in [
        "virtio_net",
        "virtio_console",
        "virtio_rng",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "ext4",
    ] {
        v.push(ModuleRequest::optional(name));
    }
    v
}

/// `virtio_blk` from `kernel/drivers/block/virtio-blk.ko.xz`: the file's base name without
/// the `.ko*` suffix, `-` turned into `_` as the kernel does.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = match base.find(".ko") {
        Some(i) => base.get(..i).unwrap_or(base),
        None => base,
    };
    normalize(stem)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

#[derive(Debug, Clone)]
struct DepEntry {
    path: String,
    deps: Vec<String>,
}

/// A module in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    /// Normalized module name.
    pub name: String,
    /// Path relative to the modules directory, as in `modules.dep` (may end in `.xz`/`.zst`).
    pub path: String,
}

/// The outcome of [`ModuleIndex::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Modules to `insmod`, dependencies before their users, each once.
    pub order: Vec<ResolvedModule>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Optional requested modules the kernel has in neither form.
    pub missing: Vec<String>,
}

/// The dependency index of one kernel's modules directory.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    by_name: BTreeMap<String, DepEntry>,
    by_path: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Reads `modules.dep` (required) and `modules.builtin` (optional) from a
    /// `lib/modules/<release>` directory.
    pub fn load(dir: &Path) -> Result<ModuleIndex> {
        let dep_path = dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Modules {
                    dir: dir.to_path_buf(),
                    reason: "no modules.dep (not a lib/modules/<release> directory, or depmod was never run)".into(),
                }
            } else {
                read_error(&dep_path, e)
            }
        })?;
        let builtin_path = dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(read_error(&builtin_path, e)),
        };
        Self::parse(dir, &dep, &builtin)
    }

    /// Builds the index from the text of `modules.dep` and `modules.builtin`; `dir` is only
    /// used in messages and to read modules later.
    ///
    /// Every path must be relative and free of `..`: the directory may come from an untrusted
    /// OCI image, and these paths are opened inside it.
    pub fn parse(dir: &Path, modules_dep: &str, modules_builtin: &str) -> Result<ModuleIndex> {
        let bad = |line: usize, why: &str| Error::Modules {
            dir: dir.to_path_buf(),
            reason: format!("modules.dep line {line}: {why}"),
        };
        let mut by_name = BTreeMap::new();
        let mut by_path = BTreeMap::new();
        for (i, line) in modules_dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .ok_or_else(|| bad(i + 1, "no ':' after the module path"))?;
            let path = path.trim();
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            for p in std::iter::once(path).chain(deps.iter().map(String::as_str)) {
                if !is_safe_relative(p) {
                    return Err(bad(i + 1, &format!("unsafe module path {p:?}")));
                }
                if !p.contains(".ko") {
                    return Err(bad(i + 1, &format!("{p:?} is not a .ko file")));
                }
            }
            let name = module_name(path);
            by_path.insert(path.to_string(), name.clone());
            by_name.entry(name).or_insert(DepEntry {
                path: path.to_string(),
                deps,
            });
        }
        let builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            by_name,
            by_path,
            builtin,
        })
    }

    /// Whether the kernel has `name` built in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Whether `name` is available as a loadable module.
    pub fn has_module(&self, name: &str) -> bool {
        self.by_name.contains_key(&normalize(name))
    }

    /// Resolves requests into a load order: each module after all of its dependencies
    /// (followed through their own `modules.dep` lines, so the order does not rely on how
    /// depmod sorted the list), each module once.
    pub fn resolve(&self, requests: &[ModuleRequest]) -> Result<Resolution> {
        let mut res = Resolution::default();
        let mut done = BTreeSet::new();
        for req in requests {
            let name = normalize(&req.name);
            if self.by_name.contains_key(&name) {
                let mut visiting = Vec::new();
                self.visit(&name, &mut visiting, &mut done, &mut res.order)?;
            } else if self.builtin.contains(&name) {
                res.builtin.push(name);
            } else if req.required {
                return Err(Error::ModuleNotFound {
                    name,
                    dir: self.dir.clone(),
                });
            } else {
                res.missing.push(name);
            }
        }
        Ok(res)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<ResolvedModule>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if visiting.iter().any(|v| v == name) {
            visiting.push(name.to_string());
            return Err(Error::Modules {
                dir: self.dir.clone(),
                reason: format!("dependency cycle: {}", visiting.join(" -> ")),
            });
        }
        let entry = self.by_name.get(name).ok_or_else(|| Error::Modules {
            dir: self.dir.clone(),
            reason: format!("module {name} is listed as a dependency but has no modules.dep line"),
        })?;
        visiting.push(name.to_string());
        // depmod lists users before what they use; walking it backwards loads in the same
        // order modprobe would.
        for dep in entry.deps.iter().rev() {
            let dep_name = self
                .by_path
                .get(dep)
                .cloned()
                .unwrap_or_else(|| module_name(dep));
            if dep_name == name {
                continue;
            }
            self.visit(&dep_name, visiting, done, order)?;
        }
        visiting.pop();
        done.insert(name.to_string());
        order.push(ResolvedModule {
            name: name.to_string(),
            path: entry.path.clone(),
        });
        Ok(())
    }
}

/// A path made only of normal components (no leading `/`, no `.`/`..`, no empty parts).
pub(crate) fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The name a module gets in the initramfs: `.ko.xz` / `.ko.zst` / `.ko.gz` become `.ko`,
/// because it is stored decompressed (busybox insmod and the kernel's own decompression
/// support vary; plain `.ko` always loads).
pub fn decompressed_path(path: &str) -> String {
    match path.find(".ko") {
        Some(i) => format!("{}.ko", path.get(..i).unwrap_or(path)),
        None => path.to_string(),
    }
}

/// Reads a module file, decompressing `.ko.xz` (xz), `.ko.zst` (zstd) and `.ko.gz` (gzip)
/// by its name; anything else after `.ko` is refused.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let file = std::fs::File::open(path).map_err(|e| read_error(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let dec_err = |reason: String| Error::Decompress {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    if name.ends_with(".ko") {
        reader
            .take(MAX_MODULE_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|e| read_error(path, e))?;
    } else if name.ends_with(".ko.xz") {
        let mut limited = LimitedWriter::new(&mut out);
        lzma_rs::xz_decompress(&mut reader, &mut limited)
            .map_err(|e| dec_err(format!("xz: {e}")))?;
    } else if name.ends_with(".ko.zst") {
        let decoder =
            zstd::stream::read::Decoder::new(reader).map_err(|e| dec_err(format!("zstd: {e}")))?;
        decoder
            .take(MAX_MODULE_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|e| dec_err(format!("zstd: {e}")))?;
    } else if name.ends_with(".ko.gz") {
        flate2::read::MultiGzDecoder::new(reader)
            .take(MAX_MODULE_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|e| dec_err(format!("gzip: {e}")))?;
    } else {
        return Err(dec_err(
            "unknown module compression (kiln handles .ko, .ko.xz, .ko.zst and .ko.gz)".into(),
        ));
    }
    if out.len() as u64 > MAX_MODULE_SIZE {
        return Err(dec_err(format!(
            "larger than {} MiB once decompressed",
            MAX_MODULE_SIZE >> 20
        )));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(dec_err(
            "the (decompressed) content is not an ELF module".into(),
        ));
    }
    Ok(out)
}

/// A `Write` into a Vec that stops with an error past [`MAX_MODULE_SIZE`], so a hostile xz
/// bomb cannot fill memory.
struct LimitedWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> LimitedWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        LimitedWriter { out }
    }
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.out.len() + buf.len()) as u64 > MAX_MODULE_SIZE {
            return Err(std::io::Error::other("module too large once decompressed"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("a/b/virtio_blk.ko.zst"), "virtio_blk");
        assert_eq!(
            decompressed_path("a/b/virtio_blk.ko.xz"),
            "a/b/virtio_blk.ko"
        );
    }

    #[test]
    fn unsafe_paths_refused() {
        let dir = Path::new("/x");
        assert!(ModuleIndex::parse(dir, "../../etc/shadow.ko:\n", "").is_err());
        assert!(ModuleIndex::parse(dir, "/abs/a.ko:\n", "").is_err());
        assert!(ModuleIndex::parse(dir, "a.ko: b/../../c.ko\n", "").is_err());
        assert!(ModuleIndex::parse(dir, "no-colon.ko\n", "").is_err());
    }
}
