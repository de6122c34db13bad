/* A polling virtio-vsock driver and stream engine for test guests; see vsock_drv.h. */
#include "vsock_drv.h"

#define RX_QUEUE 0
#define TX_QUEUE 1
#define EVENT_QUEUE 2
#define EVENT_BUFS 4
#define SLOT_BYTES (VS_HDR + VS_MAX_PAYLOAD + 4096)
#define HEAP_START 0x1000000UL

u64 vs_cid;
struct vs_conn vs_conns[VS_MAX_CONNS];
struct vs_stats vs_stats;
struct vq vs_rxq, vs_txq, vs_evq;
struct vdev vs_dev;
struct vs_hdr vs_stray[VS_STRAY_LOG];
u32 vs_stray_count;

u32 vs_rxbuf_size = 4096 + VS_HDR;
u32 vs_rx_bufs = 16;
u32 vs_tx_payload = 4096;
u32 vs_buf_alloc = 64 * 1024;
u32 vs_listen_port;
u32 vs_listen_budget;
u64 vs_plan_send, vs_plan_recv;
int vs_plan_text, vs_plan_close;

static struct vq_mem rx_mem, tx_mem, ev_mem;
static u8 *rx_buf[VS_MAX_RX_BUFS];
static u8 *slot_buf[VS_TX_SLOTS];
static int slot_busy[VS_TX_SLOTS];
static u32 slots;
static u32 next_slot;
static u8 event_buf[EVENT_BUFS][8] __attribute__((aligned(8)));
static u64 heap_next = HEAP_START;

void *vs_alloc(u64 size, u64 align)
{
	heap_next = (heap_next + align - 1) & ~(align - 1);
	void *p = (void *)heap_next;
	heap_next += size;
	return p;
}

/* Unaligned, aliasing-safe 64-bit access: x86 loads need no alignment. */
typedef u64 __attribute__((aligned(1), may_alias)) u64_un;
typedef u32 __attribute__((aligned(1), may_alias)) u32_un;

#define PAT_BYTES ((VS_PAT_LEN + 3) & ~3)

/* Two pattern blocks per connection slot, allocated on first use. */
static u8 *pat_send_buf[VS_MAX_CONNS];
static u8 *pat_recv_buf[VS_MAX_CONNS];

void vs_pattern_fill(u8 *buf, u32 seed)
{
	u32 x = seed ? seed : 1;
	for (u32 i = 0; i < PAT_BYTES; i += 4) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		*(u32_un *)(buf + i) = x;
	}
}

u32 vs_seed_to_host(u32 host_port)
{
	return host_port * 2654435761u ^ 0x746f6873u;
}

u32 vs_seed_to_guest(u32 host_port)
{
	return host_port * 2654435761u ^ 0x67756573u;
}

void vs_hdr_init(struct vs_hdr *h, u32 src_port, u32 dst_port, u16 op)
{
	memset(h, 0, sizeof(*h));
	h->src_cid = vs_cid;
	h->dst_cid = VS_HOST_CID;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->type = VS_TYPE_STREAM;
	h->op = op;
	h->buf_alloc = vs_buf_alloc;
}

