//! Link-time layout of the kiln-vmm binary, chosen for its resident memory.
//!
//! The VMM's memory overhead is mostly the file pages of its own code, and the host kernel maps
//! those 64 KiB at a time (fault-around over the page cache's 64 KiB folios). Two link options
//! keep that small without changing what the code does:
//!
//! * `-z max-page-size=0x10000`: segments start at the same offset within a 64 KiB block in the
//!   file and in memory, so one fault maps one aligned folio instead of parts of two.
//! * `link/hot-text.ld` (release builds): the functions a VM boot runs are placed together at
//!   the start of the text (`link/gen-hot-text.py` regenerates the list), so that their blocks
//!   are few and the rest of the binary is faulted in only when it is used.
//!
//! `KILN_VMM_LINK_MAP=PATH` also writes the linker's map there (used by `gen-hot-text.py`).

use std::path::Path;

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,max-page-size=0x10000");
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    let hot = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/hot-text.ld");
    println!("cargo:rerun-if-changed={}", hot.display());
    // Debug builds are not what ships, and matching the script's patterns costs link time.
    if std::env::var("PROFILE").as_deref() == Ok("release") && hot.exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", hot.display());
    }

    println!("cargo:rerun-if-env-changed=KILN_VMM_LINK_MAP");
    if let Ok(map) = std::env::var("KILN_VMM_LINK_MAP") {
        println!("cargo:rustc-link-arg-bins=-Wl,-Map={map}");
    }
}
