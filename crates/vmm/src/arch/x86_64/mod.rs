//! x86_64: memory layout, boot protocols, vCPU registers, CPUID, MSRs and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod regs;
