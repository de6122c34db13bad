//! Link-time layout of the kiln-vmm binary, chosen for its resident memory.
//!
//! The VMM's memory overhead is mostly the file pages of its own code, and the host kernel maps
//! those 64 KiB at a time (fault-around over the page cache's 64 KiB folios). Two link options
//! keep that small without changing what the code does:
//!
//! * `-z max-page-size=0x10000`: segments start at the same offset within a 64 KiB block in the
//!   file and in memory, so one fault maps one aligned folio instead of parts of two.
//! * `-z pack-relative-relocs` (DT_RELR): the static PIE's relative relocations take 1 KB
//!   instead of 92 KB, all of which start-up reads. Only where the C library applies DT_RELR
//!   (glibc 2.36 and later, in its static start-up code as in its dynamic loader): an older one
//!   would silently leave the binary unrelocated.
//! * `link/hot-text.ld` (release builds): the functions a VM boot runs are placed together at
//!   the start of the text (`link/gen-hot-text.py` regenerates the list), so that their blocks
//!   are few and the rest of the binary is faulted in only when it is used.
//!
//! `KILN_VMM_LINK_MAP=PATH` also writes the linker's map there (used by `gen-hot-text.py`).

use std::path::Path;
use std::process::Command;

/// Whether the binary is linked against this host's glibc and that glibc is 2.36 or later.
fn host_glibc_applies_dt_relr() -> bool {
    let var = |name| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_ENV") != "gnu" || var("TARGET") != var("HOST") {
        return false;
    }
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut version = text
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map(|part| part.parse::<u32>().ok());
    matches!(
        (version.next(), version.next()),
        (Some(Some(major)), Some(Some(minor))) if (major, minor) >= (2, 36)
    )
}

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,max-page-size=0x10000");
    if host_glibc_applies_dt_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }

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
