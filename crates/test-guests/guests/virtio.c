/* A polling virtio-mmio virtio-blk driver for test guests; see virtio.h. */
#include "virtio.h"

/* How long to poll for a well-formed request; a healthy device answers in microseconds. */
#define REQUEST_BUDGET 5000000UL

static struct virtq_desc desc_table[VQ_SIZE] __attribute__((aligned(4096)));
static struct virtq_avail avail_ring __attribute__((aligned(4096)));
static struct virtq_used used_ring __attribute__((aligned(4096)));

static struct virtio_blk_req_hdr req_hdr __attribute__((aligned(16)));
static volatile u8 req_status __attribute__((aligned(16)));

static u32 reg_read(u64 base, u32 off)
{
	return mmio_read32(base + off);
}

static void reg_write(u64 base, u32 off, u32 value)
{
	mmio_write32(base + off, value);
}

int virtio_cmdline_devices(struct virtio_loc *out, int max)
{
	int n = 0;
	const char *pos = NULL;
	const char *value;
	usize len;
	while ((pos = cmdline_find(pos, "virtio_mmio.device", &value, &len)) != NULL) {
		/* <size>[KMG]@<base>:<irq>[:<id>] */
		usize used;
		u64 size = parse_u64(value, len, &used);
		if (used < len && (value[used] == 'K' || value[used] == 'k')) {
			size <<= 10;
			used++;
		} else if (used < len && (value[used] == 'M' || value[used] == 'm')) {
			size <<= 20;
			used++;
		} else if (used < len && (value[used] == 'G' || value[used] == 'g')) {
			size <<= 30;
			used++;
		}
		if (used >= len || value[used] != '@')
			continue;
		value += used + 1;
		len -= used + 1;
		u64 base = parse_u64(value, len, &used);
		if (used >= len || value[used] != ':')
			continue;
		value += used + 1;
		len -= used + 1;
		u64 irq = parse_u64(value, len, &used);
		if (!used)
			continue;
		if (n < max) {
			out[n].base = base;
			out[n].size = size;
			out[n].irq = (u32)irq;
		}
		n++;
	}
	return n;
}

int virtio_reset(u64 base)
{
	reg_write(base, VIRTIO_MMIO_STATUS, 0);
	for (u32 i = 0; i < 100000; i++) {
		if (reg_read(base, VIRTIO_MMIO_STATUS) == 0)
			return 0;
	}
	return -1;
}

