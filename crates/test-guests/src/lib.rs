//! Tiny freestanding guests that kiln-vmm's integration tests boot, each checking one VMM
//! behaviour and reporting it over the serial port.
//!
//! The guests are built by `build.rs` with the machine's gcc into ELF64 images linked at 1 MiB
//! (see `guests/`). This crate only tells the tests where the images are; it has no runtime
//! code of its own.

use std::path::PathBuf;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Every guest image as (name, path), for tests and tools that want to list them.
pub use generated::ALL;

/// The path of the guest image called `name`, or `None` if there is no such guest.
///
/// Lookup by name keeps test code readable (`guest_path("hello")`) while the paths themselves
/// live in the build directory.
pub fn guest_path(name: &str) -> Option<PathBuf> {
    ALL.iter()
        .find(|(guest, _)| *guest == name)
        .map(|(_, path)| PathBuf::from(path))
}

/// The path of the guest image called `name`, for tests that name guests literally.
///
/// # Panics
///
/// Panics, listing the guests that exist, if there is no guest called `name`: that is a typo in
/// the calling test, not a runtime condition.
pub fn guest(name: &str) -> PathBuf {
    guest_path(name).unwrap_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|(guest, _)| *guest).collect();
        panic!("no test guest called {name:?}; the guests are {names:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_image_exists_and_is_elf64() {
        assert!(!ALL.is_empty());
        for (name, path) in ALL {
            let image = std::fs::read(path).expect("guest image readable");
            assert_eq!(&image[..4], b"\x7fELF", "{name} is an ELF file");
            assert_eq!(image[4], 2, "{name} is ELF64");
        }
    }

    #[test]
    fn lookup_by_name() {
        assert!(guest_path("hello").is_some());
        assert!(guest_path("no-such-guest").is_none());
        assert_eq!(Some(guest("pvh")), guest_path("pvh"));
    }
}
