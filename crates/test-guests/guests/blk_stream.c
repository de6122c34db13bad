/*
 * blk-stream: reads the first virtio-blk device sequentially, as fast as the device lets it,
 * so that the host can measure a rate limiter from outside: kiln.blk_bytes=N bytes (default
 * 1 MiB) in requests of kiln.blk_req=N bytes (default 64 KiB, a multiple of 512), wrapping at
 * the end of the disk. Prints the request count and resets.
 */
#include "virtio.h"

#define MAX_REQ (64 * 1024)

static u8 buf[MAX_REQ] __attribute__((aligned(4096)));

void guest_main(u8 *zp)
{
	(void)zp;
	struct virtio_loc devs[8];
	if (virtio_cmdline_devices(devs, 8) < 1) {
		kprintf("blk-stream: no virtio_mmio.device= on the command line\n");
		reset();
	}
	struct vblk b;
	if (vblk_init(&b, devs[0].base, 0)) {
		kprintf("blk-stream: init failed\n");
		reset();
	}
	u64 total = cmdline_u64("kiln.blk_bytes", 1024 * 1024);
	u64 req = cmdline_u64("kiln.blk_req", MAX_REQ);
	if (req == 0 || req > MAX_REQ || req % 512)
		req = MAX_REQ;
	u64 sectors = req / 512;
	u64 sector = 0, done = 0, requests = 0, errors = 0;
	kprintf("blk-stream: start bytes=%lu req=%lu\n", total, req);
	while (done < total) {
		if (sector + sectors > b.capacity)
			sector = 0;
		if (vblk_request(&b, VIRTIO_BLK_T_IN, sector, buf, (u32)req) != 0)
			errors++;
		sector += sectors;
		done += req;
		requests++;
	}
	kprintf("blk-stream: done requests=%lu bytes=%lu errors=%lu\n", requests, done, errors);
	reset();
}
