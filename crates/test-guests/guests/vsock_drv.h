/*
 * A polling virtio-vsock driver and a small stream engine for test guests.
 *
 * The driver keeps RX buffers posted on queue 0, sends packets on queue 1 from a pool of
 * slots (each slot owns descriptors 2i and 2i+1, so a packet may be a one- or two-descriptor
 * chain), and posts a few buffers on the event queue.  The engine runs connections: it
 * connects or listens, sends a pattern (or a text line) within the peer's credit, checks what
 * it receives against the expected pattern, advertises its own buf_alloc/fwd_cnt in every
 * packet and sends CREDIT_UPDATE as it consumes data, and closes with SHUTDOWN/RST.
 *
 * The pattern repeats a block of VS_PAT_LEN (a prime, so no packet size divides it) bytes of
 * a xorshift32 stream; the host tests generate the same bytes.  Seeds are derived from the
 * host-side port so both ends agree.  Guest code may be emulated one instruction at a time,
 * so the engine never touches data byte by byte: it sends payload straight out of the
 * pre-generated block (a header descriptor chained to a descriptor into the block) and checks
 * what arrives eight bytes at a time.
 */
#ifndef KILN_VSOCK_DRV_H
#define KILN_VSOCK_DRV_H

#include "vq.h"

#define VS_HDR 44
#define VS_HOST_CID 2
#define VS_TYPE_STREAM 1

#define VS_OP_REQUEST 1
#define VS_OP_RESPONSE 2
#define VS_OP_RST 3
#define VS_OP_SHUTDOWN 4
#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7

#define VS_SHUT_RCV 1
#define VS_SHUT_SEND 2

#define VS_TX_SLOTS 32
#define VS_MAX_RX_BUFS 32
#define VS_MAX_CONNS 16
#define VS_MAX_PAYLOAD 65536
#define VS_STRAY_LOG 32
#define VS_TEXT_MAX 160
#define VS_PAT_LEN 65521

struct vs_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

/* Connection states. */
#define VS_FREE 0
#define VS_CONNECTING 1
#define VS_ESTABLISHED 2
#define VS_CLOSING 3 /* we sent SHUTDOWN(RCV|SEND), waiting for RST */
#define VS_CLOSED 4

/* How a connection ends once its data is done. */
#define VS_CLOSE_GUEST 0 /* we send SHUTDOWN(RCV|SEND) and wait for the RST */
#define VS_CLOSE_HOST 1	 /* we wait for the host's SHUTDOWN and answer RST */
#define VS_CLOSE_NONE 2	 /* we leave the connection open */

struct vs_conn {
	int state;
	u32 lport; /* guest port */
	u32 pport; /* host port */
	/* Credit: ours and the peer's. */
	u32 buf_alloc;
	u32 fwd_cnt;
	u32 last_fwd_sent;
	u32 peer_buf_alloc;
	u32 peer_fwd_cnt;
	u32 tx_cnt;
	/* What to send and what was sent. */
	u64 send_total;
	u64 sent;
	int shut_send_sent;
	int text;
	char text_out[VS_TEXT_MAX];
	u32 text_len;
	const u8 *send_pat; /* VS_PAT_LEN bytes of the guest -> host pattern */
	/* What is expected and what arrived. */
	u64 recv_expect;
	u64 received;
	u64 mismatches; /* 8-byte words (or tail bytes) that differ from the pattern */
	u64 first_mismatch;
	const u8 *recv_pat; /* VS_PAT_LEN bytes of the host -> guest pattern */
	char text_in[VS_TEXT_MAX];
	u32 text_in_len;
	/* What the peer did. */
	u32 credit_updates;
	u32 credit_requests;
	u32 shutdown_flags;
	int got_rst;
	int refused;
	int close_mode;
	int reported;
	u64 start_tsc;
	u64 end_tsc;
};

