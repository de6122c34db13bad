//! kiln-vmm: boots a microVM configured over a Firecracker-compatible API on a Unix socket, or
//! from a config file.
//!
//! Exit status: 0 the guest reset the machine (i8042, Linux `reboot=k`); 1 VMM error;
//! 2 bad arguments or configuration; 3 the guest triple-faulted; 4 a vCPU failed;
//! 128+N stopped by signal N (143 for SIGTERM).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::builder::{SerialOutput, VmmOptions};
use vmm::config::{LogLevel, VmConfig};
use vmm::controller::{self, SignalWatch, Vmm};

/// Exit status for unusable arguments or configuration.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "kiln-vmm",
    version,
    about = "A Firecracker-compatible microVM monitor on KVM"
)]
struct Args {
    /// Unix socket for the API (Firecracker's paths and JSON).
    #[arg(long, default_value = "/run/kiln-vmm.socket")]
    api_sock: PathBuf,
    /// Instance id reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Boot from this JSON file (the shape of `GET /vm/config`) as soon as the VMM starts.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Do not open the API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// Add the boot-timer device: a guest write of 123 at 0xc0000000 logs the boot time.
    #[arg(long)]
    boot_timer: bool,
    /// Write guest serial output to this file instead of stdout.
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// Log file (default: stderr).
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level: Off, Error, Warning, Info, Debug, Trace.
    #[arg(long, default_value = "Warning", value_parser = parse_level)]
    level: LogLevel,
    /// Metrics file (JSON lines).
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// Load this JSON file into the metadata service (MMDS) at start, as `PUT /mmds` would.
    #[arg(long)]
    metadata: Option<PathBuf>,
    /// Largest metadata document (MMDS) accepted, in bytes.
    #[arg(long, default_value_t = mmds::DEFAULT_SIZE_LIMIT)]
    mmds_size_limit: usize,
}

fn parse_level(text: &str) -> Result<LogLevel, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        format!("unknown level {text:?}; use Off, Error, Warning, Info, Debug or Trace")
    })
}

fn fail(message: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("kiln-vmm: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args = Args::parse();
    vmm::logger::init(args.level);
    if let Some(path) = &args.log_path {
        let logger = vmm::config::LoggerConfig {
            log_path: Some(path.clone()),
            ..Default::default()
        };
        if let Err(e) = vmm::logger::configure(&logger) {
            return fail(e, EXIT_BAD_CONFIG);
        }
    }

    let options = VmmOptions {
        id: args.id.clone(),
        boot_timer: args.boot_timer,
        serial_output: match &args.serial_out {
            Some(path) => SerialOutput::File(path.clone()),
            None => SerialOutput::Stdout,
        },
        mmds_size_limit: args.mmds_size_limit,
    };
    let (handle, inbox) = match vmm::rpc::channel() {
        Ok(pair) => pair,
        Err(e) => return fail(format!("cannot create the API channel: {e}"), 1),
    };
    let mut vmm = match Vmm::new(options, (!args.no_api).then_some(inbox)) {
        Ok(vmm) => vmm,
        Err(e) => return fail(format!("cannot initialise: {e}"), 1),
    };
    // Before any other thread exists, so that every thread inherits the blocked mask.
    let signals = match SignalWatch::new(vmm.exit_signal()) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot set up signal handling: {e}"), 1),
    };

    if let Some(path) = &args.metadata {
        let document = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read metadata file {}: {e}", path.display()))
            .and_then(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| format!("metadata file {} is not JSON: {e}", path.display()))
            })
            .and_then(|value| {
                vmm.handle(vmm::rpc::VmmAction::PutMmds(value))
                    .map(|_| ())
                    .map_err(|e| format!("metadata file {}: {e}", path.display()))
            });
        if let Err(e) = document {
            return fail(e, EXIT_BAD_CONFIG);
        }
    }

    if let Some(path) = &args.metrics_path {
        let metrics = vmm::config::MetricsConfig {
            metrics_path: path.clone(),
        };
        if let Err(e) = vmm.handle(vmm::rpc::VmmAction::PutMetrics(metrics)) {
            return fail(e, EXIT_BAD_CONFIG);
        }
    }

    if args.config_file.is_none() {
        vmm.begin_preparation();
    }

    let api = if args.no_api {
        None
    } else {
        match vmm_api::start(&args.api_sock, handle) {
            Ok(server) => Some(server),
            Err(e) => return fail(e, 1),
        }
    };

    if let Some(path) = &args.config_file {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                return fail(
                    format!("cannot read config file {}: {e}", path.display()),
                    EXIT_BAD_CONFIG,
                )
            }
        };
        let config: VmConfig = match serde_json::from_str(&text) {
            Ok(config) => config,
            Err(e) => {
                return fail(
                    format!("invalid config file {}: {e}", path.display()),
                    EXIT_BAD_CONFIG,
                )
            }
        };
        if let Err(e) = vmm.apply_config(config) {
            return fail(
                format!("config file {}: {e}", path.display()),
                EXIT_BAD_CONFIG,
            );
        }
        if let Err(e) = vmm.start() {
            return fail(e, 1);
        }
    }

    let reason = controller::run(vmm, Some(signals));
    if let Some(api) = api {
        api.stop();
    }
    let code = reason.exit_code();
    if code == 0 {
        tracing::info!("VM ended: {reason}");
    } else {
        tracing::warn!("VM ended: {reason}");
        eprintln!("kiln-vmm: {reason}");
    }
    // Exit without unwinding other threads: the vCPU threads may be inside KVM_RUN.
    std::process::exit(code)
}
