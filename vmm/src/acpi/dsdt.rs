//! DSDT: `\_S5`, one PCIe host bridge per PCI segment, COM1 and the motherboard
//! resources.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::Aml;

use super::{empty_table, to_bytes, AcpiConfig, AcpiError};
use crate::layout::{pio, PciSegmentLayout, Window, MAX_PCI_SEGMENTS};

// Host bridge names are `PCI` and one hex digit of the segment id.
const _: () = assert!(MAX_PCI_SEGMENTS <= 16);

/// The DSDT for `cfg`.
pub(super) fn dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    // Linux (ACPICA acpi_get_sleep_type_data) reads SLP_TYPa from element 0 and SLP_TYPb
    // from element 1; a reduced-hardware sleep writes (SLP_TYPa << 2) | SLP_EN(0x20).
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&pio::ACPI_S5_SLP_TYP, &0u8, &0u8, &0u8]),
    );
    let mut devices = Vec::new();
    for segment in cfg.pci_segments {
        devices.extend_from_slice(&pci_host_bridge(segment)?);
    }
    devices.extend_from_slice(&com1());
    devices.extend_from_slice(&motherboard_resources(cfg.pci_segments)?);
    let mut table = empty_table(*b"DSDT", 2);
    table.append_slice(&to_bytes(&s5));
    table.append_slice(&Scope::raw("\\_SB_".into(), devices));
    Ok(table.as_slice().to_vec())
}

fn invalid_window(segment: &PciSegmentLayout, window: Window) -> AcpiError {
    AcpiError::InvalidPciWindow {
        segment: segment.id,
        start: window.start,
        size: window.size,
    }
}

/// `(start, end)` of `window` (inclusive end), if it is neither empty nor wraps.
fn bounds(segment: &PciSegmentLayout, window: Window) -> Result<(u64, u64), AcpiError> {
    let end = window
        .size
        .checked_sub(1)
        .and_then(|s| window.start.checked_add(s));
    end.map(|end| (window.start, end))
        .ok_or_else(|| invalid_window(segment, window))
}

/// A QWordMemory descriptor (read-write, not cacheable) of `[start, end]`.
fn qword_memory((start, end): (u64, u64)) -> AddressSpace<u64> {
    AddressSpace::new_memory(AddressSpaceCacheable::NotCacheable, true, start, end, None)
}

/// `PCIn`: the PCIe host bridge of segment `n` and its resource windows. Segment 0 also
/// decodes ports 0xCF8-0xCFF (mechanism #1 reaches segment 0 only) and forwards the
/// rest of the I/O space; other segments have no I/O.
///
/// No `_ADR`: a device has either `_HID` or `_ADR`, never both (ACPI 6.5 section 6.1).
fn pci_host_bridge(segment: &PciSegmentLayout) -> Result<Vec<u8>, AcpiError> {
    if segment.id >= MAX_PCI_SEGMENTS {
        return Err(AcpiError::InvalidPciSegment(segment.id));
    }
    let bus = AddressSpace::<u16>::new_bus_number(0, segment.last_bus.into());
    let config_port = pio::PCI_CONFIG as u16;
    let config_io = IO::new(config_port, config_port, 1, pio::PCI_CONFIG_LEN as u8);
    let io_low = AddressSpace::<u16>::new_io(0, config_port - 1, None);
    let config_end = config_port + pio::PCI_CONFIG_LEN as u16;
    // Windows start on a 256-port boundary: 0xcf8..0xcff belongs to the bridge itself.
    let io_high = AddressSpace::<u16>::new_io(config_end.next_multiple_of(0x100), 0xffff, None);
    let mmio32 = match segment.mmio32 {
        Some(w) => {
            let (start, end) = bounds(segment, w)?;
            let end = u32::try_from(end).map_err(|_| invalid_window(segment, w))?;
            Some(AddressSpace::<u32>::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                start as u32,
                end,
                None,
            ))
        }
        None => None,
    };
    let mmio64 = segment
        .mmio64
        .map(|w| bounds(segment, w).map(qword_memory))
        .transpose()?;
    let mut resources: Vec<&dyn Aml> = vec![&bus];
    if segment.id == 0 {
        resources.extend([&config_io as &dyn Aml, &io_low, &io_high]);
    }
    if let Some(w) = &mmio32 {
        resources.push(w);
    }
    if let Some(w) = &mmio64 {
        resources.push(w);
    }
    let crs = ResourceTemplate::new(resources);
    Ok(to_bytes(&Device::new(
        format!("PCI{:X}", segment.id).as_str().into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_SEG".into(), &segment.id),
            &Name::new("_UID".into(), &segment.id),
            &Name::new("_BBN".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
        ],
    )))
}

