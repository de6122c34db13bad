//! Emulated devices, one folder per device as in Firecracker, and the buses that route guest
//! port and MMIO accesses to them.

pub mod boot_timer;
pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};