int vs_init(void)
{
	vs_rxbuf_size = (u32)cmdline_u64("kiln.rxbuf", vs_rxbuf_size);
	if (vs_rxbuf_size > VS_HDR + VS_MAX_PAYLOAD)
		vs_rxbuf_size = VS_HDR + VS_MAX_PAYLOAD;
	vs_rx_bufs = (u32)cmdline_u64("kiln.rxbufs", vs_rx_bufs);
	if (vs_rx_bufs > VS_MAX_RX_BUFS)
		vs_rx_bufs = VS_MAX_RX_BUFS;
	if (vs_rx_bufs == 0)
		vs_rx_bufs = 1;
	vs_tx_payload = (u32)cmdline_u64("kiln.txpkt", vs_tx_payload);
	if (vs_tx_payload > VS_MAX_PAYLOAD || vs_tx_payload == 0)
		vs_tx_payload = VS_MAX_PAYLOAD;
	vs_buf_alloc = (u32)cmdline_u64("kiln.bufalloc", vs_buf_alloc);

	u64 base = vdev_find(VIRTIO_ID_VSOCK);
	if (!base) {
		kprintf("vsock: no virtio-vsock device on the command line\n");
		return -1;
	}
	if (vdev_begin(&vs_dev, base, VIRTIO_ID_VSOCK, 0) ||
	    vq_setup(&vs_dev, &vs_rxq, RX_QUEUE, &rx_mem, VQ_MAX) ||
	    vq_setup(&vs_dev, &vs_txq, TX_QUEUE, &tx_mem, VQ_MAX) ||
	    vq_setup(&vs_dev, &vs_evq, EVENT_QUEUE, &ev_mem, VQ_MAX))
		return -1;
	vs_cid = vdev_config32(&vs_dev, 0) | (u64)vdev_config32(&vs_dev, 4) << 32;

	if (vs_rx_bufs > vs_rxq.num)
		vs_rx_bufs = vs_rxq.num;
	for (u32 i = 0; i < vs_rx_bufs; i++) {
		rx_buf[i] = vs_alloc(vs_rxbuf_size, 64);
		vq_set_desc(&vs_rxq, (u16)i, (u64)rx_buf[i], vs_rxbuf_size, VIRTQ_DESC_F_WRITE, 0);
		vq_add(&vs_rxq, (u16)i);
	}
	slots = vs_txq.num / 2;
	if (slots > VS_TX_SLOTS)
		slots = VS_TX_SLOTS;
	for (u32 i = 0; i < slots; i++) {
		slot_buf[i] = vs_alloc(SLOT_BYTES, 64);
		slot_busy[i] = 0;
	}
	for (u16 i = 0; i < EVENT_BUFS && i < vs_evq.num; i++) {
		vq_set_desc(&vs_evq, i, (u64)event_buf[i], sizeof(event_buf[i]), VIRTQ_DESC_F_WRITE,
			    0);
		vq_add(&vs_evq, i);
	}
	if (vdev_ready(&vs_dev))
		return -1;
	vq_notify(&vs_rxq);
	vq_notify(&vs_evq);
	return 0;
}

/* A free slot's index, or -1. */
static int slot_take(void)
{
	for (u32 n = 0; n < slots; n++) {
		u32 i = (next_slot + n) % slots;
		if (!slot_busy[i]) {
			next_slot = (i + 1) % slots;
			return (int)i;
		}
	}
	return -1;
}

static void reclaim_tx(void)
{
	u32 id, len;
	while (vq_get_used(&vs_txq, &id, &len)) {
		if (id / 2 < slots)
			slot_busy[id / 2] = 0;
		if (len == 0)
			vs_stats.tx_zero_used++;
	}
}

int vs_slot_busy(int s)
{
	reclaim_tx();
	return s >= 0 && (u32)s < slots && slot_busy[s];
}

u8 *vs_next_slot_buf(void)
{
	int s = slot_take();
	if (s < 0)
		return NULL;
	next_slot = (u32)s;
	return slot_buf[s];
}

int vs_wait_slot(u64 ms)
{
	u64 start = rdtsc();
	u64 ticks = ms * tsc_per_ms();
	for (;;) {
		reclaim_tx();
		for (u32 i = 0; i < slots; i++) {
			if (!slot_busy[i])
				return 0;
		}
		if (rdtsc() - start > ticks)
			return -1;
	}
}

/* Queues slot `s` as a one-descriptor packet of `len` bytes (no notify). */
static void slot_submit(int s, u32 len)
{
	u16 d = (u16)(2 * s);
	vq_set_desc(&vs_txq, d, (u64)slot_buf[s], len, 0, 0);
	slot_busy[s] = 1;
	vq_add(&vs_txq, d);
	vs_stats.tx_packets++;
}

