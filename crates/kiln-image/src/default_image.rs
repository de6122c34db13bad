//! kiln's default image, built locally from Debian's busybox-static so kiln works offline on a
//! fresh machine: one layer with `/bin/busybox`, its applet symlinks, a minimal `/etc` and the
//! usual empty directories; `Cmd ["/bin/sh"]`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::blob;
use crate::error::{Error, IoContext, Result};
use crate::oci::{ImageBuilder, LayerBuilder};
use crate::store::{Compression, ImageRecord, Store};

/// The default image's reference. `localhost/…` marks it as never coming from a registry.
pub const DEFAULT_IMAGE: &str = "localhost/kiln/busybox:latest";

/// A short name that `kiln image pull` also accepts for the default image.
pub const DEFAULT_IMAGE_ALIAS: &str = "kiln/default";

/// Where the static busybox comes from unless `KILN_BUSYBOX` names another file.
const BUSYBOX: &str = "/bin/busybox";

/// Whether a pull of `reference` means the locally built default image.
pub(crate) fn is_default_name(reference: &str) -> bool {
    let r = reference.trim();
    // Cheap checks first: normalizing compiles a regex.
    if r == DEFAULT_IMAGE_ALIAS || r == DEFAULT_IMAGE {
        return true;
    }
    r.contains("kiln/busybox")
        && crate::reference::normalize_reference(r).is_ok_and(|n| n == DEFAULT_IMAGE)
}

/// Whether an ELF file has a program interpreter, i.e. is dynamically linked (and so would
/// not run inside a guest without its libraries).
fn is_dynamic_elf(data: &[u8]) -> Option<bool> {
    if data.get(..4)? != b"\x7fELF" || *data.get(4)? != 2 || *data.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?);
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

fn busybox_path() -> PathBuf {
    std::env::var_os("KILN_BUSYBOX")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BUSYBOX))
}

/// Applet paths (`bin/sh`, `usr/bin/awk`, …) from `busybox --list-full`.
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .at(busybox)?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "{} --list-full failed ({})",
            busybox.display(),
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| {
            !l.is_empty()
                && l != "bin/busybox"
                && !l.split('/').any(|c| c == ".." || c == "." || c.is_empty())
        })
        .collect())
}

/// Builds the default image's layer and config from a static busybox binary (also the base
/// layer other test images build on).
pub fn build(busybox: &Path) -> Result<crate::oci::BuiltImage> {
    let data = std::fs::read(busybox).map_err(|e| {
        Error::Other(format!(
            "cannot read {} to build the default image ({e}); install Debian's busybox-static \
             package or set KILN_BUSYBOX",
            busybox.display()
        ))
    })?;
    match is_dynamic_elf(&data) {
        Some(false) => {}
        Some(true) => {
            return Err(Error::Other(format!(
                "{} is dynamically linked; the default image needs a static busybox \
                 (install Debian's busybox-static package)",
                busybox.display()
            )))
        }
        None => {
            return Err(Error::Other(format!(
                "{} is not an x86-64 ELF executable",
                busybox.display()
            )))
        }
    }
    let applets = applets(busybox)?;

    let mut layer = LayerBuilder::new();
    let mut dirs: BTreeSet<String> = [
        "bin", "dev", "etc", "home", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr",
        "usr/bin", "usr/sbin", "var", "var/log", "var/tmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for applet in &applets {
        let mut parent = Path::new(applet).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    for dir in &dirs {
        let mode = match dir.as_str() {
            "tmp" | "var/tmp" => 0o1777,
            "root" => 0o700,
            _ => 0o755,
        };
        layer.dir(&format!("{dir}/"), mode)?;
    }
    layer.file("bin/busybox", 0o755, &data)?;
    for applet in &applets {
        layer.symlink(applet, "/bin/busybox")?;
    }
    layer.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    layer.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    layer.file(
        "etc/hosts",
        0o644,
        b"127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    )?;
    layer.file("etc/hostname", 0o644, b"kiln\n")?;
    let layer = layer.finish(Compression::Gzip)?;
    ImageBuilder::new()
        .layer(layer)
        .env(&["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        .cmd(&["/bin/sh"])
        .build()
}

impl Store {
    /// The default image ([`DEFAULT_IMAGE`]), building it from the host's static busybox
    /// (`/bin/busybox` from Debian's busybox-static, or `$KILN_BUSYBOX`) if it is not stored
    /// yet. Needs no network.
    pub fn ensure_default_image(&self) -> Result<ImageRecord> {
        if self.contains(DEFAULT_IMAGE)? {
            return self.resolve(DEFAULT_IMAGE);
        }
        let image = build(&busybox_path())?;
        self.store_built(&image, DEFAULT_IMAGE)
    }

    /// Stores an image built by [`crate::oci`] under `reference` (blobs first, then the
    /// reference), returning its record.
    pub fn store_built(
        &self,
        image: &crate::oci::BuiltImage,
        reference: &str,
    ) -> Result<ImageRecord> {
        let reference = crate::reference::normalize_reference(reference)?;
        let _lease = self.lease()?;
        let dir = self.blob_dir();
        for layer in &image.layers {
            blob::write_blob(&dir, &layer.blob.digest, &layer.blob.data)?;
        }
        blob::write_blob(&dir, &image.config.digest, &image.config.data)?;
        blob::write_blob(&dir, &image.manifest.digest, &image.manifest.data)?;
        self.record(&reference, &image.manifest.digest, None)?;
        self.resolve(&reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        assert!(is_default_name("kiln/default"));
        assert!(is_default_name("localhost/kiln/busybox"));
        assert!(is_default_name("localhost/kiln/busybox:latest"));
        assert!(!is_default_name("busybox"));
    }

    #[test]
    fn elf_interp_detection() {
        assert_eq!(is_dynamic_elf(b"not an elf"), None);
        if let Ok(data) = std::fs::read("/bin/busybox") {
            assert_eq!(
                is_dynamic_elf(&data),
                Some(false),
                "busybox-static is static"
            );
        }
        if let Ok(data) = std::fs::read("/bin/ls") {
            assert_eq!(is_dynamic_elf(&data), Some(true), "/bin/ls is dynamic");
        }
    }
}
