//! The boot-timer device: a guest write of 123 logs how long the boot took, so boot time can
//! be measured from inside the guest without a serial parser (Firecracker's convention).

use std::time::Instant;

use crate::devices::BusDevice;

/// The value a guest writes to mark the end of its boot.
pub const MAGIC_BOOT_COMPLETE: u8 = 123;
/// Size of the device's MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;

/// Remembers when InstanceStart happened and how much CPU the process had used then.
pub struct BootTimer {
    start_wall: Instant,
    start_cpu_us: u64,
}

/// CPU time used by this process so far, in microseconds.
pub fn process_cpu_us() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes it and the pointer is live.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

impl BootTimer {
    /// A timer started now.
    pub fn new(start_wall: Instant, start_cpu_us: u64) -> Self {
        BootTimer {
            start_wall,
            start_cpu_us,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC_BOOT_COMPLETE) {
            let wall_us = self.start_wall.elapsed().as_micros() as u64;
            let cpu_us = process_cpu_us().saturating_sub(self.start_cpu_us);
            tracing::warn!(
                "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
                wall_us,
                wall_us / 1000,
                cpu_us,
                cpu_us / 1000
            );
        }
    }
}