int vs_send(const struct vs_hdr *h, const void *payload, u32 len)
{
	reclaim_tx();
	int s = slot_take();
	if (s < 0)
		return -1;
	memcpy(slot_buf[s], h, VS_HDR);
	if (len)
		memcpy(slot_buf[s] + VS_HDR, payload, len);
	slot_submit(s, VS_HDR + len);
	vq_notify(&vs_txq);
	return 0;
}

int vs_send_chain(u64 a0, u32 l0, u16 f0, u64 a1, u32 l1, u16 f1, int two)
{
	reclaim_tx();
	int s = slot_take();
	if (s < 0)
		return -1;
	u16 d = (u16)(2 * s);
	if (two) {
		vq_set_desc(&vs_txq, d, a0, l0, (u16)(f0 | VIRTQ_DESC_F_NEXT), (u16)(d + 1));
		vq_set_desc(&vs_txq, (u16)(d + 1), a1, l1, f1, 0);
	} else {
		vq_set_desc(&vs_txq, d, a0, l0, f0, 0);
	}
	slot_busy[s] = 1;
	vq_add(&vs_txq, d);
	vs_stats.tx_packets++;
	vq_notify(&vs_txq);
	return s;
}

static void conn_hdr(struct vs_conn *c, struct vs_hdr *h, u16 op, u32 len, u32 flags)
{
	vs_hdr_init(h, c->lport, c->pport, op);
	h->len = len;
	h->flags = flags;
	h->buf_alloc = c->buf_alloc;
	h->fwd_cnt = c->fwd_cnt;
	c->last_fwd_sent = c->fwd_cnt;
}

static int conn_send(struct vs_conn *c, u16 op, u32 flags)
{
	struct vs_hdr h;
	u32 saved = c->last_fwd_sent;
	conn_hdr(c, &h, op, 0, flags);
	if (vs_send(&h, NULL, 0)) {
		c->last_fwd_sent = saved;
		return -1;
	}
	return 0;
}

void vs_credit_update(struct vs_conn *c)
{
	conn_send(c, VS_OP_CREDIT_UPDATE, 0);
}

static void append(char *buf, u32 *len, const char *s)
{
	while (*s && *len + 1 < VS_TEXT_MAX)
		buf[(*len)++] = *s++;
	buf[*len] = 0;
}

static void append_u(char *buf, u32 *len, u64 v)
{
	char digits[24];
	int n = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v && n < 24);
	while (n && *len + 1 < VS_TEXT_MAX)
		buf[(*len)++] = digits[--n];
	buf[*len] = 0;
}

static struct vs_conn *conn_alloc(u32 lport, u32 pport)
{
	for (int i = 0; i < VS_MAX_CONNS; i++) {
		struct vs_conn *c = &vs_conns[i];
		if (c->state == VS_FREE) {
			memset(c, 0, sizeof(*c));
			c->lport = lport;
			c->pport = pport;
			c->buf_alloc = vs_buf_alloc;
			c->first_mismatch = ~0UL;
			c->start_tsc = rdtsc();
			return c;
		}
	}
	return NULL;
}

void vs_conn_plan(struct vs_conn *c, u64 send_total, u64 recv_expect, int text, int close_mode)
{
	c->send_total = send_total;
	c->recv_expect = recv_expect;
	c->text = text;
	c->close_mode = close_mode;
	int slot = (int)(c - vs_conns);
	if (!text && send_total) {
		if (!pat_send_buf[slot])
			pat_send_buf[slot] = vs_alloc(PAT_BYTES, 64);
		vs_pattern_fill(pat_send_buf[slot], vs_seed_to_host(c->pport));
		c->send_pat = pat_send_buf[slot];
	}
	if (!text && recv_expect) {
		if (!pat_recv_buf[slot])
			pat_recv_buf[slot] = vs_alloc(PAT_BYTES, 64);
		vs_pattern_fill(pat_recv_buf[slot], vs_seed_to_guest(c->pport));
		c->recv_pat = pat_recv_buf[slot];
	}
	if (text) {
		c->text_len = 0;
		append(c->text_out, &c->text_len, "hello host, this is guest cid ");
		append_u(c->text_out, &c->text_len, vs_cid);
		append(c->text_out, &c->text_len, " port ");
		append_u(c->text_out, &c->text_len, c->lport);
		append(c->text_out, &c->text_len, "\n");
		c->send_total = c->text_len;
	}
}

