//! The VMM's log: `tracing` with a level and destination that `PUT /logger` can change while
//! the VMM runs.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, Registry};

use crate::config::{LogLevel, LoggerConfig};

type Sink = Box<dyn Write + Send>;

static SINK: OnceLock<Mutex<Sink>> = OnceLock::new();
static RELOAD: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();

fn sink() -> &'static Mutex<Sink> {
    SINK.get_or_init(|| Mutex::new(Box::new(std::io::stderr())))
}

/// Writes each log event to whatever the sink currently is.
struct SharedSink;

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::devices::bus::lock(sink()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        crate::devices::bus::lock(sink()).flush()
    }
}

struct SinkMaker;

impl<'a> MakeWriter<'a> for SinkMaker {
    type Writer = SharedSink;

    fn make_writer(&'a self) -> Self::Writer {
        SharedSink
    }
}

/// Maps Firecracker's level names onto `tracing`'s.
pub fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Installs the global subscriber, logging to stderr at `level`.
pub fn init(level: LogLevel) {
    let (filter, handle) = reload::Layer::new(level_filter(level));
    let layer = fmt::layer()
        .with_writer(SinkMaker)
        .with_ansi(false)
        .with_target(false);
    if tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(handle);
    }
}

/// Applies `PUT /logger`: a new destination and/or level.
pub fn configure(config: &LoggerConfig) -> Result<(), String> {
    if let Some(path) = &config.log_path {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("Cannot open the log file {}: {e}", path.display()))?;
        *crate::devices::bus::lock(sink()) = Box::new(file);
    }
    if let (Some(level), Some(handle)) = (config.level, RELOAD.get()) {
        handle
            .modify(|filter| *filter = level_filter(level))
            .map_err(|e| format!("Cannot change the log level: {e}"))?;
    }
    Ok(())
}
