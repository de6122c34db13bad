/* Minimal ACPI walking for test guests; see acpi.h. */
#include "acpi.h"

/* Tables are small; anything larger is treated as corrupt rather than read. */
#define ACPI_MAX_TABLE 0x100000

u8 acpi_sum(const u8 *p, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum = (u8)(sum + p[i]);
	return sum;
}

int acpi_addr_ok(u64 addr, u64 len)
{
	return addr != 0 && len <= ACPI_MAX_TABLE && addr + len <= 0xc0000000UL;
}

void acpi_probe(u64 rsdp, struct acpi_root *root)
{
	memset(root, 0, sizeof(*root));
	root->rsdp = rsdp;
	if (!acpi_addr_ok(rsdp, 36))
		return;
	const u8 *r = (const u8 *)rsdp;
	if (memcmp(r, "RSD PTR ", 8))
		return;
	root->rsdp_found = 1;
	root->revision = r[15];
	root->rsdp_ok = acpi_sum(r, 20) == 0 && (root->revision < 2 || acpi_sum(r, 36) == 0);
	if (root->revision < 2)
		return;
	root->xsdt = ld64(r + 24);
	if (!acpi_addr_ok(root->xsdt, 36))
		return;
	const u8 *x = (const u8 *)root->xsdt;
	u32 len = ld32(x + 4);
	if (memcmp(x, "XSDT", 4) || len < 36 || !acpi_addr_ok(root->xsdt, len))
		return;
	root->xsdt_found = 1;
	root->xsdt_ok = acpi_sum(x, len) == 0;
	root->xsdt_entries = (len - 36) / 8;
}

u64 acpi_find(const struct acpi_root *root, const char *sig)
{
	if (!root->xsdt_found)
		return 0;
	const u8 *x = (const u8 *)root->xsdt;
	for (u32 i = 0; i < root->xsdt_entries; i++) {
		u64 table = ld64(x + 36 + 8 * i);
		if (!acpi_addr_ok(table, 36))
			continue;
		if (!memcmp((const u8 *)table, sig, 4))
			return table;
	}
	return 0;
}

u64 acpi_fadt_dsdt(u64 fadt)
{
	const u8 *f = (const u8 *)fadt;
	u32 len = ld32(f + 4);
	if (len >= 148) {
		u64 x_dsdt = ld64(f + 140);
		if (x_dsdt)
			return x_dsdt;
	}
	if (len >= 44)
		return ld32(f + 40);
	return 0;
}
