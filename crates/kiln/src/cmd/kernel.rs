//! `kiln kernel ...`: import, pull, list, inspect and remove guest kernels in the kernel store
//! under the kiln root (`KILN_ROOT`, default `/var/lib/kiln`), and import the default kernel
//! (Debian's cloud kernel) with a generated initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use kiln_image::{ProgressMode, PullOptions};
use kiln_kernel::{
    DefaultKernelOptions, ImportOptions, InitrdChoice, InitrdKind, KernelRecord, KernelStore,
};

/// Kernel subcommands.
#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// Import a kernel: a bzImage or ELF vmlinux file, or `oci://REFERENCE` for a kernel OCI
    /// image holding /boot/vmlinux or /boot/vmlinuz and /lib/modules.
    Import {
        /// The kernel image file, or `oci://REFERENCE`.
        path: String,
        /// Boot with this initramfs instead of generating one.
        #[arg(long, value_name = "FILE", conflicts_with = "no_initrd")]
        initrd: Option<PathBuf>,
        /// The kernel's modules: its lib/modules/<release> directory, or a directory holding
        /// <release>/ or lib/modules/<release>/ (files only; OCI images carry their own).
        #[arg(long, value_name = "DIR")]
        modules: Option<PathBuf>,
        /// Name for the kernel (default: its release, e.g. 6.1.0-56-cloud-amd64).
        #[arg(long)]
        name: Option<String>,
        /// Store no initramfs: the kernel has virtio and ext4 built in.
        #[arg(long)]
        no_initrd: bool,
        /// Replace a kernel that has the same name.
        #[arg(long)]
        replace: bool,
        /// Reach this registry (host or host:port) over plain HTTP; repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
    },
    /// Pull a kernel OCI image and import it (the same as `import oci://REFERENCE`).
    Pull {
        /// Image reference: `[registry/]repository[:tag][@sha256:digest]`.
        reference: String,
        /// Name for the kernel (default: its release).
        #[arg(long)]
        name: Option<String>,
        /// Boot with this initramfs instead of generating one.
        #[arg(long, value_name = "FILE", conflicts_with = "no_initrd")]
        initrd: Option<PathBuf>,
        /// Store no initramfs: the kernel has virtio and ext4 built in.
        #[arg(long)]
        no_initrd: bool,
        /// Replace a kernel that has the same name.
        #[arg(long)]
        replace: bool,
        /// Reach this registry (host or host:port) over plain HTTP; repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
    },
    /// List stored kernels.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show a kernel as JSON: paths, digests, format, version, initramfs and modules.
    Inspect {
        /// The kernel's name.
        name: String,
    },
    /// Remove kernels (files no other kernel uses are deleted).
    #[command(alias = "remove")]
    Rm {
        /// Kernel names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Import the newest installed Debian cloud kernel as `default`, with a generated
    /// initramfs (no-op when it is already stored and current).
    EnsureDefault,
}

/// Listing formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// A JSON array.
    Json,
}

/// Runs a kernel subcommand against the store under the kiln root.
pub fn run(command: KernelCommand) -> anyhow::Result<()> {
    run_in(&kiln_image::root(), command, &mut std::io::stdout().lock())
}

fn open_store(root: &Path) -> anyhow::Result<KernelStore> {
    KernelStore::open(root)
        .with_context(|| format!("opening the kernel store in {}", root.display()))
}

fn initrd_choice(initrd: Option<PathBuf>, no_initrd: bool) -> InitrdChoice {
    match (initrd, no_initrd) {
        (Some(path), _) => InitrdChoice::File(path),
        (None, true) => InitrdChoice::None,
        (None, false) => InitrdChoice::Generate,
    }
}

fn pull_options(insecure_registries: Vec<String>) -> PullOptions {
    PullOptions {
        insecure_registries,
        progress: ProgressMode::Auto,
        ..PullOptions::default()
    }
}

/// "generated (15 modules)", "provided", "none".
fn initrd_summary(r: &KernelRecord) -> String {
    match &r.initrd {
        Some(i) if i.kind == InitrdKind::Generated => {
            format!("generated ({} modules)", i.modules.len())
        }
        Some(_) => "provided".into(),
        None => "none".into(),
    }
}

