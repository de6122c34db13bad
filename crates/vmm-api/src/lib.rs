//! kiln-vmm's HTTP API: Firecracker's paths and JSON on a Unix socket.
