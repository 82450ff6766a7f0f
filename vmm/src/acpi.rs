//! ACPI tables for a PVH-booted Linux guest.
//!
//! The machine is described as an ACPI *hardware-reduced* platform: no PM1/GPE blocks, no
//! SCI, only the FADT sleep control/status registers (power off through `\_S5`) and the
//! reset register, all in port I/O (see [`layout::pio`]). The tables are written to
//! [`layout::ACPI_START`]:
//!
//! ```text
//! ACPI_START  RSDP (16-byte aligned, so the legacy BIOS-area scan finds it too)
//!             DSDT, FADT, MADT, MCFG, XSDT (each 8-byte aligned)
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{self, pio};

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
    assert!(layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE <= 1 << 32);
    assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= 1 << 32);
    assert!(layout::IOAPIC_START < 1 << 32 && layout::LAPIC_START < 1 << 32);
    // SLP_TYPx is a 3-bit field of the sleep control register.
    assert!(pio::ACPI_S5_SLP_TYP <= 7);
    assert!(layout::ACPI_START & 0xf == 0);
};

/// Machine parameters the tables depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; their APIC ids (and ACPI processor UIDs) are `0..vcpus`.
    pub vcpus: u8,
    /// Start of the 64-bit PCI MMIO window.
    pub pci_mmio64_start: u64,
    /// Size of the 64-bit PCI MMIO window (0: no window).
    pub pci_mmio64_size: u64,
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
    /// The 64-bit PCI MMIO window wraps around the address space.
    #[error("invalid 64-bit PCI MMIO window: start {start:#x}, size {size:#x}")]
    InvalidMmio64Window { start: u64, size: u64 },
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
    let dsdt_addr = area.write(&dsdt(cfg)?)?;
    let fadt_addr = area.write(&fadt(dsdt_addr))?;
    let madt_addr = area.write(&madt(cfg.vcpus))?;
    let mcfg_addr = area.write(&mcfg())?;
    let xsdt_addr = area.write(&xsdt(&[fadt_addr, madt_addr, mcfg_addr]))?;
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

/// DSDT: `\_S5_`, the PCIe host bridge, COM1 and the motherboard resources.
fn dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    // Linux (ACPICA acpi_get_sleep_type_data) reads SLP_TYPa from element 0 and SLP_TYPb
    // from element 1; a reduced-hardware sleep writes (SLP_TYPa << 2) | SLP_EN(0x20).
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&pio::ACPI_S5_SLP_TYP, &0u8, &0u8, &0u8]),
    );
    let mut devices = pci_host_bridge(cfg)?;
    devices.extend_from_slice(&com1());
    devices.extend_from_slice(&motherboard_resources());
    let mut table = empty_table(*b"DSDT", 2);
    table.append_slice(&to_bytes(&s5));
    table.append_slice(&Scope::raw("\\_SB_".into(), devices));
    Ok(table.as_slice().to_vec())
}

