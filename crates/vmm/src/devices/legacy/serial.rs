//! COM1: vm-superio's 16550 UART on the port bus, with output to stdout or a file and input
//! fed from stdin by the event loop.
//!
//! The UART's input FIFO holds 64 bytes. Host input is read only while the FIFO has room, and
//! when it fills, the event loop stops watching stdin until the guest has drained it (the
//! [`InputDrained`] eventfd), so a paste or a piped file reaches the guest whole and in order
//! instead of being dropped byte by byte.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::IrqLine;
use crate::devices::BusDevice;

/// Base port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORT_COUNT: u64 = 8;

/// Signals the event loop when the guest has read the last byte of the input FIFO, so that
/// stdin is watched again only when its bytes have somewhere to go.
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::debug!("cannot signal the serial input drain: {e}");
        }
    }
}

/// The serial console device.
pub struct SerialConsole {
    uart: Serial<IrqLine, InputDrained, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes guest output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let drained = InputDrained(EventFd::new(EFD_NONBLOCK)?);
        Ok(SerialConsole {
            uart: Serial::with_events(irq, drained, out),
        })
    }

    /// Queues host input for the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let take = bytes.len().min(room);
        if take == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The eventfd that becomes readable when the guest empties the input FIFO.
    pub fn input_drained_fd(&self) -> RawFd {
        self.uart.events().0.as_raw_fd()
    }

    /// Consumes a pending drain signal.
    pub fn clear_input_drained(&self) {
        // EAGAIN (nothing pending) is the only expected error and means the same as success.
        let _ = self.uart.events().0.read();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *value) {
                tracing::debug!("serial output failed: {e:?}");
            }
        }
    }
}
