//! One module per `kiln` subcommand group.

pub mod image;
pub mod kernel;
pub mod login;
pub mod vm;
