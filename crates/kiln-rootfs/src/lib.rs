//! Root filesystems for kiln: OCI layers applied safely into a directory, then an ext4 disk.
//!
//! An image's layers are untrusted input that kiln, running as root, turns into a filesystem
//! for a guest. [`Rootfs::unpack`] applies layers with OCI whiteouts while never following a
//! symlink on the host; [`FsImageBuilder`] turns the tree into an ext4 image without mounting
//! anything; [`DiskCache`] keeps one image per image digest and hands each VM a cheap
//! copy-on-write disk of it.
//!
//! ```no_run
//! use kiln_rootfs::{DiskCache, LayerSource};
//! # fn main() -> kiln_rootfs::Result<()> {
//! let cache = DiskCache::open_default()?;
//! let layers = [LayerSource::new("/blobs/l0", "application/vnd.oci.image.layer.v1.tar+gzip")];
//! let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
//! cache.image_disk(digest, &layers, 64 << 20)?;
//! let disk = cache.vm_disk(digest, "/run/kiln/vm1/root.ext4".as_ref(), 1 << 30)?;
//! # let _ = disk; Ok(()) }
//! ```

mod cache;
mod error;
mod ext4;
mod fsops;
mod layer;
mod scratch;
mod unpack;

pub use cache::{copy_disk, kiln_root, CopyMethod, DiskCache, DEFAULT_KILN_ROOT};
pub use error::{EntryError, Error, Result};
pub use ext4::{fs_usage, FsImageBuilder, FsUsage, MkfsExt4, TreeUsage, BLOCK_SIZE};
pub use layer::{declared_compression, sniff_compression, Compression, LayerSource};
pub use unpack::{Rootfs, UnpackStats};
