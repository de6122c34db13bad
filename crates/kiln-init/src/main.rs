//! `kiln-init`: PID 1 of kiln's microVMs, or (`--listen-unix PATH`) the same protocol service
//! as an ordinary process, for tests and debugging.

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_init::{agent, boot, error, transport};

const USAGE: &str = "usage: kiln-init                           (as PID 1 of a kiln microVM)
       kiln-init --listen-unix PATH [--debug] (serve the agent protocol on a Unix socket)";

fn main() -> ExitCode {
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } == 1 {
        boot::run();
    }
    let mut listen = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen-unix" => match args.next() {
                Some(p) => listen = Some(PathBuf::from(p)),
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--debug" => kiln_init::log::set_debug(true),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("kiln-init: unknown argument {arg:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = listen else {
        eprintln!("kiln-init: not PID 1; give --listen-unix PATH to serve on a socket\n{USAGE}");
        return ExitCode::from(2);
    };
    let transport = match transport::listen_unix(&path) {
        Ok(t) => t,
        Err(e) => {
            error!("cannot listen on {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // Tell whoever started us that connecting will work now.
    println!("kiln-init: listening on {}", path.display());
    match agent::serve(transport, agent::Mode::Local) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