struct vs_stats {
	u64 rx_packets;
	u64 rx_short;	  /* used length below the header size */
	u64 rx_bad_len;	  /* header len beyond what the device wrote */
	u64 rx_bad_addr;  /* packets not addressed to our cid from the host cid */
	u64 tx_packets;
	u64 tx_zero_used; /* tx used elements are expected to have len 0 anyway */
	u64 stray;
};

extern u64 vs_cid;
extern struct vs_conn vs_conns[VS_MAX_CONNS];
extern struct vs_stats vs_stats;
extern struct vq vs_rxq, vs_txq, vs_evq;
extern struct vdev vs_dev;
/* Packets that matched no connection, most recent last (wraps). */
extern struct vs_hdr vs_stray[VS_STRAY_LOG];
extern u32 vs_stray_count;

/* Options of the engine, set from the command line by vs_init. */
extern u32 vs_rxbuf_size;	 /* kiln.rxbuf: bytes per RX buffer including the header */
extern u32 vs_rx_bufs;		 /* kiln.rxbufs: RX buffers kept posted */
extern u32 vs_tx_payload;	 /* kiln.txpkt: most payload bytes per RW packet */
extern u32 vs_buf_alloc;	 /* kiln.bufalloc: receive window advertised per connection */
extern u32 vs_listen_port;	 /* the port vs_poll accepts REQUESTs on (0: none) */
extern u32 vs_listen_budget;	 /* how many more connections to accept */

/* A bump allocator over RAM from 16 MiB up (the guests' images end far below). */
void *vs_alloc(u64 size, u64 align);

/* Finds and starts the vsock device, posts buffers, reads the guest cid; 0 on success. */
int vs_init(void);
/* Reclaims TX slots and handles every received packet; reposts RX buffers. */
void vs_poll(void);
/* Sends a packet (header + payload copied into a slot); 0 on success, -1 if no slot is free. */
int vs_send(const struct vs_hdr *h, const void *payload, u32 len);
/* Waits (polling) for a free TX slot, up to `ms` milliseconds; 0 if one is free. */
int vs_wait_slot(u64 ms);
/*
 * Hostile sends: queues a chain of one or two descriptors that the caller describes.
 * Returns 0 on success, -1 if no slot is free.  The slot's own buffer is at vs_slot_buf().
 */
int vs_send_chain(u64 a0, u32 l0, u16 f0, u64 a1, u32 l1, u16 f1, int two);
/* Whether the device has not yet returned slot `s` (from vs_send_chain). */
int vs_slot_busy(int s);
/* The buffer of the slot the next vs_send_chain will use (after vs_wait_slot succeeded). */
u8 *vs_next_slot_buf(void);
/* Fills in a header from the guest cid to the host. */
void vs_hdr_init(struct vs_hdr *h, u32 src_port, u32 dst_port, u16 op);

/* Fills `buf` (VS_PAT_LEN bytes, rounded up to 4) with the pattern block for `seed`. */
void vs_pattern_fill(u8 *buf, u32 seed);
/* Seeds of the two directions of a connection whose host-side port is `host_port`. */
u32 vs_seed_to_host(u32 host_port);
u32 vs_seed_to_guest(u32 host_port);

/* Starts a connection to host port `pport` from guest port `lport`; the conn or NULL. */
struct vs_conn *vs_connect(u32 lport, u32 pport);
/* Sets what a connection sends/expects and how it closes (call once established or before). */
void vs_conn_plan(struct vs_conn *c, u64 send_total, u64 recv_expect, int text, int close_mode);
/* Pushes data, credit updates and closes for every connection; call in the poll loop. */
void vs_pump(void);
/* Whether `c` is finished (closed, refused, or done with close mode NONE). */
int vs_conn_finished(const struct vs_conn *c);
/* Prints one "vsock: conn ..." line for `c` (prefix is the guest's name). */
void vs_report(const char *prefix, struct vs_conn *c);
/* Sends a CREDIT_UPDATE on `c` now (best effort). */
void vs_credit_update(struct vs_conn *c);

/* Default plan for connections accepted by the listener (set before polling). */
extern u64 vs_plan_send, vs_plan_recv;
extern int vs_plan_text, vs_plan_close;

#endif
