//! Guest physical address map and port-I/O assignments of the ferrio x86_64 machine.
//!
//! ```text
//! 0x0000_0000  low RAM (real-mode IVT, boot structures, ACPI tables, kernel, initramfs)
//! 0x000e_0000  ACPI tables (128 KiB, reserved in e820)
//! 0x0010_0000  RAM ...
//! 0xc000_0000  32-bit PCI MMIO window (512 MiB)            } hole below 4 GiB:
//! 0xe000_0000  PCIe ECAM, segment 0, buses 0-255 (256 MiB) } no RAM here
//! 0xfec0_0000  IOAPIC                                      }
//! 0xfee0_0000  LAPIC                                       }
//! 0x1_0000_0000 RAM above 4 GiB (when memory > 3 GiB)
//! then          64-bit PCI MMIO window of segment 0 (1 GiB aligned, 64 GiB)
//! then          segments 1..n: their ECAM windows (256 MiB each), then from the next
//!               1 GiB boundary their 64-bit MMIO windows (64 GiB each)
//! ```
//!
//! PCI segments are described as data ([`PciSegmentLayout`], from [`pci_segments`]):
//! segment 0 owns the windows below 4 GiB (and ports 0xCF8/0xCFC); further segments
//! get an ECAM window and a 64-bit window above segment 0's, and no 32-bit window (the
//! hole below 4 GiB is not split), so their devices need 64-bit BARs.

/// Boot GDT (PVH 32-bit entry and 64-bit bzImage entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` (the "zero page") for bzImage boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for the 64-bit bzImage entry (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux x86 COMMAND_LINE_SIZE is 2048; newer kernels 4096).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area: RAM below it is usable, above it reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x20000;
/// First byte after the legacy BIOS area: the kernel loads at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the MMIO hole below 4 GiB: RAM below 4 GiB ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration access (ECAM) for segment 0, buses 0..=255.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const PCI_ECAM_LAST_BUS: u8 = 255;
/// IOAPIC and local APIC register windows.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// RAM that does not fit below the hole continues here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI MMIO window placed above the top of RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Port I/O map.
pub mod pio {
    /// COM1 16550 UART (IRQ 4).
    pub const COM1: u64 = 0x3f8;
    pub const COM1_LEN: u64 = 8;
    pub const COM1_IRQ: u32 = 4;
    /// i8042 keyboard controller: only the reset command (0xfe on port 0x64) is emulated.
    pub const I8042: u64 = 0x60;
    pub const I8042_LEN: u64 = 5;
    /// PCI configuration mechanism #1 (0xcf8 address, 0xcfc data).
    pub const PCI_CONFIG: u64 = 0xcf8;
    pub const PCI_CONFIG_LEN: u64 = 8;
    /// ACPI hardware-reduced sleep control/status and reset registers (one byte each).
    pub const ACPI_SLEEP_CONTROL: u64 = 0x600;
    pub const ACPI_SLEEP_STATUS: u64 = 0x601;
    pub const ACPI_RESET: u64 = 0x602;
    pub const ACPI_REGS_LEN: u64 = 3;
    /// Value the guest writes to the reset register.
    pub const ACPI_RESET_VALUE: u8 = 0x1;
    /// SLP_TYPx value of \_S5 in the DSDT.
    pub const ACPI_S5_SLP_TYP: u8 = 5;
}

/// Number of IOAPIC pins of the in-kernel irqchip.
pub const IOAPIC_PINS: u32 = 24;

/// 64-bit PCI MMIO window: from the first 1 GiB boundary above the top of RAM.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    ram_end.max(RAM_64BIT_START).div_ceil(GIB) * GIB
}

/// Most PCI segments [`pci_segments`] lays out.
pub const MAX_PCI_SEGMENTS: u16 = 16;

/// A guest physical address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
}

impl Window {
    /// First address after the window.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where one PCI segment (PCI domain) lives in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSegmentLayout {
    /// Segment number (`_SEG`, the MCFG entry's segment, Linux's PCI domain).
    pub id: u16,
    /// ECAM window of buses `0..=last_bus`.
    pub ecam_base: u64,
    pub last_bus: u8,
    /// 32-bit BAR window (segment 0 only).
    pub mmio32: Option<Window>,
    /// 64-bit BAR window.
    pub mmio64: Option<Window>,
}

impl PciSegmentLayout {
    /// The ECAM window: 1 MiB per bus.
    pub fn ecam(&self) -> Window {
        Window {
            start: self.ecam_base,
            size: (u64::from(self.last_bus) + 1) << 20,
        }
    }
}

