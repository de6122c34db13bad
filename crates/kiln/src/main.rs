//! kiln: run OCI images as KVM microVMs with a container's ease of use.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = "Run OCI images as KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pull, import, list and remove OCI images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Import, list and remove guest kernels.
    #[command(subcommand)]
    Kernel(cmd::kernel::KernelCommand),
    /// Log in to a registry; pulls then use the credentials.
    Login(cmd::login::LoginArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(command) => cmd::image::run(command),
        Command::Kernel(command) => cmd::kernel::run(command),
        Command::Login(args) => cmd::login::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
