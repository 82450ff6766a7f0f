//! ACPI tables for a PVH-booted Linux guest.
//!
//! The machine is described as an ACPI *hardware-reduced* platform: no PM1/GPE blocks, no
//! SCI, only the FADT sleep control/status registers (power off through `\_S5`) and the
//! reset register, all in port I/O (see [`layout::pio`]). The tables are written to
//! [`layout::ACPI_START`]:
//!
//! ```text
//! ACPI_START  RSDP (16-byte aligned, so the legacy BIOS-area scan finds it too)
//!             DSDT, FADT, MADT, MCFG, [VIOT,] XSDT (each 8-byte aligned)
//! ```
//!
//! The VIOT (`viot.rs`) is there when a virtio-iommu is.
//!
//! Each PCI segment gets an MCFG allocation and a host bridge in the DSDT (`dsdt.rs`).

mod dsdt;
pub mod viot;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{self, pio, PciSegmentLayout};

/// OEM id of every table.
const OEM_ID: [u8; 6] = *b"FERRIO";
/// OEM table id of every table.
const OEM_TABLE_ID: [u8; 8] = *b"FERRIOVM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Size of the standard ACPI table header.
const HEADER_LEN: u32 = 36;
/// Alignment of the tables after the RSDP.
const TABLE_ALIGN: u64 = 8;

/// IAPC_BOOT_ARCH: no VGA controller to probe.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: no CMOS RTC at ports 0x70/0x71.
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

// The AML and table fields below are 16/32 bits wide: check the layout constants fit.
const _: () = {
    assert!(pio::COM1 + pio::COM1_LEN <= 0x1_0000 && pio::COM1_LEN <= 0xff);
    assert!(pio::ACPI_RESET < 0x1_0000 && pio::ACPI_SLEEP_CONTROL < 0x1_0000);
    assert!(pio::ACPI_SLEEP_STATUS < 0x1_0000 && pio::ACPI_REGS_LEN <= 0xff);
    assert!(pio::PCI_CONFIG + pio::PCI_CONFIG_LEN <= 0x1_0000 && pio::PCI_CONFIG_LEN <= 0xff);
    assert!(layout::IOAPIC_START < 1 << 32 && layout::LAPIC_START < 1 << 32);
    // SLP_TYPx is a 3-bit field of the sleep control register.
    assert!(pio::ACPI_S5_SLP_TYP <= 7);
    assert!(layout::ACPI_START & 0xf == 0);
};

/// Machine parameters the tables depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs; their APIC ids (and ACPI processor UIDs) are `0..vcpus`.
    pub vcpus: u8,
    /// The PCI segments ([`layout::pci_segments`]): one MCFG entry and one host bridge
    /// each (ids below [`layout::MAX_PCI_SEGMENTS`]).
    pub pci_segments: &'a [PciSegmentLayout],
    /// The virtio-iommu and its endpoints, when there is one.
    pub viot: Option<&'a viot::ViotConfig>,
}

/// Errors of [`create_acpi_tables`].
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {needed:#x} bytes but only {available:#x} are reserved")]
    TooLarge { needed: u64, available: u64 },
    /// APIC ids must be in 0..=254 (255 is the xAPIC broadcast id) and there must be a vCPU.
    #[error("invalid vCPU count {0} for the MADT (must be 1..=254)")]
    InvalidVcpuCount(u8),
    /// A PCI segment's window is empty, wraps around the address space, or (32-bit
    /// window) ends above 4 GiB.
    #[error("invalid window of PCI segment {segment}: start {start:#x}, size {size:#x}")]
    InvalidPciWindow { segment: u16, start: u64, size: u64 },
    /// The DSDT names host bridges `PCI0`..`PCIF`.
    #[error("PCI segment {0} is out of range (at most {max})", max = layout::MAX_PCI_SEGMENTS - 1)]
    InvalidPciSegment(u16),
    /// Writing the tables to guest memory failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// Builds the ACPI tables, writes them to guest memory at [`layout::ACPI_START`] and returns
/// the address of the RSDP (for the PVH start info's `rsdp_paddr`).
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus == u8::MAX {
        return Err(AcpiError::InvalidVcpuCount(cfg.vcpus));
    }
    let mut area = TableArea::new(mem);
    // The RSDP needs the XSDT address, which is known last: reserve its slot first.
    let rsdp_addr = area.reserve(Rsdp::len() as u64)?;
    let dsdt_addr = area.write(&dsdt::dsdt(cfg)?)?;
    let fadt_addr = area.write(&fadt(dsdt_addr))?;
    let madt_addr = area.write(&madt(cfg.vcpus))?;
    let mcfg_addr = area.write(&mcfg(cfg.pci_segments))?;
    let mut tables = vec![fadt_addr, madt_addr, mcfg_addr];
    if let Some(v) = cfg.viot {
        tables.push(area.write(&viot::viot(v))?);
    }
    let xsdt_addr = area.write(&xsdt(&tables))?;
    area.write_at(rsdp_addr, &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0)))?;
    Ok(rsdp_addr)
}

