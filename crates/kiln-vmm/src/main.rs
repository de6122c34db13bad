//! kiln-vmm: boots a microVM configured over a Firecracker-compatible API or a config file.

fn main() {}
