/*
 * 64-bit entry of the C test guests.
 *
 * kiln-vmm jumps here in long mode (CPL0, identity-mapped low 4 GiB, interrupts off) with the
 * zero page in RSI.  The VMM's boot stack at 0x8ff0 sits right above the zero page, so the
 * guest moves to its own stack before calling into C, after zeroing its .bss (the loader only
 * copies the file-backed part of each segment).
 */
	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	movq	%rsi, %r12
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
1:	cmpq	%rcx, %rdi
	jae	2f
	movq	$0, (%rdi)
	addq	$8, %rdi
	jmp	1b
2:	leaq	stack_top(%rip), %rsp
	movq	%r12, boot_params(%rip)
	movq	%r12, %rdi
	call	guest_main
	call	reset
3:	jmp	3b

	.section .bss.stack, "aw", @nobits
	.p2align 4
stack_bottom:
	.skip	16384
	.globl	stack_top
stack_top:

	.section .note.GNU-stack, "", @progbits
