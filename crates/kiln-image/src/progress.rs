//! Download progress on stderr: one indicatif bar per layer on a terminal, plain lines
//! otherwise (CI logs, pipes), nothing when quiet.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How pulls report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Always plain lines.
    Plain,
    /// Nothing at all (library use, tests).
    Quiet,
}

/// A pull's progress display.
pub(crate) struct Progress {
    multi: Option<MultiProgress>,
    plain: bool,
}

impl Progress {
    /// Chooses bars, lines or silence from `mode` and whether stderr is a terminal.
    pub(crate) fn new(mode: ProgressMode) -> Progress {
        match mode {
            ProgressMode::Quiet => Progress {
                multi: None,
                plain: false,
            },
            ProgressMode::Plain => Progress {
                multi: None,
                plain: true,
            },
            ProgressMode::Auto if std::io::stderr().is_terminal() => Progress {
                multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
                plain: false,
            },
            ProgressMode::Auto => Progress {
                multi: None,
                plain: true,
            },
        }
    }

    /// A status line ("pulling …", "stored …").
    pub(crate) fn message(&self, msg: &str) {
        if let Some(multi) = &self.multi {
            let _ = multi.println(msg);
        } else if self.plain {
            eprintln!("{msg}");
        }
    }

    /// Starts tracking one blob of `size` bytes.
    pub(crate) fn blob(&self, digest: &str, size: u64) -> BlobProgress {
        let label = short(digest);
        if let Some(multi) = &self.multi {
            let bar = multi.add(ProgressBar::new(size));
            let style = ProgressStyle::with_template(
                "{prefix}: {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.clone());
            BlobProgress {
                bar: Some(bar),
                plain: false,
                label,
            }
        } else {
            BlobProgress {
                bar: None,
                plain: self.plain,
                label,
            }
        }
    }
}

/// Progress of one blob.
pub(crate) struct BlobProgress {
    bar: Option<ProgressBar>,
    plain: bool,
    label: String,
}

impl BlobProgress {
    /// The download started, at `offset` when resuming a partial download: the bar starts
    /// there, so what is left (and the rate) reads right.
    pub(crate) fn started(&self, size: u64, offset: u64) {
        self.set_position(offset);
        if self.plain {
            if offset > 0 {
                eprintln!(
                    "{}: resuming at {} of {}",
                    self.label,
                    human_size(offset),
                    human_size(size)
                );
            } else {
                eprintln!("{}: downloading {}", self.label, human_size(size));
            }
        }
    }

    /// The bytes held so far changed other than by arriving (resume, restart from 0).
    pub(crate) fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.reset_eta();
        }
    }

    /// A note on the bar (or a plain line): "waiting for another pull", "starting over".
    pub(crate) fn note(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
        } else if self.plain {
            eprintln!("{}: {msg}", self.label);
        }
    }

    /// `n` more bytes arrived.
    pub(crate) fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Finished with a closing word ("done", "already present", "failed").
    pub(crate) fn finish(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_with_message(msg.to_string());
        } else if self.plain {
            eprintln!("{}: {msg}", self.label);
        }
    }
}

/// `sha256:0123456789ab` — enough to tell layers apart.
pub(crate) fn short(digest: &str) -> String {
    let end = digest.len().min("sha256:".len() + 12);
    digest.get(..end).unwrap_or(digest).to_string()
}

/// 1234567 → "1.2 MB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
