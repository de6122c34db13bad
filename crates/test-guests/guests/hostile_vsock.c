/*
 * hostile-vsock: sends the vsock device malformed and hostile packets, one case at a time,
 * and prints what came back for each (an RST or RESPONSE addressed to the case's port, whether
 * the TX chain was returned, DEVICE_NEEDS_RESET).  Then it runs one well-formed connection
 * (64 KiB each way, pattern-checked) to show the device still serves, prints its final line
 * and idles so that the host can check the VMM is alive.
 *
 * kiln.port=P: the host listens on P (the good connection), P+1 (accepts but never reads:
 * the credit-overrun case) and P+2 (accepts and reads: the split-header and established
 * cases).  Nothing listens on P+50.
 */
#include "vsock_drv.h"

#define FAR_ADDR 0x7ffffff00000UL
#define MMIO_GAP_ADDR 0xd0000000UL
#define WRAP_ADDR 0xffffffffffffffe0UL
#define CASE_MS 300
#define GOOD_BYTES (64 * 1024)
#define OVERRUN_LIMIT (16UL << 20)

static u32 good_port, stall_port, split_port, nobody_port;
static int last_slot;
static struct vs_conn *case_conn;
static u64 overrun_sent;

static void settle(u64 ms)
{
	u64 end = rdtsc() + ms * tsc_per_ms();
	while (rdtsc() < end)
		vs_poll();
}

/* A one-descriptor packet: `hdr` then `payload_len` zero bytes, descriptor length `desc_len`. */
static void send_one(const struct vs_hdr *h, u32 payload_len, u32 desc_len, u16 flags)
{
	if (vs_wait_slot(1000))
		return;
	u8 *b = vs_next_slot_buf();
	memcpy(b, h, VS_HDR);
	memset(b + VS_HDR, 0x5a, payload_len);
	last_slot = vs_send_chain((u64)b, desc_len, flags, 0, 0, 0, 0);
}

static void len_beyond_buffer(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, nobody_port, VS_OP_RW);
	h.len = 4096;
	send_one(&h, 16, VS_HDR + 16, 0);
}

static void len_over_64k(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, nobody_port, VS_OP_RW);
	h.len = VS_MAX_PAYLOAD + 1;
	send_one(&h, h.len, VS_HDR + h.len, 0);
}

static void unknown_op(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, nobody_port, 99);
	send_one(&h, 0, VS_HDR, 0);
}

static void wrong_type(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	h.type = 2;
	send_one(&h, 0, VS_HDR, 0);
}

static void wrong_src_cid(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	h.src_cid = vs_cid + 1;
	send_one(&h, 0, VS_HDR, 0);
}

static void wrong_dst_cid(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	h.dst_cid = vs_cid;
	send_one(&h, 0, VS_HDR, 0);
}

static void rw_unknown_connection(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_RW);
	h.len = 16;
	send_one(&h, 16, VS_HDR + 16, 0);
}

static void header_shorter_than_44(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	send_one(&h, 0, 20, 0);
}

static void header_outside_ram(u32 port)
{
	(void)port;
	if (!vs_wait_slot(1000))
		last_slot = vs_send_chain(FAR_ADDR, VS_HDR, 0, 0, 0, 0, 0);
}

static void payload_outside_ram(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, nobody_port, VS_OP_RW);
	h.len = 100;
	if (vs_wait_slot(1000))
		return;
	u8 *b = vs_next_slot_buf();
	memcpy(b, &h, VS_HDR);
	last_slot = vs_send_chain((u64)b, VS_HDR, 0, FAR_ADDR, 100, 0, 1);
}

static void header_in_mmio_gap(u32 port)
{
	(void)port;
	if (!vs_wait_slot(1000))
		last_slot = vs_send_chain(MMIO_GAP_ADDR, VS_HDR, 0, 0, 0, 0, 0);
}

static void descriptor_wrapping_address_space(u32 port)
{
	(void)port;
	if (!vs_wait_slot(1000))
		last_slot = vs_send_chain(WRAP_ADDR, VS_HDR, 0, 0, 0, 0, 0);
}

