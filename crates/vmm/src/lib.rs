//! kiln-vmm's core: builds a KVM microVM from a [`config::VmConfig`] and runs it.
//!
//! The crate is organised like Firecracker's `vmm` crate: `arch` holds the x86_64 boot
//! protocol (memory layout, page tables, CPUID, MSRs, ACPI), `devices` one folder per emulated
//! device, and `rpc` the request interface the API server drives.

pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod logger;
pub mod metrics;
pub mod rate_limiter;
pub mod rpc;
pub mod vstate;