struct vs_conn *vs_connect(u32 lport, u32 pport)
{
	struct vs_conn *c = conn_alloc(lport, pport);
	if (!c)
		return NULL;
	c->state = VS_CONNECTING;
	if (vs_wait_slot(1000) || conn_send(c, VS_OP_REQUEST, 0)) {
		c->state = VS_FREE;
		return NULL;
	}
	return c;
}

static struct vs_conn *conn_find(u32 lport, u32 pport)
{
	for (int i = 0; i < VS_MAX_CONNS; i++) {
		struct vs_conn *c = &vs_conns[i];
		if (c->state != VS_FREE && c->state != VS_CLOSED && c->lport == lport &&
		    c->pport == pport)
			return c;
	}
	return NULL;
}

static void conn_closed(struct vs_conn *c)
{
	c->state = VS_CLOSED;
	c->end_tsc = rdtsc();
}

static void mismatch(struct vs_conn *c, u64 at)
{
	if (!c->mismatches)
		c->first_mismatch = at;
	c->mismatches++;
}

/* Compares `len` bytes that start at stream offset `at` with the expected pattern. */
static void check_pattern(struct vs_conn *c, const u8 *data, u32 len, u64 at)
{
	if (!c->recv_pat) {
		if (len)
			mismatch(c, at);
		return;
	}
	u32 off = (u32)(at % VS_PAT_LEN);
	u32 done = 0;
	while (done < len) {
		u32 seg = len - done;
		if (seg > VS_PAT_LEN - off)
			seg = VS_PAT_LEN - off;
		const u8 *a = data + done;
		const u8 *b = c->recv_pat + off;
		u32 k = 0;
		for (; k + 32 <= seg; k += 32) {
			u64 diff = (*(const u64_un *)(a + k) ^ *(const u64_un *)(b + k)) |
				   (*(const u64_un *)(a + k + 8) ^ *(const u64_un *)(b + k + 8)) |
				   (*(const u64_un *)(a + k + 16) ^ *(const u64_un *)(b + k + 16)) |
				   (*(const u64_un *)(a + k + 24) ^ *(const u64_un *)(b + k + 24));
			if (diff) {
				for (u32 w = 0; w < 32; w += 8) {
					if (*(const u64_un *)(a + k + w) != *(const u64_un *)(b + k + w))
						mismatch(c, at + done + k + w);
				}
			}
		}
		for (; k < seg; k++) {
			if (a[k] != b[k])
				mismatch(c, at + done + k);
		}
		done += seg;
		off = 0;
	}
}

static void consume(struct vs_conn *c, const u8 *data, u32 len)
{
	if (c->text) {
		for (u32 i = 0; i < len && c->text_in_len + 1 < VS_TEXT_MAX; i++)
			c->text_in[c->text_in_len++] = (char)data[i];
	} else {
		check_pattern(c, data, len, c->received);
	}
	c->received += len;
	c->fwd_cnt += len;
}

static void record_stray(const struct vs_hdr *h)
{
	vs_stray[vs_stray_count % VS_STRAY_LOG] = *h;
	vs_stray_count++;
	vs_stats.stray++;
}