static void device_writable_header(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	send_one(&h, 0, VS_HDR, VIRTQ_DESC_F_WRITE);
}

static void zero_length_descriptor(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, good_port, VS_OP_REQUEST);
	send_one(&h, 0, 0, 0);
}

static void header_split_across_descriptors(u32 port)
{
	struct vs_hdr h;
	vs_hdr_init(&h, port, split_port, VS_OP_REQUEST);
	if (vs_wait_slot(1000))
		return;
	u8 *b = vs_next_slot_buf();
	memcpy(b, &h, VS_HDR);
	/* The second part lives 1 KiB further on, so the header really is in two pieces. */
	memcpy(b + 1024, b + 20, VS_HDR - 20);
	last_slot = vs_send_chain((u64)b, 20, 0, (u64)b + 1024, VS_HDR - 20, 0, 1);
}

static void unknown_op_on_established_connection(u32 port)
{
	case_conn = vs_connect(port, split_port);
	if (!case_conn)
		return;
	vs_conn_plan(case_conn, 0, 0, 0, VS_CLOSE_NONE);
	case_conn->shut_send_sent = 1; /* no engine traffic on this one */
	u64 end = rdtsc() + 2000 * tsc_per_ms();
	while (case_conn->state == VS_CONNECTING && rdtsc() < end)
		vs_poll();
	struct vs_hdr h;
	vs_hdr_init(&h, port, split_port, 99);
	h.fwd_cnt = case_conn->fwd_cnt;
	send_one(&h, 0, VS_HDR, 0);
}

static void credit_overrun(u32 port)
{
	case_conn = vs_connect(port, stall_port);
	if (!case_conn)
		return;
	vs_conn_plan(case_conn, 0, 0, 0, VS_CLOSE_NONE);
	case_conn->shut_send_sent = 1;
	u64 end = rdtsc() + 2000 * tsc_per_ms();
	while (case_conn->state == VS_CONNECTING && rdtsc() < end)
		vs_poll();
	if (case_conn->state != VS_ESTABLISHED)
		return;
	/* Ignore the peer's credit entirely: 64 KiB packets until RST or the limit. */
	end = rdtsc() + 20000 * tsc_per_ms();
	overrun_sent = 0;
	while (overrun_sent < OVERRUN_LIMIT && case_conn->state == VS_ESTABLISHED &&
	       rdtsc() < end) {
		if (vs_wait_slot(100)) {
			vs_poll();
			continue;
		}
		struct vs_hdr h;
		vs_hdr_init(&h, port, stall_port, VS_OP_RW);
		h.len = VS_MAX_PAYLOAD;
		h.fwd_cnt = case_conn->fwd_cnt;
		u8 *b = vs_next_slot_buf();
		memcpy(b, &h, VS_HDR);
		last_slot = vs_send_chain((u64)b, VS_HDR + VS_MAX_PAYLOAD, 0, 0, 0, 0, 0);
		overrun_sent += VS_MAX_PAYLOAD;
		vs_poll();
	}
}

struct hostile_case {
	const char *name;
	void (*run)(u32 port);
};

static const struct hostile_case cases[] = {
	{ "len-beyond-buffer", len_beyond_buffer },
	{ "len-over-64k", len_over_64k },
	{ "unknown-op", unknown_op },
	{ "wrong-type", wrong_type },
	{ "wrong-src-cid", wrong_src_cid },
	{ "wrong-dst-cid", wrong_dst_cid },
	{ "rw-unknown-connection", rw_unknown_connection },
	{ "header-shorter-than-44", header_shorter_than_44 },
	{ "header-outside-ram", header_outside_ram },
	{ "payload-outside-ram", payload_outside_ram },
	{ "header-in-mmio-gap", header_in_mmio_gap },
	{ "descriptor-wrapping-address-space", descriptor_wrapping_address_space },
	{ "device-writable-header", device_writable_header },
	{ "zero-length-descriptor", zero_length_descriptor },
	{ "header-split-across-descriptors", header_split_across_descriptors },
	{ "unknown-op-on-established-connection", unknown_op_on_established_connection },
	{ "credit-overrun", credit_overrun },
};

