/*
 * Shared runtime for kiln's test guests: serial output, a printf subset, reset, command-line
 * parsing and the few libc functions the compiler may call.
 */
#include "rt.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THR_EMPTY 0x20
#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe

u8 *boot_params;

void *memset(void *dst, int c, usize n)
{
	volatile u8 *d = dst;
	for (usize i = 0; i < n; i++)
		d[i] = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, usize n)
{
	volatile u8 *d = dst;
	const u8 *s = src;
	for (usize i = 0; i < n; i++)
		d[i] = s[i];
	return dst;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (usize i = 0; i < n; i++) {
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	}
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, usize n)
{
	for (usize i = 0; i < n; i++) {
		if (a[i] != b[i])
			return (u8)a[i] < (u8)b[i] ? -1 : 1;
		if (!a[i])
			return 0;
	}
	return 0;
}

void serial_putc(char c)
{
	/* Bounded wait: a broken LSR must not hang the guest forever. */
	for (u32 i = 0; i < 100000; i++) {
		if (inb(COM1_LSR) & LSR_THR_EMPTY)
			break;
	}
	outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s++);
	}
}

static void put_unsigned(u64 v, u32 base, int width, char pad)
{
	char buf[24];
	int n = 0;
	do {
		u32 digit = (u32)(v % base);
		buf[n++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
		v /= base;
	} while (v && n < (int)sizeof(buf));
	while (width > n) {
		serial_putc(pad);
		width--;
	}
	while (n)
		serial_putc(buf[--n]);
}

void kvprintf(const char *fmt, va_list ap)
{
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			if (*p == '\n')
				serial_putc('\r');
			serial_putc(*p);
			continue;
		}
		p++;
		char pad = ' ';
		int width = 0;
		int is_long = 0;
		if (*p == '0') {
			pad = '0';
			p++;
		}
		while (*p >= '0' && *p <= '9')
			width = width * 10 + (*p++ - '0');
		if (*p == 'l') {
			is_long = 1;
			p++;
		}
		switch (*p) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			serial_puts(s ? s : "(null)");
			break;
		}
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 'd': {
			i64 v = is_long ? va_arg(ap, i64) : va_arg(ap, int);
			if (v < 0) {
				serial_putc('-');
				v = -v;
			}
			put_unsigned((u64)v, 10, width, pad);
			break;
		}
		case 'u':
			put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad);
			break;
		case 'x':
			put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad);
			break;
		case '%':
			serial_putc('%');
			break;
		case '\0':
			return;
		default:
			serial_putc('%');
			serial_putc(*p);
			break;
		}
	}
}

void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}

void print_hex_bytes(const void *buf, usize len)
{
	const u8 *b = buf;
	for (usize i = 0; i < len; i++)
		kprintf("%02x", b[i]);
}

__attribute__((noreturn)) void reset(void)
{
	outb(I8042_COMMAND, I8042_RESET);
	/* The VMM should be gone by now; if it is not, say so once and spin. */
	serial_puts("reset: i8042 reset did not stop the VM\n");
	idle_forever();
}

__attribute__((noreturn)) void idle_forever(void)
{
	for (;;)
		barrier();
}

void delay_tsc(u64 ticks)
{
	u64 start = rdtsc();
	/* If the TSC is frozen, fall back to a fixed amount of work (about 1 s when emulated). */
	for (u64 spins = 0; spins < 600000; spins++) {
		if (rdtsc() - start >= ticks)
			return;
		barrier();
	}
}

const char *cmdline(void)
{
	if (!boot_params)
		return "";
	u32 ptr = ld32(boot_params + ZP_CMD_LINE_PTR);
	if (!ptr)
		return "";
	return (const char *)(u64)ptr;
}

const char *cmdline_find(const char *from, const char *key, const char **value, usize *len)
{
	usize klen = strlen(key);
	const char *s = from ? from : cmdline();
	const char *start = cmdline();
	for (const char *p = s; *p; p++) {
		if (p != start && p[-1] != ' ')
			continue;
		if (strncmp(p, key, klen) || p[klen] != '=')
			continue;
		const char *v = p + klen + 1;
		usize n = 0;
		while (v[n] && v[n] != ' ')
			n++;
		*value = v;
		*len = n;
		return v + n;
	}
	return NULL;
}

u64 parse_u64(const char *s, usize len, usize *used)
{
	u64 v = 0;
	usize i = 0;
	u32 base = 10;
	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	for (; i < len; i++) {
		char c = s[i];
		u32 d;
		if (c >= '0' && c <= '9')
			d = (u32)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (u32)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (u32)(c - 'A' + 10);
		else
			break;
		v = v * base + d;
	}
	if (used)
		*used = i;
	return v;
}

u64 cmdline_u64(const char *key, u64 fallback)
{
	const char *value;
	usize len;
	if (!cmdline_find(NULL, key, &value, &len) || !len)
		return fallback;
	return parse_u64(value, len, NULL);
}

u32 fnv1a(const void *buf, usize len)
{
	const u8 *b = buf;
	u32 h = 2166136261u;
	for (usize i = 0; i < len; i++) {
		h ^= b[i];
		h *= 16777619u;
	}
	return h;
}
