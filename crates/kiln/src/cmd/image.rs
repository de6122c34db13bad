//! `kiln image ...`.

use clap::Subcommand;

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List stored images.
    Ls,
}

/// Runs an image subcommand.
pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Ls => anyhow::bail!("kiln image ls is not implemented yet"),
    }
}