fn imported_line(r: &KernelRecord) -> String {
    format!(
        "{}: {} {}, initramfs {}{}",
        r.name,
        r.format,
        r.release.as_deref().unwrap_or("(unknown release)"),
        initrd_summary(r),
        match &r.initrd {
            Some(i) if !i.missing.is_empty() => {
                format!("; not in this kernel: {}", i.missing.join(" "))
            }
            _ => String::new(),
        }
    )
}

/// Why a kernel imported without `--no-initrd` got no initramfs, and what to do if that was
/// not meant: a stock kernel needs its virtio modules loaded before it can see the disk.
fn no_initrd_note(r: &KernelRecord) -> String {
    let hint = match r.release.as_deref() {
        Some(rel)
            if Path::new("/lib/modules")
                .join(rel)
                .join("modules.dep")
                .is_file() =>
        {
            format!(" (its modules are in /lib/modules/{rel}: import it with --modules /lib/modules/{rel})")
        }
        _ => String::new(),
    };
    format!(
        "note: {} has no modules, so no initramfs was generated; it boots only if virtio-mmio, virtio-blk and ext4 are built in (see crates/kiln-kernel/README.md){hint}",
        r.name
    )
}

/// "3 minutes ago" for a Unix timestamp.
fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match now.saturating_sub(secs) {
        0..=59 => "just now".to_string(),
        d @ 60..=3599 => format!("{} minutes ago", d / 60),
        d @ 3600..=86_399 => format!("{} hours ago", d / 3600),
        d => format!("{} days ago", d / 86_400),
    }
}

