/*
 * entropy: reads from the virtio-rng device and reports what it got.
 *
 * Two 4 KiB reads (are they different, all zeros, their FNV-1a digests), then buffers the
 * device must handle with care: a device-readable buffer (must come back with used length 0
 * and untouched), a two-descriptor writable chain, a 128 KiB buffer (the device caps one
 * request), and a buffer outside RAM; then a last good read.  kiln.end=idle makes the guest
 * idle at the end instead of resetting, so the host can check the VMM is still up.
 */
#include "vq.h"

#define READ_BYTES 4096
#define FAR_ADDR 0x7ffffff00000UL
#define UNTOUCHED 0xa5
#define BIG_BYTES (128 * 1024)

static struct vq_mem mem;
static struct vq q;
static struct vdev dev;
static u8 buf1[READ_BYTES] __attribute__((aligned(4096)));
static u8 buf2[READ_BYTES] __attribute__((aligned(4096)));
static u8 small[512] __attribute__((aligned(64)));
static u8 *big = (u8 *)0x1000000UL; /* 16 MiB: RAM nothing else uses */

/* Submits the chain at descriptor 0 and waits; returns the used length or -1 on timeout. */
static i64 submit_and_wait(void)
{
	vq_add(&q, 0);
	vq_notify(&q);
	u64 deadline = rdtsc() + 2000 * tsc_per_ms();
	u32 id, len;
	while (rdtsc() < deadline) {
		if (vq_get_used(&q, &id, &len))
			return len;
	}
	return -1;
}

static int all_bytes(const u8 *b, usize n, u8 value)
{
	for (usize i = 0; i < n; i++) {
		if (b[i] != value)
			return 0;
	}
	return 1;
}

static void print_len(i64 len)
{
	if (len < 0)
		kprintf("timeout");
	else
		kprintf("%ld", len);
}

static void read_into(const char *name, u8 *b, u32 n)
{
	memset(b, 0, n);
	vq_set_desc(&q, 0, (u64)b, n, VIRTQ_DESC_F_WRITE, 0);
	i64 len = submit_and_wait();
	kprintf("entropy: %s len=", name);
	print_len(len);
	kprintf(" all-zero=%s fnv=0x%08x head=", all_bytes(b, n, 0) ? "yes" : "no", fnv1a(b, n));
	print_hex_bytes(b, 8);
	kprintf("\n");
}

void guest_main(u8 *zp)
{
	(void)zp;
	u64 base = vdev_find(VIRTIO_ID_RNG);
	if (!base || vdev_begin(&dev, base, VIRTIO_ID_RNG, 0) || vq_setup(&dev, &q, 0, &mem, 16) ||
	    vdev_ready(&dev)) {
		kprintf("entropy: no usable virtio-rng device\n");
		reset();
	}
	kprintf("entropy: device base=0x%lx queue=%u\n", base, q.num);

	read_into("read 1", buf1, READ_BYTES);
	read_into("read 2", buf2, READ_BYTES);
	kprintf("entropy: reads-differ=%s\n", memcmp(buf1, buf2, READ_BYTES) ? "yes" : "no");

	memset(small, UNTOUCHED, sizeof(small));
	vq_set_desc(&q, 0, (u64)small, sizeof(small), 0, 0);
	i64 len = submit_and_wait();
	kprintf("entropy: device-readable len=");
	print_len(len);
	kprintf(" untouched=%s\n", all_bytes(small, sizeof(small), UNTOUCHED) ? "yes" : "no");

	memset(small, 0, sizeof(small));
	vq_set_desc(&q, 0, (u64)small, 100, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
	vq_set_desc(&q, 1, (u64)small + 256, 200, VIRTQ_DESC_F_WRITE, 0);
	len = submit_and_wait();
	kprintf("entropy: two-descriptors len=");
	print_len(len);
	kprintf("\n");

	vq_set_desc(&q, 0, (u64)big, BIG_BYTES, VIRTQ_DESC_F_WRITE, 0);
	len = submit_and_wait();
	kprintf("entropy: big-buffer size=%u len=", BIG_BYTES);
	print_len(len);
	kprintf("\n");

	vq_set_desc(&q, 0, FAR_ADDR, 4096, VIRTQ_DESC_F_WRITE, 0);
	len = submit_and_wait();
	kprintf("entropy: outside-ram len=");
	print_len(len);
	kprintf(" needs-reset=%u\n", vdev_needs_reset(&dev));

	read_into("read 3", buf1, READ_BYTES);

	const char *value;
	usize vlen;
	int idle = cmdline_find(NULL, "kiln.end", &value, &vlen) && vlen == 4 &&
		   !strncmp(value, "idle", 4);
	kprintf("entropy: done\n");
	if (idle)
		idle_forever();
	reset();
}
