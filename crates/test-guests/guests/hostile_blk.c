/*
 * hostile-blk: feeds the first virtio-blk device malformed descriptor chains, one per case,
 * and prints what the device did with each: whether a used element appeared, the status byte,
 * the device status (DEVICE_NEEDS_RESET), and whether buffers it must not write were written.
 * Before every case the device is reset and set up again, so cases do not disturb each other.
 * After the last case a well-formed read shows whether the device still works; then the guest
 * prints its final line and idles (it does not reset) so the host can check the VMM is alive.
 */
#include "virtio.h"

/* Far beyond any test guest's RAM, but a canonical address. */
#define FAR_ADDR 0x7ffffff00000UL
/* Inside the 32-bit MMIO gap: mapped in the guest, but not RAM. */
#define MMIO_GAP_ADDR 0xd0000000UL
/* How long to wait for a used element; a healthy device answers in microseconds. */
#define HOSTILE_BUDGET 200000UL
#define UNTOUCHED 0xa5

static struct virtio_blk_req_hdr hdr __attribute__((aligned(16)));
static volatile u8 status_byte __attribute__((aligned(16)));
static u8 data[4096] __attribute__((aligned(4096)));
static struct virtq_desc indirect_table[4] __attribute__((aligned(16)));

static u64 ram_top;
static u64 big_buf;

static void set_desc(struct vblk *b, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	b->desc[i].addr = addr;
	b->desc[i].len = len;
	b->desc[i].flags = flags;
	b->desc[i].next = next;
}

/* header -> data -> status in descriptors 0, 1, 2, each part overridable. */
static void chain(struct vblk *b, u64 ha, u32 hl, u16 hf, u64 da, u32 dl, u16 df, u64 sa, u16 sf)
{
	set_desc(b, 0, ha, hl, hf | VIRTQ_DESC_F_NEXT, 1);
	set_desc(b, 1, da, dl, df | VIRTQ_DESC_F_NEXT, 2);
	set_desc(b, 2, sa, 1, sf, 0);
}

#define HDR ((u64)&hdr)
#define DATA ((u64)data)
#define STATUS ((u64)&status_byte)
#define W VIRTQ_DESC_F_WRITE

