/* Ring-3 runtime for test guests; see usermode.h. */
#include "usermode.h"

#define PTE_P 0x001UL
#define PTE_RW 0x002UL
#define PTE_US 0x004UL
#define PTE_PWT 0x008UL
#define PTE_PCD 0x010UL
#define PTE_PS 0x080UL

#define CR4_SMEP (1UL << 20)
#define CR4_SMAP (1UL << 21)

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x18
#define SEL_UCODE 0x20
#define SEL_TSS 0x28

#define RFLAGS_FIXED 0x2UL
#define RFLAGS_IOPL3 0x3000UL

/* PML4, PDPT and four page directories: 0-4 GiB in 2 MiB pages. */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));

struct tss64 {
	u32 reserved0;
	u64 rsp0;
	u64 rsp1;
	u64 rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

static struct tss64 tss __attribute__((aligned(16)));
static u64 gdt[8] __attribute__((aligned(16)));
static u8 kernel_stack[4096] __attribute__((aligned(16)));
static u8 user_stack[65536] __attribute__((aligned(16)));

struct __attribute__((packed)) desc_ptr {
	u16 limit;
	u64 base;
};

static struct desc_ptr gdt_ptr;
static struct desc_ptr idt_ptr;

/*
 * Exceptions.  kvm_pvm runs ring-3 code natively with the host's IOPL of 0, so `in`/`out`
 * from ring 3 raise #GP despite the IOPL of 3 in RFLAGS; the #GP handler performs the port
 * access in ring 0 and steps over the instruction.  Every other exception is reported on the
 * serial port and resets the VM.  Vectors 0-31 have stubs that push a zero where the CPU
 * pushes no error code, then the vector, and jump to a common entry that saves the
 * caller-saved registers and calls usermode_trap() with the frame.
 */
struct trap_frame {
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

static u64 idt[32][2] __attribute__((aligned(16)));
void usermode_trap(struct trap_frame *f);

#define TRAP_NOERR(n) "1: pushq $0\n\tpushq $" #n "\n\tjmp trap_common\n\t.p2align 4\n"
#define TRAP_ERR(n) "1: pushq $" #n "\n\tjmp trap_common\n\t.p2align 4\n"

__asm__(".text\n\t"
	".p2align 4\n"
	"trap_stub_0:\n\t"
	TRAP_NOERR(0) TRAP_NOERR(1) TRAP_NOERR(2) TRAP_NOERR(3) TRAP_NOERR(4) TRAP_NOERR(5)
	TRAP_NOERR(6) TRAP_NOERR(7) TRAP_ERR(8) TRAP_NOERR(9) TRAP_ERR(10) TRAP_ERR(11)
	TRAP_ERR(12) TRAP_ERR(13) TRAP_ERR(14) TRAP_NOERR(15) TRAP_NOERR(16) TRAP_ERR(17)
	TRAP_NOERR(18) TRAP_NOERR(19) TRAP_NOERR(20) TRAP_ERR(21) TRAP_NOERR(22) TRAP_NOERR(23)
	TRAP_NOERR(24) TRAP_NOERR(25) TRAP_NOERR(26) TRAP_NOERR(27) TRAP_NOERR(28) TRAP_ERR(29)
	TRAP_ERR(30) TRAP_NOERR(31)
	"trap_common:\n\t"
	"pushq %rax\n\tpushq %rcx\n\tpushq %rdx\n\tpushq %rsi\n\tpushq %rdi\n\t"
	"pushq %r8\n\tpushq %r9\n\tpushq %r10\n\tpushq %r11\n\t"
	"movq %rsp, %rdi\n\t"
	"call usermode_trap\n\t"
	"popq %r11\n\tpopq %r10\n\tpopq %r9\n\tpopq %r8\n\tpopq %rdi\n\t"
	"popq %rsi\n\tpopq %rdx\n\tpopq %rcx\n\tpopq %rax\n\t"
	"addq $16, %rsp\n\t"
	"iretq\n");

/* Every stub is 16 bytes long (.p2align 4), so stub n is at trap_stub_0 + 16 n. */
extern const u8 trap_stub_0[];

/* Emulates in/out at `f->rip` (the forms gcc emits for inb/outb and inl/outl); 1 if done. */
static int emulate_io(struct trap_frame *f)
{
	const u8 *ip = (const u8 *)f->rip;
	u8 op = ip[0];
	u16 port = (u16)f->rdx;
	u64 len = 1;
	if (op == 0xe4 || op == 0xe5 || op == 0xe6 || op == 0xe7) {
		port = ip[1];
		len = 2;
	}
	switch (op) {
	case 0xee: case 0xe6: /* out %al */
		__asm__ volatile("outb %0, %1" : : "a"((u8)f->rax), "Nd"(port));
		break;
	case 0xef: case 0xe7: /* out %eax */
		__asm__ volatile("outl %0, %1" : : "a"((u32)f->rax), "Nd"(port));
		break;
	case 0xec: case 0xe4: { /* in %al */
		u8 v;
		__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
		f->rax = (f->rax & ~0xffUL) | v;
		break;
	}
	case 0xed: case 0xe5: { /* in %eax (zero-extends to rax) */
		u32 v;
		__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
		f->rax = v;
		break;
	}
	default:
		return 0;
	}
	f->rip += len;
	return 1;
}

u64 usermode_io_traps;

void usermode_trap(struct trap_frame *f)
{
	if (f->vector == 13 && (f->cs & 3) == 3 && emulate_io(f)) {
		usermode_io_traps++;
		return;
	}
	kprintf("usermode: exception %lu error=0x%lx rip=0x%lx cs=0x%lx rsp=0x%lx\n", f->vector,
		f->error, f->rip, f->cs, f->rsp);
	reset();
}

static void build_idt(void)
{
	for (u64 n = 0; n < 32; n++) {
		u64 addr = (u64)trap_stub_0 + 16 * n;
		idt[n][0] = (addr & 0xffff) | ((u64)SEL_KCODE << 16) | (0x8eUL << 40) |
			    (((addr >> 16) & 0xffff) << 48);
		idt[n][1] = addr >> 32;
	}
	idt_ptr.limit = sizeof(idt) - 1;
	idt_ptr.base = (u64)idt;
}

int usermode_requested(void)
{
	return cmdline_u64("kiln.user", 0) != 0;
}

static void build_page_tables(void)
{
	for (u64 g = 0; g < 4; g++) {
		for (u64 i = 0; i < 512; i++) {
			u64 addr = (g << 30) | (i << 21);
			u64 flags = PTE_P | PTE_RW | PTE_US | PTE_PS;
			/* The 3-4 GiB gap holds the virtio-mmio window and other devices. */
			if (g == 3)
				flags |= PTE_PCD | PTE_PWT;
			pd[g][i] = addr | flags;
		}
		pdpt[g] = (u64)pd[g] | PTE_P | PTE_RW | PTE_US;
	}
	pml4[0] = (u64)pdpt | PTE_P | PTE_RW | PTE_US;
}

static void build_gdt(void)
{
	u64 base = (u64)&tss;
	u64 limit = sizeof(tss) - 1;
	memset(&tss, 0, sizeof(tss));
	tss.rsp0 = (u64)(kernel_stack + sizeof(kernel_stack));
	tss.iomap_base = sizeof(tss); /* no I/O bitmap: IOPL 3 decides */
	gdt[0] = 0;
	gdt[1] = 0x00af9b000000ffffUL; /* kernel code, 64-bit (the boot GDT's selector 0x08) */
	gdt[2] = 0x00cf93000000ffffUL; /* kernel data (0x10) */
	gdt[3] = 0x00cff3000000ffffUL; /* user data, DPL 3 (0x18) */
	gdt[4] = 0x00affb000000ffffUL; /* user code, 64-bit, DPL 3 (0x20) */
	gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
		 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[6] = base >> 32;
	gdt[7] = 0;
	gdt_ptr.limit = sizeof(gdt) - 1;
	gdt_ptr.base = (u64)gdt;
}

__attribute__((noreturn)) void usermode_run(void (*fn)(void *), void *arg)
{
	build_page_tables();
	build_gdt();
	build_idt();
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	if (cr4 & (CR4_SMEP | CR4_SMAP)) {
		cr4 &= ~(CR4_SMEP | CR4_SMAP);
		__asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
	}
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
	__asm__ volatile("lgdt %0\n\t"
			 "pushq %1\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n"
			 "1:\n\t"
			 "mov %2, %%ax\n\t"
			 "mov %%ax, %%ds\n\t"
			 "mov %%ax, %%es\n\t"
			 "mov %%ax, %%ss\n\t"
			 "mov %3, %%ax\n\t"
			 "ltr %%ax\n\t"
			 "lidt %4"
			 :
			 : "m"(gdt_ptr), "i"(SEL_KCODE), "i"(SEL_KDATA), "i"(SEL_TSS), "m"(idt_ptr)
			 : "rax", "memory");
	u64 user_rsp = (u64)(user_stack + sizeof(user_stack)) - 8; /* as if called */
	__asm__ volatile("pushq %0\n\t" /* SS */
			 "pushq %1\n\t" /* RSP */
			 "pushq %2\n\t" /* RFLAGS: IOPL 3, interrupts off */
			 "pushq %3\n\t" /* CS */
			 "pushq %4\n\t" /* RIP */
			 "mov %0, %%ds\n\t"
			 "mov %0, %%es\n\t"
			 "iretq"
			 :
			 : "r"((u64)(SEL_UDATA | 3)), "r"(user_rsp), "r"(RFLAGS_FIXED | RFLAGS_IOPL3),
			   "r"((u64)(SEL_UCODE | 3)), "r"((u64)fn), "D"(arg)
			 : "memory");
	__builtin_unreachable();
}
