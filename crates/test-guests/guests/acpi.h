/*
 * Minimal ACPI walking for test guests: RSDP -> XSDT -> tables, with checksum checks, so that
 * guests can report what kiln-vmm put in the tables without trusting any of it blindly.
 */
#ifndef KILN_ACPI_H
#define KILN_ACPI_H

#include "rt.h"

/* What was found starting from an RSDP address; *_ok are checksum results. */
struct acpi_root {
	u64 rsdp;
	int rsdp_found;
	int rsdp_ok;
	u8 revision;
	u64 xsdt;
	int xsdt_found;
	int xsdt_ok;
	u32 xsdt_entries;
};

/* Sums `len` bytes: a valid ACPI structure sums to 0. */
u8 acpi_sum(const u8 *p, u32 len);
/* Whether an address may be dereferenced (below the 4 GiB identity map, not null). */
int acpi_addr_ok(u64 addr, u64 len);
/* Validates the RSDP at `rsdp` and the XSDT it points to. */
void acpi_probe(u64 rsdp, struct acpi_root *root);
/* Finds a table by signature through the XSDT; returns its address or 0. */
u64 acpi_find(const struct acpi_root *root, const char *sig);
/* The DSDT address from a FADT (X_DSDT preferred, then DSDT), or 0. */
u64 acpi_fadt_dsdt(u64 fadt);

#endif