/// `PCI0`: the PCIe host bridge of segment 0 and its resource windows.
///
/// No `_ADR`: a device has either `_HID` or `_ADR`, never both (ACPI 6.5 section 6.1).
fn pci_host_bridge(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let bad_window = AcpiError::InvalidMmio64Window {
        start: cfg.pci_mmio64_start,
        size: cfg.pci_mmio64_size,
    };
    let mmio64 = match cfg.pci_mmio64_size {
        0 => None,
        size => {
            let end = cfg
                .pci_mmio64_start
                .checked_add(size - 1)
                .ok_or(bad_window)?;
            Some(AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                cfg.pci_mmio64_start,
                end,
                None,
            ))
        }
    };
    let bus = AddressSpace::<u16>::new_bus_number(0, layout::PCI_ECAM_LAST_BUS.into());
    let config_port = pio::PCI_CONFIG as u16;
    let config_io = IO::new(config_port, config_port, 1, pio::PCI_CONFIG_LEN as u8);
    let io_low = AddressSpace::<u16>::new_io(0, config_port - 1, None);
    let config_end = config_port + pio::PCI_CONFIG_LEN as u16;
    // Windows start on a 256-port boundary: 0xcf8..0xcff belongs to the bridge itself.
    let io_high = AddressSpace::<u16>::new_io(config_end.next_multiple_of(0x100), 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&bus, &config_io, &io_low, &io_high, &mmio32];
    if let Some(mmio64) = &mmio64 {
        resources.push(mmio64);
    }
    let crs = ResourceTemplate::new(resources);
    Ok(to_bytes(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_UID".into(), &0u8),
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

/// `MBRD`: motherboard resources (PNP0C02) reserving the ECAM window, which Linux requires
/// before it uses MMCONFIG, and the ACPI sleep/reset ports.
fn motherboard_resources() -> Vec<u8> {
    let ecam = Memory32Fixed::new(
        true,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_SIZE as u32,
    );
    let port = pio::ACPI_SLEEP_CONTROL as u16;
    let acpi_ports = IO::new(port, port, 1, pio::ACPI_REGS_LEN as u8);
    to_bytes(&Device::new(
        "MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&ecam, &acpi_ports]),
            ),
        ],
    ))
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

/// MCFG: the ECAM window of segment 0.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, layout::PCI_ECAM_LAST_BUS);
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

    fn config(vcpus: u8) -> AcpiConfig {
        AcpiConfig {
            vcpus,
            pci_mmio64_start: 0x10_0000_0000,
            pci_mmio64_size: layout::PCI_MMIO64_SIZE,
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

    fn contains(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    /// Builds the tables, checks the RSDP and XSDT, returns [RSDP, FADT, MADT, MCFG, DSDT].
    fn build(vcpus: u8) -> (GuestMemoryMmap<()>, [Vec<u8>; 5]) {
        let mem = memory();
        let rsdp_addr = create_acpi_tables(&mem, &config(vcpus)).unwrap();
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
    fn dsdt_has_s5_and_devices() {
        let (_, [.., dsdt]) = build(2);
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
        // EISAIDs as DWordConst: PNP0A08 == 0x080ad041, PNP0A03, PNP0501, PNP0C02.
        for id in [[0x0a, 0x08], [0x0a, 0x03], [0x05, 0x01], [0x0c, 0x02]] {
            assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, id[0], id[1]]).is_some());
        }
        // COM1: IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(edge, high, exclusive) { 4 }.
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]).is_some());
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]).is_some());
        // ECAM reservation: Memory32Fixed(ReadWrite, PCI_ECAM_START, PCI_ECAM_SIZE).
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(layout::PCI_ECAM_SIZE as u32).to_le_bytes());
        assert!(contains(&dsdt, &ecam).is_some());
        // ACPI ports: IO(Decode16, 0x600, 0x600, 1, 3).
        assert!(contains(&dsdt, &[0x47, 1, 0, 6, 0, 6, 1, 3]).is_some());
        // 64-bit window: QWordMemory min/max.
        let mut mmio64 = 0x10_0000_0000u64.to_le_bytes().to_vec();
        mmio64.extend_from_slice(&(0x10_0000_0000 + layout::PCI_MMIO64_SIZE - 1).to_le_bytes());
        assert!(contains(&dsdt, &mmio64).is_some());
    }

    #[test]
    fn max_vcpus_fit() {
        let (_, [_, _, madt, ..]) = build(254);
        assert_eq!(madt.len(), 44 + 254 * 8 + 12 + 10 + 6);
    }

    #[test]
    fn rejects_bad_config() {
        let mem = memory();
        for vcpus in [0, 255] {
            let err = create_acpi_tables(&mem, &config(vcpus)).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidVcpuCount(n) if n == vcpus));
        }
        let mut cfg = config(1);
        cfg.pci_mmio64_start = u64::MAX - 0xfff;
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(matches!(err, AcpiError::InvalidMmio64Window { .. }));
        cfg.pci_mmio64_size = 0;
        assert!(create_acpi_tables(&mem, &cfg).is_ok());
        // Guest memory that does not cover the ACPI area.
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&small, &config(1)).unwrap_err();
        assert!(matches!(err, AcpiError::GuestMemory(_)));
        let too_large = TableArea::new(&mem).reserve(layout::ACPI_SIZE + 1);
        assert!(matches!(too_large, Err(AcpiError::TooLarge { .. })));
    }
}
