/*
 * virtio-discover: finds the virtio-mmio devices twice, independently: from the
 * `virtio_mmio.device=` entries of the command line, and from ACPI (RSDP -> XSDT -> FADT ->
 * DSDT, each checksum checked), where every device is a `LNRO0005` Device with a
 * Memory32Fixed and an Extended Interrupt descriptor.  For each device it reads the
 * transport's magic, version and device id.  The host test checks both lists agree.
 */
#include "acpi.h"
#include "virtio.h"

#define MAX_DEVICES 32

static void print_registers(u64 base)
{
	if (base < 0xc0000000UL || base >= 0x100000000UL) {
		kprintf(" (outside the MMIO gap, not read)\n");
		return;
	}
	kprintf(" magic=0x%x version=%u device-id=%u\n", mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE),
		mmio_read32(base + VIRTIO_MMIO_VERSION), mmio_read32(base + VIRTIO_MMIO_DEVICE_ID));
}

static void list_cmdline(void)
{
	struct virtio_loc devs[MAX_DEVICES];
	int n = virtio_cmdline_devices(devs, MAX_DEVICES);
	if (n > MAX_DEVICES)
		n = MAX_DEVICES;
	for (int i = 0; i < n; i++) {
		kprintf("discover: cmdline dev base=0x%lx size=0x%lx irq=%u", devs[i].base, devs[i].size,
			devs[i].irq);
		print_registers(devs[i].base);
	}
	kprintf("discover: cmdline devices=%d\n", n);
}

static const u8 *find_bytes(const u8 *from, const u8 *end, const void *needle, usize len)
{
	for (const u8 *p = from; p + len <= end; p++) {
		if (!memcmp(p, needle, len))
			return p;
	}
	return NULL;
}

/* Decodes the AML integer after a `_UID` name, or returns -1. */
static i64 aml_integer(const u8 *p, const u8 *end)
{
	if (p >= end)
		return -1;
	switch (p[0]) {
	case 0x00:
		return 0;
	case 0x01:
		return 1;
	case 0x0a:
		return p + 1 < end ? p[1] : -1;
	case 0x0b:
		return p + 2 < end ? (i64)ld16(p + 1) : -1;
	case 0x0c:
		return p + 4 < end ? (i64)ld32(p + 1) : -1;
	default:
		return -1;
	}
}

/* Decodes an AML PkgLength at p; returns the length (counted from p) or 0. */
static u32 aml_pkg_length(const u8 *p, const u8 *end)
{
	if (p >= end)
		return 0;
	u32 follow = p[0] >> 6;
	if (p + follow >= end)
		return 0;
	if (!follow)
		return p[0] & 0x3f;
	u32 len = p[0] & 0x0f;
	for (u32 i = 0; i < follow; i++)
		len |= (u32)p[1 + i] << (4 + 8 * i);
	return len;
}

/*
 * Describes the device whose _HID string is at `hid`: the enclosing DeviceOp (0x5b 0x82
 * PkgLength) bounds the search for _UID and the resource descriptors; without one, the search
 * runs from `hid` to `hi` (the next device's _HID).
 */
static void describe_device(const u8 *lo, const u8 *hid, const u8 *hi)
{
	const u8 *dev_lo = hid, *dev_hi = hi;
	for (const u8 *p = hid - 2; p >= lo; p--) {
		if (p[0] != 0x5b || p[1] != 0x82)
			continue;
		u32 pkg = aml_pkg_length(p + 2, hi);
		if (pkg && p + 2 + pkg > hid) {
			dev_lo = p;
			dev_hi = p + 2 + pkg < hi ? p + 2 + pkg : hi;
			break;
		}
	}
	hid = dev_lo;
	hi = dev_hi;
	const u8 *uid = find_bytes(dev_lo, dev_hi, "_UID", 4);
	i64 uid_value = uid ? aml_integer(uid + 4, hi) : -1;

	u64 base = 0, size = 0;
	const u8 *mem = NULL;
	for (const u8 *p = hid; p + 12 <= hi; p++) {
		if (p[0] == 0x86 && p[1] == 0x09 && p[2] == 0x00) {
			mem = p;
			base = ld32(p + 4);
			size = ld32(p + 8);
			break;
		}
	}
	i64 irq = -1;
	for (const u8 *p = hid; p + 9 <= hi; p++) {
		if (p[0] == 0x89 && ld16(p + 1) >= 6 && p[4] >= 1) {
			irq = ld32(p + 5);
			break;
		}
	}
	if (!mem || irq < 0 || uid_value < 0) {
		kprintf("discover: acpi dev incomplete uid=%s memory32fixed=%s extended-irq=%s\n",
			uid_value < 0 ? "missing" : "ok", mem ? "ok" : "missing", irq < 0 ? "missing" : "ok");
		return;
	}
	kprintf("discover: acpi dev uid=%ld base=0x%lx size=0x%lx irq=%ld", uid_value, base, size, irq);
	print_registers(base);
}

static void list_acpi(const u8 *zp)
{
	u64 rsdp = ld64(zp + ZP_ACPI_RSDP_ADDR);
	struct acpi_root root;
	acpi_probe(rsdp, &root);
	kprintf("discover: rsdp=0x%lx found=%s checksum=%s\n", rsdp, root.rsdp_found ? "yes" : "no",
		root.rsdp_ok ? "ok" : "bad");
	if (!root.xsdt_found) {
		kprintf("discover: xsdt found=no\n");
		return;
	}
	kprintf("discover: xsdt=0x%lx checksum=%s entries=%u\n", root.xsdt,
		root.xsdt_ok ? "ok" : "bad", root.xsdt_entries);
	u64 fadt = acpi_find(&root, "FACP");
	if (!fadt || !acpi_addr_ok(fadt, ld32((const u8 *)fadt + 4))) {
		kprintf("discover: fadt found=no\n");
		return;
	}
	u64 dsdt = acpi_fadt_dsdt(fadt);
	u32 fadt_len = ld32((const u8 *)fadt + 4);
	kprintf("discover: fadt=0x%lx checksum=%s dsdt=0x%lx\n", fadt,
		acpi_sum((const u8 *)fadt, fadt_len) == 0 ? "ok" : "bad", dsdt);
	if (!acpi_addr_ok(dsdt, 36) || memcmp((const u8 *)dsdt, "DSDT", 4)) {
		kprintf("discover: dsdt found=no\n");
		return;
	}
	const u8 *d = (const u8 *)dsdt;
	u32 len = ld32(d + 4);
	if (!acpi_addr_ok(dsdt, len) || len < 36) {
		kprintf("discover: dsdt length=%u invalid\n", len);
		return;
	}
	kprintf("discover: dsdt length=%u checksum=%s\n", len, acpi_sum(d, len) == 0 ? "ok" : "bad");

	const u8 *end = d + len;
	const u8 *hid = find_bytes(d + 36, end, "LNRO0005", 8);
	int n = 0;
	while (hid) {
		const u8 *next = find_bytes(hid + 8, end, "LNRO0005", 8);
		describe_device(d + 36, hid, next ? next : end);
		n++;
		hid = next;
	}
	kprintf("discover: acpi devices=%d\n", n);
}

void guest_main(u8 *zp)
{
	list_cmdline();
	list_acpi(zp);
	kprintf("discover: done\n");
	reset();
}
