//! Kernels shipped as OCI images (Weave Ignite's convention): `/boot/vmlinux` (ELF) or
//! `/boot/vmlinuz` (bzImage) plus `/lib/modules/<release>`.
//!
//! Only those paths are extracted (and `/usr/lib/modules`, where merged-`/usr` images keep
//! modules). Layers are applied in order with their whiteouts and opaque markers, but only as
//! far as they touch these paths. Images are untrusted, so:
//!
//! - an entry whose path is absolute or has a `..` component refuses the whole image;
//! - symbolic links are never created on disk: they are kept in a table and resolved
//!   lexically inside the image when the kernel file is looked up, and a kernel link that
//!   leads outside `/boot` and the modules directories (e.g. `/boot/vmlinuz -> /etc/shadow`)
//!   refuses the image; links inside the modules tree (`build`, `source`) are dropped;
//! - every file is created with `O_EXCL` in directories kiln made itself, so nothing is ever
//!   written through a link;
//! - the total extracted size is capped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kiln_image::ImageRecord;

use crate::error::{Error, IoContext, Result};

/// The trees taken from a kernel image.
const ROOTS: [&[&str]; 3] = [&["boot"], &["lib", "modules"], &["usr", "lib", "modules"]];
/// Largest total size extracted from one image.
const MAX_TOTAL: u64 = 4 << 30;
/// Symbolic link hops followed when resolving the kernel file.
const MAX_HOPS: usize = 16;

/// What [`extract`] found.
#[derive(Debug)]
pub(crate) struct Extracted {
    /// The kernel image file (inside the extraction directory).
    pub(crate) kernel: PathBuf,
    /// How the image names it (`/boot/vmlinuz-6.1.0 via /boot/vmlinuz`).
    pub(crate) kernel_name: String,
    /// The extracted `lib/modules` (or `usr/lib/modules`), if the image has one.
    pub(crate) modules_root: Option<PathBuf>,
}

#[derive(Debug, Clone)]
enum Link {
    Symbolic(String),
    Hard(Vec<String>),
}

struct Extractor<'a> {
    dest: &'a Path,
    reference: &'a str,
    links: BTreeMap<Vec<String>, Link>,
    total: u64,
}

/// Extracts the kernel and its modules from `image`'s layers into `dest` (an empty directory
/// kiln owns).
pub(crate) fn extract(image: &ImageRecord, dest: &Path) -> Result<Extracted> {
    let mut ex = Extractor {
        dest,
        reference: &image.reference,
        links: BTreeMap::new(),
        total: 0,
    };
    for (i, layer) in image.layers.iter().enumerate() {
        ex.apply_layer(i, &mut layer.open()?).map_err(|e| match e {
            Error::OciImage { .. } => e,
            other => Error::OciImage {
                reference: image.reference.clone(),
                reason: format!("layer {} ({}): {other}", i + 1, layer.digest),
            },
        })?;
    }
    let (kernel, kernel_name) = ex.find_kernel()?;
    let modules_root = [&["lib", "modules"][..], &["usr", "lib", "modules"][..]]
        .iter()
        .map(|r| r.iter().fold(dest.to_path_buf(), |p, c| p.join(c)))
        .find(|p| p.is_dir());
    Ok(Extracted {
        kernel,
        kernel_name,
        modules_root,
    })
}

fn starts_with(path: &[String], prefix: &[&str]) -> bool {
    path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| a == b)
}

fn within_root(path: &[String]) -> bool {
    ROOTS.iter().any(|r| starts_with(path, r))
}