/// Bump allocator over the ACPI area of guest memory.
struct TableArea<'a, M> {
    mem: &'a M,
    next: u64,
}

impl<'a, M: GuestMemory> TableArea<'a, M> {
    fn new(mem: &'a M) -> Self {
        Self {
            mem,
            next: layout::ACPI_START,
        }
    }

    /// Reserves `len` bytes at the next 8-byte-aligned address.
    fn reserve(&mut self, len: u64) -> Result<GuestAddress, AcpiError> {
        let start = self.next.next_multiple_of(TABLE_ALIGN);
        let end = start + len;
        let needed = end - layout::ACPI_START;
        if needed > layout::ACPI_SIZE {
            return Err(AcpiError::TooLarge {
                needed,
                available: layout::ACPI_SIZE,
            });
        }
        self.next = end;
        Ok(GuestAddress(start))
    }

    /// Writes `table` at the next 8-byte-aligned address and returns that address.
    fn write(&mut self, table: &[u8]) -> Result<GuestAddress, AcpiError> {
        let addr = self.reserve(table.len() as u64)?;
        self.write_at(addr, table)?;
        Ok(addr)
    }

    /// Writes `bytes` at `addr` (a slot returned by [`Self::reserve`]).
    fn write_at(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), AcpiError> {
        Ok(self.mem.write_slice(bytes, addr)?)
    }
}

/// Serialises an acpi_tables object.
fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// An empty table (header only) with ferrio's OEM fields, to be filled with `append_slice`.
fn empty_table(signature: [u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        signature,
        HEADER_LEN,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    )
}