/// `COM1`: the 16550 UART at 0x3f8, IRQ 4 (edge, active high).
fn com1() -> Vec<u8> {
    let port = pio::COM1 as u16;
    let io = IO::new(port, port, 1, pio::COM1_LEN as u8);
    let irq = Interrupt::new(true, true, false, false, pio::COM1_IRQ);
    to_bytes(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &1u8),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq])),
        ],
    ))
}

/// `MBRD`: motherboard resources (PNP0C02) reserving every segment's ECAM window, which
/// Linux requires before it uses MMCONFIG, and the ACPI sleep/reset ports.
fn motherboard_resources(segments: &[PciSegmentLayout]) -> Result<Vec<u8>, AcpiError> {
    let mut resources: Vec<Box<dyn Aml>> = Vec::new();
    for segment in segments {
        let ecam = segment.ecam();
        let (start, end) = bounds(segment, ecam)?;
        resources.push(match u32::try_from(end) {
            Ok(_) => Box::new(Memory32Fixed::new(true, start as u32, ecam.size as u32)),
            Err(_) => Box::new(qword_memory((start, end))),
        });
    }
    let port = pio::ACPI_SLEEP_CONTROL as u16;
    resources.push(Box::new(IO::new(port, port, 1, pio::ACPI_REGS_LEN as u8)));
    let crs = ResourceTemplate::new(resources.iter().map(|r| r.as_ref()).collect());
    Ok(to_bytes(&Device::new(
        "MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
        ],
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{self, pci_segments};

    fn contains(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| w == &needle)
            .count()
    }

    /// The DSDT for `segments`, checked for length and checksum.
    fn build(segments: &[PciSegmentLayout]) -> Vec<u8> {
        let dsdt = dsdt(&cfg(segments)).unwrap();
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize,
            dsdt.len()
        );
        assert_eq!(dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        dsdt
    }

    /// The value of `Name(name, ...)` as an integer (ZeroOp, OneOp, Byte/WordConst).
    fn int_after(b: &[u8], name: &[u8; 4]) -> u64 {
        let at = contains(b, &[&[0x08u8][..], name].concat()).expect("name") + 5;
        match b[at] {
            0x00 => 0,
            0x01 => 1,
            0x0a => u64::from(b[at + 1]),
            0x0b => u64::from(u16::from_le_bytes([b[at + 1], b[at + 2]])),
            op => panic!("unexpected opcode {op:#x}"),
        }
    }

    /// DWordMemory min/max bytes of `w`.
    fn min_max32(w: Window) -> Vec<u8> {
        let (start, end) = (w.start as u32, (w.start + w.size - 1) as u32);
        [start.to_le_bytes(), end.to_le_bytes()].concat()
    }

    /// QWordMemory min/max bytes of `w`.
    fn min_max64(w: Window) -> Vec<u8> {
        [w.start.to_le_bytes(), (w.start + w.size - 1).to_le_bytes()].concat()
    }

    fn cfg(pci_segments: &[PciSegmentLayout]) -> AcpiConfig<'_> {
        AcpiConfig {
            vcpus: 1,
            pci_segments,
            viot: None,
        }
    }

    /// IO(Decode16, 0xcf8, 0xcf8, 1, 8): mechanism #1 ports.
    const CF8_IO: [u8; 8] = [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8];

    #[test]
    fn s5_com1_and_one_host_bridge() {
        let segments = pci_segments(1, 0x10_0000_0000);
        let dsdt = build(&segments);
        // Name(_S5_, Package(4) { SLP_TYP, 0, 0, 0 }): NameOp, name, PackageOp, PkgLength,
        // NumElements, then SLP_TYPa as a ByteConst (or Zero/One).
        let s5 = contains(&dsdt, b"\x08_S5_").expect("_S5_") + 5;
        assert_eq!(dsdt[s5], 0x12);
        assert_eq!(dsdt[s5 + 2], 4);
        let slp_typ = match dsdt[s5 + 3] {
            0x00 => 0,
            0x01 => 1,
            0x0a => dsdt[s5 + 4],
            op => panic!("unexpected opcode {op:#x}"),
        };
        assert_eq!(slp_typ, pio::ACPI_S5_SLP_TYP);

        for name in [&b"_SB_"[..], b"PCI0", b"COM1", b"MBRD", b"_CRS"] {
            assert!(contains(&dsdt, name).is_some());
        }
        assert!(contains(&dsdt, b"PCI1").is_none());
        // EISAIDs as DWordConst: PNP0A08 == 0x080ad041, PNP0A03, PNP0501, PNP0C02.
        for id in [[0x0a, 0x08], [0x0a, 0x03], [0x05, 0x01], [0x0c, 0x02]] {
            assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, id[0], id[1]]), 1);
        }
        assert_eq!(
            (int_after(&dsdt, b"_SEG"), int_after(&dsdt, b"_BBN")),
            (0, 0)
        );
        assert_eq!(count(&dsdt, &CF8_IO), 1);
        // COM1: IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(edge, high, exclusive) { 4 }.
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]).is_some());
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]).is_some());
        // ECAM reservation: Memory32Fixed(ReadWrite, PCI_ECAM_START, PCI_ECAM_SIZE).
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(layout::PCI_ECAM_SIZE as u32).to_le_bytes());
        assert_eq!(count(&dsdt, &ecam), 1);
        assert_eq!(count(&dsdt, &[0x86, 9, 0, 1]), 1);
        // ACPI ports: IO(Decode16, 0x600, 0x600, 1, 3).
        assert!(contains(&dsdt, &[0x47, 1, 0, 6, 0, 6, 1, 3]).is_some());
        // The windows: DWordMemory below 4 GiB, QWordMemory above.
        let [seg] = &segments[..] else { panic!() };
        assert!(contains(&dsdt, &min_max32(seg.mmio32.unwrap())).is_some());
        assert!(contains(&dsdt, &min_max64(seg.mmio64.unwrap())).is_some());
        assert_eq!(seg.mmio64.unwrap().start, 0x10_0000_0000);
    }

    #[test]
    fn three_host_bridges() {
        let segments = pci_segments(3, 6 << 30);
        let dsdt = build(&segments);
        let starts: Vec<usize> = (0..3)
            .map(|i| contains(&dsdt, format!("PCI{i}\x08_HID").as_bytes()).expect("PCIn"))
            .chain([contains(&dsdt, b"COM1").unwrap()])
            .collect();
        assert!(starts.is_sorted());
        for (s, bounds) in segments.iter().zip(starts.windows(2)) {
            let dev = &dsdt[bounds[0]..bounds[1]];
            assert_eq!(int_after(dev, b"_SEG"), u64::from(s.id));
            assert_eq!(int_after(dev, b"_UID"), u64::from(s.id));
            assert_eq!(int_after(dev, b"_BBN"), 0);
            // Only segment 0 decodes 0xCF8 and has I/O and 32-bit windows.
            assert_eq!(contains(dev, &CF8_IO).is_some(), s.id == 0);
            // WordIO: resource type 1.
            assert_eq!(contains(dev, &[0x88, 0x0d, 0, 1]).is_some(), s.id == 0);
            let mmio32 = min_max32(segments[0].mmio32.unwrap());
            assert_eq!(contains(dev, &mmio32).is_some(), s.id == 0);
            assert!(contains(dev, &min_max64(s.mmio64.unwrap())).is_some());
            // WordBusNumber: min 0, max last_bus.
            let bus = contains(dev, &[0x88, 0x0d, 0, 2]).expect("bus range");
            assert_eq!(dev[bus + 8..bus + 12], [0, 0, s.last_bus, 0]);
        }
        // MBRD reserves every ECAM window: segment 0 below 4 GiB, the others above.
        let mbrd = &dsdt[contains(&dsdt, b"MBRD").unwrap()..];
        assert_eq!(count(mbrd, &[0x86, 9, 0, 1]), 1);
        for s in &segments[1..] {
            assert!(contains(mbrd, &min_max64(s.ecam())).is_some());
        }
    }

    #[test]
    fn rejects_bad_windows() {
        let mut segments = pci_segments(2, 0);
        assert!(dsdt(&cfg(&segments)).is_ok());
        segments[1].mmio64 = Some(Window {
            start: u64::MAX - 0xfff,
            size: 0x2000,
        });
        let err = dsdt(&cfg(&segments)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::InvalidPciWindow { segment: 1, .. }
        ));
        segments[1].mmio64 = None;
        assert!(dsdt(&cfg(&segments)).is_ok());
        segments[0].mmio32 = Some(Window {
            start: 0xf000_0000,
            size: 0x2000_0000,
        });
        let err = dsdt(&cfg(&segments)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::InvalidPciWindow { segment: 0, .. }
        ));
        segments[0].mmio32 = Some(Window {
            start: 0xc000_0000,
            size: 0,
        });
        assert!(dsdt(&cfg(&segments)).is_err());
        segments[0].mmio32 = None;
        segments[1].id = MAX_PCI_SEGMENTS;
        let err = dsdt(&cfg(&segments)).unwrap_err();
        assert!(matches!(err, AcpiError::InvalidPciSegment(16)));
    }
}
