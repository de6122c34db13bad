//! kiln's engine: what `kiln run` and friends do below the command line.
//!
//! - [`state`]: the VM records in SQLite under the kiln root, safe for any number of CLIs.
//! - [`backend`]: the hypervisors (kiln-vmm, QEMU) behind one `Backend` trait, and the
//!   transports to the guest agent.
//! - [`guest`]: the boot files: kernel plus an initramfs with the embedded kiln-init.
//! - [`network`]: the NAT bridge `kiln0`, address leases' subnet, tap devices.
//! - [`vm`]: create, start, stop, kill, remove; keeping `ps` honest.
//! - [`supervisor`]: the process that runs one VM and outlives the CLI.
//! - [`control`]: what the CLI and a supervisor say to each other.
//! - [`client`]: the CLI side of sessions (attach, exec, copy).
//! - [`logfile`]: size-capped console and output logs.

pub mod backend;
pub mod client;
pub mod control;
pub mod error;
pub mod guest;
pub mod logfile;
pub mod network;
pub mod state;
pub mod supervisor;
pub mod vm;

pub use error::{EngineError, Result};
