/*
 * net-pump: a scripted virtio-net traffic pump for the host tests in
 * crates/kiln-vmm/tests/net.rs.  No TCP/IP stack: the host prepares whole Ethernet frames and a
 * small script on a virtio-blk disk, the guest runs the script against the first virtio-net
 * device, stores what it received back on the disk, prints one line per fact, and resets.
 *
 * The guest negotiates VERSION_1 (and MAC) only, so every buffer starts with a 12-byte
 * virtio_net_hdr_v1 that is all zeros on transmit, and received frames carry no offloads.
 *
 * Disk layout (all little-endian u32; the host side is `Script` in tests/net.rs):
 *   offset 0:     magic "KNP1", command count, frame-area length, output offset, output size,
 *                 3 reserved words; then the commands, 4 words each (op, a, b, c), at offset 32.
 *   offset 4096:  the frame area: frame count, then per frame its length and its bytes,
 *                 padded to 4.
 *   output:       written at the end: magic "KNO1", entry count, bytes used, 0; then per stored
 *                 RX buffer the used length and the bytes the device wrote (header included),
 *                 padded to 4.
 *
 * Commands:
 *   SEND first count repeat   send frames [first, first+count), `repeat` times (0 = once)
 *   RECV n ms ethertype       store received frames of that ethertype (0 = any) until n were
 *                             stored or returned empty (dropped by the device), or `ms` pass
 *   FLOOD frame ms            send one frame as fast as the device takes it, until a stop frame
 *                             (ethertype 0x88b6) arrives or `ms` pass
 *   SINK ms every             count received frames until a stop frame or `ms`; print progress
 *                             every `every` frames
 *   HOSTILE kind              one malformed TX (or RX) chain; see hostile()
 *   RESET size mode count     reset and re-initialise the net device; post `count` RX buffers
 *                             (0 = a full ring) of `size` bytes (0 = 1526); mode 1 = buffer 0
 *                             outside RAM, 2 = read-only buffers, 3 = post none yet
 *   POST count                post RX buffers 0..count-1 (after RESET with mode 3)
 *   MARK k                    print "net-pump: mark k"
 *   SLEEP ms                  spin for `ms`
 *
 * kiln.end=idle on the command line makes the guest idle at the end instead of resetting;
 * kiln.net_features=MASK adds feature bits to the ones the guest accepts (e.g. 0x2 for
 * VIRTIO_NET_F_GUEST_CSUM: received frames may then carry NEEDS_CSUM headers).
 */
#include "virtio.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_NET_F_MAC (1UL << 5)

#define NET_HDR 12
#define MAX_ETH 1514
#define RX_BUF_SIZE (NET_HDR + MAX_ETH)
#define SLOT_SIZE 2048
#define NQ 128
#define RX 0
#define TX 1

#define ETH_STOP 0x88b6

#define SCRIPT_MAGIC 0x31504e4bU /* "KNP1" */
#define OUT_MAGIC 0x314f4e4bU	 /* "KNO1" */
#define FRAMES_OFFSET 4096
#define MAX_CMDS 30
#define MAX_IN (4UL << 20)
#define MAX_OUT (4UL << 20)
#define MAX_FRAMES 1024

enum {
	OP_SEND = 1,
	OP_RECV = 2,
	OP_FLOOD = 3,
	OP_SINK = 4,
	OP_HOSTILE = 5,
	OP_RESET = 6,
	OP_MARK = 7,
	OP_SLEEP = 8,
	OP_POST = 9,
};

/* Big buffers live in RAM above the image (the tests give the guest 128 MiB). */
#define IN_AREA ((u8 *)0x2000000UL)
#define OUT_AREA ((u8 *)0x2800000UL)
#define RX_SLOTS ((u8 *)0x3000000UL)
#define TX_SLOTS ((u8 *)0x3100000UL)
#define BIG_AREA ((u8 *)0x3200000UL)
#define FAR_ADDR 0x7ffffff00000UL

struct nq_avail {
	u16 flags;
	u16 idx;
	u16 ring[NQ];
	u16 used_event;
};

struct nq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[NQ];
	u16 avail_event;
};

