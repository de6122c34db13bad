/*
 * bootinfo: reports what the VMM told the guest at boot, one fact per line, so that the host
 * test can compare it with what it configured: the setup header and command line from the
 * zero page, the e820 map, the RSDP and the MADT's CPUs, and the hypervisor CPUID leaves.
 */
#include "acpi.h"

static void print_cmdline(const u8 *zp)
{
	u32 ptr = ld32(zp + ZP_CMD_LINE_PTR);
	u32 size = ld32(zp + ZP_CMDLINE_SIZE);
	kprintf("bootinfo: cmd_line_ptr=0x%x cmdline_size=%u\n", ptr, size);
	if (!ptr) {
		kprintf("bootinfo: cmdline=(none)\n");
		return;
	}
	const char *s = (const char *)(u64)ptr;
	kprintf("bootinfo: cmdline=\"");
	for (u32 i = 0; i < 4096 && s[i]; i++)
		serial_putc(s[i] >= ' ' && s[i] < 0x7f ? s[i] : '?');
	kprintf("\"\n");
}

static void print_e820(const u8 *zp)
{
	u32 entries = zp[ZP_E820_ENTRIES];
	kprintf("bootinfo: e820 entries=%u\n", entries);
	if (entries > E820_MAX_ENTRIES)
		entries = E820_MAX_ENTRIES;
	for (u32 i = 0; i < entries; i++) {
		const u8 *e = zp + ZP_E820_TABLE + 20 * i;
		kprintf("bootinfo: e820 addr=0x%016lx size=0x%016lx type=%u\n", ld64(e), ld64(e + 8),
			ld32(e + 16));
	}
}

static void print_acpi(const u8 *zp)
{
	u64 rsdp = ld64(zp + ZP_ACPI_RSDP_ADDR);
	kprintf("bootinfo: acpi_rsdp_addr=0x%lx\n", rsdp);
	struct acpi_root root;
	acpi_probe(rsdp, &root);
	if (!root.rsdp_found) {
		kprintf("bootinfo: rsdp found=no\n");
		return;
	}
	kprintf("bootinfo: rsdp found=yes checksum=%s revision=%u xsdt=0x%lx\n",
		root.rsdp_ok ? "ok" : "bad", root.revision, root.xsdt);
	if (!root.xsdt_found) {
		kprintf("bootinfo: xsdt found=no\n");
		return;
	}
	kprintf("bootinfo: xsdt checksum=%s entries=%u\n", root.xsdt_ok ? "ok" : "bad",
		root.xsdt_entries);
	u64 madt = acpi_find(&root, "APIC");
	if (!madt) {
		kprintf("bootinfo: madt found=no\n");
		return;
	}
	const u8 *m = (const u8 *)madt;
	u32 len = ld32(m + 4);
	if (!acpi_addr_ok(madt, len) || len < 44) {
		kprintf("bootinfo: madt found=yes length=%u (invalid)\n", len);
		return;
	}
	u32 lapics = 0, enabled = 0, ioapics = 0;
	for (u32 off = 44; off + 2 <= len;) {
		u8 type = m[off], elen = m[off + 1];
		if (elen < 2 || off + elen > len)
			break;
		if (type == 0 && elen >= 8) {
			lapics++;
			if (ld32(m + off + 4) & 1)
				enabled++;
		} else if (type == 1) {
			ioapics++;
		}
		off += elen;
	}
	kprintf("bootinfo: madt checksum=%s lapics=%u enabled=%u ioapics=%u\n",
		acpi_sum(m, len) == 0 ? "ok" : "bad", lapics, enabled, ioapics);
}

static void print_cpuid(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	u32 hypervisor = (c >> 31) & 1;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	char sig[13];
	u32 regs[3] = { b, c, d };
	for (int i = 0; i < 12; i++) {
		char ch = (char)(regs[i / 4] >> (8 * (i % 4)));
		sig[i] = ch >= ' ' && ch < 0x7f ? ch : 0;
	}
	sig[12] = 0;
	kprintf("bootinfo: cpuid hypervisor_bit=%u signature=\"%s\" max_hv_leaf=0x%x\n", hypervisor,
		sig, a);
}

void guest_main(u8 *zp)
{
	kprintf("bootinfo: zero_page=0x%lx boot_flag=0x%x header=0x%x\n", (u64)zp,
		ld16(zp + ZP_BOOT_FLAG), ld32(zp + ZP_HEADER));
	print_cmdline(zp);
	print_e820(zp);
	print_acpi(zp);
	print_cpuid();
	kprintf("bootinfo: done\n");
	reset();
}
