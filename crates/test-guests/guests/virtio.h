/*
 * A polling virtio-mmio (version 2) driver for one virtio-blk queue, small enough to read in
 * one sitting.  The queue lives in static memory (identity-mapped, so guest virtual ==
 * physical) and requests are sent one at a time.
 */
#ifndef KILN_VIRTIO_H
#define KILN_VIRTIO_H

#include "rt.h"

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976
#define VIRTIO_ID_BLOCK 2

#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1UL << 32)
#define VIRTIO_RING_F_INDIRECT_DESC (1UL << 28)
#define VIRTIO_BLK_F_RO (1UL << 5)
#define VIRTIO_BLK_F_FLUSH (1UL << 9)

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* Descriptors the driver uses; also what the hostile guest builds chains from. */
#define VQ_SIZE 16

/* Results of a request besides the device's status byte. */
#define REQ_TIMEOUT (-1)
#define REQ_NEEDS_RESET (-2)

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[VQ_SIZE];
	u16 used_event;
};

struct virtq_used_elem {
	u32 id;
	u32 len;
};

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[VQ_SIZE];
	u16 avail_event;
};

struct virtio_blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* A virtio-mmio device as `virtio_mmio.device=<size>@<base>:<irq>` describes it. */
struct virtio_loc {
	u64 base;
	u64 size;
	u32 irq;
};

struct vblk {
	u64 base;
	u64 offered;
	u64 accepted;
	u64 capacity;
	u16 num;
	u16 last_used;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	/* The last used element, after vblk_wait_used returned 1. */
	u32 used_id;
	u32 used_len;
};

/* Parses every virtio_mmio.device= on the command line; returns how many were found. */
int virtio_cmdline_devices(struct virtio_loc *out, int max);
/* Writes 0 to Status and waits (bounded) for the device to read back 0; returns 0 on success. */
int virtio_reset(u64 base);
/* Resets and initialises a virtio-blk device with queue 0; prints why and returns <0 on failure. */
int vblk_init(struct vblk *b, u64 base, u64 wanted_features);
/* Makes descriptor `head` available and notifies the device. */
void vblk_submit(struct vblk *b, u16 head);
/* Polls the used ring: 1 = an element arrived, REQ_TIMEOUT, or REQ_NEEDS_RESET. */
int vblk_wait_used(struct vblk *b, u64 budget);
/*
 * Sends a well-formed request (header, optional data, status) and waits for it.  Returns the
 * device's status byte or REQ_TIMEOUT / REQ_NEEDS_RESET.
 */
int vblk_request(struct vblk *b, u32 type, u64 sector, void *data, u32 len);
/* Prints a request result as a number or as "timeout" / "needs-reset". */
void print_req_status(int status);

#endif
