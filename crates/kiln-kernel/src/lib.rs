//! Guest kernels for kiln: importing them, a content-addressed store under the kiln root, and
//! the initramfs kiln generates so that a stock distribution kernel boots an image's disk.
//!
//! - [`KernelStore`] keeps kernels under `<kiln root>/kernels` (see [`store`] for the layout
//!   and the locking); [`KernelStore::get`] gives `kiln run` a [`KernelRecord`] with the kernel,
//!   initramfs and modules paths.
//! - Kernels come from files ([`KernelStore::import_file`]: a bzImage or an ELF vmlinux, with an
//!   optional `lib/modules/<release>` directory) or from OCI images holding `/boot/vmlinux` or
//!   `/boot/vmlinuz` and `/lib/modules` ([`KernelStore::import_oci`], Weave Ignite's
//!   convention).
//! - [`ensure_default_kernel`] imports Debian's `linux-image-cloud-amd64` (installed by
//!   `scripts/setup.sh`) as the kernel named `default`.
//! - [`InitramfsBuilder`] writes the initramfs: the virtio modules the guest needs with their
//!   dependencies in load order, and an `/init` that mounts the root disk and switches to the
//!   image's init (a busybox script now, kiln's guest agent later).
//!
//! `README.md` in this crate says what a custom kernel must have built in to boot without an
//! initramfs.

pub mod cpio;
mod error;
pub mod format;
pub mod initramfs;
pub mod modules;
mod oci;
pub mod store;
mod util;

pub use error::{Error, Result};
pub use format::{inspect_kernel, KernelFormat, KernelInfo};
pub use initramfs::{busybox_path, Initramfs, InitramfsBuilder, INITRAMFS_VERSION, INIT_SCRIPT};
pub use modules::{
    default_module_requests, ModuleIndex, ModuleRequest, Resolution, ResolvedModule,
};
pub use store::{
    find_host_kernel, list_to_json, validate_name, DefaultKernelOptions, GcReport, HostKernel,
    ImportOptions, InitrdChoice, InitrdInfo, InitrdKind, KernelLease, KernelRecord, KernelStore,
    ModulesInfo, DEFAULT_KERNEL_NAME,
};

/// The default kernel in the store under [`kiln_image::root()`], importing the newest
/// installed Debian cloud kernel first if needed: what `kiln run` uses when no kernel is named.
pub fn ensure_default_kernel() -> Result<KernelRecord> {
    KernelStore::open_default()?.ensure_default(&DefaultKernelOptions::default())
}
