//! Architecture-specific boot set-up; x86_64 is the only architecture kiln-vmm supports.

pub mod x86_64;
