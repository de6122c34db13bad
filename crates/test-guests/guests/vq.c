/* Generic polling virtio-mmio device and virtqueue helpers; see vq.h. */
#include "vq.h"

static u32 rd(u64 base, u32 off)
{
	return mmio_read32(base + off);
}

static void wr(u64 base, u32 off, u32 value)
{
	mmio_write32(base + off, value);
}

u64 vdev_find(u32 device_id)
{
	struct virtio_loc devs[8];
	int n = virtio_cmdline_devices(devs, 8);
	if (n > 8)
		n = 8;
	for (int i = 0; i < n; i++) {
		u64 base = devs[i].base;
		if (rd(base, VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC &&
		    rd(base, VIRTIO_MMIO_VERSION) == 2 && rd(base, VIRTIO_MMIO_DEVICE_ID) == device_id)
			return base;
	}
	return 0;
}

int vdev_begin(struct vdev *d, u64 base, u32 device_id, u64 wanted)
{
	memset(d, 0, sizeof(*d));
	d->base = base;
	if (virtio_reset(base)) {
		kprintf("vq: device at 0x%lx did not reset\n", base);
		return -1;
	}
	if (rd(base, VIRTIO_MMIO_DEVICE_ID) != device_id) {
		kprintf("vq: device at 0x%lx is not device %u\n", base, device_id);
		return -1;
	}
	d->status = VIRTIO_STATUS_ACKNOWLEDGE;
	wr(base, VIRTIO_MMIO_STATUS, d->status);
	d->status |= VIRTIO_STATUS_DRIVER;
	wr(base, VIRTIO_MMIO_STATUS, d->status);
	wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	d->offered = rd(base, VIRTIO_MMIO_DEVICE_FEATURES);
	wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	d->offered |= (u64)rd(base, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	d->accepted = d->offered & (wanted | VIRTIO_F_VERSION_1);
	if (!(d->accepted & VIRTIO_F_VERSION_1)) {
		kprintf("vq: device at 0x%lx lacks VIRTIO_F_VERSION_1\n", base);
		return -1;
	}
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->accepted);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	wr(base, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->accepted >> 32));
	d->status |= VIRTIO_STATUS_FEATURES_OK;
	wr(base, VIRTIO_MMIO_STATUS, d->status);
	if (!(rd(base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		kprintf("vq: device at 0x%lx refused features 0x%lx\n", base, d->accepted);
		return -1;
	}
	return 0;
}

int vq_setup(struct vdev *d, struct vq *q, u16 index, struct vq_mem *mem, u16 want)
{
	u64 base = d->base;
	memset(q, 0, sizeof(*q));
	memset(mem, 0, sizeof(*mem));
	wr(base, VIRTIO_MMIO_QUEUE_SEL, index);
	u32 max = rd(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) {
		kprintf("vq: device at 0x%lx has no queue %u\n", base, index);
		return -1;
	}
	if (want > VQ_MAX)
		want = VQ_MAX;
	q->base = base;
	q->index = index;
	q->num = (u16)(max < want ? max : want);
	q->desc = mem->desc;
	q->avail = &mem->avail;
	q->used = &mem->used;
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	wr(base, VIRTIO_MMIO_QUEUE_NUM, q->num);
	wr(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)mem->desc);
	wr(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)mem->desc >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&mem->avail);
	wr(base, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)&mem->avail >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&mem->used);
	wr(base, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)((u64)&mem->used >> 32));
	wr(base, VIRTIO_MMIO_QUEUE_READY, 1);
	return 0;
}

int vdev_ready(struct vdev *d)
{
	d->status |= VIRTIO_STATUS_DRIVER_OK;
	wr(d->base, VIRTIO_MMIO_STATUS, d->status);
	u32 status = rd(d->base, VIRTIO_MMIO_STATUS);
	if (status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED) ||
	    !(status & VIRTIO_STATUS_DRIVER_OK)) {
		kprintf("vq: device at 0x%lx not live after DRIVER_OK (status 0x%x)\n", d->base,
			status);
		return -1;
	}
	return 0;
}

u32 vdev_config32(struct vdev *d, u32 offset)
{
	return rd(d->base, VIRTIO_MMIO_CONFIG + offset);
}

int vdev_needs_reset(struct vdev *d)
{
	return (rd(d->base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET) != 0;
}

void vq_set_desc(struct vq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	q->desc[i].addr = addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

void vq_add(struct vq *q, u16 head)
{
	u16 idx = q->avail->idx;
	q->avail->ring[idx % q->num] = head;
	barrier();
	q->avail->idx = (u16)(idx + 1);
	barrier();
}

void vq_notify(struct vq *q)
{
	barrier();
	wr(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int vq_get_used(struct vq *q, u32 *id, u32 *len)
{
	barrier();
	if (q->used->idx == q->last_used)
		return 0;
	barrier();
	volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->num];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 1;
}

static u64 cached_tsc_per_ms;

static u64 probe_tsc_per_ms(void)
{
	u32 a, b, c, d;
	cpuid(0, 0, &a, &b, &c, &d);
	u32 max_leaf = a;
	if (max_leaf >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c)
			return (u64)c * b / a / 1000;
	}
	if (max_leaf >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a & 0xffff)
			return (u64)(a & 0xffff) * 1000;
	}
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (a >= 0x40000010) {
		cpuid(0x40000010, 0, &a, &b, &c, &d);
		if (a)
			return a;
	}
	return 2000000;
}

u64 tsc_per_ms(void)
{
	if (!cached_tsc_per_ms)
		cached_tsc_per_ms = probe_tsc_per_ms();
	return cached_tsc_per_ms;
}
