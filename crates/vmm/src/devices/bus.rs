//! Address-range routing of guest port I/O and MMIO exits to devices.
//!
//! vCPU threads look devices up here on every exit; the map is built before the vCPUs start
//! and never changes afterwards, so lookups need no lock on the map itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes within its address range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be inserted.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((start, entry)) = before {
            if start + entry.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, address: u64) -> Option<(u64, &Entry)> {
        let (start, entry) = self.devices.range(..=address).next_back()?;
        (address - start < entry.len).then_some((address - start, entry))
    }

    /// Routes a guest read; returns false when no device claims `address`.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a guest write; returns false when no device claims `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device that panicked once must not take
/// every later access (and so the VMM) down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .expect("first");
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0x108, 0x10)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0xf8, 0x10)
            .is_err());
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x110, 0x10)
            .expect("adjacent");
        let mut byte = [0u8];
        assert!(bus.read(0x102, &mut byte));
        assert_eq!(byte[0], 12);
        assert!(bus.write(0x110, &[7]));
        assert!(bus.read(0x110, &mut byte));
        assert_eq!(byte[0], 7);
        assert!(!bus.read(0x120, &mut byte));
        assert!(!bus.read(0xff, &mut byte));
    }
}
