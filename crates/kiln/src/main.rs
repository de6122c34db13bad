//! kiln: run OCI images as KVM microVMs with a container's ease of use.

mod cmd;
mod term;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kiln", version, about = "Run OCI images as KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot an image as a microVM and run its command, like `docker run`.
    Run(cmd::vm::RunArgs),
    /// Create a VM without starting it.
    Create(cmd::vm::CreateArgs),
    /// Start created or stopped VMs.
    Start(cmd::vm::StartArgs),
    /// Stop VMs: SIGTERM to the main process, SIGKILL after a timeout, power off.
    Stop(cmd::vm::StopArgs),
    /// Send a signal to VMs' main processes.
    Kill(cmd::vm::KillArgs),
    /// Remove VMs and everything they own (disk, logs, sockets).
    Rm(cmd::vm::RmArgs),
    /// List VMs.
    Ps(cmd::vm::PsArgs),
    /// Show a VM's output (or, with --console, its serial console).
    Logs(cmd::vm::LogsArgs),
    /// Run a command in a running VM.
    Exec(cmd::vm::ExecArgs),
    /// Attach to a running VM's serial console, or with --main to its main process.
    Attach(cmd::vm::AttachArgs),
    /// Copy files between a VM and the host (VM:PATH on one side).
    Cp(cmd::vm::CpArgs),
    /// Show VMs as JSON.
    Inspect(cmd::vm::InspectArgs),
    /// Pull, import, list and remove OCI images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Import, list and remove guest kernels.
    #[command(subcommand)]
    Kernel(cmd::kernel::KernelCommand),
    /// Log in to a registry; pulls then use the credentials.
    Login(cmd::login::LoginArgs),
    /// Housekeeping.
    #[command(subcommand)]
    System(SystemCommand),
    /// Internal: the per-VM supervisor.
    #[command(name = "__supervise", hide = true)]
    Supervise(cmd::vm::SuperviseArgs),
}

#[derive(Subcommand, Debug)]
enum SystemCommand {
    /// Remove all stopped VMs and leftovers of dead ones.
    Prune,
}

/// Commands that only read state and print it: like other Unix tools they end quietly when
/// the reader of their output goes away (`kiln ps | head`). Rust ignores SIGPIPE, which would
/// turn that into a "failed printing to stdout" panic. Commands that talk to a supervisor or a
/// registry keep ignoring it, so a vanished peer is an error they can report.
fn only_prints(command: &Command) -> bool {
    use cmd::image::ImageCommand;
    use cmd::kernel::KernelCommand;
    matches!(
        command,
        Command::Ps(_)
            | Command::Inspect(_)
            | Command::Logs(_)
            | Command::Image(ImageCommand::Ls { .. } | ImageCommand::Inspect { .. })
            | Command::Kernel(KernelCommand::Ls { .. } | KernelCommand::Inspect { .. })
    )
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if only_prints(&cli.command) {
        // SAFETY: restores the default disposition of SIGPIPE before any other thread runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if matches!(cli.command, Command::Supervise(_)) {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    let unit = |r: anyhow::Result<()>| r.map(|()| 0u8);
    let vm_command = matches!(
        cli.command,
        Command::Run(_)
            | Command::Create(_)
            | Command::Start(_)
            | Command::Exec(_)
            | Command::Stop(_)
            | Command::Kill(_)
            | Command::Rm(_)
            | Command::Ps(_)
            | Command::Logs(_)
            | Command::Attach(_)
            | Command::Cp(_)
            | Command::Inspect(_)
            | Command::System(_)
            | Command::Supervise(_)
    );
    if matches!(
        cli.command,
        Command::Run(_) | Command::Exec(_) | Command::Start(_)
    ) {
        cmd::vm::forward_signals();
    }
    let result = match cli.command {
        Command::Run(args) => cmd::vm::run(args),
        Command::Create(args) => cmd::vm::create(args),
        Command::Start(args) => cmd::vm::start(args),
        Command::Stop(args) => cmd::vm::stop(args),
        Command::Kill(args) => cmd::vm::kill(args),
        Command::Rm(args) => cmd::vm::rm(args),
        Command::Ps(args) => cmd::vm::ps(args),
        Command::Logs(args) => cmd::vm::logs(args),
        Command::Exec(args) => cmd::vm::exec(args),
        Command::Attach(args) => cmd::vm::attach(args),
        Command::Cp(args) => cmd::vm::cp(args),
        Command::Inspect(args) => cmd::vm::inspect(args),
        Command::System(SystemCommand::Prune) => cmd::vm::prune(),
        Command::Supervise(args) => cmd::vm::supervise(args),
        Command::Image(command) => unit(cmd::image::run(command)),
        Command::Kernel(command) => unit(cmd::kernel::run(command)),
        Command::Login(args) => unit(cmd::login::run(args)),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("kiln: {e:#}");
            // Docker's convention: 125 when kiln itself failed, so it is not mistaken for the
            // exit code of the process in the VM.
            std::process::ExitCode::from(if vm_command {
                cmd::vm::EXIT_KILN_ERROR
            } else {
                1
            })
        }
    }
}
