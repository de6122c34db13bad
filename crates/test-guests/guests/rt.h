/*
 * Shared runtime for kiln's test guests.
 *
 * The guests run in 64-bit long mode at CPL0 with interrupts off and no usable IDT, under a
 * KVM whose kernel-mode code is emulated one instruction at a time: everything here is
 * integer-only, avoids string instructions, and never causes an exception.  Each guest checks
 * one thing and reports it over the 16550 at 0x3f8, one line per fact, prefixed with its name,
 * so that the host-side tests can parse the output.
 */
#ifndef KILN_RT_H
#define KILN_RT_H

#include <stdarg.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Addresses of the boot contract (see crates/vmm/src/arch/x86_64/layout.rs). */
#define ZP_ACPI_RSDP_ADDR 0x070
#define ZP_E820_ENTRIES 0x1e8
#define ZP_BOOT_FLAG 0x1fe
#define ZP_HEADER 0x202
#define ZP_CMD_LINE_PTR 0x228
#define ZP_CMDLINE_SIZE 0x238
#define ZP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128

#define BOOT_TIMER_ADDR 0xc0000000UL
#define VIRTIO_MMIO_BASE 0xc0001000UL

static inline void outb(u16 port, u8 value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 value;
	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* Keeps the compiler from reordering or caching memory accesses across this point. */
static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static inline void mmio_write32(u64 addr, u32 value)
{
	*(volatile u32 *)addr = value;
}

static inline u8 mmio_read8(u64 addr)
{
	return *(volatile u8 *)addr;
}

static inline void mmio_write8(u64 addr, u8 value)
{
	*(volatile u8 *)addr = value;
}

static inline void cpuid(u32 leaf, u32 subleaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* Unaligned little-endian loads from guest memory (ACPI tables are byte-packed). */
static inline u16 ld16(const void *p)
{
	const u8 *b = p;
	return (u16)(b[0] | (b[1] << 8));
}

static inline u32 ld32(const void *p)
{
	const u8 *b = p;
	return (u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24);
}

static inline u64 ld64(const void *p)
{
	const u8 *b = p;
	return (u64)ld32(b) | ((u64)ld32(b + 4) << 32);
}

/* The zero page the VMM passed in RSI; set by start.S before guest_main runs. */
extern u8 *boot_params;

/* The guest's entry point, called by start.S with the zero page address. */
void guest_main(u8 *zero_page);

void *memset(void *dst, int c, usize n);
void *memcpy(void *dst, const void *src, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strncmp(const char *a, const char *b, usize n);

void serial_putc(char c);
void serial_puts(const char *s);
/* printf subset: %s %c %d %u %x, the l modifier, and a zero-padded width (%08x). */
void kprintf(const char *fmt, ...);
void kvprintf(const char *fmt, va_list ap);

/* Asks the i8042 to reset the machine (kiln-vmm then exits with status 0). */
__attribute__((noreturn)) void reset(void);
/* Spins forever without touching any device: for guests that must stay alive. */
__attribute__((noreturn)) void idle_forever(void);

/* Busy-waits roughly `ticks` TSC ticks (falls back to counting if the TSC does not move). */
void delay_tsc(u64 ticks);

/* The command line from the zero page ("" if there is none). */
const char *cmdline(void);
/*
 * Finds `key=` as a whole word in the command line; on success stores where its value starts
 * and how long it is, and returns the occurrence after `from` (0 for the first).
 */
const char *cmdline_find(const char *from, const char *key, const char **value, usize *len);
/* Reads the numeric value of `key=` (decimal or 0x hex), or returns `fallback`. */
u64 cmdline_u64(const char *key, u64 fallback);
/* Parses a decimal or 0x-prefixed hex number; stores the characters used in *used. */
u64 parse_u64(const char *s, usize len, usize *used);

/* FNV-1a over a buffer: lets the host check a whole sector without printing it. */
u32 fnv1a(const void *buf, usize len);

/* Prints `len` bytes as hex without separators. */
void print_hex_bytes(const void *buf, usize len);

#endif
