//! Loading a kernel and describing the machine to it: guest RAM regions, the kernel (ELF
//! vmlinux or bzImage), the initrd, the command line, and the zero page (64-bit Linux boot
//! protocol) or `hvm_start_info` (PVH).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::*;
use super::regs::EntryMode;

/// Why a kernel or initrd could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the kernel or initrd file failed.
    #[error("could not read {what}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel is neither an x86_64 ELF nor a bzImage.
    #[error("the kernel image is neither an x86_64 ELF vmlinux nor a bzImage (no ELF magic and no \"HdrS\" header)")]
    UnknownFormat,
    /// linux-loader refused the kernel.
    #[error("could not load the kernel: {0}")]
    Kernel(loader::Error),
    /// The initrd does not fit in guest RAM below the MMIO gap.
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}; give the VM more memory")]
    InitrdTooBig {
        /// Size of the initrd.
        size: u64,
        /// Highest address it could end at.
        limit: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("could not write {what} into guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The boot configurator refused the zero page or start info.
    #[error("could not write the boot parameters: {0}")]
    Configurator(linux_loader::configurator::Error),
}

/// Guest RAM regions for `mem_size` bytes: below the MMIO gap first, the rest above 4 GiB.
pub fn memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_GAP_START {
        regions.push((
            GuestAddress(MMIO_GAP_END),
            (mem_size - MMIO_GAP_START) as usize,
        ));
    }
    regions
}

/// An e820 entry kind.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The e820 map: usable RAM, with the legacy BIOS area (where the ACPI tables live) reserved.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let end = mem.last_addr().raw_value() + 1;
    let low_end = end.min(MMIO_GAP_START);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if end > MMIO_GAP_END {
        map.push((MMIO_GAP_END, end - MMIO_GAP_END, E820_RAM));
    }
    map
}

/// Where and how the loaded kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Guest physical entry address.
    pub address: u64,
    /// For a bzImage, its setup header, which must be copied into the zero page.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// First guest address past the loaded kernel.
    pub kernel_end: u64,
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<KernelEntry, BootError> {
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .map_err(|source| BootError::Read {
            what: "the kernel image",
            source,
        })?;
    let rewind = |kernel: &mut File| {
        kernel
            .seek(SeekFrom::Start(0))
            .map_err(|source| BootError::Read {
                what: "the kernel image",
                source,
            })
    };
    rewind(kernel)?;
    if magic == *b"\x7fELF" {
        let result = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::Kernel)?;
        return Ok(match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => KernelEntry {
                mode: EntryMode::Pvh,
                address: entry.raw_value(),
                setup_header: None,
                kernel_end: result.kernel_end,
            },
            _ => KernelEntry {
                mode: EntryMode::LinuxBoot64,
                address: result.kernel_load.raw_value(),
                setup_header: None,
                kernel_end: result.kernel_end,
            },
        });
    }
    let mut header = [0u8; 0x206];
    let is_bzimage = kernel.read_exact(&mut header).is_ok() && &header[0x202..0x206] == b"HdrS";
    rewind(kernel)?;
    if !is_bzimage {
        return Err(BootError::UnknownFormat);
    }
    let result = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::Kernel)?;
    // The 64-bit entry point of a bzImage is 0x200 bytes into its protected-mode code.
    Ok(KernelEntry {
        mode: EntryMode::LinuxBoot64,
        address: result.kernel_load.raw_value() + 0x200,
        setup_header: result.setup_header,
        kernel_end: result.kernel_end,
    })
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Copies the initrd to the top of RAM below the MMIO gap, page aligned.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let size = initrd
        .metadata()
        .map_err(|source| BootError::Read {
            what: "the initrd",
            source,
        })?
        .len();
    let low_end = (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START);
    let address = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig {
            size,
            limit: low_end,
        })?;
    mem.read_exact_volatile_from(GuestAddress(address), initrd, size as usize)
        .map_err(|source| BootError::Memory {
            what: "the initrd",
            source,
        })?;
    Ok(InitrdPlacement { address, size })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the zero page (64-bit Linux boot) or `hvm_start_info` (PVH).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let map = e820_map(mem);
    match entry.mode {
        EntryMode::LinuxBoot64 => {
            let mut params = boot_params::default();
            if let Some(hdr) = entry.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            if entry.setup_header.is_none() {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            }
            if let Some(initrd) = initrd {
                params.hdr.ramdisk_image = initrd.address as u32;
                params.hdr.ramdisk_size = initrd.size as u32;
            }
            params.acpi_rsdp_addr = RSDP_START;
            for (i, (addr, size, kind)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *kind,
                };
            }
            params.e820_entries = map.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(BootError::Configurator)
        }
        EntryMode::Pvh => {
            let mut start_info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: RSDP_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|(addr, size, kind)| hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *kind,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            if let Some(initrd) = initrd {
                start_info.nr_modules = 1;
                start_info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: initrd.address,
                    size: initrd.size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configurator)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_the_gap_moves_to_4g() {
        let regions = memory_regions(4 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(regions[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(regions[1].1 as u64, (4 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn small_guest_is_one_region_and_e820_reserves_bios_area() {
        let regions = memory_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&regions).expect("memory");
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
    }
}
