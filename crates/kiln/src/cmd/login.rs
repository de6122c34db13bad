//! `kiln login REGISTRY`: checks credentials against a registry and stores them in
//! `<kiln root>/auth.json` (0600) for later pulls.

use std::io::{BufRead, IsTerminal};

use anyhow::Context as _;
use clap::Args;
use kiln_image::Credentials;

/// Arguments of `kiln login`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Registry host\[:port\] (`docker.io` for Docker Hub).
    pub registry: String,
    /// User name (asked for on a terminal if missing).
    #[arg(long, short)]
    pub username: Option<String>,
    /// Password or token (visible in `ps`; prefer --password-stdin).
    #[arg(long, short, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Reach the registry over plain HTTP (loopback registries always are).
    #[arg(long)]
    pub insecure: bool,
    /// Forget the stored credentials for the registry instead.
    #[arg(long, conflicts_with_all = ["username", "password", "password_stdin"])]
    pub logout: bool,
}

fn read_line(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Runs `kiln login`.
pub fn run(args: LoginArgs) -> anyhow::Result<()> {
    let root = kiln_image::root();
    if args.logout {
        if kiln_image::logout(&root, &args.registry)? {
            println!("removed credentials for {}", args.registry);
        } else {
            println!("no credentials stored for {}", args.registry);
        }
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    let username = match args.username {
        Some(u) => u,
        None if interactive && !args.password_stdin => read_line("Username: ")?,
        None => anyhow::bail!("--username is required"),
    };
    let password = match (args.password, args.password_stdin) {
        (Some(p), _) => p,
        (None, true) => read_line("")?,
        (None, false) if interactive => kiln_image::prompt_password("Password: ")?,
        (None, false) => anyhow::bail!("give a password with --password-stdin or --password"),
    };
    if username.is_empty() || password.is_empty() {
        anyhow::bail!("username and password must not be empty");
    }
    kiln_image::login(
        &root,
        &args.registry,
        &Credentials { username, password },
        args.insecure,
    )?;
    println!("login succeeded: {}", args.registry);
    Ok(())
}
