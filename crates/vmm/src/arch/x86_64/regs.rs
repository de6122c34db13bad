//! Initial vCPU register state: long mode for the 64-bit Linux boot protocol, flat 32-bit
//! protected mode for the PVH entry, identity page tables and the boot GDT.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, MMIO_GAP_END, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// Why the initial register state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM refused the vCPU registers: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("could not write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = zero page.
    LinuxBoot64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Page-table entry flags: present, writable, and (for PD/PDPT leaves) a large page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_LARGE: u64 = 0x80;

/// Packs a GDT descriptor from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// Unpacks a GDT descriptor into the segment KVM wants.
fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: (table_index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if ((entry >> 47) & 1) == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for the Linux entry and
/// 32-bit for PVH.
fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code_flags = match mode {
        EntryMode::LinuxBoot64 => 0xa09b,
        EntryMode::Pvh => 0xc09b,
    };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes identity page tables covering the low 4 GiB (2 MiB pages, so the MMIO gap is mapped
/// too) and RAM above 4 GiB up to `mem_end` (1 GiB pages).
fn write_page_tables(mem: &GuestMemoryMmap, mem_end: u64) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPTE_START + pd * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((pd << 30) + (i << 21)) | PTE_PRESENT_RW | PTE_LARGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    // One PDPT covers 512 GiB; RAM beyond that is left for the kernel to map itself.
    let top_gib = mem_end.div_ceil(1 << 30).min(512);
    for gib in (MMIO_GAP_END >> 30)..top_gib {
        mem.write_obj(
            (gib << 30) | PTE_PRESENT_RW | PTE_LARGE,
            GuestAddress(PDPTE_START + gib * 8),
        )?;
    }
    Ok(())
}

/// Puts the boot vCPU in the state its entry protocol expects.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mem_end: u64,
    mode: EntryMode,
    entry: u64,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(mode);
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt_bytes, GuestAddress(BOOT_GDT_START))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::LinuxBoot64 => {
            write_page_tables(mem, mem_end)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)?;
    setup_fpu(vcpu)
}

/// x87 and SSE control words at their reset values, for every vCPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_round_trips_through_kvm_segment() {
        let seg = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.l, 0);
    }

    #[test]
    fn page_tables_identity_map_low_memory_and_gap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)])
            .expect("test memory");
        write_page_tables(&mem, 0x20_0000).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("pml4");
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // The last 2 MiB page below 4 GiB (inside the MMIO gap) maps to itself.
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .expect("pde");
        assert_eq!(pde & !0xfff, 0xffe0_0000);
    }
}
