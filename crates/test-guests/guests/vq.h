/*
 * A generic polling virtio-mmio (version 2) driver core: find a device by id, negotiate
 * features, and run any number of split virtqueues of up to VQ_MAX entries each.  Devices
 * other than virtio-blk (vsock, rng) build on this; virtio.c keeps its own simpler
 * single-queue virtio-blk driver.
 */
#ifndef KILN_VQ_H
#define KILN_VQ_H

#include "virtio.h"

#define VQ_MAX 64

#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

struct vq_avail_n {
	u16 flags;
	u16 idx;
	u16 ring[VQ_MAX];
	u16 used_event;
};

struct vq_used_n {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[VQ_MAX];
	u16 avail_event;
};

/* The three rings of one queue, in one page. */
struct vq_mem {
	struct virtq_desc desc[VQ_MAX];
	struct vq_avail_n avail;
	struct vq_used_n used __attribute__((aligned(8)));
} __attribute__((aligned(4096)));

struct vq {
	u64 base;
	u16 index;
	u16 num;
	u16 last_used;
	volatile struct virtq_desc *desc;
	volatile struct vq_avail_n *avail;
	volatile struct vq_used_n *used;
};

struct vdev {
	u64 base;
	u32 status;
	u64 offered;
	u64 accepted;
};

/* The base of the first virtio-mmio device with `device_id` on the command line, or 0. */
u64 vdev_find(u32 device_id);
/* Resets the device, negotiates `wanted` (plus VERSION_1) and sets FEATURES_OK; 0 on success. */
int vdev_begin(struct vdev *d, u64 base, u32 device_id, u64 wanted);
/* Sets up queue `index` with at most `want` entries in `mem`; 0 on success. */
int vq_setup(struct vdev *d, struct vq *q, u16 index, struct vq_mem *mem, u16 want);
/* Sets DRIVER_OK and checks the device took it; 0 on success. */
int vdev_ready(struct vdev *d);
/* Reads a 32-bit config field at `offset` from the device config space. */
u32 vdev_config32(struct vdev *d, u32 offset);
/* Whether the device set DEVICE_NEEDS_RESET. */
int vdev_needs_reset(struct vdev *d);

/* Sets descriptor `i` of `q`. */
void vq_set_desc(struct vq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next);
/* Makes chain `head` available (without notifying). */
void vq_add(struct vq *q, u16 head);
/* Tells the device queue `q` has new buffers. */
void vq_notify(struct vq *q);
/* Takes one used element if there is one: returns 1 and stores its id and length, else 0. */
int vq_get_used(struct vq *q, u32 *id, u32 *len);

/* TSC ticks per millisecond, from CPUID (a guess of 2 GHz if CPUID does not say). */
u64 tsc_per_ms(void);

#endif
