//! The virtio-mmio transport, version 2 ("modern"): the register window a driver uses to
//! negotiate features, set up queues and drive the device status machine.
//!
//! Every register access comes from a guest, so every value is checked: out-of-order status
//! transitions, bad queue indices and unaligned accesses are ignored (and logged), never
//! trusted.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::lock;
use crate::devices::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// "KILN" as a little-endian vendor id.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"KILN");

/// Offset of the queue-notify register, where KVM ioeventfds are attached.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 0x01;
const STATUS_DRIVER: u32 = 0x02;
const STATUS_DRIVER_OK: u32 = 0x04;
const STATUS_FEATURES_OK: u32 = 0x08;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    status: u32,
}

impl MmioTransport {
    /// Wraps `device`; its queues are created at the device's maximum sizes.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect();
        MmioTransport {
            device,
            memory,
            interrupt,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            status: 0,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn in_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn reset(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            lock(&self.device).reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // Only one new bit at a time, in the order the spec gives.
        let new = value & !self.status;
        if value & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x})",
                self.status
            );
            return;
        }
        match new {
            STATUS_ACKNOWLEDGE if self.status == 0 => self.status = value,
            STATUS_DRIVER if self.status == STATUS_ACKNOWLEDGE => self.status = value,
            STATUS_FEATURES_OK if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER => {
                let offered = lock(&self.device).avail_features();
                if self.driver_features & !offered == 0
                    && self.driver_features & VIRTIO_F_VERSION_1 != 0
                {
                    lock(&self.device).set_acked_features(self.driver_features);
                    self.status = value;
                } else {
                    tracing::debug!(
                        "virtio-mmio: refusing features {:#x} (offered {offered:#x})",
                        self.driver_features
                    );
                }
            }
            STATUS_DRIVER_OK
                if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK =>
            {
                self.activate();
                self.status = value;
            }
            _ => tracing::debug!(
                "virtio-mmio: ignoring status {value:#x} in state {:#x}",
                self.status
            ),
        }
    }

    fn activate(&mut self) {
        let usable = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.memory));
        if !usable || !self.queues.iter().any(|q| q.ready()) {
            tracing::warn!("virtio-mmio: driver started the device with invalid queues");
            self.interrupt.mark_broken();
            return;
        }
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.interrupt.mark_broken();
            return;
        };
        let result =
            lock(&self.device).activate(self.memory.clone(), queues, self.interrupt.clone());
        if let Err(e) = result {
            tracing::warn!("virtio-mmio: activation failed: {e}");
            self.interrupt.mark_broken();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC_VALUE,
            0x004 => MMIO_VERSION,
            0x008 => lock(&self.device).device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let features = lock(&self.device).avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            0x044 => self.selected_queue().map_or(0, |q| q.ready() as u32),
            0x060 => self.interrupt.status(),
            0x070 => {
                let broken = if self.interrupt.is_broken() {
                    STATUS_NEEDS_RESET
                } else {
                    0
                };
                self.status | broken
            }
            0x0fc => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue_setup = self.in_status(STATUS_FEATURES_OK, STATUS_DRIVER_OK | STATUS_FAILED);
        let features_setup = self.in_status(STATUS_DRIVER, STATUS_FEATURES_OK | STATUS_FAILED);
        match offset {
            0x014 => self.device_features_select = value,
            0x020 if features_setup => match self.driver_features_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value as u64,
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | ((value as u64) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16)
                }
            }
            0x044 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1)
                }
            }
            NOTIFY_REG_OFFSET => {
                // Normally caught by the ioeventfd; a notify that reaches us (for example a
                // 16-bit write) is forwarded by hand.
                let device = lock(&self.device);
                if let Some(event) = device.queue_events().get(value as usize) {
                    let _ = event.write(1);
                }
            }
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            0x080 if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            0x084 if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            0x090 if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            0x094 if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            0x0a0 if queue_setup => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 if queue_setup => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!("virtio-mmio: ignored write of {value:#x} at {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q)
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
