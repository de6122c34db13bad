//! `kiln image ...`: pull, import, list, inspect, tag, remove and prune images in the store
//! under the kiln root (`KILN_ROOT`, default `/var/lib/kiln`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use kiln_image::{ImportOptions, ProgressMode, PullOptions, Store};

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image from a registry (`kiln/default` builds the offline busybox image).
    Pull {
        /// Image reference: `[registry/]repository[:tag][@sha256:digest]`.
        reference: String,
        /// Reach this registry (host or host:port) over plain HTTP; repeatable. Loopback
        /// registries always are.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
        /// Print plain progress lines even on a terminal.
        #[arg(long, conflicts_with = "quiet")]
        plain: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Import a `docker save` tarball or an OCI image layout (directory or tar).
    Import {
        /// The archive or layout directory.
        path: PathBuf,
        /// Name the image (required when the archive carries no name).
        #[arg(long, short)]
        tag: Option<String>,
    },
    /// List stored images.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show an image as JSON: reference, digests, config, layers, size.
    Inspect {
        /// Reference, `repo@digest`, or digest prefix.
        reference: String,
    },
    /// Give a stored image another name.
    Tag {
        /// The stored image.
        source: String,
        /// The new reference.
        target: String,
    },
    /// Remove image references (blobs go with `prune`).
    #[command(alias = "remove")]
    Rm {
        /// References, `repo@digest`s, or digest prefixes.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Delete blobs no stored image uses.
    Prune,
}

/// Listing formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// A JSON array.
    Json,
}

fn open_store() -> anyhow::Result<Store> {
    let root = kiln_image::root();
    Store::open(&root).with_context(|| format!("opening the image store in {}", root.display()))
}

/// "3 minutes ago" for a Unix timestamp.
fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let d = now.saturating_sub(secs);
    match d {
        0..=59 => "just now".to_string(),
        60..=3599 => format!("{} minutes ago", d / 60),
        3600..=86_399 => format!("{} hours ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// Runs an image subcommand.
pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Pull {
            reference,
            insecure_registries,
            plain,
            quiet,
        } => {
            let store = open_store()?;
            let options = PullOptions {
                insecure_registries,
                progress: if quiet {
                    ProgressMode::Quiet
                } else if plain {
                    ProgressMode::Plain
                } else {
                    ProgressMode::Auto
                },
                ..PullOptions::default()
            };
            let record = store.pull(&reference, &options)?;
            println!("{} {}", record.reference, record.manifest_digest);
        }
        ImageCommand::Import { path, tag } => {
            let store = open_store()?;
            let records = store.import(&path, &ImportOptions { tag })?;
            for record in records {
                println!("{} {}", record.reference, record.manifest_digest);
            }
        }
        ImageCommand::Ls { format } => {
            let records = open_store()?.list()?;
            match format {
                Format::Json => println!("{}", kiln_image::list_to_json(&records)?),
                Format::Table => {
                    let width = records
                        .iter()
                        .map(|r| r.reference.len())
                        .max()
                        .unwrap_or(0)
                        .max("REFERENCE".len());
                    println!(
                        "{:<width$}  {:<12}  {:>9}  STORED",
                        "REFERENCE", "DIGEST", "SIZE"
                    );
                    for r in &records {
                        println!(
                            "{:<width$}  {:<12}  {:>9}  {}",
                            r.reference,
                            short_digest(&r.manifest_digest),
                            kiln_image::human_size(r.size),
                            ago(r.stored_at)
                        );
                    }
                }
            }
        }
        ImageCommand::Inspect { reference } => {
            let record = open_store()?.resolve(&reference)?;
            println!("{}", record.to_json()?);
        }
        ImageCommand::Tag { source, target } => {
            let record = open_store()?.tag(&source, &target)?;
            println!("{} {}", record.reference, record.manifest_digest);
        }
        ImageCommand::Rm { references } => {
            let store = open_store()?;
            let mut failed = 0usize;
            for reference in &references {
                match store.remove(reference) {
                    Ok(names) => names.iter().for_each(|n| println!("removed {n}")),
                    Err(e) => {
                        eprintln!("kiln: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} images not removed", references.len());
            }
        }
        ImageCommand::Prune => {
            let report = open_store()?.prune()?;
            println!(
                "removed {} blobs, freed {}",
                report.removed.len(),
                kiln_image::human_size(report.bytes)
            );
        }
    }
    Ok(())
}
