//! kiln-init, kiln's guest agent.
//!
//! It is PID 1 (`/init`) of the initramfs kiln generates for a guest kernel: it loads the
//! virtio modules, mounts the root disk, switches into it and then serves the agent protocol
//! ([`kiln_agent_protocol`]) over virtio-vsock or a virtio-console port, so the host can run
//! processes, stream their I/O, copy files and power the VM off.
//!
//! Everything but the PID-1 bring-up ([`boot`]) also runs as an ordinary process
//! (`kiln-init --listen-unix PATH`), which is how the protocol service is tested on the host.
//!
//! The binary is static (glibc with `crt-static`), so nothing here may use NSS: users and
//! groups come from parsing `/etc/passwd` and `/etc/group` ([`users`]).

#[macro_use]
pub mod log;

pub mod agent;
pub mod boot;
pub mod cmdline;
pub mod copy;
pub mod net;
pub mod spawn;
pub mod sys;
pub mod transport;
pub mod users;

/// The agent's name and version as sent in `Hello`, so a host can tell which build it talks to.
pub const AGENT_VERSION: &str = concat!("kiln-init ", env!("CARGO_PKG_VERSION"));
