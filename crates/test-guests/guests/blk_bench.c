/*
 * blk-bench: sequential virtio-blk throughput for bench/devices.py.
 *
 * Reads or writes `kiln.bytes` bytes from sector 0 of the first virtio-blk device in requests
 * of `kiln.req` bytes, keeping up to `kiln.depth` requests in flight (each a header / data /
 * status chain of three descriptors), polling the used ring (no interrupts).  It accepts
 * VIRTIO_BLK_F_FLUSH when the device offers it, as Linux does, and never sends a flush: a device
 * whose driver cannot flush must write through (QEMU then fdatasync()s every write), which
 * would measure the disk rather than the device; with the feature, writes land in the host's
 * page cache under kiln-vmm (whose default cache type offers no flush) and QEMU alike.  The data are not
 * looked at: the figure is the device's, not the guest's.  With kiln.user=1 the loop runs in
 * ring 3 (usermode.h), where this host runs guest code natively instead of emulating it.
 *
 *   kiln.op=read|write  (default read)   kiln.bytes=N (default 64 MiB)
 *   kiln.req=N (default 128 KiB)          kiln.depth=D (default 8, at most 16)
 *   kiln.user=0|1 (default 0)             kiln.rounds=R: repeat the whole pass R times
 *   kiln.mark=M (default 0: none): a nonzero M makes writes start every request's data with the
 *     16-byte mark "blkbench" + M (little-endian u64), and reads count the request buffers
 *     that start with it after the pass ("marked=K" of "slots=S"), so that the host can check
 *     that the bytes really went through the device (bench/devices.py does, for kiln-vmm and
 *     QEMU alike).  It costs a few stores per buffer outside the timed pass.
 *
 * Lines: "blkbench: ready ...", "blkbench: start round=I" just before a pass,
 * "blkbench: end" right after it, then "blkbench: round=I ... us=T errors=E", and
 * "blkbench: done ..." before the reset.
 */
#include "vq.h"
#include "usermode.h"

#define DEPTH_MAX 16
#define BUF_BASE 0x1000000UL /* data buffers: 16 MiB up, depth * req bytes */
#define REQ_MAX (1UL << 20)
/* Ring of VQ_MAX (a power of two, as split rings need) entries, 3 descriptors per request. */

static struct vq_mem qmem;
static struct vq q;
static struct vdev dev;
static struct virtio_blk_req_hdr hdrs[DEPTH_MAX] __attribute__((aligned(16)));
static volatile u8 status[DEPTH_MAX] __attribute__((aligned(16)));

struct plan {
	int write;
	u64 bytes;
	u64 req;
	u32 depth;
	u32 rounds;
	u64 mark;
};

static struct plan plan;

static u64 us_since(u64 start)
{
	return (rdtsc() - start) * 1000 / tsc_per_ms();
}

static void submit(u32 slot, u64 sector)
{
	u16 d = (u16)(3 * slot);
	hdrs[slot].type = plan.write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
	hdrs[slot].reserved = 0;
	hdrs[slot].sector = sector;
	status[slot] = 0xff;
	vq_set_desc(&q, d, (u64)&hdrs[slot], sizeof(hdrs[slot]), VIRTQ_DESC_F_NEXT, (u16)(d + 1));
	vq_set_desc(&q, (u16)(d + 1), BUF_BASE + slot * plan.req, (u32)plan.req,
		    (u16)(VIRTQ_DESC_F_NEXT | (plan.write ? 0 : VIRTQ_DESC_F_WRITE)), (u16)(d + 2));
	vq_set_desc(&q, (u16)(d + 2), (u64)&status[slot], 1, VIRTQ_DESC_F_WRITE, 0);
	vq_add(&q, d);
}

/* One sequential pass; returns the number of failed requests (or of lost ones, on timeout). */
static u64 pass(void)
{
	u64 total = plan.bytes / plan.req;
	u64 issued = 0, done = 0, errors = 0;
	u32 free_slots[DEPTH_MAX];
	u32 nfree = plan.depth;
	for (u32 i = 0; i < plan.depth; i++)
		free_slots[i] = plan.depth - 1 - i;
	u64 last_progress = rdtsc();
	u64 patience = 10000 * tsc_per_ms();
	while (done < total) {
		int added = 0;
		while (nfree && issued < total) {
			submit(free_slots[--nfree], issued * (plan.req / 512));
			issued++;
			added = 1;
		}
		if (added)
			vq_notify(&q);
		u32 id, len;
		int got = 0;
		while (vq_get_used(&q, &id, &len)) {
			u32 slot = id / 3;
			if (slot >= plan.depth || id % 3) {
				errors++;
				continue;
			}
			if (status[slot] != 0)
				errors++;
			free_slots[nfree++] = slot;
			done++;
			got = 1;
		}
		if (got) {
			last_progress = rdtsc();
		} else if (rdtsc() - last_progress > patience) {
			kprintf("blkbench: timeout with %lu of %lu requests done\n", done, total);
			return errors + (total - done);
		}
	}
	return errors;
}

