//! The i8042 keyboard controller, as much as guests need: the reset command (0xFE on port
//! 0x64) that ends the VM, sensible answers to Linux's probes, and Ctrl-Alt-Del injection.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::IrqLine;
use crate::devices::BusDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};

/// First port (data, 0x60); the status/command port is 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports decoded: 0x60..=0x64.
pub const I8042_PORT_COUNT: u64 = 5;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;

/// Scancode-set-2 make codes for Ctrl, Alt and Del, as Firecracker sends them.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Longest queue of bytes waiting for the guest.
const BUF_SIZE: usize = 16;

/// The controller.
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    buffer: VecDeque<u8>,
    irq: IrqLine,
    exit: ExitSignal,
}

impl I8042 {
    /// A controller that raises `irq` for keyboard data and reports resets through `exit`.
    pub fn new(irq: IrqLine, exit: ExitSignal) -> Self {
        I8042 {
            status: SB_KBD_ENABLED,
            control: CB_KBD_INT | CB_POST_OK,
            output_port: 0x01,
            pending_command: None,
            buffer: VecDeque::with_capacity(BUF_SIZE),
            irq,
            exit,
        }
    }

    fn push(&mut self, byte: u8) -> bool {
        if self.buffer.len() >= BUF_SIZE {
            return false;
        }
        self.buffer.push_back(byte);
        self.status |= SB_OUT_DATA_AVAIL;
        true
    }

    fn interrupt(&self) {
        if self.control & CB_KBD_INT != 0 {
            if let Err(e) = self.irq.trigger() {
                tracing::warn!("i8042 interrupt failed: {e}");
            }
        }
    }

    /// Queues Ctrl+Alt+Del for the guest's keyboard driver; false if the buffer is full.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if BUF_SIZE - self.buffer.len() < CTRL_ALT_DEL.len() {
            return false;
        }
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        self.interrupt();
        true
    }

    fn command(&mut self, command: u8) {
        self.status |= SB_I8042_CMD_DATA;
        match command {
            CMD_READ_CTR => {
                let control = self.control;
                self.push(control);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_READ_OUTP => {
                let port = self.output_port;
                self.push(port);
            }
            CMD_SELF_TEST => {
                self.push(0x55);
            }
            CMD_KBD_TEST => {
                self.push(0x00);
            }
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_RESET_CPU => self.exit.request(ExitReason::GuestReset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_I8042_CMD_DATA;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.output_port = value,
            Some(_) => {}
            None => {
                // A byte for the keyboard itself: acknowledge it like a real AT keyboard.
                self.push(KBD_ACK);
                match value {
                    0xff => {
                        self.push(KBD_RESET_OK);
                    }
                    0xf2 => {
                        self.push(0xab);
                        self.push(0x83);
                    }
                    _ => {}
                }
                self.interrupt();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFS_STATUS => self.status,
            OFS_DATA => {
                let byte = self.buffer.pop_front().unwrap_or(0);
                if self.buffer.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                } else {
                    self.interrupt();
                }
                byte
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFS_STATUS => self.command(value),
            OFS_DATA => self.data(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042, ExitSignal) {
        let exit = ExitSignal::new().expect("eventfd");
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        (I8042::new(irq, exit.clone()), exit)
    }

    #[test]
    fn reset_command_requests_guest_reset() {
        let (mut dev, exit) = device();
        dev.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn ctrl_alt_del_is_readable_from_the_data_port() {
        let (mut dev, _exit) = device();
        assert!(dev.send_ctrl_alt_del());
        let mut seen = Vec::new();
        let mut byte = [0u8];
        loop {
            dev.read(OFS_STATUS, &mut byte);
            if byte[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            dev.read(OFS_DATA, &mut byte);
            seen.push(byte[0]);
        }
        assert_eq!(seen, CTRL_ALT_DEL);
    }

    #[test]
    fn self_test_and_control_byte_round_trip() {
        let (mut dev, _exit) = device();
        let mut byte = [0u8];
        dev.write(OFS_STATUS, &[CMD_SELF_TEST]);
        dev.read(OFS_DATA, &mut byte);
        assert_eq!(byte[0], 0x55);
        dev.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        dev.write(OFS_DATA, &[0x47]);
        dev.write(OFS_STATUS, &[CMD_READ_CTR]);
        dev.read(OFS_DATA, &mut byte);
        assert_eq!(byte[0], 0x47);
    }
}
