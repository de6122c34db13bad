//! `kiln image ...`: pull, import, list, inspect, tag, remove and prune images in the store
//! under the kiln root (`KILN_ROOT`, default `/var/lib/kiln`), and build their root
//! filesystem disks (`kiln image disk`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use kiln_image::{ImportOptions, ProgressMode, PullOptions, Store};
use kiln_rootfs::{DiskCache, LayerSource, MkfsExt4};

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
    /// Print the path of the image's ext4 root filesystem, building it if it is not cached.
    ///
    /// Pulls the image first if it is not in the store. The disk is cached per image ID
    /// (config digest) under `$KILN_ROOT/rootfs`; with `--vm-disk` a copy-on-write copy for
    /// one VM is made too, grown to `--size`.
    Disk {
        /// Image reference, `repo@digest`, digest prefix, or `kiln/default`.
        reference: String,
        /// Free space to leave in the filesystem when it is built (K, M, G, T suffixes,
        /// powers of 1024). A cached disk is reused as it is.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
        free_space: u64,
        /// Also make a disk for one VM at PATH (which must not exist): a copy-on-write copy
        /// of the image's disk.
        #[arg(long, value_name = "PATH", requires = "size")]
        vm_disk: Option<PathBuf>,
        /// Size of the VM disk (e.g. `4G`); the filesystem is grown to fill it.
        #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size, requires = "vm_disk")]
        size: Option<u64>,
        /// Reach this registry (host or host:port) over plain HTTP if the image must be
        /// pulled; repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
        /// No pull progress output.
        #[arg(long, short)]
        quiet: bool,
        /// Output format: the path(s), one a line, or a JSON object.
        #[arg(long, value_enum, default_value_t = DiskFormat::Path)]
        format: DiskFormat,
    },
}

/// Output formats of `kiln image disk`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// The image disk's path, then the VM disk's path if one was made.
    Path,
    /// One JSON object: reference, digests, paths, sizes, whether the disk was cached and
    /// how long each step took.
    Json,
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

/// Parses a size: a whole number of bytes with an optional `K`, `M`, `G` or `T` suffix
/// (powers of 1024; `KiB`/`KB`/`k` spellings accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid size {text:?}: {why}; expected a whole number of bytes with an optional \
             K, M, G or T suffix (powers of 1024), e.g. 4G"
        )
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad(&format!("unknown suffix {suffix:?}"))),
    };
    let value: u64 = number.parse().map_err(|_| bad("number too large"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))
}