static void handle_packet(const u8 *buf, u32 used_len)
{
	vs_stats.rx_packets++;
	if (used_len < VS_HDR) {
		vs_stats.rx_short++;
		return;
	}
	struct vs_hdr h;
	memcpy(&h, buf, VS_HDR);
	if (h.len > used_len - VS_HDR) {
		vs_stats.rx_bad_len++;
		return;
	}
	if (h.src_cid != VS_HOST_CID || h.dst_cid != vs_cid) {
		vs_stats.rx_bad_addr++;
		return;
	}
	struct vs_conn *c = conn_find(h.dst_port, h.src_port);
	if (!c) {
		if (h.op == VS_OP_REQUEST && vs_listen_port && h.dst_port == vs_listen_port &&
		    vs_listen_budget) {
			c = conn_alloc(h.dst_port, h.src_port);
			if (c) {
				vs_listen_budget--;
				c->state = VS_ESTABLISHED;
				c->peer_buf_alloc = h.buf_alloc;
				c->peer_fwd_cnt = h.fwd_cnt;
				vs_conn_plan(c, vs_plan_send, vs_plan_recv, vs_plan_text,
					     vs_plan_close);
				vs_wait_slot(1000);
				conn_send(c, VS_OP_RESPONSE, 0);
				return;
			}
		}
		record_stray(&h);
		if (h.op == VS_OP_REQUEST) {
			struct vs_hdr r;
			vs_hdr_init(&r, h.dst_port, h.src_port, VS_OP_RST);
			vs_wait_slot(1000);
			vs_send(&r, NULL, 0);
		}
		return;
	}
	c->peer_buf_alloc = h.buf_alloc;
	c->peer_fwd_cnt = h.fwd_cnt;
	switch (h.op) {
	case VS_OP_RESPONSE:
		if (c->state == VS_CONNECTING) {
			c->state = VS_ESTABLISHED;
			c->start_tsc = rdtsc();
		}
		break;
	case VS_OP_RST:
		if (c->state == VS_CONNECTING)
			c->refused = 1;
		c->got_rst = 1;
		conn_closed(c);
		break;
	case VS_OP_SHUTDOWN:
		c->shutdown_flags |= h.flags;
		if ((c->shutdown_flags & (VS_SHUT_RCV | VS_SHUT_SEND)) ==
			    (VS_SHUT_RCV | VS_SHUT_SEND) ||
		    c->state == VS_CLOSING) {
			vs_wait_slot(1000);
			conn_send(c, VS_OP_RST, 0);
			conn_closed(c);
		}
		break;
	case VS_OP_RW:
		if (c->state == VS_ESTABLISHED || c->state == VS_CLOSING)
			consume(c, buf + VS_HDR, h.len);
		break;
	case VS_OP_CREDIT_UPDATE:
		c->credit_updates++;
		break;
	case VS_OP_CREDIT_REQUEST:
		c->credit_requests++;
		vs_wait_slot(1000);
		vs_credit_update(c);
		break;
	default:
		record_stray(&h);
		break;
	}
}

void vs_poll(void)
{
	reclaim_tx();
	u32 id, len;
	int reposted = 0;
	while (vq_get_used(&vs_rxq, &id, &len)) {
		if (id >= vs_rx_bufs) {
			vs_stats.rx_short++;
			continue;
		}
		handle_packet(rx_buf[id], len);
		vq_set_desc(&vs_rxq, (u16)id, (u64)rx_buf[id], vs_rxbuf_size, VIRTQ_DESC_F_WRITE, 0);
		vq_add(&vs_rxq, (u16)id);
		reposted = 1;
	}
	if (reposted)
		vq_notify(&vs_rxq);
}

