/*
 * pvh: a guest with a PVH entry point (an ELF note "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY).
 * kiln-vmm must enter it at that address in 32-bit protected mode with paging off and EBX
 * pointing to `struct hvm_start_info`.  It checks the start info's magic, prints the magic,
 * the command line, CR0 and the memory map, then resets.
 *
 * The ELF entry point (_start) is 64-bit code that only says the PVH note was ignored, so a
 * VMM that boots this image the 64-bit way fails the test with a clear message.
 */
#define COM1 0x3f8
#define HVM_START_MAGIC 0x336ec578

	.section .note.Xen, "a", @note
	.p2align 2
	.long	4		/* namesz */
	.long	4		/* descsz */
	.long	18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_start

	.section .rodata, "a"
msg_wrong_entry:
	.asciz	"pvh: entered through the 64-bit ELF entry point: the PVH note was ignored\r\n"
msg_entered:
	.asciz	"pvh: entered at the PVH entry point in 32-bit mode\r\n"
msg_start_info:
	.asciz	"pvh: start_info=0x"
msg_cr0:
	.asciz	"pvh: cr0=0x"
msg_magic:
	.asciz	"pvh: magic=0x"
msg_bad_magic:
	.asciz	"pvh: bad start info magic, expected 0x336ec578\r\n"
msg_version:
	.asciz	"pvh: version="
msg_cmdline:
	.asciz	"pvh: cmdline=\""
msg_no_cmdline:
	.asciz	"pvh: cmdline=(none)\r\n"
msg_rsdp:
	.asciz	"pvh: rsdp=0x"
msg_memmap:
	.asciz	"pvh: memmap entries="
msg_mm_addr:
	.asciz	"pvh: memmap addr=0x"
msg_mm_size:
	.asciz	" size=0x"
msg_mm_type:
	.asciz	" type="
msg_done:
	.asciz	"pvh: done\r\n"
msg_quote_nl:
	.asciz	"\"\r\n"
msg_nl:
	.asciz	"\r\n"

	.section .text.entry, "ax"
	.code64
	.globl	_start
_start:
	leaq	msg_wrong_entry(%rip), %rsi
	movw	$COM1, %dx
1:	movb	(%rsi), %al
	testb	%al, %al
	jz	2f
	outb	%al, %dx
	incq	%rsi
	jmp	1b
2:	movb	$0xfe, %al
	outb	%al, $0x64
3:	jmp	3b

	.code32
	.globl	pvh_start
pvh_start:
	movl	$stack_top, %esp
	movl	%ebx, %ebp			/* struct hvm_start_info */

	movl	$msg_entered, %esi
	call	puts
	movl	$msg_start_info, %esi
	call	puts
	movl	%ebp, %eax
	call	puthex
	call	newline

	movl	$msg_cr0, %esi
	call	puts
	movl	%cr0, %eax
	call	puthex
	call	newline

	movl	$msg_magic, %esi
	call	puts
	movl	0(%ebp), %eax
	call	puthex
	call	newline
	cmpl	$HVM_START_MAGIC, 0(%ebp)
	je	magic_ok
	movl	$msg_bad_magic, %esi
	call	puts
	jmp	do_reset
magic_ok:
	movl	$msg_version, %esi
	call	puts
	movl	4(%ebp), %eax
	call	putdec
	call	newline

	/* cmdline_paddr (u64 at 24): printable only if it is below 4 GiB and not null. */
	movl	24(%ebp), %esi
	movl	28(%ebp), %eax
	orl	%eax, %eax
	jnz	no_cmdline
	testl	%esi, %esi
	jz	no_cmdline
	pushl	%esi
	movl	$msg_cmdline, %esi
	call	puts
	popl	%esi
	movl	$4096, %ecx
print_cmdline:
	movb	(%esi), %al
	testb	%al, %al
	jz	cmdline_end
	call	putc
	incl	%esi
	decl	%ecx
	jnz	print_cmdline
cmdline_end:
	movl	$msg_quote_nl, %esi
	call	puts
	jmp	rsdp
no_cmdline:
	movl	$msg_no_cmdline, %esi
	call	puts

rsdp:
	movl	$msg_rsdp, %esi
	call	puts
	movl	32(%ebp), %eax
	call	puthex
	call	newline

	/* Memory map: memmap_paddr (u64 at 40), memmap_entries (u32 at 48), 24-byte entries. */
	movl	$msg_memmap, %esi
	call	puts
	movl	48(%ebp), %eax
	call	putdec
	call	newline
	movl	44(%ebp), %eax
	testl	%eax, %eax
	jnz	memmap_done
	movl	40(%ebp), %edi
	movl	48(%ebp), %ebx
	cmpl	$64, %ebx
	jbe	memmap_loop
	movl	$64, %ebx
memmap_loop:
	testl	%ebx, %ebx
	jz	memmap_done
	movl	$msg_mm_addr, %esi
	call	puts
	movl	4(%edi), %eax
	call	puthex
	movl	0(%edi), %eax
	call	puthex
	movl	$msg_mm_size, %esi
	call	puts
	movl	12(%edi), %eax
	call	puthex
	movl	8(%edi), %eax
	call	puthex
	movl	$msg_mm_type, %esi
	call	puts
	movl	16(%edi), %eax
	call	putdec
	call	newline
	addl	$24, %edi
	decl	%ebx
	jmp	memmap_loop
memmap_done:
	movl	$msg_done, %esi
	call	puts
do_reset:
	movb	$0xfe, %al
	outb	%al, $0x64
halt:
	jmp	halt

/* putc: writes %al to COM1 once the transmitter is empty (bounded wait). Clobbers %edx. */
putc:
	pushl	%ecx
	pushl	%eax
	movl	$100000, %ecx
	movw	$(COM1 + 5), %dx
1:	inb	%dx, %al
	testb	$0x20, %al
	jnz	2f
	decl	%ecx
	jnz	1b
2:	popl	%eax
	movw	$COM1, %dx
	outb	%al, %dx
	popl	%ecx
	ret

/* puts: writes the NUL-terminated string at %esi. Clobbers %eax, %edx, %esi. */
puts:
	movb	(%esi), %al
	testb	%al, %al
	jz	1f
	call	putc
	incl	%esi
	jmp	puts
1:	ret

newline:
	movl	$msg_nl, %esi
	jmp	puts

/* puthex: writes %eax as 8 hex digits. Clobbers %eax, %edx. */
puthex:
	pushl	%ecx
	pushl	%ebx
	movl	%eax, %ebx
	movl	$8, %ecx
1:	roll	$4, %ebx
	movl	%ebx, %eax
	andl	$0xf, %eax
	cmpl	$10, %eax
	jb	2f
	addl	$('a' - '0' - 10), %eax
2:	addl	$'0', %eax
	call	putc
	decl	%ecx
	jnz	1b
	popl	%ebx
	popl	%ecx
	ret

/* putdec: writes %eax in decimal. Clobbers %eax, %edx. */
putdec:
	pushl	%ecx
	pushl	%ebx
	movl	$10, %ebx
	xorl	%ecx, %ecx
1:	xorl	%edx, %edx
	divl	%ebx
	pushl	%edx
	incl	%ecx
	testl	%eax, %eax
	jnz	1b
2:	popl	%eax
	addl	$'0', %eax
	call	putc
	decl	%ecx
	jnz	2b
	popl	%ebx
	popl	%ecx
	ret

	.section .bss, "aw", @nobits
	.p2align 4
	.skip	4096
stack_top:

	.section .note.GNU-stack, "", @progbits
