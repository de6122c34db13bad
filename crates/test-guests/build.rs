//! Compiles the test guests in `guests/` with the machine's gcc into freestanding ELF64 images
//! linked at 1 MiB, then checks that each image is loadable by kiln-vmm (identity-mapped
//! PT_LOAD segments, entry point at or above 1 MiB, a PVH note where one is expected) and that
//! the code uses no instruction the host's instruction emulator lacks (SSE/x87, xsave, popcnt,
//! cmpxchg16b, int/int3, clac/stac, string instructions).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How one guest is built.
struct Guest {
    /// Name used by tests (`test_guests::guest("hello")`) and as the file name.
    name: &'static str,
    /// Guest-specific sources in `guests/`.
    sources: &'static [&'static str],
    /// Whether the C runtime (`start.S`, `rt.c`) is linked in; the PVH guest is pure asm.
    runtime: bool,
    /// Linker script in `guests/`.
    script: &'static str,
    /// Whether the image must carry a PVH (XEN_ELFNOTE_PHYS32_ENTRY) note.
    pvh: bool,
}

const GUESTS: &[Guest] = &[
    c_guest("hello", &["hello.c"]),
    c_guest("bootinfo", &["bootinfo.c", "acpi.c"]),
    c_guest(
        "virtio-discover",
        &["virtio_discover.c", "acpi.c", "virtio.c"],
    ),
    c_guest("blk", &["blk.c", "virtio.c"]),
    c_guest("blk-stream", &["blk_stream.c", "virtio.c"]),
    c_guest("hostile-blk", &["hostile_blk.c", "virtio.c"]),
    c_guest("boot-timer", &["boot_timer.c"]),
    c_guest("counter", &["counter.c"]),
    c_guest("serial-echo", &["serial_echo.c"]),
    c_guest("net-pump", &["net_pump.c", "virtio.c"]),
    c_guest("ctrl-alt-del", &["ctrl_alt_del.c"]),
    c_guest("triple-fault", &["triple_fault.c"]),
    c_guest("vsock", &["vsock.c", "vsock_drv.c", "vq.c", "virtio.c"]),
    c_guest(
        "hostile-vsock",
        &["hostile_vsock.c", "vsock_drv.c", "vq.c", "virtio.c"],
    ),
    c_guest("entropy", &["entropy.c", "vq.c", "virtio.c"]),
    c_guest(
        "blk-bench",
        &["blk_bench.c", "vq.c", "virtio.c", "usermode.c"],
    ),
    c_guest(
        "vsock-bench",
        &[
            "vsock_bench.c",
            "vsock_drv.c",
            "vq.c",
            "virtio.c",
            "usermode.c",
        ],
    ),
    // blk-bench with a PVH entry (pvh_entry.S: 32-bit start info -> zero page, long mode, then
    // the usual 64-bit entry), so that QEMU can boot it for bench/devices.py's baseline.
    Guest {
        name: "blk-bench-pvh",
        sources: &[
            "pvh_entry.S",
            "blk_bench.c",
            "vq.c",
            "virtio.c",
            "usermode.c",
        ],
        runtime: true,
        script: "guest-pvh.ld",
        pvh: true,
    },
    Guest {
        name: "pvh",
        sources: &["pvh.S"],
        runtime: false,
        script: "pvh.ld",
        pvh: true,
    },
];

