/*
 * blk: drives the first virtio-blk device end to end and prints every result, so that the
 * host test can check both sides: GET_ID, a read of sector 0 (the host's pattern), a write of
 * a known pattern, FLUSH, and a read-back.
 *
 * Command line knobs: kiln.blk_write=N (first of the 4 sectors written, default 8) and
 * kiln.blk_zero=N (also read sector N and report whether it is all zeros, for sparse files).
 */
#include "virtio.h"

#define SECTOR 512
#define WRITE_SECTORS 4

static u8 sector0[SECTOR] __attribute__((aligned(512)));
static u8 wbuf[WRITE_SECTORS * SECTOR] __attribute__((aligned(512)));
static u8 rbuf[WRITE_SECTORS * SECTOR] __attribute__((aligned(512)));
static u8 id_buf[VIRTIO_BLK_ID_BYTES + 1] __attribute__((aligned(16)));

/* The host test computes the same bytes: see `guest_pattern` in tests/guests.rs. */
static u8 pattern_byte(u64 sector, u32 offset)
{
	return (u8)(sector * 31 + offset * 7 + 0x5a);
}

static void print_id(void)
{
	kprintf("\"");
	for (int i = 0; i < VIRTIO_BLK_ID_BYTES && id_buf[i]; i++)
		serial_putc(id_buf[i] >= ' ' && id_buf[i] < 0x7f ? (char)id_buf[i] : '?');
	kprintf("\"");
}

void guest_main(u8 *zp)
{
	(void)zp;
	struct virtio_loc devs[8];
	int n = virtio_cmdline_devices(devs, 8);
	if (n < 1) {
		kprintf("blk: no virtio_mmio.device= on the command line\n");
		kprintf("blk: done\n");
		reset();
	}
	struct vblk b;
	kprintf("blk: device base=0x%lx irq=%u\n", devs[0].base, devs[0].irq);
	if (vblk_init(&b, devs[0].base, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH)) {
		kprintf("blk: init failed\n");
		kprintf("blk: done\n");
		reset();
	}
	kprintf("blk: features offered=0x%lx accepted=0x%lx ro=%u flush=%u capacity=%lu queue=%u\n",
		b.offered, b.accepted, (b.accepted & VIRTIO_BLK_F_RO) ? 1 : 0,
		(b.accepted & VIRTIO_BLK_F_FLUSH) ? 1 : 0, b.capacity, b.num);

	memset(id_buf, 0, sizeof(id_buf));
	int st = vblk_request(&b, VIRTIO_BLK_T_GET_ID, 0, id_buf, VIRTIO_BLK_ID_BYTES);
	kprintf("blk: get-id status=");
	print_req_status(st);
	kprintf(" id=");
	print_id();
	kprintf("\n");

	memset(sector0, 0xa5, sizeof(sector0));
	st = vblk_request(&b, VIRTIO_BLK_T_IN, 0, sector0, SECTOR);
	kprintf("blk: read sector=0 status=");
	print_req_status(st);
	kprintf(" fnv=0x%08x head=", fnv1a(sector0, SECTOR));
	print_hex_bytes(sector0, 16);
	kprintf("\n");

	u64 first = cmdline_u64("kiln.blk_write", 8);
	for (u32 s = 0; s < WRITE_SECTORS; s++) {
		for (u32 i = 0; i < SECTOR; i++)
			wbuf[s * SECTOR + i] = pattern_byte(first + s, i);
	}
	st = vblk_request(&b, VIRTIO_BLK_T_OUT, first, wbuf, sizeof(wbuf));
	kprintf("blk: write sectors=%lu+%u status=", first, WRITE_SECTORS);
	print_req_status(st);
	kprintf("\n");

	st = vblk_request(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
	kprintf("blk: flush status=");
	print_req_status(st);
	kprintf("\n");

	memset(rbuf, 0, sizeof(rbuf));
	st = vblk_request(&b, VIRTIO_BLK_T_IN, first, rbuf, sizeof(rbuf));
	kprintf("blk: read-back sectors=%lu+%u status=", first, WRITE_SECTORS);
	print_req_status(st);
	kprintf(" match=%s\n", memcmp(rbuf, wbuf, sizeof(wbuf)) ? "no" : "yes");

	const char *value;
	usize len;
	if (cmdline_find(NULL, "kiln.blk_zero", &value, &len)) {
		u64 zs = parse_u64(value, len, NULL);
		memset(sector0, 0xa5, sizeof(sector0));
		st = vblk_request(&b, VIRTIO_BLK_T_IN, zs, sector0, SECTOR);
		int zero = 1;
		for (u32 i = 0; i < SECTOR; i++)
			zero &= sector0[i] == 0;
		kprintf("blk: read sector=%lu status=", zs);
		print_req_status(st);
		kprintf(" all-zero=%s\n", zero ? "yes" : "no");
	}
	kprintf("blk: done\n");
	reset();
}
