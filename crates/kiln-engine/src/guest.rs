//! What every guest boots with: the kernel from the kernel store and an initramfs that kiln
//! generates per kernel, holding the kernel's virtio modules and kiln-init (embedded in this
//! crate at build time, see `build.rs`) as `/init`.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_kernel::{InitramfsBuilder, KernelRecord, INITRAMFS_VERSION};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// The static kiln-init executable.
pub static KILN_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-init"));

/// `sha256` of [`KILN_INIT`] (hex), computed by `build.rs`.
pub const KILN_INIT_SHA256: &str = env!("KILN_INIT_SHA256");

/// The kernel and initramfs one VM boots.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs with kiln-init.
    pub initrd: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The boot files for `kernel`, generating its kiln-init initramfs under
/// `<kiln_root>/initramfs` on first use. Concurrent callers may both build it; the rename
/// into place makes the result the same.
pub fn boot_files(kiln_root: &Path, kernel: &KernelRecord) -> Result<BootFiles> {
    let mut key = Sha256::new();
    key.update(kernel.kernel_digest.as_bytes());
    key.update(format!("{:?}", kernel.modules_dir).as_bytes());
    key.update(INITRAMFS_VERSION.to_le_bytes());
    key.update(KILN_INIT_SHA256.as_bytes());
    let key = hex(&key.finalize());
    let dir = kiln_root.join("initramfs");
    std::fs::create_dir_all(&dir).map_err(|e| EngineError::io("create", &dir, e))?;
    let initrd = dir.join(format!("{}.img", &key[..32]));
    if initrd.is_file() {
        return Ok(BootFiles {
            kernel: kernel.kernel_path.clone(),
            initrd,
        });
    }
    let mut init = tempfile::NamedTempFile::new_in(&dir)
        .map_err(|e| EngineError::io("create a temporary file in", &dir, e))?;
    init.write_all(KILN_INIT)
        .map_err(|e| EngineError::io("write", init.path(), e))?;
    let mut builder = InitramfsBuilder::new().with_init(init.path());
    if let Some(modules) = &kernel.modules_dir {
        builder = builder.modules_dir(modules);
        if let Some(release) = &kernel.release {
            builder = builder.release(release);
        }
    }
    let built = builder.build()?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .map_err(|e| EngineError::io("create a temporary file in", &dir, e))?;
    tmp.write_all(&built.data)
        .map_err(|e| EngineError::io("write", tmp.path(), e))?;
    tmp.persist(&initrd)
        .map_err(|e| EngineError::io("rename into place", &initrd, e.error))?;
    tracing::info!(
        kernel = %kernel.name,
        modules = built.modules.len(),
        path = %initrd.display(),
        "generated the kiln-init initramfs"
    );
    Ok(BootFiles {
        kernel: kernel.kernel_path.clone(),
        initrd,
    })
}
