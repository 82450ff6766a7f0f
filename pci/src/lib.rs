//! ferrio's PCIe emulation (host bridge, config space, BARs, capabilities, MSI-X, the
//! virtio-pci transport).
//!
//! Not implemented yet: the crate exists so the workspace layout is final. The VMM
//! already describes the PCIe host bridge to the guest (ACPI DSDT `PCI0` with its
//! `_CRS` windows, MCFG for the ECAM window at `vmm::layout::PCI_ECAM_START`), so the
//! bus only has to be plugged into the MMIO and port-I/O buses.