static void *slot_buf(u32 slot)
{
	return (void *)(BUF_BASE + slot * plan.req);
}

/* Writes the mark into (write) or clears it from (read) the start of every request buffer. */
static void mark_prepare(void)
{
	for (u32 slot = 0; slot < plan.depth; slot++) {
		volatile u64 *b = slot_buf(slot);
		b[0] = plan.write ? 0x68636e65626b6c62UL : 0; /* "blkbench" */
		b[1] = plan.write ? plan.mark : 0;
	}
}

/* How many request buffers start with the mark. */
static u32 mark_count(void)
{
	u32 n = 0;
	for (u32 slot = 0; slot < plan.depth; slot++) {
		volatile u64 *b = slot_buf(slot);
		if (b[0] == 0x68636e65626b6c62UL && b[1] == plan.mark)
			n++;
	}
	return n;
}

static void run(void *unused)
{
	(void)unused;
	u64 all = rdtsc();
	u64 errors = 0;
	for (u32 r = 0; r < plan.rounds; r++) {
		if (plan.mark)
			mark_prepare();
		kprintf("blkbench: start round=%u\n", r);
		u64 start = rdtsc();
		u64 e = pass();
		u64 us = us_since(start);
		/* Short, so that the host's end-of-pass reading sees little of the printing. */
		kprintf("blkbench: end\n");
		errors += e;
		kprintf("blkbench: round=%u op=%s bytes=%lu req=%lu depth=%u cpl=%u us=%lu errors=%lu\n",
			r, plan.write ? "write" : "read", plan.bytes, plan.req, plan.depth,
			current_cpl(), us, e);
		if (plan.mark)
			kprintf("blkbench: round=%u mark=0x%lx marked=%u slots=%u\n", r, plan.mark,
				mark_count(), plan.depth);
	}
	kprintf("blkbench: done rounds=%u errors=%lu us=%lu\n", plan.rounds, errors, us_since(all));
	reset();
}

static int cmdline_is(const char *key, const char *want)
{
	const char *value;
	usize len;
	if (!cmdline_find(NULL, key, &value, &len))
		return 0;
	return len == strlen(want) && !strncmp(value, want, len);
}

void guest_main(u8 *zp)
{
	(void)zp;
	plan.write = cmdline_is("kiln.op", "write");
	plan.bytes = cmdline_u64("kiln.bytes", 64UL << 20);
	plan.req = cmdline_u64("kiln.req", 128UL << 10);
	plan.depth = (u32)cmdline_u64("kiln.depth", 8);
	plan.rounds = (u32)cmdline_u64("kiln.rounds", 1);
	plan.mark = cmdline_u64("kiln.mark", 0);
	if (plan.req < 512 || plan.req > REQ_MAX || plan.req % 512)
		plan.req = 128UL << 10;
	if (plan.depth < 1 || plan.depth > DEPTH_MAX)
		plan.depth = 8;
	if (plan.rounds < 1)
		plan.rounds = 1;
	plan.bytes -= plan.bytes % plan.req;

	u64 base = vdev_find(VIRTIO_ID_BLOCK);
	if (!base || vdev_begin(&dev, base, VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH) ||
	    vq_setup(&dev, &q, 0, &qmem, VQ_MAX) || vdev_ready(&dev)) {
		kprintf("blkbench: no usable virtio-blk device\n");
		kprintf("blkbench: done rounds=0 errors=1 us=0\n");
		reset();
	}
	if (q.num < 3 * plan.depth)
		plan.depth = q.num / 3;
	u64 capacity = vdev_config32(&dev, 0) | (u64)vdev_config32(&dev, 4) << 32;
	if (plan.bytes > capacity * 512)
		plan.bytes = capacity * 512 - (capacity * 512) % plan.req;
	int user = usermode_requested();
	kprintf("blkbench: ready base=0x%lx capacity=%lu queue=%u features=0x%lx op=%s bytes=%lu "
		"req=%lu depth=%u user=%u\n",
		base, capacity, q.num, dev.accepted, plan.write ? "write" : "read", plan.bytes,
		plan.req, plan.depth, user);
	if (user)
		usermode_run(run, NULL);
	run(NULL);
}