/// Runs a kernel subcommand against the store under `root`, writing results to `out`
/// (separate from [`run`] so tests need neither `KILN_ROOT` nor stdout).
pub fn run_in(root: &Path, command: KernelCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        KernelCommand::Import {
            path,
            initrd,
            modules,
            name,
            no_initrd,
            replace,
            insecure_registries,
        } => {
            let store = open_store(root)?;
            let options = ImportOptions {
                name,
                modules_dir: modules.clone(),
                initrd: initrd_choice(initrd, no_initrd),
                replace,
                busybox: None,
            };
            let record = match path.strip_prefix("oci://") {
                Some(reference) => {
                    if modules.is_some() {
                        anyhow::bail!(
                            "--modules is for kernel files; an OCI kernel image carries its own /lib/modules"
                        );
                    }
                    store.import_oci(reference, &pull_options(insecure_registries), &options)?
                }
                None => store.import_file(Path::new(&path), &options)?,
            };
            writeln!(out, "imported {}", imported_line(&record))?;
            if record.initrd.is_none() && !no_initrd {
                eprintln!("{}", no_initrd_note(&record));
            }
        }
        KernelCommand::Pull {
            reference,
            name,
            initrd,
            no_initrd,
            replace,
            insecure_registries,
        } => {
            let store = open_store(root)?;
            let options = ImportOptions {
                name,
                modules_dir: None,
                initrd: initrd_choice(initrd, no_initrd),
                replace,
                busybox: None,
            };
            let record =
                store.import_oci(&reference, &pull_options(insecure_registries), &options)?;
            writeln!(out, "imported {}", imported_line(&record))?;
        }
        KernelCommand::Ls { format } => {
            let records = open_store(root)?.list()?;
            match format {
                Format::Json => writeln!(out, "{}", kiln_kernel::list_to_json(&records)?)?,
                Format::Table => {
                    let width = |f: &dyn Fn(&KernelRecord) -> usize, title: &str| {
                        records.iter().map(f).max().unwrap_or(0).max(title.len())
                    };
                    let nw = width(&|r| r.name.len(), "NAME");
                    let rw = width(&|r| r.release.as_deref().map_or(1, str::len), "RELEASE");
                    let iw = width(&|r| initrd_summary(r).len(), "INITRAMFS");
                    writeln!(
                        out,
                        "{:<nw$}  {:<rw$}  {:<7}  {:<iw$}  {:>9}  IMPORTED",
                        "NAME", "RELEASE", "FORMAT", "INITRAMFS", "SIZE"
                    )?;
                    for r in &records {
                        let size = r.kernel_size
                            + r.initrd.as_ref().map_or(0, |i| i.size)
                            + r.modules.as_ref().map_or(0, |m| m.size);
                        writeln!(
                            out,
                            "{:<nw$}  {:<rw$}  {:<7}  {:<iw$}  {:>9}  {}",
                            r.name,
                            r.release.as_deref().unwrap_or("-"),
                            r.format.as_str(),
                            initrd_summary(r),
                            kiln_image::human_size(size),
                            ago(r.imported_at)
                        )?;
                    }
                }
            }
        }
        KernelCommand::Inspect { name } => {
            let record = open_store(root)?.get(&name)?;
            writeln!(out, "{}", record.to_json()?)?;
        }
        KernelCommand::Rm { names } => {
            let store = open_store(root)?;
            let vms = kiln_engine::state::StateStore::open(root)
                .and_then(|state| state.list(true))
                .map_err(|e| anyhow::anyhow!("checking which VMs use the kernels: {e}"))?;
            let mut failed = 0usize;
            for name in &names {
                // A VM boots its kernel again on every start: keep what a VM still needs.
                let users: Vec<&str> = vms
                    .iter()
                    .filter(|vm| &vm.kernel == name)
                    .map(|vm| vm.name.as_str())
                    .collect();
                if !users.is_empty() {
                    eprintln!(
                        "kiln: kernel {name} is used by VM(s) {}: remove them first (kiln rm)",
                        users.join(", ")
                    );
                    failed += 1;
                    continue;
                }
                match store.remove(name) {
                    Ok(_) => writeln!(out, "removed {name}")?,
                    Err(e) => {
                        eprintln!("kiln: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} kernels not removed", names.len());
            }
        }
        KernelCommand::EnsureDefault => {
            let record = open_store(root)?.ensure_default(&DefaultKernelOptions::default())?;
            writeln!(out, "{}", imported_line(&record))?;
            writeln!(out, "kernel: {}", record.kernel_path.display())?;
            if let Some(initrd) = &record.initrd_path {
                writeln!(out, "initramfs: {}", initrd.display())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop (the kiln crate has no tempfile dev-dependency).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "kiln-cli-kernel-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A minimal bzImage: setup header with a version string.
    fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x2000];
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&(0x1000u16 - 0x200).to_le_bytes());
        img[0x1000..0x1000 + version.len()].copy_from_slice(version.as_bytes());
        img
    }

    fn run_cmd(root: &Path, command: KernelCommand) -> (anyhow::Result<()>, String) {
        let mut out = Vec::new();
        let r = run_in(root, command, &mut out);
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    fn import(path: &Path, name: Option<&str>) -> KernelCommand {
        KernelCommand::Import {
            path: path.display().to_string(),
            initrd: None,
            modules: None,
            name: name.map(str::to_string),
            no_initrd: false,
            replace: false,
            insecure_registries: Vec::new(),
        }
    }

    /// Nothing but lock files and an empty name table under `<root>/kernels`.
    fn assert_nothing_stored(root: &Path) {
        let kernels = root.join("kernels");
        for sub in ["blobs/sha256", "modules", "tmp"] {
            let n = std::fs::read_dir(kernels.join(sub)).map_or(0, |d| d.count());
            assert_eq!(n, 0, "{sub} should be empty");
        }
        if let Ok(text) = std::fs::read_to_string(kernels.join("kernels.json")) {
            assert!(text.contains("\"kernels\": {}"), "{text}");
        }
    }

    #[test]
    fn import_ls_inspect_rm() {
        let s = Scratch::new("ok");
        let root = s.0.join("root");
        let kernel = s.0.join("vmlinuz");
        std::fs::write(&kernel, fake_bzimage("6.6.6-cli (t@t) #1")).expect("kernel");

        let (r, out) = run_cmd(
            &root,
            KernelCommand::Ls {
                format: Format::Json,
            },
        );
        r.expect("ls");
        assert_eq!(out.trim(), "[]");

        let (r, out) = run_cmd(&root, import(&kernel, None));
        r.expect("import");
        assert_eq!(
            out.trim(),
            "imported 6.6.6-cli: bzimage 6.6.6-cli, initramfs none"
        );

        let (r, out) = run_cmd(
            &root,
            KernelCommand::Ls {
                format: Format::Table,
            },
        );
        r.expect("ls");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        assert!(
            lines[1].starts_with("6.6.6-cli  6.6.6-cli  bzimage  none"),
            "{out}"
        );

        let (r, out) = run_cmd(
            &root,
            KernelCommand::Ls {
                format: Format::Json,
            },
        );
        r.expect("ls json");
        assert!(out.contains("\"name\": \"6.6.6-cli\""), "{out}");
        assert!(out.contains("\"format\": \"bzimage\""), "{out}");

        let (r, out) = run_cmd(
            &root,
            KernelCommand::Inspect {
                name: "6.6.6-cli".into(),
            },
        );
        r.expect("inspect");
        assert!(out.contains("\"kernel_path\""), "{out}");
        assert!(out.contains("\"version\": \"6.6.6-cli (t@t) #1\""), "{out}");

        let (r, out) = run_cmd(
            &root,
            KernelCommand::Rm {
                names: vec!["6.6.6-cli".into()],
            },
        );
        r.expect("rm");
        assert_eq!(out.trim(), "removed 6.6.6-cli");
        assert_nothing_stored(&root);
    }

    #[test]
    fn clear_errors_and_nothing_left_behind() {
        let s = Scratch::new("err");
        let root = s.0.join("root");
        let missing = s.0.join("no-such-kernel");
        let (r, _) = run_cmd(&root, import(&missing, None));
        let msg = format!("{:#}", r.expect_err("missing file"));
        assert!(
            msg.contains("no-such-kernel") && msg.contains("No such file"),
            "{msg}"
        );
        assert_nothing_stored(&root);

        let junk = s.0.join("junk");
        std::fs::write(&junk, b"just text").expect("junk");
        let (r, _) = run_cmd(&root, import(&junk, None));
        let msg = format!("{:#}", r.expect_err("not a kernel"));
        assert!(msg.contains("is not a kernel kiln can boot"), "{msg}");
        assert_nothing_stored(&root);

        let kernel = s.0.join("vmlinuz");
        std::fs::write(&kernel, fake_bzimage("6.6.6-cli #1")).expect("kernel");
        run_cmd(&root, import(&kernel, Some("k")))
            .0
            .expect("first import");
        let (r, _) = run_cmd(&root, import(&kernel, Some("k")));
        let msg = format!("{:#}", r.expect_err("name in use"));
        assert!(msg.contains("a kernel named \"k\" already exists"), "{msg}");

        let (r, _) = run_cmd(
            &root,
            KernelCommand::Rm {
                names: vec!["nope".into()],
            },
        );
        let msg = format!("{:#}", r.expect_err("unknown name"));
        assert!(msg.contains("1 of 1 kernels not removed"), "{msg}");
        let (r, _) = run_cmd(
            &root,
            KernelCommand::Inspect {
                name: "nope".into(),
            },
        );
        let msg = format!("{:#}", r.expect_err("unknown name"));
        assert!(msg.contains("no kernel named \"nope\""), "{msg}");

        let mut cmd = import(&kernel, None);
        if let KernelCommand::Import { path, modules, .. } = &mut cmd {
            *path = "oci://example.invalid/kernel:1".into();
            *modules = Some(s.0.clone());
        }
        let msg = format!(
            "{:#}",
            run_cmd(&root, cmd).0.expect_err("--modules with oci")
        );
        assert!(msg.contains("--modules is for kernel files"), "{msg}");

        run_cmd(
            &root,
            KernelCommand::Rm {
                names: vec!["k".into()],
            },
        )
        .0
        .expect("rm");
        assert_nothing_stored(&root);
    }
}