static u32 peer_credit(const struct vs_conn *c)
{
	u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static int data_done(const struct vs_conn *c)
{
	return c->sent >= c->send_total && c->received >= c->recv_expect;
}

void vs_pump(void)
{
	int submitted = 0;
	reclaim_tx();
	for (int i = 0; i < VS_MAX_CONNS; i++) {
		struct vs_conn *c = &vs_conns[i];
		if (c->state != VS_ESTABLISHED)
			continue;
		while (c->sent < c->send_total) {
			u32 credit = peer_credit(c);
			if (!credit)
				break;
			int s = slot_take();
			if (s < 0)
				break;
			u64 left = c->send_total - c->sent;
			u32 n = vs_tx_payload;
			if (n > credit)
				n = credit;
			if (n > left)
				n = (u32)left;
			u32 off = (u32)(c->sent % VS_PAT_LEN);
			if (!c->text && n > VS_PAT_LEN - off)
				n = VS_PAT_LEN - off;
			struct vs_hdr h;
			conn_hdr(c, &h, VS_OP_RW, n, 0);
			u8 *buf = slot_buf[s];
			memcpy(buf, &h, VS_HDR);
			if (c->text) {
				for (u32 k = 0; k < n; k++)
					buf[VS_HDR + k] = (u8)c->text_out[c->sent + k];
				slot_submit(s, VS_HDR + n);
			} else {
				/* Zero copy: the payload descriptor points into the pattern block. */
				u16 d = (u16)(2 * s);
				vq_set_desc(&vs_txq, d, (u64)buf, VS_HDR, VIRTQ_DESC_F_NEXT,
					    (u16)(d + 1));
				vq_set_desc(&vs_txq, (u16)(d + 1), (u64)(c->send_pat + off), n, 0, 0);
				slot_busy[s] = 1;
				vq_add(&vs_txq, d);
				vs_stats.tx_packets++;
			}
			submitted = 1;
			c->sent += n;
			c->tx_cnt += n;
		}
		if (c->sent >= c->send_total && !c->shut_send_sent) {
			if (!conn_send(c, VS_OP_SHUTDOWN, VS_SHUT_SEND))
				c->shut_send_sent = 1;
		}
		if (c->fwd_cnt - c->last_fwd_sent >= c->buf_alloc / 2)
			vs_credit_update(c);
		if (c->shut_send_sent && data_done(c) && c->close_mode == VS_CLOSE_GUEST) {
			if (!conn_send(c, VS_OP_SHUTDOWN, VS_SHUT_RCV | VS_SHUT_SEND))
				c->state = VS_CLOSING;
		}
	}
	if (submitted)
		vq_notify(&vs_txq);
}

int vs_conn_finished(const struct vs_conn *c)
{
	if (c->state == VS_CLOSED)
		return 1;
	return c->state == VS_ESTABLISHED && c->close_mode == VS_CLOSE_NONE && c->shut_send_sent &&
	       data_done(c);
}

static const char *state_name(int state)
{
	switch (state) {
	case VS_CONNECTING:
		return "connecting";
	case VS_ESTABLISHED:
		return "established";
	case VS_CLOSING:
		return "closing";
	case VS_CLOSED:
		return "closed";
	default:
		return "free";
	}
}

void vs_report(const char *prefix, struct vs_conn *c)
{
	u64 end = c->end_tsc ? c->end_tsc : rdtsc();
	c->reported = 1;
	kprintf("%s: conn guest-port=%u host-port=%u state=%s refused=%u rst=%u "
		"shutdown-flags=%u sent=%lu received=%lu expected=%lu mismatches=%lu "
		"credit-updates=%u credit-requests=%u ms=%lu text=\"",
		prefix, c->lport, c->pport, state_name(c->state), c->refused, c->got_rst,
		c->shutdown_flags, c->sent, c->received, c->recv_expect, c->mismatches,
		c->credit_updates, c->credit_requests, (end - c->start_tsc) / tsc_per_ms());
	for (u32 i = 0; i < c->text_in_len; i++) {
		char ch = c->text_in[i];
		if (ch == '\n')
			kprintf("\\n");
		else
			serial_putc(ch >= ' ' && ch < 0x7f && ch != '"' ? ch : '?');
	}
	kprintf("\"\n");
	if (c->mismatches)
		kprintf("%s: conn guest-port=%u first-mismatch=%lu\n", prefix, c->lport,
			c->first_mismatch);
}
