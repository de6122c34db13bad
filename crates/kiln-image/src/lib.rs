//! OCI images for kiln: pulling from registries, importing, and a content-addressed store.
//!
//! Everything lives under the kiln root ([`root()`], `/var/lib/kiln` unless `KILN_ROOT` is
//! set), in `<root>/images`:
//!
//! - `blobs/sha256/<hex>`: every manifest, index, config and layer, stored once and shared by
//!   all images. A blob is written to a temporary file in the same directory, fsynced,
//!   verified against its digest and only then renamed into place, so a blob file that exists
//!   is always complete and correct.
//! - `partial/<hex>`: a blob a pull has begun, with `partial/<hex>.json` recording how much
//!   of it is durably on disk. An interrupted pull (Ctrl-C, `kill -9`, a dropped connection)
//!   resumes from there with an HTTP range request; the whole blob is still verified before it
//!   is renamed into `blobs/sha256`. `prune` removes partial files untouched for 24 hours.
//! - `refs.json`: image references → manifest digests, replaced atomically under an exclusive
//!   `flock` on `refs.lock` (see [`store`] for why a locked file and not SQLite).
//! - `gc.lock`: writers (pulls, imports, [`Store::lease`]) hold it shared; `prune` holds it
//!   exclusively, so it never deletes a blob that a concurrent pull has written but not yet
//!   recorded.
//!
//! Other crates use [`Store::open`] / [`Store::resolve`] to get an [`ImageRecord`] whose
//! [`Layer`]s point at blob files, in application order.

mod auth;
mod blob;
mod default_image;
mod error;
mod import;
mod lock;
pub mod manifest;
pub mod oci;
mod partial;
mod progress;
mod pull;
mod reference;
pub mod store;

use std::path::PathBuf;

pub use auth::{login, logout, prompt_password, Credentials};
pub use default_image::{build as build_default_image, DEFAULT_IMAGE, DEFAULT_IMAGE_ALIAS};
pub use error::{Error, Result};
pub use import::ImportOptions;
pub use progress::{human_size, ProgressMode};
pub use pull::PullOptions;
pub use reference::normalize_reference;
pub use store::{list_to_json, Compression, ImageRecord, Layer, Lease, PruneReport, Store};

/// Re-exported so consumers name the exact config type [`ImageRecord::config`] uses.
pub use oci_spec::image::ImageConfiguration;

/// The kiln root used when `KILN_ROOT` is not set.
pub const DEFAULT_ROOT: &str = "/var/lib/kiln";

/// The kiln root: `$KILN_ROOT` if set and non-empty, else [`DEFAULT_ROOT`].
///
/// Every kiln crate resolves its state directory through this one function so that moving the
/// root (tests, unprivileged use) moves images, disks and kernels together.
pub fn root() -> PathBuf {
    match std::env::var_os("KILN_ROOT") {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => PathBuf::from(DEFAULT_ROOT),
    }
}