struct nq_mem {
	struct virtq_desc desc[NQ];
	struct nq_avail avail;
	struct nq_used used __attribute__((aligned(8)));
} __attribute__((aligned(4096)));

struct nq {
	u16 index;
	u16 num;
	u16 last_used;
	volatile struct virtq_desc *desc;
	volatile struct nq_avail *avail;
	volatile struct nq_used *used;
};

static struct nq_mem qmem[2];
static struct nq queues[2];
static u64 net_base;
static u32 net_status;
static u64 offered, accepted;
static u32 rx_size = RX_BUF_SIZE;
/* TX descriptors not owned by the device. */
static u16 tx_free[NQ];
static u16 tx_nfree;

static struct vblk disk;
static u32 cmds[MAX_CMDS][4];
static u32 ncmds;
static u32 in_len, out_offset, out_size;
static const u8 *frames[MAX_FRAMES];
static u32 frame_len[MAX_FRAMES];
static u32 nframes;
static u32 out_used = 16, out_count;
static u64 ticks_per_ms;

static u32 rd(u32 off)
{
	return mmio_read32(net_base + off);
}

static void wr(u32 off, u32 value)
{
	mmio_write32(net_base + off, value);
}

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

static u64 deadline_after(u64 ms)
{
	return rdtsc() + ms * ticks_per_ms;
}

/* Spins for `ms` milliseconds of TSC time (rt.c's delay_tsc gives up after a fixed count). */
static void spin_ms(u64 ms)
{
	u64 deadline = deadline_after(ms);
	while (rdtsc() < deadline)
		barrier();
}

static int needs_reset(void)
{
	return (rd(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET) != 0;
}

static void nq_set(struct nq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	q->desc[i].addr = addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

static void nq_add(struct nq *q, u16 head)
{
	u16 idx = q->avail->idx;
	q->avail->ring[idx % q->num] = head;
	barrier();
	q->avail->idx = (u16)(idx + 1);
	barrier();
}

static void nq_notify(struct nq *q)
{
	barrier();
	wr(VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

static int nq_get_used(struct nq *q, u32 *id, u32 *len)
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

static int setup_queue(u16 index)
{
	struct nq *q = &queues[index];
	struct nq_mem *mem = &qmem[index];
	memset(q, 0, sizeof(*q));
	memset(mem, 0, sizeof(*mem));
	wr(VIRTIO_MMIO_QUEUE_SEL, index);
	u32 max = rd(VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) {
		kprintf("net-pump: no queue %u\n", index);
		return -1;
	}
	q->index = index;
	q->num = (u16)(max < NQ ? max : NQ);
	q->desc = mem->desc;
	q->avail = &mem->avail;
	q->used = &mem->used;
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	wr(VIRTIO_MMIO_QUEUE_NUM, q->num);
	wr(VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)mem->desc);
	wr(VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)mem->desc >> 32));
	wr(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&mem->avail);
	wr(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)&mem->avail >> 32));
	wr(VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&mem->used);
	wr(VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)((u64)&mem->used >> 32));
	wr(VIRTIO_MMIO_QUEUE_READY, 1);
	return 0;
}

static u8 *rx_slot(u16 i)
{
	return RX_SLOTS + (u64)i * SLOT_SIZE;
}

static u8 *tx_slot(u16 i)
{
	return TX_SLOTS + (u64)i * SLOT_SIZE;
}

/* Posts RX descriptor `i` again with the current buffer size. */
static void rx_post(u16 i)
{
	nq_set(&queues[RX], i, (u64)rx_slot(i), rx_size, VIRTQ_DESC_F_WRITE, 0);
	nq_add(&queues[RX], i);
}

