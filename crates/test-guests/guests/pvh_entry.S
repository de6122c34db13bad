/*
 * PVH entry for the C test guests, so that QEMU (whose x86 `-kernel` boots an ELF only through
 * its PVH note) can run them too; used by the `blk-bench-pvh` variant of `blk-bench`.
 *
 * The VMM enters `pvh_entry` (ELF note "Xen", type 18 XEN_ELFNOTE_PHYS32_ENTRY) in 32-bit
 * protected mode, paging off, interrupts off, with EBX = struct hvm_start_info.  This stub turns
 * the start info into the part of a Linux zero page (boot_params) the guests read: the command
 * line (copied into the image, so that nothing the firmware left in low memory is relied on),
 * the ACPI RSDP address and the e820 map.  It then builds identity page tables for the low 4 GiB
 * (2 MiB pages, the 3-4 GiB device hole uncached) and a GDT with the 64-bit code segment at 0x08
 * and data at 0x10 (as kiln-vmm's boot GDT), enables long mode and jumps to the guests' ordinary
 * 64-bit entry `_start` (start.S) with RSI = the zero page, exactly as kiln-vmm's 64-bit boot
 * would.  No stack, no calls.  Everything it writes lives in the image's .data (file-backed, so
 * it is zero when loaded, and outside the .bss that start.S clears).
 *
 * The ELF entry point stays `_start`, but a VMM that sees the PVH note uses the note (kiln-vmm
 * does too), so the guests kiln-vmm's tests and benches boot the 64-bit way are built without
 * this file.
 */
#define HVM_START_MAGIC 0x336ec578

#define ZP_ACPI_RSDP_ADDR 0x070
#define ZP_E820_ENTRIES 0x1e8
#define ZP_BOOT_FLAG 0x1fe
#define ZP_HEADER 0x202
#define ZP_CMD_LINE_PTR 0x228
#define ZP_CMDLINE_SIZE 0x238
#define ZP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128
#define CMDLINE_MAX 4096

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20

	.section .note.Xen, "a", @note
	.p2align 2
	.long	4		/* namesz */
	.long	4		/* descsz */
	.long	18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_entry
	/* An empty note, so that a reader loading the descriptor as 64 bits sees the same value. */
	.long	0, 0, 0

	.section .text.pvh_entry, "ax"
	.code32
	.globl	pvh_entry
pvh_entry:
	movl	%ebx, %ebp
	cmpl	$HVM_START_MAGIC, 0(%ebp)
	jne	paging

	/* Command line (cmdline_paddr, u64 at 24), if any and below 4 GiB. */
	movl	24(%ebp), %esi
	cmpl	$0, 28(%ebp)
	jne	rsdp
	testl	%esi, %esi
	jz	rsdp
	movl	$pvh_cmdline, %edi
	movl	$(CMDLINE_MAX - 1), %ecx
1:	movb	(%esi), %al
	testb	%al, %al
	jz	2f
	movb	%al, (%edi)
	incl	%esi
	incl	%edi
	decl	%ecx
	jnz	1b
2:	movb	$0, (%edi)
	movl	$pvh_cmdline, (pvh_zero_page + ZP_CMD_LINE_PTR)
	movl	$(CMDLINE_MAX - 1), (pvh_zero_page + ZP_CMDLINE_SIZE)

rsdp:	/* rsdp_paddr, u64 at 32. */
	movl	32(%ebp), %eax
	movl	%eax, (pvh_zero_page + ZP_ACPI_RSDP_ADDR)
	movl	36(%ebp), %eax
	movl	%eax, (pvh_zero_page + ZP_ACPI_RSDP_ADDR + 4)

	/* Memory map: memmap_paddr (u64 at 40), memmap_entries (u32 at 48); 24-byte entries
	 * (addr, size, type, reserved) become 20-byte e820 entries (addr, size, type). */
	cmpl	$0, 44(%ebp)
	jne	header
	movl	40(%ebp), %esi
	testl	%esi, %esi
	jz	header
	movl	48(%ebp), %ecx
	cmpl	$E820_MAX_ENTRIES, %ecx
	jbe	3f
	movl	$E820_MAX_ENTRIES, %ecx
3:	movb	%cl, (pvh_zero_page + ZP_E820_ENTRIES)
	movl	$(pvh_zero_page + ZP_E820_TABLE), %edi
	testl	%ecx, %ecx
	jz	header
4:	movl	0(%esi), %eax
	movl	%eax, 0(%edi)
	movl	4(%esi), %eax
	movl	%eax, 4(%edi)
	movl	8(%esi), %eax
	movl	%eax, 8(%edi)
	movl	12(%esi), %eax
	movl	%eax, 12(%edi)
	movl	16(%esi), %eax
	movl	%eax, 16(%edi)
	addl	$24, %esi
	addl	$20, %edi
	decl	%ecx
	jnz	4b

header:
	movw	$0xaa55, (pvh_zero_page + ZP_BOOT_FLAG)
	movl	$0x53726448, (pvh_zero_page + ZP_HEADER)	/* "HdrS" */

paging:
	/* Four page directories of 2 MiB pages: 0-4 GiB identity, the last GiB uncached. */
	movl	$pvh_pd, %edi
	movl	$(PTE_P | PTE_RW | PTE_PS), %eax
	xorl	%ecx, %ecx
5:	movl	%eax, %edx
	cmpl	$1536, %ecx
	jb	6f
	orl	$(PTE_PCD | PTE_PWT), %edx
6:	movl	%edx, (%edi)
	movl	$0, 4(%edi)
	addl	$0x200000, %eax
	addl	$8, %edi
	incl	%ecx
	cmpl	$2048, %ecx
	jb	5b
	movl	$(pvh_pd + PTE_P + PTE_RW), (pvh_pdpt)
	movl	$(pvh_pd + 0x1000 + PTE_P + PTE_RW), (pvh_pdpt + 8)
	movl	$(pvh_pd + 0x2000 + PTE_P + PTE_RW), (pvh_pdpt + 16)
	movl	$(pvh_pd + 0x3000 + PTE_P + PTE_RW), (pvh_pdpt + 24)
	movl	$(pvh_pdpt + PTE_P + PTE_RW), (pvh_pml4)

	/* Long mode: PAE, CR3, EFER.LME, then paging; a far jump loads the 64-bit CS. */
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pvh_pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	lgdt	pvh_gdt_ptr
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
	ljmp	$0x08, $pvh_long

	.code64
pvh_long:
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$pvh_zero_page, %esi
	jmp	_start

	.section .rodata.pvh_gdt, "a"
	.p2align 3
pvh_gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* 0x08: code, 64-bit */
	.quad	0x00cf93000000ffff	/* 0x10: data */
pvh_gdt_end:
	.p2align 2
pvh_gdt_ptr:
	.word	pvh_gdt_end - pvh_gdt - 1
	.long	pvh_gdt

	/* In .data, not .bss: start.S clears .bss while running on these page tables. */
	.section .data.pvh, "aw"
	.p2align 12
pvh_pml4:
	.skip	4096
pvh_pdpt:
	.skip	4096
pvh_pd:
	.skip	4 * 4096
pvh_zero_page:
	.skip	4096
pvh_cmdline:
	.skip	CMDLINE_MAX

	.section .note.GNU-stack, "", @progbits
