/*
 * vsock: runs vsock streams as the command line says, then reports each one.
 *
 *   kiln.mode=connect|listen  connect to the host, or accept connections from it
 *   kiln.port=P               host port to connect to (connection i goes to P+i), or the
 *                             guest port to listen on
 *   kiln.conns=K              how many connections (default 1)
 *   kiln.send=N               pattern bytes to send on each connection (default 0)
 *   kiln.recv=M               pattern bytes expected on each connection (default 0)
 *   kiln.text=1               send one text line instead of a pattern, show what arrives
 *   kiln.close=guest|host|none  who ends each connection once its data is done
 *   kiln.end=reset|idle       what the guest does at the end (default reset)
 *   kiln.timeout=S            give up after S seconds (default 120)
 *   kiln.rxbuf, kiln.rxbufs, kiln.txpkt, kiln.bufalloc: driver sizes (see vsock_drv.h)
 *
 * Each connection sends SHUTDOWN(SEND) once all its data went out, so the host reader sees
 * EOF.  Lines: "vsock: ready ...", "vsock: listening ..." (host may connect now), one
 * "vsock: conn ..." per connection when it finishes, and "vsock: done ...".
 */
#include "vsock_drv.h"

static int cmdline_is(const char *key, const char *want)
{
	const char *value;
	usize len;
	if (!cmdline_find(NULL, key, &value, &len))
		return 0;
	return len == strlen(want) && !strncmp(value, want, len);
}

static void finish(u32 ok, u32 total, u64 start)
{
	kprintf("vsock: stats rx-packets=%lu rx-short=%lu rx-bad-len=%lu rx-bad-addr=%lu "
		"tx-packets=%lu stray=%lu\n",
		vs_stats.rx_packets, vs_stats.rx_short, vs_stats.rx_bad_len, vs_stats.rx_bad_addr,
		vs_stats.tx_packets, vs_stats.stray);
	kprintf("vsock: done conns=%u finished=%u ms=%lu\n", total, ok,
		(rdtsc() - start) / tsc_per_ms());
	if (cmdline_is("kiln.end", "idle"))
		idle_forever();
	reset();
}

void guest_main(u8 *zp)
{
	(void)zp;
	u64 start = rdtsc();
	if (vs_init()) {
		kprintf("vsock: init failed\n");
		finish(0, 0, start);
	}
	u32 port = (u32)cmdline_u64("kiln.port", 5000);
	u32 conns = (u32)cmdline_u64("kiln.conns", 1);
	if (conns > VS_MAX_CONNS)
		conns = VS_MAX_CONNS;
	u64 send = cmdline_u64("kiln.send", 0);
	u64 recv = cmdline_u64("kiln.recv", 0);
	int text = cmdline_u64("kiln.text", 0) != 0;
	int close = VS_CLOSE_GUEST;
	if (cmdline_is("kiln.close", "host"))
		close = VS_CLOSE_HOST;
	else if (cmdline_is("kiln.close", "none"))
		close = VS_CLOSE_NONE;
	u64 timeout_ms = cmdline_u64("kiln.timeout", 120) * 1000;
	int listen = cmdline_is("kiln.mode", "listen");

	kprintf("vsock: ready cid=%lu base=0x%lx rxbufs=%u rxbuf=%u txpkt=%u bufalloc=%u "
		"queues=%u/%u/%u\n",
		vs_cid, vs_dev.base, vs_rx_bufs, vs_rxbuf_size, vs_tx_payload, vs_buf_alloc,
		vs_rxq.num, vs_txq.num, vs_evq.num);

	if (listen) {
		vs_plan_send = send;
		vs_plan_recv = recv;
		vs_plan_text = text;
		vs_plan_close = close;
		vs_listen_port = port;
		vs_listen_budget = conns;
		kprintf("vsock: listening port=%u conns=%u\n", port, conns);
	} else {
		for (u32 i = 0; i < conns; i++) {
			struct vs_conn *c = vs_connect(1024 + i, port + i);
			if (!c) {
				kprintf("vsock: cannot start connection %u\n", i);
				continue;
			}
			vs_conn_plan(c, send, recv, text, close);
		}
		kprintf("vsock: connecting port=%u conns=%u\n", port, conns);
	}

	u64 deadline = rdtsc() + timeout_ms * tsc_per_ms();
	u32 finished = 0;
	for (;;) {
		vs_poll();
		vs_pump();
		u32 started = 0;
		for (int i = 0; i < VS_MAX_CONNS; i++) {
			struct vs_conn *c = &vs_conns[i];
			if (c->state == VS_FREE)
				continue;
			started++;
			if (!c->reported && vs_conn_finished(c)) {
				vs_report("vsock", c);
				finished++;
			}
		}
		if (finished >= conns || (!listen && finished >= started))
			break;
		if (rdtsc() > deadline) {
			kprintf("vsock: timeout after %lu ms\n", timeout_ms);
			for (int i = 0; i < VS_MAX_CONNS; i++) {
				struct vs_conn *c = &vs_conns[i];
				if (c->state != VS_FREE && !c->reported)
					vs_report("vsock", c);
			}
			break;
		}
	}
	finish(finished, conns, start);
}
