//! ACPI tables (RSDP, XSDT, hardware-reduced FADT, MADT, DSDT) so that stock distribution
//! kernels, whose virtio-mmio driver cannot take devices from the command line, find every
//! virtio-mmio device (as LNRO0005), the serial port, the i8042 and the CMOS clock.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, HIMEM_START, I8042_IRQ, IOAPIC_START, RSDP_START, SERIAL_IRQ};
use crate::devices::legacy::cmos::{CMOS_PORT, CMOS_PORT_COUNT};

const OEM_ID: [u8; 6] = *b"KILNVM";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH bits: no VGA, no MSI, no PCIe ASPM control (as Firecracker sets them).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew the space below 1 MiB reserved for them.
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooBig(u64),
    /// Writing into guest memory failed.
    #[error("could not write the ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base address of its register window.
    pub address: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt line.
    pub irq: u32,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// One device in the DSDT: `_HID`, optional `_UID`, and its resources.
fn dsdt_device(body: &mut Vec<u8>, path: &str, hid: &dyn Aml, uid: Option<u64>, crs: &[&dyn Aml]) {
    let crs = aml::ResourceTemplate::new(crs.to_vec());
    let hid = aml::Name::new("_HID".into(), hid);
    let uid_value = uid.unwrap_or(0);
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(path.into(), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(body);
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    dsdt_device(
        &mut body,
        "_SB_.COM1",
        &aml::EISAName::new("PNP0501"),
        Some(0),
        &[&com1_io, &com1_irq],
    );
    let ps2_data = aml::IO::new(0x60, 0x60, 1, 1);
    let ps2_cmd = aml::IO::new(0x64, 0x64, 1, 1);
    let ps2_irq = aml::Interrupt::new(true, true, false, false, I8042_IRQ);
    dsdt_device(
        &mut body,
        "_SB_.PS2_",
        &aml::EISAName::new("PNP0303"),
        None,
        &[&ps2_data, &ps2_cmd, &ps2_irq],
    );
    // The CMOS clock (always present). Described so that Linux binds rtc_cmos through PNP
    // instead of registering a platform device at the legacy address on its own. No
    // interrupt: the device raises none, and without one in `_CRS` the driver runs without
    // alarms instead of waiting for interrupts that never come.
    let rtc_io = aml::IO::new(CMOS_PORT as u16, CMOS_PORT as u16, 1, CMOS_PORT_COUNT as u8);
    dsdt_device(
        &mut body,
        "_SB_.RTC_",
        &aml::EISAName::new("PNP0B00"),
        None,
        &[&rtc_io],
    );
    for (slot, device) in devices.iter().enumerate() {
        let window = aml::Memory32Fixed::new(true, device.address as u32, device.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, device.irq);
        dsdt_device(
            &mut body,
            &format!("_SB_.V{slot:03X}"),
            &"LNRO0005",
            Some(slot as u64),
            &[&window, &irq],
        );
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"KILNDSDT", OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"KILNMADT",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    to_bytes(&madt)
}

fn fadt(dsdt_address: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"KILNFACP", OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    to_bytes(&builder.finalize())
}

/// Writes all tables starting at [`RSDP_START`].
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpu_count: u8,
    devices: &[MmioDeviceInfo],
) -> Result<(), AcpiError> {
    let align = |a: u64| (a + 7) & !7;
    let mut next = align(RSDP_START + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let address = next;
        if address + bytes.len() as u64 > HIMEM_START {
            return Err(AcpiError::TooBig(address + bytes.len() as u64 - RSDP_START));
        }
        mem.write_slice(bytes, GuestAddress(address))?;
        next = align(address + bytes.len() as u64);
        Ok(address)
    };
    let dsdt_address = place(&dsdt(devices))?;
    let fadt_address = place(&fadt(dsdt_address))?;
    let madt_address = place(&madt(vcpu_count))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"KILNXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let xsdt_address = place(&to_bytes(&xsdt))?;
    mem.write_slice(
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_address)),
        GuestAddress(RSDP_START),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_list_every_device() {
        let devices = [
            MmioDeviceInfo {
                address: 0xc000_1000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                address: 0xc000_2000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let dsdt = dsdt(&devices);
        assert!(checksum_ok(&dsdt));
        let text = String::from_utf8_lossy(&dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        let madt = madt(4);
        assert!(checksum_ok(&madt));
        // Header (44 bytes) + 4 local APICs (8 bytes) + 1 IOAPIC (12 bytes).
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        assert!(checksum_ok(&fadt(0x1234)));
    }

    /// The AML of a `_HID` holding an EISA id: NameOp, "_HID", DWordPrefix, the compressed id.
    fn hid_eisa(id: [u8; 4]) -> Vec<u8> {
        let mut bytes = vec![0x08];
        bytes.extend_from_slice(b"_HID");
        bytes.push(0x0c);
        bytes.extend_from_slice(&id);
        bytes
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_describes_the_cmos_clock_at_its_ports_without_an_interrupt() {
        let dsdt = dsdt(&[]);
        assert!(checksum_ok(&dsdt));
        // PNP0B00 compressed: "PNP" = 0x41d0, product 0x0b00.
        assert!(contains(&dsdt, &hid_eisa([0x41, 0xd0, 0x0b, 0x00])));
        assert!(contains(&dsdt, b"RTC_"));
        // Its _CRS: a 10-byte buffer holding exactly one I/O port descriptor (decodes 16-bit,
        // 0x70..=0x70, alignment 1, length 2) and the end tag, so no interrupt.
        let crs = [
            0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x79, 0x00,
        ];
        let rtc = dsdt
            .windows(4)
            .position(|w| w == b"RTC_")
            .expect("RTC_ device");
        assert!(contains(&dsdt[rtc..], &crs));
        // The other legacy devices keep their ids: PNP0501 (COM1) and PNP0303 (i8042).
        assert!(contains(&dsdt, &hid_eisa([0x41, 0xd0, 0x05, 0x01])));
        assert!(contains(&dsdt, &hid_eisa([0x41, 0xd0, 0x03, 0x03])));
    }

    #[test]
    fn rsdp_points_at_an_xsdt_listing_fadt_and_madt() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("memory");
        write_tables(&mem, 2, &[]).expect("tables");
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_START))
            .expect("rsdp");
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]));
        assert!(checksum_ok(&rsdp));
        let xsdt_address = u64::from_le_bytes(rsdp[24..32].try_into().expect("8 bytes"));
        let mut header = [0u8; 52];
        mem.read_slice(&mut header, GuestAddress(xsdt_address))
            .expect("xsdt");
        assert_eq!(&header[0..4], b"XSDT");
        assert_eq!(
            u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")),
            52
        );
    }
}