static void header_outside_ram(struct vblk *b)
{
	chain(b, FAR_ADDR, 16, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void data_outside_ram(struct vblk *b)
{
	chain(b, HDR, 16, 0, FAR_ADDR, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void status_outside_ram(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, FAR_ADDR, W);
	vblk_submit(b, 0);
}

static void data_in_mmio_gap(struct vblk *b)
{
	chain(b, HDR, 16, 0, MMIO_GAP_ADDR, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void data_crossing_ram_end(struct vblk *b)
{
	chain(b, HDR, 16, 0, ram_top - 256, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void data_wrapping_address_space(struct vblk *b)
{
	chain(b, HDR, 16, 0, 0xffffffffffffff00UL, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void self_loop(struct vblk *b)
{
	set_desc(b, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 0);
	vblk_submit(b, 0);
}

static void three_descriptor_loop(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	set_desc(b, 2, STATUS, 1, W | VIRTQ_DESC_F_NEXT, 1);
	vblk_submit(b, 0);
}

static void chain_longer_than_queue(struct vblk *b)
{
	/* Every descriptor of the table, then one more (index == queue size). */
	set_desc(b, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
	for (u16 i = 1; i + 1 < b->num; i++)
		set_desc(b, i, DATA + 32 * i, 32, W | VIRTQ_DESC_F_NEXT, (u16)(i + 1));
	set_desc(b, (u16)(b->num - 1), STATUS, 1, W | VIRTQ_DESC_F_NEXT, b->num);
	vblk_submit(b, 0);
}

static void next_index_out_of_range(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	set_desc(b, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 200);
	vblk_submit(b, 0);
}

static void head_index_out_of_range(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 300);
}

static void zero_length_data(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 0, W, STATUS, W);
	vblk_submit(b, 0);
}

static void zero_length_header(struct vblk *b)
{
	chain(b, HDR, 0, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void short_header(struct vblk *b)
{
	chain(b, HDR, 8, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void writable_header(struct vblk *b)
{
	chain(b, HDR, 16, W, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void huge_in_buffer(struct vblk *b)
{
	chain(b, HDR, 16, 0, big_buf, 0xffffffffU, W, STATUS, W);
	vblk_submit(b, 0);
}

static void huge_out_buffer(struct vblk *b)
{
	hdr.type = VIRTIO_BLK_T_OUT;
	chain(b, HDR, 16, 0, big_buf, 0xffffffffU, 0, STATUS, W);
	vblk_submit(b, 0);
}

static void read_only_buffer_for_in(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, 0, STATUS, W);
	vblk_submit(b, 0);
}

static void read_only_status(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, 0);
	vblk_submit(b, 0);
}

static void read_past_capacity(struct vblk *b)
{
	hdr.sector = b->capacity;
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void unknown_request_type(struct vblk *b)
{
	hdr.type = 0x1234;
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	vblk_submit(b, 0);
}

static void indirect_without_feature(struct vblk *b)
{
	indirect_table[0].addr = HDR;
	indirect_table[0].len = 16;
	indirect_table[0].flags = VIRTQ_DESC_F_NEXT;
	indirect_table[0].next = 1;
	indirect_table[1].addr = DATA;
	indirect_table[1].len = 512;
	indirect_table[1].flags = W | VIRTQ_DESC_F_NEXT;
	indirect_table[1].next = 2;
	indirect_table[2].addr = STATUS;
	indirect_table[2].len = 1;
	indirect_table[2].flags = W;
	indirect_table[2].next = 0;
	set_desc(b, 0, (u64)indirect_table, 3 * sizeof(struct virtq_desc), VIRTQ_DESC_F_INDIRECT, 0);
	vblk_submit(b, 0);
}

static void avail_index_far_ahead(struct vblk *b)
{
	chain(b, HDR, 16, 0, DATA, 512, W, STATUS, W);
	b->avail->ring[0] = 0;
	barrier();
	b->avail->idx = 1000;
	barrier();
	mmio_write32(b->base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

struct hostile_case {
	const char *name;
	void (*run)(struct vblk *b);
};

static const struct hostile_case cases[] = {
	{ "header-outside-ram", header_outside_ram },
	{ "data-outside-ram", data_outside_ram },
	{ "status-outside-ram", status_outside_ram },
	{ "data-in-mmio-gap", data_in_mmio_gap },
	{ "data-crossing-ram-end", data_crossing_ram_end },
	{ "data-wrapping-address-space", data_wrapping_address_space },
	{ "descriptor-self-loop", self_loop },
	{ "descriptor-loop-0-1-2-1", three_descriptor_loop },
	{ "chain-longer-than-queue", chain_longer_than_queue },
	{ "next-index-out-of-range", next_index_out_of_range },
	{ "head-index-out-of-range", head_index_out_of_range },
	{ "zero-length-data", zero_length_data },
	{ "zero-length-header", zero_length_header },
	{ "short-header", short_header },
	{ "device-writable-header", writable_header },
	{ "huge-4g-in-buffer", huge_in_buffer },
	{ "huge-4g-out-buffer", huge_out_buffer },
	{ "read-only-buffer-for-in", read_only_buffer_for_in },
	{ "read-only-status", read_only_status },
	{ "read-past-capacity", read_past_capacity },
	{ "unknown-request-type", unknown_request_type },
	{ "indirect-without-feature", indirect_without_feature },
	{ "avail-index-far-ahead", avail_index_far_ahead },
};

static void find_ram_top(const u8 *zp)
{
	u32 entries = zp[ZP_E820_ENTRIES];
	if (entries > E820_MAX_ENTRIES)
		entries = E820_MAX_ENTRIES;
	ram_top = 0;
	for (u32 i = 0; i < entries; i++) {
		const u8 *e = zp + ZP_E820_TABLE + 20 * i;
		u64 end = ld64(e) + ld64(e + 8);
		if (ld32(e + 16) == 1 && end > ram_top)
			ram_top = end;
	}
	if (ram_top < 0x1000000UL)
		ram_top = 0x1000000UL;
	/* Upper half of RAM below 3 GiB: nothing of the guest lives there. */
	u64 low_top = ram_top < 0xc0000000UL ? ram_top : 0xc0000000UL;
	big_buf = (low_top / 2) & ~0xfffUL;
}

static void run_case(u64 base, int index, const struct hostile_case *c)
{
	struct vblk b;
	if (vblk_init(&b, base, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH)) {
		kprintf("hostile: case %d %s: skipped, device did not initialise\n", index, c->name);
		return;
	}
	hdr.type = VIRTIO_BLK_T_IN;
	hdr.reserved = 0;
	hdr.sector = 0;
	status_byte = UNTOUCHED;
	memset(data, UNTOUCHED, sizeof(data));
	memset(indirect_table, 0, sizeof(indirect_table));

	c->run(&b);
	int got = vblk_wait_used(&b, HOSTILE_BUDGET);
	barrier();
	u16 used_idx = b.used->idx;
	u32 dev_status = mmio_read32(base + VIRTIO_MMIO_STATUS);
	int data_written = 0;
	for (usize i = 0; i < sizeof(data); i++)
		data_written |= data[i] != UNTOUCHED;

	kprintf("hostile: case %d %s: used=", index, c->name);
	if (got == 1)
		kprintf("yes id=%u len=%u", b.used_id, b.used_len);
	else
		kprintf("no");
	kprintf(" used-idx=%u status-byte=0x%02x device-status=0x%x needs-reset=%u data-written=%s\n",
		used_idx, status_byte, dev_status, (dev_status & VIRTIO_STATUS_NEEDS_RESET) ? 1 : 0,
		data_written ? "yes" : "no");

	if (virtio_reset(base))
		kprintf("hostile: case %d %s: device did not reset (status 0x%x)\n", index, c->name,
			mmio_read32(base + VIRTIO_MMIO_STATUS));
}

void guest_main(u8 *zp)
{
	struct virtio_loc devs[8];
	int n = virtio_cmdline_devices(devs, 8);
	find_ram_top(zp);
	if (n < 1) {
		kprintf("hostile: no virtio_mmio.device= on the command line\n");
		kprintf("hostile-blk: finished 0 cases\n");
		idle_forever();
	}
	u64 base = devs[0].base;
	kprintf("hostile: device base=0x%lx ram-top=0x%lx cases=%u\n", base, ram_top,
		(u32)ARRAY_SIZE(cases));
	for (usize i = 0; i < ARRAY_SIZE(cases); i++)
		run_case(base, (int)i + 1, &cases[i]);

	struct vblk b;
	int st = REQ_TIMEOUT;
	if (!vblk_init(&b, base, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH))
		st = vblk_request(&b, VIRTIO_BLK_T_IN, 0, data, 512);
	kprintf("hostile: sanity read after all cases status=");
	print_req_status(st);
	kprintf("\n");
	kprintf("hostile-blk: finished %u cases\n", (u32)ARRAY_SIZE(cases));
	idle_forever();
}