/// An 8-bit System I/O register at `port`.
fn io_register(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// FADT (6.5): hardware-reduced, with the sleep control/status and reset registers.
fn fadt(dsdt_addr: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = io_register(pio::ACPI_RESET);
    fadt.reset_value = pio::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(pio::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(pio::ACPI_SLEEP_STATUS);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERRIO\0\0").into();
    to_bytes(&fadt.finalize())
}

/// MADT (revision 5): local APICs `0..vcpus`, the IOAPIC, IRQ0 -> GSI 2, LINT1 NMI.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = empty_table(*b"APIC", 5);
    let mut fields = (layout::LAPIC_START as u32).to_le_bytes().to_vec();
    fields.extend_from_slice(&0u32.to_le_bytes()); // flags: no PCAT_COMPAT
    table.append_slice(&fields);
    for id in 0..vcpus {
        let lapic = ProcessorLocalApic::new(id, id, EnabledStatus::Enabled);
        table.append_slice(&to_bytes(&lapic));
    }
    let ioapic = IoApic::new(0, layout::IOAPIC_START as u32, 0);
    table.append_slice(&to_bytes(&ioapic));
    // Interrupt Source Override (type 2): ISA bus, IRQ 0 -> GSI 2, conforming polarity/trigger.
    let mut iso = vec![2, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    table.append_slice(&iso);
    // Local APIC NMI (type 4): all processors (0xff), conforming flags, LINT1.
    table.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    table.as_slice().to_vec()
}

/// MCFG: the ECAM window of every PCI segment.
fn mcfg(segments: &[PciSegmentLayout]) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for s in segments {
        mcfg.add_ecam(s.ecam_base, s.id, 0, s.last_bus);
    }
    to_bytes(&mcfg)
}

/// XSDT listing `tables`.
fn xsdt(tables: &[GuestAddress]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in tables {
        xsdt.add_entry(table.0);
    }
    to_bytes(&xsdt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// RAM up to 64 GiB: segment 0's 64-bit window starts there.
    const RAM_END: u64 = 0x10_0000_0000;

    fn config(vcpus: u8, pci_segments: &[PciSegmentLayout]) -> AcpiConfig<'_> {
        AcpiConfig {
            vcpus,
            pci_segments,
            viot: None,
        }
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads the table at `addr`, checking its signature, length, checksum and alignment.
    fn table(mem: &GuestMemoryMmap<()>, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert_eq!(addr % 8, 0);
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(addr + len as u64 <= layout::ACPI_START + layout::ACPI_SIZE);
        let bytes = read(mem, addr, len);
        assert_eq!(sum(&bytes), 0, "checksum of {signature:?}");
        assert_eq!(&bytes[10..16], b"FERRIO");
        bytes
    }

    /// Builds the tables for one PCI segment, checks the RSDP and XSDT, returns
    /// [RSDP, FADT, MADT, MCFG, DSDT].
    fn build(vcpus: u8) -> (GuestMemoryMmap<()>, [Vec<u8>; 5]) {
        build_with(vcpus, 1)
    }

    /// [`build`] with `segments` PCI segments.
    fn build_with(vcpus: u8, segments: u16) -> (GuestMemoryMmap<()>, [Vec<u8>; 5]) {
        let mem = memory();
        let segments = layout::pci_segments(segments, RAM_END);
        let rsdp_addr = create_acpi_tables(&mem, &config(vcpus, &segments)).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(layout::ACPI_START));
        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
        let mcfg = table(&mem, u64_at(&xsdt, 52), b"MCFG");
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        (mem, [rsdp, fadt, madt, mcfg, dsdt])
    }

    #[test]
    fn fadt_is_hardware_reduced() {
        let (_, [_, fadt, ..]) = build(1);
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5)); // FADT 6.5
        assert_eq!(u32_at(&fadt, 40), 0); // 32-bit DSDT unused
        let flags = u32_at(&fadt, 112);
        assert_eq!(flags, (1 << 20) | (1 << 10)); // HW_REDUCED_ACPI | RESET_REG_SUP
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            (1 << 2) | (1 << 5)
        );
        // GAS: System I/O, 8 bits, offset 0, byte access, port.
        let gas = |off: usize, port: u64| {
            assert_eq!(fadt[off..off + 4], [1, 8, 0, 1]);
            assert_eq!(u64_at(&fadt, off + 4), port);
        };
        gas(116, pio::ACPI_RESET);
        assert_eq!(fadt[128], pio::ACPI_RESET_VALUE);
        gas(244, pio::ACPI_SLEEP_CONTROL);
        gas(256, pio::ACPI_SLEEP_STATUS);
        assert_eq!(&fadt[268..276], b"FERRIO\0\0");
    }

    #[test]
    fn madt_lists_vcpus_ioapic_and_overrides() {
        let (_, [_, _, madt, ..]) = build(4);
        assert_eq!(u32_at(&madt, 36), layout::LAPIC_START as u32);
        assert_eq!(u32_at(&madt, 40), 0);
        let mut lapic_ids = Vec::new();
        let (mut ioapics, mut isos, mut nmis) = (0, 0, 0);
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            let entry = &madt[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(entry[2], entry[3]); // processor UID == APIC id
                    assert_eq!(u32_at(entry, 4), 1); // enabled
                    lapic_ids.push(entry[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(entry[2], 0);
                    assert_eq!(u32_at(entry, 4), layout::IOAPIC_START as u32);
                    assert_eq!(u32_at(entry, 8), 0);
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(entry, [2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
                    isos += 1;
                }
                4 => {
                    assert_eq!(entry, [4, 6, 0xff, 0, 0, 1]);
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapic_ids, [0, 1, 2, 3]);
        assert_eq!((ioapics, isos, nmis), (1, 1, 1));
    }

    #[test]
    fn mcfg_covers_ecam() {
        let (_, [.., mcfg, _]) = build(1);
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(&mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], [0, 0, 0, layout::PCI_ECAM_LAST_BUS]);
    }

    #[test]
    fn three_segments() {
        let segments = layout::pci_segments(3, RAM_END);
        let (_, [_, _, _, mcfg, dsdt]) = build_with(2, 3);
        // One 16-byte allocation per segment: base, segment, start bus, end bus.
        assert_eq!(mcfg.len(), 36 + 8 + 3 * 16);
        for (i, s) in segments.iter().enumerate() {
            let entry = &mcfg[44 + 16 * i..60 + 16 * i];
            assert_eq!(u64_at(entry, 0), s.ecam_base);
            assert_eq!(entry[8..12], [s.id as u8, (s.id >> 8) as u8, 0, s.last_bus]);
        }
        assert!(segments[1].ecam_base > 1 << 32);
        // The DSDT's host bridges are tested in dsdt.rs; here: one per segment.
        let host_bridges = dsdt
            .windows(5)
            .filter(|w| *w == [0x0c, 0x41, 0xd0, 0x0a, 0x08]);
        assert_eq!(host_bridges.count(), 3);
    }

    #[test]
    fn max_vcpus_fit() {
        let (_, [_, _, madt, ..]) = build(254);
        assert_eq!(madt.len(), 44 + 254 * 8 + 12 + 10 + 6);
    }

    #[test]
    fn rejects_bad_config() {
        let mem = memory();
        let mut segments = layout::pci_segments(1, RAM_END);
        for vcpus in [0, 255] {
            let err = create_acpi_tables(&mem, &config(vcpus, &segments)).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidVcpuCount(n) if n == vcpus));
        }
        segments[0].mmio64 = Some(layout::Window {
            start: u64::MAX - 0xfff,
            size: layout::PCI_MMIO64_SIZE,
        });
        let err = create_acpi_tables(&mem, &config(1, &segments)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::InvalidPciWindow { segment: 0, .. }
        ));
        segments[0].mmio64 = None;
        assert!(create_acpi_tables(&mem, &config(1, &segments)).is_ok());
        // Guest memory that does not cover the ACPI area.
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&small, &config(1, &segments)).unwrap_err();
        assert!(matches!(err, AcpiError::GuestMemory(_)));
        let too_large = TableArea::new(&mem).reserve(layout::ACPI_SIZE + 1);
        assert!(matches!(too_large, Err(AcpiError::TooLarge { .. })));
    }
}
