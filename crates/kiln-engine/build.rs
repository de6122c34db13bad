//! Builds `kiln-init` (the guest agent, crate `crates/kiln-init`) as a static executable and
//! embeds it in kiln-engine, so that a `kiln` binary carries the agent it puts into every
//! guest's initramfs: no separate file to install, no version skew between host and guest.
//!
//! The agent must be static (the initramfs has no libc), and Cargo cannot give one crate of a
//! build different `RUSTFLAGS`, so this runs a second Cargo on the agent alone with
//! `+crt-static`, in its own target directory (`<target>/kiln-init`) to stay clear of the
//! outer build's lock. `KILN_INIT_BINARY=/path/to/kiln-init` embeds a prebuilt agent instead.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_INIT_BINARY");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out_dir.join("kiln-init");
    let binary = match env::var_os("KILN_INIT_BINARY") {
        Some(path) => PathBuf::from(path),
        None => build_agent(&out_dir),
    };
    std::fs::copy(&binary, &embedded).unwrap_or_else(|e| {
        panic!(
            "copying {} to {}: {e}",
            binary.display(),
            embedded.display()
        )
    });
    // Its digest, computed once here rather than on every `kiln create`: part of the key of
    // the cached initramfs.
    use sha2::Digest;
    let data = std::fs::read(&embedded).expect("reading the embedded kiln-init");
    let digest: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=KILN_INIT_SHA256={digest}");
}

fn build_agent(out_dir: &Path) -> PathBuf {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/kiln-engine sits two levels below the workspace root")
        .to_path_buf();
    for watched in ["crates/kiln-init", "crates/agent-protocol", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out, with a <triple> level after
    // <target> when Cargo runs with --target.
    let mut target_dir = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace.join("target"));
    if let Some(triple) = env::var_os("TARGET") {
        if target_dir.file_name() == Some(triple.as_os_str()) {
            if let Some(parent) = target_dir.parent() {
                target_dir = parent.to_path_buf();
            }
        }
    }
    let agent_target = target_dir.join("kiln-init");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "--offline",
            "-p",
            "kiln-init",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&agent_target)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_INCREMENTAL",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build kiln-init: {e}"));
    if !status.success() {
        panic!("building the static guest agent kiln-init failed ({status}); see the output above");
    }
    agent_target
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("kiln-init")
}
