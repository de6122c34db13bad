//! Console logging. As PID 1, stderr is `/dev/console` (the serial console), which is all a
//! user has to diagnose a guest that never reached the host; progress lines are printed only
//! with `kiln.debug` so a normal boot stays quiet, errors always.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns progress logging on or off (`kiln.debug` on the kernel command line, `--debug`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether progress lines are printed.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one `kiln-init: ...` line to stderr in a single write, so lines from threads do not
/// interleave; errors writing are ignored (there is nowhere else to report them).
pub fn line(args: std::fmt::Arguments<'_>) {
    let text = format!("kiln-init: {args}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Logs a progress line when debugging is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::line(format_args!($($arg)*))
        }
    };
}

/// Logs an error line, always.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
