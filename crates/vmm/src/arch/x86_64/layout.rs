//! Where things live in guest physical memory.
//!
//! Test guests in `crates/test-guests` rely on these addresses; change them together.

/// Zero page (`struct boot_params`) for the 64-bit Linux boot protocol; `rsi` points here.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH `hvm_start_info`; `ebx` points here for the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Largest number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: u64 = (ZERO_PAGE_START - PVH_MEMMAP_START) / 24;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table for the first 512 GiB.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories that map the low 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, including the devices kiln-vmm appends.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable, the rest of the first MiB not.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: RSDP first (where a legacy scan of 0xe0000..0xfffff finds it), then the rest.
pub const RSDP_START: u64 = 0xe0000;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address above 4 GiB, where RAM resumes.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Boot-timer device (a guest write of 123 at offset 0 logs the boot time).
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// First virtio-mmio slot; slot `n` is at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of each virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOTS: u64 = 19;
/// IRQ of the first virtio-mmio slot; slot `n` uses `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQ of the serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the i8042 keyboard controller.
pub const I8042_IRQ: u32 = 1;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