const fn c_guest(name: &'static str, sources: &'static [&'static str]) -> Guest {
    Guest {
        name,
        sources,
        runtime: true,
        script: "guest.ld",
        pvh: false,
    }
}

/// Flags that make gcc emit code the emulated kernel mode can run: integer registers only,
/// no red zone (there is no proper stack switching to rely on), no stack protector or CET,
/// no unwind tables, and no library calls or string instructions behind our back.
const CFLAGS: &[&str] = &[
    "-m64",
    "-march=x86-64",
    "-mtune=generic",
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-nostartfiles",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mcmodel=small",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-mstringop-strategy=libcall",
    "-fno-jump-tables",
    "-ffunction-sections",
    "-fdata-sections",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--gc-sections",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
];

/// Where every guest is linked; kiln-vmm refuses ELF entry points below it.
const LOAD_ADDRESS: u64 = 0x10_0000;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src_dir = manifest_dir.join("guests");
    let bin_dir = out_dir.join("guests");
    fs::create_dir_all(&bin_dir).expect("create OUT_DIR/guests");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rerun-if-env-changed=TEST_GUESTS_CC");
    for entry in fs::read_dir(&src_dir).expect("read crates/test-guests/guests") {
        let entry = entry.expect("list crates/test-guests/guests");
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let cc = env::var("TEST_GUESTS_CC").unwrap_or_else(|_| "gcc".to_string());
    check_compiler(&cc);
    let objdump = Command::new("objdump").arg("--version").output().is_ok();
    if !objdump {
        println!("cargo:warning=objdump not found: the guests' instruction check is skipped");
    }

    let mut generated = String::new();
    generated.push_str(
        "/// Every guest, as (name, path of its ELF image).\npub const ALL: &[(&str, &str)] = &[\n",
    );
    for guest in GUESTS {
        let output = bin_dir.join(guest.name);
        build(&cc, &src_dir, guest, &output);
        check_elf(guest, &output);
        if objdump {
            check_instructions(guest, &output);
        }
        let _ = writeln!(
            generated,
            "    ({:?}, {:?}),",
            guest.name,
            output.display().to_string()
        );
    }
    generated.push_str("];\n");
    fs::write(out_dir.join("guests.rs"), generated).expect("write OUT_DIR/guests.rs");
}

fn check_compiler(cc: &str) {
    match Command::new(cc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "test-guests: `{cc} --version` failed ({}); the test guests need gcc (C and GNU as) \
             for x86_64: install it (Debian: `apt-get install gcc`) or point TEST_GUESTS_CC at one",
            out.status
        ),
        Err(err) => panic!(
            "test-guests: cannot run `{cc}` ({err}); the test guests need gcc (C and GNU as) for \
             x86_64: install it (Debian: `apt-get install gcc`) or point TEST_GUESTS_CC at one"
        ),
    }
}

fn build(cc: &str, src_dir: &Path, guest: &Guest, output: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS)
        .arg("-I")
        .arg(src_dir)
        .arg(format!("-Wl,-T,{}", src_dir.join(guest.script).display()))
        .arg("-o")
        .arg(output);
    if guest.runtime {
        cmd.arg(src_dir.join("start.S")).arg(src_dir.join("rt.c"));
    }
    for source in guest.sources {
        cmd.arg(src_dir.join(source));
    }
    let result = cmd
        .output()
        .unwrap_or_else(|err| panic!("test-guests: running {cmd:?}: {err}"));
    if !result.status.success() {
        panic!(
            "test-guests: building guest `{}` failed ({}):\n{cmd:?}\n{}{}",
            guest.name,
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) | (le32(b, at + 4) << 32)
}

/// Checks what kiln-vmm's ELF loader relies on, so that a linker-script mistake shows up here
/// instead of as a guest that silently fails to boot.
fn check_elf(guest: &Guest, path: &Path) {
    let image = fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let fail = |why: String| -> ! {
        panic!(
            "test-guests: guest `{}` ({}): {why}",
            guest.name,
            path.display()
        )
    };
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 || image[5] != 1 {
        fail("not a little-endian ELF64 file".into());
    }
    let entry = le64(&image, 24);
    if entry < LOAD_ADDRESS {
        fail(format!("entry point {entry:#x} is below {LOAD_ADDRESS:#x}"));
    }
    let phoff = le64(&image, 32) as usize;
    let phentsize = le16(&image, 54) as usize;
    let phnum = le16(&image, 56) as usize;
    let mut loads = 0;
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if ph + 56 > image.len() {
            fail("program headers run past the end of the file".into());
        }
        let p_type = le32(&image, ph);
        let offset = le64(&image, ph + 8) as usize;
        let vaddr = le64(&image, ph + 16);
        let paddr = le64(&image, ph + 24);
        let filesz = le64(&image, ph + 32) as usize;
        match p_type {
            1 => {
                loads += 1;
                if vaddr != paddr {
                    fail(format!(
                        "PT_LOAD with p_vaddr {vaddr:#x} != p_paddr {paddr:#x}"
                    ));
                }
                if paddr < LOAD_ADDRESS {
                    fail(format!("PT_LOAD at {paddr:#x}, below {LOAD_ADDRESS:#x}"));
                }
            }
            4 => {
                // Notes: namesz, descsz, type, name (4-aligned), desc (4-aligned).
                let mut at = offset;
                let end = (offset + filesz).min(image.len());
                while at + 12 <= end {
                    let namesz = le32(&image, at) as usize;
                    let descsz = le32(&image, at + 4) as usize;
                    let n_type = le32(&image, at + 8);
                    let desc = at + 12 + namesz.div_ceil(4) * 4;
                    let name = image.get(at + 12..at + 12 + namesz);
                    if n_type == 18 && name == Some(b"Xen\0".as_slice()) && descsz >= 4 {
                        if desc + 4 > end {
                            fail("PVH note descriptor runs past its segment".into());
                        }
                        pvh_entry = Some(le32(&image, desc));
                    }
                    at = desc + descsz.div_ceil(4) * 4;
                }
            }
            _ => {}
        }
    }
    if loads == 0 {
        fail("no PT_LOAD segment".into());
    }
    match (guest.pvh, pvh_entry) {
        (true, None) => fail("no XEN_ELFNOTE_PHYS32_ENTRY note in a PT_NOTE segment".into()),
        (true, Some(addr)) if addr < LOAD_ADDRESS => {
            fail(format!("PVH entry {addr:#x} below 1 MiB"))
        }
        (false, Some(_)) => fail("unexpected PVH note: kiln-vmm would use the 32-bit entry".into()),
        _ => {}
    }
}

