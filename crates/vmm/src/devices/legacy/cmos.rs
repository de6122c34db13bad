//! The CMOS real-time clock on ports 0x70/0x71, reporting the host's UTC time.
//!
//! Linux probes it at boot; without sensible answers (update-not-in-progress, valid RAM) the
//! guest waits out a multi-second timeout.

use crate::devices::BusDevice;

/// Index port; 0x71 is the data port.
pub const CMOS_PORT: u64 = 0x70;
/// Ports decoded.
pub const CMOS_PORT_COUNT: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1.024 kHz periodic rate, update not in progress.
const REG_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD.
const REG_B_VALUE: u8 = 0x02;
/// RAM and time valid.
const REG_D_VALUE: u8 = 0x80;

/// The RTC and its 128 bytes of CMOS RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = REG_A_VALUE;
        ram[REG_B as usize] = REG_B_VALUE;
        ram[REG_D as usize] = REG_D_VALUE;
        Cmos { index: 0, ram }
    }
}

fn bcd(value: i32) -> u8 {
    let v = value.rem_euclid(100) as u8;
    ((v / 10) << 4) | (v % 10)
}

fn utc_now() -> libc::tm {
    // SAFETY: `time` with a null pointer only returns the current time.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: an all-zero `tm` is a valid value for this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call; gmtime_r is thread-safe.
    unsafe { libc::gmtime_r(&now, &mut tm) };
    tm
}

impl Cmos {
    fn register(&self, index: u8) -> u8 {
        let tm = || utc_now();
        match index {
            REG_SECONDS => bcd(tm().tm_sec),
            REG_MINUTES => bcd(tm().tm_min),
            REG_HOURS => bcd(tm().tm_hour),
            REG_WEEKDAY => bcd(tm().tm_wday + 1),
            REG_DAY => bcd(tm().tm_mday),
            REG_MONTH => bcd(tm().tm_mon + 1),
            REG_YEAR => bcd(tm().tm_year),
            REG_CENTURY => bcd((tm().tm_year + 1900) / 100),
            REG_C => 0,
            _ => self.ram[(index & 0x7f) as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index masks NMIs on real hardware; only the index matters here.
            0 => self.index = value & 0x7f,
            _ => match self.index {
                REG_A | REG_B | REG_C | REG_D => {}
                index => self.ram[index as usize] = value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_bcd_time_and_no_update_in_progress() {
        let mut cmos = Cmos::default();
        let mut byte = [0u8];
        cmos.write(0, &[REG_A]);
        cmos.read(1, &mut byte);
        assert_eq!(byte[0] & 0x80, 0, "update-in-progress must be clear");
        cmos.write(0, &[REG_MONTH]);
        cmos.read(1, &mut byte);
        assert!((0x01..=0x12).contains(&byte[0]));
        cmos.write(0, &[0x80 | REG_D]);
        cmos.read(1, &mut byte);
        assert_eq!(byte[0], REG_D_VALUE);
    }
}
