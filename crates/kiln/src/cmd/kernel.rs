//! `kiln kernel ...`.

use clap::Subcommand;

/// Kernel subcommands.
#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// List imported kernels.
    Ls,
}

/// Runs a kernel subcommand.
pub fn run(command: KernelCommand) -> anyhow::Result<()> {
    match command {
        KernelCommand::Ls => anyhow::bail!("kiln kernel ls is not implemented yet"),
    }
}
