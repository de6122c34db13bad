//! x86_64: memory layout, boot protocols, vCPU registers, CPUID, MSRs and ACPI tables.

pub mod layout;
