/*
 * bench/guest/first-byte.S - the smallest useful guest for the VMM benchmark.
 *
 * Entered through the PVH entry point (ELF note "Xen", type 18 XEN_ELFNOTE_PHYS32_ENTRY) in
 * 32-bit protected mode with paging off, as both kiln-vmm and QEMU microvm do for such an ELF.
 * It writes one byte to the COM1 transmit register (0x3f8) and then:
 *   default        resets the machine through the i8042 (outb 0xFE to port 0x64); kiln-vmm
 *                  exits 0, QEMU with -no-reboot exits;
 *   -DSPIN         halts forever with interrupts off (the vCPU sleeps in the host kernel), so the
 *                  VMM stays up for the memory measurement;
 *   -DTOUCH_PAGES=N  (with SPIN) first writes one byte into each of N 4 KiB pages from 2 MiB
 *                  upwards, so the subtraction of guest pages can be checked.
 * Kept to a handful of instructions: on kvm_pvm guest kernel-mode code is emulated, slowly.
 */
	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
#if defined(SPIN) && defined(TOUCH_PAGES) && TOUCH_PAGES > 0
	movl	$0x200000, %edi
	movl	$TOUCH_PAGES, %ecx
1:	movb	$1, (%edi)
	addl	$4096, %edi
	loop	1b
#endif
	movw	$0x3f8, %dx
	movb	$'K', %al
	outb	%al, %dx
#ifndef SPIN
	movb	$0xfe, %al
	outb	%al, $0x64
#endif
2:	cli
	hlt
	jmp	2b

/*
 * PVH note: namesz 4 ("Xen\0"), descsz 4, type 18, desc = 32-bit physical entry. It is followed by
 * an empty note (all zero) so that a reader that loads the descriptor as a 64-bit word still sees
 * the right value (the upper half is the next note's zero namesz).
 */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4
	.long	4
	.long	18
	.asciz	"Xen"
	.long	_start
	.long	0, 0, 0