/// [`parse_size`], refusing zero.
fn parse_nonzero_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!("invalid size {text:?}: must be greater than zero")),
        n => Ok(n),
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a JSON string; paths that are not UTF-8 cannot be printed faithfully.
fn json_path(path: &Path) -> anyhow::Result<String> {
    path.to_str().map(json_string).with_context(|| {
        format!(
            "{} is not UTF-8 and cannot be printed as JSON",
            path.display()
        )
    })
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// What `kiln image disk` was asked for.
struct DiskRequest {
    reference: String,
    free_space: u64,
    vm_disk: Option<(PathBuf, u64)>,
    pull: PullOptions,
    format: DiskFormat,
}

/// `kiln image disk`: ensure the image, build or reuse its disk, optionally copy a VM disk.
fn disk(req: DiskRequest) -> anyhow::Result<()> {
    // Refuse an unusable VM disk destination before any slow work.
    if let Some((dest, _)) = &req.vm_disk {
        if std::fs::symlink_metadata(dest).is_ok() {
            anyhow::bail!("VM disk {} already exists", dest.display());
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            anyhow::bail!(
                "directory {} for the VM disk does not exist",
                parent.display()
            );
        }
    }
    let started = Instant::now();
    let store = open_store()?;
    // Held from before the layers are resolved until the disk is built, so a concurrent
    // `kiln image prune` cannot delete the blobs being read.
    let lease = store.lease().context("locking the image store")?;
    let record = store
        .ensure(&req.reference, &req.pull)
        .with_context(|| format!("getting image {}", req.reference))?;
    let ensure_ms = millis(started);

    let cache_root = kiln_image::root();
    let cache = DiskCache::open(&cache_root).with_context(|| {
        format!(
            "opening the disk cache in {}",
            cache_root.join("rootfs").display()
        )
    })?;
    let image_id = &record.config_digest;
    let cached = cache.cached(image_id)?;
    let was_cached = cached.is_some();
    let disk_started = Instant::now();
    let image_disk = match cached {
        Some(path) => path,
        None => {
            MkfsExt4::check_tools()?;
            let layers: Vec<LayerSource> = record
                .layers
                .iter()
                .map(|l| LayerSource::new(&l.path, &l.media_type))
                .collect();
            cache
                .image_disk(image_id, &layers, req.free_space)
                .with_context(|| {
                    format!(
                        "building the root filesystem of {} ({image_id})",
                        record.reference
                    )
                })?
        }
    };
    drop(lease);
    let disk_ms = millis(disk_started);
    let image_size = std::fs::metadata(&image_disk)
        .with_context(|| format!("stat {}", image_disk.display()))?
        .len();

    let mut vm = None;
    if let Some((dest, size)) = &req.vm_disk {
        let vm_started = Instant::now();
        if *size < image_size {
            anyhow::bail!(
                "--size {} ({size} bytes) is smaller than the image's disk ({}, {image_size} bytes)",
                kiln_image::human_size(*size),
                kiln_image::human_size(image_size)
            );
        }
        let path = cache
            .vm_disk(image_id, dest, *size)
            .with_context(|| format!("making VM disk {}", dest.display()))?;
        vm = Some((path, *size, millis(vm_started)));
    }

    match req.format {
        DiskFormat::Path => {
            println!("{}", image_disk.display());
            if let Some((path, _, _)) = &vm {
                println!("{}", path.display());
            }
        }
        DiskFormat::Json => {
            let vm_json = match &vm {
                Some((path, size, ms)) => format!(
                    "{{\"path\": {}, \"size\": {size}, \"ms\": {ms:.1}}}",
                    json_path(path)?
                ),
                None => "null".to_string(),
            };
            println!(
                "{{\"reference\": {}, \"manifest_digest\": {}, \"image_id\": {}, \
                 \"disk\": {}, \"disk_size\": {image_size}, \"cached\": {was_cached}, \
                 \"ensure_ms\": {ensure_ms:.1}, \"disk_ms\": {disk_ms:.1}, \"vm_disk\": {vm_json}}}",
                json_string(&record.reference),
                json_string(&record.manifest_digest),
                json_string(image_id),
                json_path(&image_disk)?,
            );
        }
    }
    Ok(())
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
            let partial = report
                .removed
                .iter()
                .filter(|name| name.starts_with("partial "))
                .count();
            let blobs = report.removed.len() - partial;
            if partial > 0 {
                println!(
                    "removed {blobs} blobs and {partial} stale partial downloads, freed {}",
                    kiln_image::human_size(report.bytes)
                );
            } else {
                println!(
                    "removed {blobs} blobs, freed {}",
                    kiln_image::human_size(report.bytes)
                );
            }
        }
        ImageCommand::Disk {
            reference,
            free_space,
            vm_disk,
            size,
            insecure_registries,
            quiet,
            format,
        } => disk(DiskRequest {
            reference,
            free_space,
            vm_disk: vm_disk.zip(size),
            pull: PullOptions {
                insecure_registries,
                progress: if quiet {
                    ProgressMode::Quiet
                } else {
                    ProgressMode::Auto
                },
                ..PullOptions::default()
            },
            format,
        })?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size(" 1 G "), Ok(1 << 30));
        for bad in [
            "",
            "G",
            "4X",
            "1.5G",
            "-1",
            "4GG",
            "99999999999T",
            "18446744073709551616",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.contains("invalid size"), "{err}");
        }
        assert!(parse_nonzero_size("0").is_err());
        assert_eq!(parse_nonzero_size("1M"), Ok(1 << 20));
    }

    #[test]
    fn json_strings() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
    }
}