/// The PCI segments of a machine whose RAM ends at `ram_end`: segment 0 from the
/// constants above, then `count - 1` more above segment 0's 64-bit window (see the
/// module map).
///
/// # Panics
///
/// If `count` is not in `1..=MAX_PCI_SEGMENTS` (the configuration validates it).
pub fn pci_segments(count: u16, ram_end: u64) -> Vec<PciSegmentLayout> {
    const GIB: u64 = 1 << 30;
    assert!(
        (1..=MAX_PCI_SEGMENTS).contains(&count),
        "{count} PCI segments"
    );
    let mmio64_start = pci_mmio64_start(ram_end);
    let mut segments = vec![PciSegmentLayout {
        id: 0,
        ecam_base: PCI_ECAM_START,
        last_bus: PCI_ECAM_LAST_BUS,
        mmio32: Some(Window {
            start: PCI_MMIO32_START,
            size: PCI_MMIO32_SIZE,
        }),
        mmio64: Some(Window {
            start: mmio64_start,
            size: PCI_MMIO64_SIZE,
        }),
    }];
    let ecam_start = mmio64_start + PCI_MMIO64_SIZE;
    let extra = u64::from(count - 1);
    let mmio64_start = (ecam_start + extra * PCI_ECAM_SIZE).next_multiple_of(GIB);
    for i in 1..count {
        let n = u64::from(i - 1);
        segments.push(PciSegmentLayout {
            id: i,
            ecam_base: ecam_start + n * PCI_ECAM_SIZE,
            last_bus: PCI_ECAM_LAST_BUS,
            mmio32: None,
            mmio64: Some(Window {
                start: mmio64_start + n * PCI_MMIO64_SIZE,
                size: PCI_MMIO64_SIZE,
            }),
        });
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    #[test]
    fn one_segment_is_the_constants() {
        for ram_end in [512 << 20, MMIO_HOLE_START, 6 << 30] {
            let seg = pci_segments(1, ram_end);
            assert_eq!(
                seg,
                [PciSegmentLayout {
                    id: 0,
                    ecam_base: PCI_ECAM_START,
                    last_bus: PCI_ECAM_LAST_BUS,
                    mmio32: Some(Window {
                        start: PCI_MMIO32_START,
                        size: PCI_MMIO32_SIZE
                    }),
                    mmio64: Some(Window {
                        start: pci_mmio64_start(ram_end),
                        size: PCI_MMIO64_SIZE
                    }),
                }]
            );
            assert_eq!(seg[0].ecam().size, PCI_ECAM_SIZE);
        }
        assert_eq!(pci_mmio64_start(512 << 20), RAM_64BIT_START);
        assert_eq!(pci_mmio64_start((6 << 30) + 1), 7 << 30);
    }

    #[test]
    fn segments_do_not_overlap_ram_or_each_other() {
        for mem in [128u64 << 20, 3 << 30, (5 << 30) + 4096, 1 << 40] {
            let ram_end = crate::memory::ram_end(mem);
            for count in 1..=MAX_PCI_SEGMENTS {
                let segments = pci_segments(count, ram_end);
                assert_eq!(segments.len(), usize::from(count));
                let mut windows: Vec<(Window, String)> = ram_ranges(mem)
                    .iter()
                    .map(|&(a, l)| {
                        (
                            Window {
                                start: a.0,
                                size: l as u64,
                            },
                            "RAM".into(),
                        )
                    })
                    .collect();
                for (addr, what) in [(IOAPIC_START, "IOAPIC"), (LAPIC_START, "LAPIC")] {
                    windows.push((
                        Window {
                            start: addr,
                            size: 0x1000,
                        },
                        what.into(),
                    ));
                }
                for (i, s) in segments.iter().enumerate() {
                    assert_eq!(usize::from(s.id), i);
                    let ecam = s.ecam();
                    // PCIe: the ECAM base is aligned to the window's size.
                    assert_eq!(ecam.start % ecam.size, 0);
                    assert_eq!(s.mmio32.is_some(), s.id == 0, "32-bit window");
                    let mmio64 = s.mmio64.expect("64-bit window");
                    assert_eq!(mmio64.start % (1 << 30), 0);
                    if s.id > 0 {
                        assert!(ecam.start >= segments[0].mmio64.unwrap().end());
                    }
                    windows.push((ecam, format!("ECAM {}", s.id)));
                    windows.extend(s.mmio32.map(|w| (w, format!("MMIO32 {}", s.id))));
                    windows.push((mmio64, format!("MMIO64 {}", s.id)));
                }
                windows.sort_by_key(|(w, _)| w.start);
                for pair in windows.windows(2) {
                    let ((a, an), (b, bn)) = (&pair[0], &pair[1]);
                    assert!(a.size > 0 && a.end() <= b.start, "{an} overlaps {bn}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "17 PCI segments")]
    fn too_many_segments() {
        pci_segments(MAX_PCI_SEGMENTS + 1, 0);
    }
}