/// The roots strictly below `path` (`lib` → `lib/modules`).
fn roots_below(path: &[String]) -> Vec<Vec<String>> {
    ROOTS
        .iter()
        .filter(|r| r.len() > path.len() && r.iter().zip(path).all(|(a, b)| a == b))
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

fn display(path: &[String]) -> String {
    format!("/{}", path.join("/"))
}

impl Extractor<'_> {
    fn hostile(&self, reason: String) -> Error {
        Error::OciImage {
            reference: self.reference.to_string(),
            reason,
        }
    }

    fn disk(&self, path: &[String]) -> PathBuf {
        path.iter().fold(self.dest.to_path_buf(), |p, c| p.join(c))
    }

    /// Splits an entry path into components, refusing absolute paths and `..`.
    fn components(&self, layer: usize, raw: &[u8]) -> Result<Vec<String>> {
        let shown = String::from_utf8_lossy(raw).into_owned();
        if raw.first() == Some(&b'/') {
            return Err(self.hostile(format!(
                "layer {} has an entry with an absolute path {shown:?}: refusing the image",
                layer + 1
            )));
        }
        let mut out = Vec::new();
        for part in raw.split(|&b| b == b'/') {
            match part {
                b"" | b"." => continue,
                b".." => {
                    return Err(self.hostile(format!(
                        "layer {} has an entry with a '..' component {shown:?}: refusing the image",
                        layer + 1
                    )))
                }
                _ => out.push(String::from_utf8_lossy(part).into_owned()),
            }
        }
        Ok(out)
    }

    fn apply_layer(&mut self, layer: usize, reader: &mut dyn Read) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        let mut written: BTreeSet<Vec<String>> = BTreeSet::new();
        let entries = archive
            .entries()
            .map_err(|e| Error::Other(format!("reading the layer tar: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::Other(format!("reading the layer tar: {e}")))?;
            let path = self.components(layer, &entry.path_bytes())?;
            let kind = entry.header().entry_type();
            let link = match entry.link_name_bytes() {
                Some(l) if kind.is_hard_link() => Some(self.components(layer, &l)?),
                _ => None,
            };
            let Some(base) = path.last() else { continue };
            let parent = path.get(..path.len() - 1).unwrap_or_default();
            if base == ".wh..wh..opq" {
                self.opaque(parent, &written)?;
                continue;
            }
            if let Some(target) = base.strip_prefix(".wh.") {
                let mut t = parent.to_vec();
                t.push(target.to_string());
                self.whiteout(&t)?;
                continue;
            }
            if !within_root(&path) {
                continue;
            }
            if path.iter().any(|c| c.contains('\u{fffd}')) {
                return Err(self.hostile(format!("{} is not valid UTF-8", display(&path))));
            }
            for n in 1..=path.len() {
                if let Some(p) = path.get(..n) {
                    written.insert(p.to_vec());
                }
            }
            match kind {
                tar::EntryType::Directory => {
                    self.links.remove(&path);
                    self.make_dirs(&path)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mode = entry.header().mode().unwrap_or(0o644);
                    self.write_file(&path, &mut entry, mode)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default();
                    self.remove(&path)?;
                    self.links.insert(path, Link::Symbolic(target));
                }
                tar::EntryType::Link => {
                    let target = link.unwrap_or_default();
                    self.remove(&path)?;
                    let src = self.disk(&target);
                    let is_file = within_root(&target)
                        && fs::symlink_metadata(&src).is_ok_and(|m| m.is_file());
                    if is_file {
                        self.ensure_parent(&path)?;
                        let dst = self.disk(&path);
                        let mut from = fs::File::open(&src).at(&src)?;
                        let size = from.metadata().at(&src)?.len();
                        self.write_new(&dst, &mut from, size, 0o644)?;
                    } else {
                        self.links.insert(path, Link::Hard(target));
                    }
                }
                _ => {} // devices, fifos: not part of a kernel
            }
        }
        Ok(())
    }

    /// Creates `path` and its parents as directories, replacing any file in the way (a later
    /// layer's directory replaces an earlier layer's file).
    fn make_dirs(&mut self, path: &[String]) -> Result<()> {
        for n in 1..=path.len() {
            let Some(prefix) = path.get(..n) else {
                continue;
            };
            let p = self.disk(prefix);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => fs::remove_file(&p).at(&p)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, e)),
            }
            self.links.remove(prefix);
            fs::create_dir(&p).at(&p)?;
        }
        Ok(())
    }

    fn ensure_parent(&mut self, path: &[String]) -> Result<()> {
        match path.get(..path.len().saturating_sub(1)) {
            Some(parent) if !parent.is_empty() => self.make_dirs(parent),
            _ => Ok(()),
        }
    }

    fn write_file(&mut self, path: &[String], data: &mut dyn Read, mode: u32) -> Result<()> {
        self.remove(path)?;
        self.ensure_parent(path)?;
        let dst = self.disk(path);
        self.write_new(&dst, data, u64::MAX, mode)
    }

    /// Writes a new file (`O_EXCL`: never through an existing name), counting its size
    /// against [`MAX_TOTAL`].
    fn write_new(&mut self, dst: &Path, data: &mut dyn Read, limit: u64, mode: u32) -> Result<()> {
        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(perm)
            .open(dst)
            .at(dst)?;
        let budget = MAX_TOTAL.saturating_sub(self.total);
        let n = std::io::copy(&mut data.take(limit.min(budget + 1)), &mut file).at(dst)?;
        self.total += n;
        if self.total > MAX_TOTAL {
            return Err(self.hostile(format!(
                "its kernel files are larger than {} GiB in total",
                MAX_TOTAL >> 30
            )));
        }
        Ok(())
    }

    /// Removes whatever is at `path` (file, directory tree, or recorded link).
    fn remove(&mut self, path: &[String]) -> Result<()> {
        let p = self.disk(path);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).at(&p)?,
            Ok(_) => fs::remove_file(&p).at(&p)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
        self.links
            .retain(|k, _| !starts_with(k, &path.iter().map(String::as_str).collect::<Vec<_>>()));
        Ok(())
    }

    /// `.wh.NAME`: deletes NAME from lower layers, as far as it touches the kernel trees.
    fn whiteout(&mut self, target: &[String]) -> Result<()> {
        if within_root(target) {
            return self.remove(target);
        }
        for root in roots_below(target) {
            self.remove(&root)?;
        }
        Ok(())
    }

    /// `.wh..wh..opq` in DIR: hides everything lower layers put under DIR; entries of this
    /// layer (in `written`) stay.
    fn opaque(&mut self, dir: &[String], written: &BTreeSet<Vec<String>>) -> Result<()> {
        if within_root(dir) {
            return self.prune(dir, written);
        }
        for root in roots_below(dir) {
            if written.contains(&root) {
                self.prune(&root, written)?;
            } else {
                self.remove(&root)?;
            }
        }
        Ok(())
    }

    fn prune(&mut self, dir: &[String], written: &BTreeSet<Vec<String>>) -> Result<()> {
        let p = self.disk(dir);
        let children = match fs::read_dir(&p) {
            Ok(rd) => rd
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<_>>>()
                .at(&p)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(&p, e)),
        };
        for name in children {
            let mut child = dir.to_vec();
            child.push(name);
            if !written.contains(&child) {
                self.remove(&child)?;
            } else if self.disk(&child).is_dir() {
                self.prune(&child, written)?;
            }
        }
        let prefix: Vec<&str> = dir.iter().map(String::as_str).collect();
        self.links.retain(|k, _| {
            !starts_with(k, &prefix) || k.len() == prefix.len() || written.contains(k)
        });
        Ok(())
    }

    /// Finds the kernel: `/boot/vmlinux`, else `/boot/vmlinuz`, else the only
    /// `/boot/vmlinu[xz]-*`.
    fn find_kernel(&self) -> Result<(PathBuf, String)> {
        for name in ["vmlinux", "vmlinuz"] {
            let path = vec!["boot".to_string(), name.to_string()];
            if let Some(found) = self.resolve(&path)? {
                return Ok(found);
            }
        }
        let mut versioned: BTreeSet<String> = BTreeSet::new();
        if let Ok(rd) = fs::read_dir(self.dest.join("boot")) {
            for e in rd.flatten() {
                versioned.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        for k in self.links.keys() {
            if let [boot, name] = k.as_slice() {
                if boot == "boot" {
                    versioned.insert(name.clone());
                }
            }
        }
        let candidates: Vec<String> = versioned
            .into_iter()
            .filter(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
            .collect();
        match candidates.as_slice() {
            [only] => {
                let path = vec!["boot".to_string(), only.clone()];
                self.resolve(&path)?.ok_or_else(|| {
                    self.hostile(format!("/boot/{only} is not a regular file"))
                })
            }
            [] => Err(self.hostile(
                "it has no /boot/vmlinux or /boot/vmlinuz (a kernel image holds /boot/vmlinux or /boot/vmlinuz and /lib/modules)".into(),
            )),
            many => Err(self.hostile(format!(
                "it has several kernels ({}) and no /boot/vmlinux or /boot/vmlinuz to choose one",
                many.iter().map(|n| format!("/boot/{n}")).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The extracted regular file `path` names, following recorded links lexically inside the
    /// image; `None` if nothing is at `path`.
    fn resolve(&self, path: &[String]) -> Result<Option<(PathBuf, String)>> {
        let mut cur = path.to_vec();
        let mut shown = display(path);
        for hop in 0..MAX_HOPS {
            let disk = self.disk(&cur);
            match fs::symlink_metadata(&disk) {
                Ok(m) if m.is_file() => return Ok(Some((disk, shown))),
                Ok(_) => {
                    return Err(self.hostile(format!("{} is not a regular file", display(&cur))))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&disk, e)),
            }
            let next = match self.links.get(&cur) {
                None if hop == 0 => return Ok(None),
                None => {
                    return Err(self.hostile(format!(
                        "{shown}: the link target {} does not exist in the image",
                        display(&cur)
                    )))
                }
                Some(Link::Symbolic(target)) => {
                    let mut next: Vec<String> = if target.starts_with('/') {
                        Vec::new()
                    } else {
                        cur.get(..cur.len().saturating_sub(1))
                            .unwrap_or_default()
                            .to_vec()
                    };
                    for part in target.split('/') {
                        match part {
                            "" | "." => {}
                            ".." => {
                                next.pop();
                            }
                            p => next.push(p.to_string()),
                        }
                    }
                    if !within_root(&next) {
                        return Err(self.hostile(format!(
                            "{} is a symbolic link to {target} ({}), outside /boot and /lib/modules: refusing it",
                            display(&cur),
                            display(&next)
                        )));
                    }
                    next
                }
                Some(Link::Hard(target)) => {
                    if !within_root(target) {
                        return Err(self.hostile(format!(
                            "{} is a hard link to {}, outside /boot and /lib/modules: refusing it",
                            display(&cur),
                            display(target)
                        )));
                    }
                    target.clone()
                }
            };
            shown = format!("{} (via {})", display(&next), display(path));
            cur = next;
        }
        Err(self.hostile(format!(
            "{}: more than {MAX_HOPS} levels of symbolic links",
            display(path)
        )))
    }
}
