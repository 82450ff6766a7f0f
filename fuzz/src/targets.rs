//! One module per fuzz target: `run` (the harness) and `seeds` (its seed corpus).

pub mod blk;
pub mod console;
pub mod iommu;
pub mod net;
pub mod net_ctrl;
pub mod pci_config;
pub mod pci_sriov;
pub mod ring;
pub mod virtio_pci;