/// Instruction mnemonics (or prefixes) the host's kernel-mode emulator cannot run, or that
/// would fault without an IDT.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "popcnt",
    "lzcnt",
    "tzcnt",
    "cmpxchg16b",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "xrstor",
    "xrstors",
    "fxsave",
    "fxrstor",
    "ldmxcsr",
    "stmxcsr",
    "emms",
    "int3",
    "int",
    "into",
    "int1",
    "ud2",
    "ud0",
    "ud1",
    "clac",
    "stac",
    "rep",
    "repz",
    "repe",
    "repnz",
    "repne",
    "movsb",
    "movsw",
    "movsl",
    "movsq",
    "stos",
    "stosb",
    "stosw",
    "stosl",
    "stosq",
    "lods",
    "lodsb",
    "lodsl",
    "lodsq",
    "scas",
    "scasb",
    "cmpsb",
    "vzeroupper",
];

/// Words objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repe", "repnz", "repne", "data16", "addr32", "cs", "ds", "es", "ss",
    "fs", "gs", "notrack", "bnd", "rex", "rex.W", "rex.B", "rex.X", "rex.R", "rex.WB", "rex.WR",
    "rex.WX",
];

fn check_instructions(guest: &Guest, path: &Path) {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .arg(path)
        .output()
        .unwrap_or_else(|err| panic!("running objdump on {}: {err}", path.display()));
    if !out.status.success() {
        panic!(
            "objdump -d {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bad = Vec::new();
    for line in text.lines() {
        // Instruction lines look like "  100004:\tmov    %rsi,%r12".
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let insn = insn.trim();
        let uses_vector_regs = ["%xmm", "%ymm", "%zmm", "%mm", "%st"]
            .iter()
            .any(|r| insn.contains(r));
        // Prefixes come first; the first other word is the mnemonic, the rest are operands.
        let mut words = insn.split_whitespace();
        let mut checked = Vec::new();
        for word in words.by_ref() {
            checked.push(word);
            if !PREFIXES.contains(&word) {
                break;
            }
        }
        let forbidden = checked.iter().any(|word| {
            FORBIDDEN_MNEMONICS.contains(word)
                // x87 instructions all start with 'f' (fld, fstp, fnstcw, ...).
                || (word.starts_with('f') && !PREFIXES.contains(word))
                // SSE/AVX floating-point mnemonics that do not name an xmm register.
                || (word.len() > 4 && (word.ends_with("ps") || word.ends_with("pd")))
        });
        if uses_vector_regs || forbidden {
            bad.push(line.trim().to_string());
        }
    }
    if !bad.is_empty() {
        panic!(
            "test-guests: guest `{}` uses instructions the emulated kernel mode lacks:\n{}",
            guest.name,
            bad.join("\n")
        );
    }
}