/* Resets the device and brings it up with both queues; RX buffers per `mode` (see top). */
static int net_init(u32 size, u32 mode, u32 count)
{
	if (virtio_reset(net_base)) {
		kprintf("net-pump: device did not reset\n");
		return -1;
	}
	net_status = VIRTIO_STATUS_ACKNOWLEDGE;
	wr(VIRTIO_MMIO_STATUS, net_status);
	net_status |= VIRTIO_STATUS_DRIVER;
	wr(VIRTIO_MMIO_STATUS, net_status);
	wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered = rd(VIRTIO_MMIO_DEVICE_FEATURES);
	wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	accepted = offered & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC |
			      cmdline_u64("kiln.net_features", 0));
	wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	wr(VIRTIO_MMIO_DRIVER_FEATURES, (u32)accepted);
	wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	wr(VIRTIO_MMIO_DRIVER_FEATURES, (u32)(accepted >> 32));
	net_status |= VIRTIO_STATUS_FEATURES_OK;
	wr(VIRTIO_MMIO_STATUS, net_status);
	if (!(rd(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		kprintf("net-pump: features 0x%lx refused\n", accepted);
		return -1;
	}
	if (setup_queue(RX) || setup_queue(TX))
		return -1;
	net_status |= VIRTIO_STATUS_DRIVER_OK;
	wr(VIRTIO_MMIO_STATUS, net_status);
	if (rd(VIRTIO_MMIO_STATUS) != net_status) {
		kprintf("net-pump: device not live (status 0x%x)\n", rd(VIRTIO_MMIO_STATUS));
		return -1;
	}
	rx_size = size ? size : RX_BUF_SIZE;
	if (rx_size > SLOT_SIZE)
		rx_size = SLOT_SIZE;
	if (!count || count > queues[RX].num)
		count = queues[RX].num;
	if (mode == 3)
		count = 0;
	for (u16 i = 0; i < count; i++)
		rx_post(i);
	if (mode == 1)
		queues[RX].desc[0].addr = FAR_ADDR;
	else if (mode == 2) {
		for (u16 i = 0; i < count; i++)
			queues[RX].desc[i].flags = 0;
	}
	nq_notify(&queues[RX]);
	tx_nfree = queues[TX].num;
	for (u16 i = 0; i < tx_nfree; i++)
		tx_free[i] = (u16)(tx_nfree - 1 - i);
	return 0;
}

/* Takes back every TX descriptor the device finished with; returns how many. */
static u32 tx_reap(void)
{
	u32 id, len, n = 0;
	while (nq_get_used(&queues[TX], &id, &len)) {
		if (id < queues[TX].num && tx_nfree < queues[TX].num)
			tx_free[tx_nfree++] = (u16)id;
		n++;
	}
	return n;
}

/* Waits until the device owns no TX descriptor; 0 on success. */
static int tx_drain(u64 ms)
{
	u64 deadline = deadline_after(ms);
	while (tx_nfree < queues[TX].num) {
		tx_reap();
		if (rdtsc() > deadline || needs_reset())
			return -1;
	}
	return 0;
}

static u16 ethertype(const u8 *frame, u32 len)
{
	if (len < 14)
		return 0;
	return (u16)(frame[12] << 8 | frame[13]);
}

/* Appends one received buffer to the output area; returns 0 if it did not fit. */
static int store(const u8 *buf, u32 len)
{
	u32 need = 4 + ((len + 3) & ~3U);
	if (out_used + need > out_size || out_used + need > MAX_OUT)
		return 0;
	u8 *at = OUT_AREA + out_used;
	at[0] = (u8)len;
	at[1] = (u8)(len >> 8);
	at[2] = (u8)(len >> 16);
	at[3] = (u8)(len >> 24);
	memcpy(at + 4, buf, len);
	out_used += need;
	out_count++;
	return 1;
}

/* Reads `len` bytes at byte `offset` (sector-aligned) of the disk into `dst`. */
static int disk_read(u64 offset, u8 *dst, u32 len)
{
	for (u32 done = 0; done < len; done += 32768) {
		u32 chunk = len - done < 32768 ? len - done : 32768;
		chunk = (chunk + 511) & ~511U;
		int st = vblk_request(&disk, VIRTIO_BLK_T_IN, (offset + done) / 512, dst + done, chunk);
		if (st != 0)
			return -1;
	}
	return 0;
}

static int disk_write(u64 offset, u8 *src, u32 len)
{
	for (u32 done = 0; done < len; done += 32768) {
		u32 chunk = len - done < 32768 ? len - done : 32768;
		chunk = (chunk + 511) & ~511U;
		int st = vblk_request(&disk, VIRTIO_BLK_T_OUT, (offset + done) / 512, src + done, chunk);
		if (st != 0)
			return -1;
	}
	return 0;
}

static int load_script(void)
{
	u8 *head = IN_AREA;
	if (disk_read(0, head, 512)) {
		kprintf("net-pump: cannot read the script sector\n");
		return -1;
	}
	if (ld32(head) != SCRIPT_MAGIC) {
		kprintf("net-pump: bad script magic 0x%x\n", ld32(head));
		return -1;
	}
	ncmds = ld32(head + 4);
	in_len = ld32(head + 8);
	out_offset = ld32(head + 12);
	out_size = ld32(head + 16);
	if (ncmds > MAX_CMDS || in_len > MAX_IN || out_offset % 512) {
		kprintf("net-pump: bad script header\n");
		return -1;
	}
	for (u32 i = 0; i < ncmds; i++) {
		for (u32 w = 0; w < 4; w++)
			cmds[i][w] = ld32(head + 32 + i * 16 + w * 4);
	}
	u8 *area = IN_AREA + 4096;
	if (in_len && disk_read(FRAMES_OFFSET, area, in_len)) {
		kprintf("net-pump: cannot read the frames\n");
		return -1;
	}
	u32 at = 4;
	u32 count = in_len >= 4 ? ld32(area) : 0;
	for (nframes = 0; nframes < count && nframes < MAX_FRAMES; nframes++) {
		if (at + 4 > in_len)
			break;
		u32 len = ld32(area + at);
		if (len > SLOT_SIZE - NET_HDR || at + 4 + len > in_len)
			break;
		frames[nframes] = area + at + 4;
		frame_len[nframes] = len;
		at += 4 + ((len + 3) & ~3U);
	}
	kprintf("net-pump: script commands=%u frames=%u\n", ncmds, nframes);
	return 0;
}

/* Gets a free TX descriptor, reaping (bounded) if none is free; -1 if the device is stuck. */
static int tx_take(void)
{
	u64 deadline = 0;
	while (!tx_nfree) {
		tx_reap();
		if (tx_nfree)
			break;
		if (!deadline)
			deadline = deadline_after(2000);
		if (rdtsc() > deadline || needs_reset())
			return -1;
	}
	return tx_free[--tx_nfree];
}

static void op_send(u32 first, u32 count, u32 repeat)
{
	u32 sent = 0;
	if (!repeat)
		repeat = 1;
	for (u32 r = 0; r < repeat; r++) {
		for (u32 f = first; f < first + count && f < nframes; f++) {
			int d = tx_take();
			if (d < 0)
				goto out;
			u8 *slot = tx_slot((u16)d);
			memset(slot, 0, NET_HDR);
			memcpy(slot + NET_HDR, frames[f], frame_len[f]);
			nq_set(&queues[TX], (u16)d, (u64)slot, NET_HDR + frame_len[f], 0, 0);
			nq_add(&queues[TX], (u16)d);
			nq_notify(&queues[TX]);
			sent++;
		}
	}
out:;
	int drained = tx_drain(2000) == 0;
	kprintf("net-pump: send frames=%u drained=%u needs-reset=%u\n", sent, drained, needs_reset());
}

/*
 * Takes one used RX buffer if there is one: stores its length in *len and returns its
 * descriptor (to be posted again with rx_post), or -1.
 */
static int rx_take(u32 *len)
{
	u32 id;
	if (!nq_get_used(&queues[RX], &id, len))
		return -1;
	if (id >= queues[RX].num)
		return -1;
	return (int)id;
}

static int is_stop(u16 d, u32 len)
{
	return len > NET_HDR && ethertype(rx_slot(d) + NET_HDR, len - NET_HDR) == ETH_STOP;
}

static void op_recv(u32 want, u32 ms, u32 type)
{
	u32 got = 0, empty = 0, other = 0;
	u64 deadline = deadline_after(ms);
	kprintf("net-pump: recv-start want=%u\n", want);
	while (got + empty < want && rdtsc() < deadline) {
		u32 len;
		int d = rx_take(&len);
		if (d < 0) {
			if (needs_reset())
				break;
			continue;
		}
		u8 *buf = rx_slot((u16)d);
		if (len == 0) {
			empty++;
		} else if (len > rx_size || len < NET_HDR) {
			kprintf("net-pump: rx bad-len=%u\n", len);
			other++;
		} else if (type && ethertype(buf + NET_HDR, len - NET_HDR) != type) {
			other++;
		} else {
			kprintf("net-pump: rx len=%u type=0x%04x fnv=0x%08x\n", len - NET_HDR,
				ethertype(buf + NET_HDR, len - NET_HDR),
				fnv1a(buf + NET_HDR, len - NET_HDR));
			store(buf, len);
			got++;
		}
		rx_post((u16)d);
		nq_notify(&queues[RX]);
	}
	kprintf("net-pump: recv got=%u empty=%u other=%u needs-reset=%u\n", got, empty, other,
		needs_reset());
}

static void op_flood(u32 frame, u32 ms)
{
	if (frame >= nframes) {
		kprintf("net-pump: flood no frame %u\n", frame);
		return;
	}
	/* Every TX descriptor points at the same buffer: the device only reads it. */
	u8 *buf = BIG_AREA;
	u32 len = NET_HDR + frame_len[frame];
	memset(buf, 0, NET_HDR);
	memcpy(buf + NET_HDR, frames[frame], frame_len[frame]);
	u64 sent = 0, bytes = 0;
	const char *why = "timeout";
	u64 deadline = deadline_after(ms);
	kprintf("net-pump: flood-start len=%u\n", frame_len[frame]);
	for (;;) {
		tx_reap();
		u32 added = 0;
		while (tx_nfree) {
			u16 d = tx_free[--tx_nfree];
			nq_set(&queues[TX], d, (u64)buf, len, 0, 0);
			nq_add(&queues[TX], d);
			added++;
		}
		if (added) {
			nq_notify(&queues[TX]);
			sent += added;
			bytes += (u64)added * frame_len[frame];
		}
		u32 rlen;
		int d = rx_take(&rlen);
		if (d >= 0) {
			int stop = is_stop((u16)d, rlen);
			rx_post((u16)d);
			nq_notify(&queues[RX]);
			if (stop) {
				why = "stop";
				break;
			}
		}
		if (rdtsc() > deadline) {
			break;
		}
		if (needs_reset()) {
			why = "needs-reset";
			break;
		}
	}
	/* Queued frames count as sent only once the device took them. */
	u32 queued = queues[TX].num - tx_nfree;
	tx_drain(5000);
	kprintf("net-pump: flood-done frames=%lu bytes=%lu queued=%u why=%s\n", sent, bytes, queued,
		why);
}

static void op_sink(u32 ms, u32 every)
{
	u64 count = 0, bytes = 0, empty = 0;
	const char *why = "timeout";
	u64 deadline = deadline_after(ms);
	if (!every)
		every = 100;
	kprintf("net-pump: sink-start\n");
	for (;;) {
		u32 len;
		int d = rx_take(&len);
		if (d < 0) {
			if (rdtsc() > deadline)
				break;
			if (needs_reset()) {
				why = "needs-reset";
				break;
			}
			continue;
		}
		int stop = is_stop((u16)d, len);
		rx_post((u16)d);
		nq_notify(&queues[RX]);
		if (stop) {
			why = "stop";
			break;
		}
		if (len <= NET_HDR) {
			empty++;
			continue;
		}
		count++;
		bytes += len - NET_HDR;
		if (count % every == 0)
			kprintf("net-pump: sink frames=%lu bytes=%lu\n", count, bytes);
	}
	kprintf("net-pump: sink-done frames=%lu bytes=%lu empty=%lu why=%s\n", count, bytes, empty,
		why);
}

/* Submits TX chain `head` and waits up to 1 s for the device to return it. */
static void hostile_submit(u32 kind, const char *name, u16 head)
{
	nq_add(&queues[TX], head);
	nq_notify(&queues[TX]);
	u64 deadline = deadline_after(1000);
	u32 id = 0, len = 0;
	int used = 0;
	while (rdtsc() < deadline) {
		if (nq_get_used(&queues[TX], &id, &len)) {
			used = 1;
			break;
		}
		if (needs_reset())
			break;
	}
	kprintf("net-pump: hostile kind=%u name=%s used=%u id=%u needs-reset=%u\n", kind, name, used,
		id, needs_reset());
}

/*
 * One malformed transmit chain.  Needs every TX descriptor back first; uses descriptors 0..3
 * and leaves the free list as it was.
 */
static void hostile(u32 kind)
{
	if (tx_drain(2000)) {
		kprintf("net-pump: hostile kind=%u skipped: TX not drained\n", kind);
		return;
	}
	struct nq *q = &queues[TX];
	u8 *buf = BIG_AREA;
	memset(buf, 0, 128);
	/* A plausible frame after the header: broadcast, ethertype 0x88b5. */
	for (u32 i = 0; i < 6; i++)
		buf[NET_HDR + i] = 0xff;
	buf[NET_HDR + 12] = 0x88;
	buf[NET_HDR + 13] = 0xb5;
	switch (kind) {
	case 1:
		nq_set(q, 0, FAR_ADDR, 100, 0, 0);
		hostile_submit(kind, "outside-ram", 0);
		break;
	case 2:
		/* 80000 bytes in two descriptors: more than the device's 64 KiB limit. */
		nq_set(q, 0, (u64)buf, 40000, VIRTQ_DESC_F_NEXT, 1);
		nq_set(q, 1, (u64)buf + 40000, 40000, 0, 0);
		hostile_submit(kind, "too-big", 0);
		break;
	case 3:
		nq_set(q, 0, (u64)buf, 0, 0, 0);
		hostile_submit(kind, "zero-length", 0);
		break;
	case 4:
		nq_set(q, 0, (u64)buf, NET_HDR, 0, 0);
		hostile_submit(kind, "header-only", 0);
		break;
	case 5:
		nq_set(q, 0, (u64)buf, 60, VIRTQ_DESC_F_NEXT, 300);
		hostile_submit(kind, "next-out-of-range", 0);
		break;
	case 6:
		nq_set(q, 0, (u64)buf, 60, VIRTQ_DESC_F_NEXT, 0);
		hostile_submit(kind, "loop", 0);
		break;
	case 7:
		nq_set(q, 0, (u64)buf, 60, VIRTQ_DESC_F_WRITE, 0);
		hostile_submit(kind, "write-only", 0);
		break;
	case 8:
		nq_set(q, 0, FAR_ADDR, 4096, VIRTQ_DESC_F_INDIRECT, 0);
		hostile_submit(kind, "indirect-outside-ram", 0);
		break;
	case 9:
		/* Header announcing TCPv4 GSO with nonsense sizes (HOST_TSO4 not negotiated). */
		buf[1] = 1;
		buf[2] = 0xff;
		buf[3] = 0xff;
		buf[4] = 1;
		nq_set(q, 0, (u64)buf, NET_HDR + 60, 0, 0);
		hostile_submit(kind, "bogus-gso", 0);
		break;
	case 10:
		/* NEEDS_CSUM with csum_start/offset beyond the frame (CSUM not negotiated). */
		buf[0] = 1;
		buf[6] = 0xf0;
		buf[7] = 0xff;
		buf[8] = 0xf0;
		buf[9] = 0xff;
		nq_set(q, 0, (u64)buf, NET_HDR + 60, 0, 0);
		hostile_submit(kind, "bogus-csum", 0);
		break;
	case 11:
		/* Exactly the largest frame the device takes (65562 with the header). */
		nq_set(q, 0, (u64)buf, 65562, 0, 0);
		hostile_submit(kind, "max-frame", 0);
		break;
	case 12:
		/* Descriptors whose lengths add up past 4 GiB. */
		nq_set(q, 0, (u64)buf, 0xfffffff0U, VIRTQ_DESC_F_NEXT, 1);
		nq_set(q, 1, (u64)buf, 0xfffffff0U, 0, 0);
		hostile_submit(kind, "length-overflow", 0);
		break;
	case 13: {
		/* An avail index far ahead of the ring: the device must refuse the queue. */
		u16 idx = q->avail->idx;
		q->avail->idx = (u16)(idx + 1000);
		nq_notify(q);
		spin_ms(200);
		kprintf("net-pump: hostile kind=%u name=avail-jump needs-reset=%u\n", kind,
			needs_reset());
		return;
	}
	case 14:
		/* A head index outside the ring. */
		nq_add(q, 500);
		nq_notify(q);
		spin_ms(200);
		kprintf("net-pump: hostile kind=%u name=head-out-of-range needs-reset=%u\n", kind,
			needs_reset());
		return;
	default:
		kprintf("net-pump: hostile kind=%u unknown\n", kind);
		return;
	}
}

static void finish(void)
{
	u8 *out = OUT_AREA;
	u32 words[4] = {OUT_MAGIC, out_count, out_used, 0};
	for (u32 w = 0; w < 4; w++) {
		out[w * 4] = (u8)words[w];
		out[w * 4 + 1] = (u8)(words[w] >> 8);
		out[w * 4 + 2] = (u8)(words[w] >> 16);
		out[w * 4 + 3] = (u8)(words[w] >> 24);
	}
	if (out_size && disk_write(out_offset, out, out_used))
		kprintf("net-pump: cannot write the output\n");
	kprintf("net-pump: stored entries=%u bytes=%u\n", out_count, out_used);
	kprintf("net-pump: done\n");
	const char *value;
	usize vlen;
	if (cmdline_find(NULL, "kiln.end", &value, &vlen) && vlen == 4 && !strncmp(value, "idle", 4))
		idle_forever();
	reset();
}

void guest_main(u8 *zp)
{
	(void)zp;
	ticks_per_ms = probe_tsc_per_ms();
	struct virtio_loc devs[8];
	int n = virtio_cmdline_devices(devs, 8);
	u64 blk_base = 0;
	for (int i = 0; i < n && i < 8; i++) {
		u64 base = devs[i].base;
		if (mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
			continue;
		u32 id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
		if (id == VIRTIO_ID_BLOCK && !blk_base)
			blk_base = base;
		else if (id == VIRTIO_ID_NET && !net_base)
			net_base = base;
	}
	if (!blk_base || !net_base) {
		kprintf("net-pump: need a virtio-blk and a virtio-net device (blk=0x%lx net=0x%lx)\n",
			blk_base, net_base);
		finish();
	}
	if (vblk_init(&disk, blk_base, 0) || load_script()) {
		kprintf("net-pump: no script\n");
		finish();
	}
	if (net_init(0, 0, 0))
		finish();
	u8 mac[6];
	for (u32 i = 0; i < 6; i++)
		mac[i] = mmio_read8(net_base + VIRTIO_MMIO_CONFIG + i);
	kprintf("net-pump: net base=0x%lx offered=0x%lx accepted=0x%lx rxq=%u txq=%u mac=", net_base,
		offered, accepted, queues[RX].num, queues[TX].num);
	print_hex_bytes(mac, 6);
	kprintf(" tsc-per-ms=%lu\n", ticks_per_ms);

	for (u32 i = 0; i < ncmds; i++) {
		u32 op = cmds[i][0], a = cmds[i][1], b = cmds[i][2], c = cmds[i][3];
		switch (op) {
		case OP_SEND:
			op_send(a, b, c);
			break;
		case OP_RECV:
			op_recv(a, b, c);
			break;
		case OP_FLOOD:
			op_flood(a, b);
			break;
		case OP_SINK:
			op_sink(a, b);
			break;
		case OP_HOSTILE:
			hostile(a);
			break;
		case OP_RESET:
			kprintf("net-pump: reset ok=%u\n", net_init(a, b, c) == 0);
			break;
		case OP_MARK:
			kprintf("net-pump: mark %u\n", a);
			break;
		case OP_SLEEP:
			spin_ms(a);
			break;
		case OP_POST:
			for (u32 d = 0; d < a && d < queues[RX].num; d++)
				rx_post((u16)d);
			nq_notify(&queues[RX]);
			kprintf("net-pump: posted %u\n", a);
			break;
		default:
			kprintf("net-pump: unknown op %u\n", op);
			break;
		}
	}
	finish();
}
