//! Legacy PC devices a Linux guest expects to find: the 16550 serial port, the i8042
//! keyboard controller (for reset and Ctrl-Alt-Del) and the CMOS real-time clock.

pub mod cmos;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line backed by a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