/* Whether a packet with `op` to guest port `port` arrived since stray entry `from`. */
static int stray_seen(u32 from, u32 port, u16 op)
{
	for (u32 i = from; i < vs_stray_count; i++) {
		if (vs_stray_count - i > VS_STRAY_LOG)
			continue;
		struct vs_hdr *h = &vs_stray[i % VS_STRAY_LOG];
		if (h->dst_port == port && h->op == op)
			return 1;
	}
	return 0;
}

static void run_case(int n, const struct hostile_case *c)
{
	u32 port = 5000 + (u32)n;
	u32 before = vs_stray_count;
	last_slot = -1;
	case_conn = NULL;
	overrun_sent = 0;
	c->run(port);
	settle(CASE_MS);
	int rst = stray_seen(before, port, VS_OP_RST) || (case_conn && case_conn->got_rst);
	int response = stray_seen(before, port, VS_OP_RESPONSE) ||
		       (case_conn && case_conn->state != VS_CONNECTING && !case_conn->refused);
	kprintf("hostile-vsock: case %d %s: rst=%s response=%s tx-used=%s needs-reset=%u", n,
		c->name, rst ? "yes" : "no", response ? "yes" : "no",
		last_slot >= 0 && !vs_slot_busy(last_slot) ? "yes" : "no",
		vdev_needs_reset(&vs_dev));
	if (case_conn)
		kprintf(" conn-state=%u overrun-sent=%lu", case_conn->state, overrun_sent);
	kprintf("\n");
	if (stray_seen(before, port, VS_OP_RESPONSE)) {
		/* Close what the device opened for us. */
		struct vs_hdr h;
		vs_hdr_init(&h, port, c->run == header_split_across_descriptors ? split_port : good_port,
			    VS_OP_RST);
		vs_wait_slot(1000);
		vs_send(&h, NULL, 0);
	}
	if (case_conn && case_conn->state != VS_CLOSED) {
		struct vs_hdr h;
		vs_hdr_init(&h, case_conn->lport, case_conn->pport, VS_OP_RST);
		vs_wait_slot(1000);
		vs_send(&h, NULL, 0);
		case_conn->state = VS_CLOSED;
	}
	settle(20);
}

void guest_main(u8 *zp)
{
	(void)zp;
	if (vs_init()) {
		kprintf("hostile-vsock: init failed\n");
		kprintf("hostile-vsock: finished 0 cases\n");
		idle_forever();
	}
	u32 port = (u32)cmdline_u64("kiln.port", 7000);
	good_port = port;
	stall_port = port + 1;
	split_port = port + 2;
	nobody_port = port + 50;
	kprintf("hostile-vsock: ready cid=%lu cases=%u\n", vs_cid, (u32)ARRAY_SIZE(cases));
	for (usize i = 0; i < ARRAY_SIZE(cases); i++)
		run_case((int)i + 1, &cases[i]);

	struct vs_conn *c = vs_connect(6000, good_port);
	if (c) {
		vs_conn_plan(c, GOOD_BYTES, GOOD_BYTES, 0, VS_CLOSE_GUEST);
		u64 end = rdtsc() + 30000 * tsc_per_ms();
		while (!vs_conn_finished(c) && rdtsc() < end) {
			vs_poll();
			vs_pump();
		}
		vs_report("hostile-vsock: good", c);
	} else {
		kprintf("hostile-vsock: good connection could not start\n");
	}
	kprintf("hostile-vsock: stats rx-packets=%lu rx-short=%lu rx-bad-len=%lu stray=%lu "
		"needs-reset=%u\n",
		vs_stats.rx_packets, vs_stats.rx_short, vs_stats.rx_bad_len, vs_stats.stray,
		vdev_needs_reset(&vs_dev));
	kprintf("hostile-vsock: finished %u cases\n", (u32)ARRAY_SIZE(cases));
	idle_forever();
}