int vblk_init(struct vblk *b, u64 base, u64 wanted_features)
{
	memset(b, 0, sizeof(*b));
	b->base = base;
	if (virtio_reset(base)) {
		kprintf("virtio: device at 0x%lx did not reset (status 0x%x)\n", base,
			reg_read(base, VIRTIO_MMIO_STATUS));
		return -1;
	}
	u32 magic = reg_read(base, VIRTIO_MMIO_MAGIC_VALUE);
	u32 version = reg_read(base, VIRTIO_MMIO_VERSION);
	u32 id = reg_read(base, VIRTIO_MMIO_DEVICE_ID);
	if (magic != VIRTIO_MMIO_MAGIC || version != 2 || id != VIRTIO_ID_BLOCK) {
		kprintf("virtio: no modern virtio-blk at 0x%lx (magic 0x%x version %u id %u)\n", base,
			magic, version, id);
		return -1;
	}
	u32 status = VIRTIO_STATUS_ACKNOWLEDGE;
	reg_write(base, VIRTIO_MMIO_STATUS, status);
	status |= VIRTIO_STATUS_DRIVER;
	reg_write(base, VIRTIO_MMIO_STATUS, status);

	reg_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 offered = reg_read(base, VIRTIO_MMIO_DEVICE_FEATURES);
	reg_write(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)reg_read(base, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	b->offered = offered;
	b->accepted = offered & (wanted_features | VIRTIO_F_VERSION_1);
	if (!(b->accepted & VIRTIO_F_VERSION_1)) {
		kprintf("virtio: device at 0x%lx does not offer VIRTIO_F_VERSION_1 (features 0x%lx)\n",
			base, offered);
		return -1;
	}
	reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (u32)b->accepted);
	reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	reg_write(base, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(b->accepted >> 32));
	status |= VIRTIO_STATUS_FEATURES_OK;
	reg_write(base, VIRTIO_MMIO_STATUS, status);
	if (!(reg_read(base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		kprintf("virtio: device at 0x%lx refused features 0x%lx\n", base, b->accepted);
		return -1;
	}

	reg_write(base, VIRTIO_MMIO_QUEUE_SEL, 0);
	u32 max = reg_read(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) {
		kprintf("virtio: device at 0x%lx has no queue 0\n", base);
		return -1;
	}
	b->num = (u16)(max < VQ_SIZE ? max : VQ_SIZE);
	memset(desc_table, 0, sizeof(desc_table));
	memset(&avail_ring, 0, sizeof(avail_ring));
	memset(&used_ring, 0, sizeof(used_ring));
	b->desc = desc_table;
	b->avail = &avail_ring;
	b->used = &used_ring;
	b->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	reg_write(base, VIRTIO_MMIO_QUEUE_NUM, b->num);
	reg_write(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)desc_table);
	reg_write(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)desc_table >> 32));
	reg_write(base, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&avail_ring);
	reg_write(base, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)&avail_ring >> 32));
	reg_write(base, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&used_ring);
	reg_write(base, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)((u64)&used_ring >> 32));
	reg_write(base, VIRTIO_MMIO_QUEUE_READY, 1);
	status |= VIRTIO_STATUS_DRIVER_OK;
	reg_write(base, VIRTIO_MMIO_STATUS, status);
	status = reg_read(base, VIRTIO_MMIO_STATUS);
	if (status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED) ||
	    !(status & VIRTIO_STATUS_DRIVER_OK)) {
		kprintf("virtio: device at 0x%lx not live after DRIVER_OK (status 0x%x)\n", base, status);
		return -1;
	}

	u32 generation;
	do {
		generation = reg_read(base, VIRTIO_MMIO_CONFIG_GENERATION);
		b->capacity = reg_read(base, VIRTIO_MMIO_CONFIG) |
			      (u64)reg_read(base, VIRTIO_MMIO_CONFIG + 4) << 32;
	} while (generation != reg_read(base, VIRTIO_MMIO_CONFIG_GENERATION));
	return 0;
}

void vblk_submit(struct vblk *b, u16 head)
{
	u16 idx = b->avail->idx;
	b->avail->ring[idx % b->num] = head;
	barrier();
	b->avail->idx = (u16)(idx + 1);
	barrier();
	reg_write(b->base, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

int vblk_wait_used(struct vblk *b, u64 budget)
{
	for (u64 i = 0; i < budget; i++) {
		barrier();
		if (b->used->idx != b->last_used) {
			barrier();
			volatile struct virtq_used_elem *e = &b->used->ring[b->last_used % b->num];
			b->used_id = e->id;
			b->used_len = e->len;
			b->last_used++;
			return 1;
		}
		if ((i & 0x3ff) == 0 &&
		    (reg_read(b->base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET))
			return REQ_NEEDS_RESET;
	}
	return REQ_TIMEOUT;
}

int vblk_request(struct vblk *b, u32 type, u64 sector, void *data, u32 len)
{
	req_hdr.type = type;
	req_hdr.reserved = 0;
	req_hdr.sector = sector;
	req_status = 0xff;
	u16 status_desc = data ? 2 : 1;
	b->desc[0].addr = (u64)&req_hdr;
	b->desc[0].len = sizeof(req_hdr);
	b->desc[0].flags = VIRTQ_DESC_F_NEXT;
	b->desc[0].next = 1;
	if (data) {
		b->desc[1].addr = (u64)data;
		b->desc[1].len = len;
		b->desc[1].flags = VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_OUT ? 0 : VIRTQ_DESC_F_WRITE);
		b->desc[1].next = 2;
	}
	b->desc[status_desc].addr = (u64)&req_status;
	b->desc[status_desc].len = 1;
	b->desc[status_desc].flags = VIRTQ_DESC_F_WRITE;
	b->desc[status_desc].next = 0;
	vblk_submit(b, 0);
	int got = vblk_wait_used(b, REQUEST_BUDGET);
	if (got != 1)
		return got;
	barrier();
	return req_status;
}

void print_req_status(int status)
{
	if (status == REQ_TIMEOUT)
		kprintf("timeout");
	else if (status == REQ_NEEDS_RESET)
		kprintf("needs-reset");
	else
		kprintf("%d", status);
}
