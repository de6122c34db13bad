//! COM1: vm-superio's 16550 UART on the port bus, with output to stdout or a file and input
//! fed from stdin by the event loop.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqLine;
use crate::devices::BusDevice;

/// Base port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORT_COUNT: u64 = 8;

/// The serial console device.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes guest output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(irq, out),
        }
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
