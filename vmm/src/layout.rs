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
//! then          64-bit PCI MMIO window (1 GiB aligned, 64 GiB)
//! ```

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
