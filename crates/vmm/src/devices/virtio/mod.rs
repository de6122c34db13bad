//! Virtio: the device trait, interrupt plumbing, the virtio-mmio transport and the devices.
//!
//! The transport (vCPU threads) and the device's queue processing (event loop) share a device
//! behind a mutex; queue notifications arrive through KVM ioeventfds and interrupts leave
//! through irqfds, so neither path exits to the VMM for a doorbell.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

/// Helpers the device unit tests share.
#[cfg(test)]
pub(crate) mod test_util {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    /// A split queue of `size` entries laid out from `base` in `memory`.
    pub fn queue_at(memory: &GuestMemoryMmap, base: u64, size: u16) -> Queue {
        let mut queue = Queue::new(size).expect("queue");
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(memory));
        queue
    }
}

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device type of a block device.
pub const TYPE_BLOCK: u32 = 2;

/// Feature bit: the device conforms to virtio 1.x (mandatory for the v2 MMIO transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// A device's interrupt line, its interrupt status register, and its "needs reset" flag.
pub struct VirtioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt that fires through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd,
        }
    }

    /// The eventfd KVM injects the interrupt from.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt failed: {e}");
        }
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_RING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) after the driver violated the spec, and
    /// tells the driver through a configuration-change interrupt.
    pub fn mark_broken(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    /// Whether the device has marked itself broken.
    pub fn is_broken(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Copies the part of a device's configuration space a driver reads; bytes past its end
/// read as zero (the driver may probe any offset).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up queues the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueue(String),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Records what the driver accepted.
    fn set_acked_features(&mut self, features: u64);
    /// Driver read of the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver write of the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, which KVM signals when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Starts processing on the driver's queues.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops processing (driver reset); the transport then forgets the queues.
    fn reset(&mut self);
}
