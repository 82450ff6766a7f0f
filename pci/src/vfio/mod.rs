//! VFIO passthrough of a host PCI function: the function model a guest sees and the
//! narrow host interface it drives.
//!
//! The model ([`VfioPciDevice`]) is an ordinary [`crate::PciDevice`]: the root complex
//! routes config accesses to it and the VMM routes BAR accesses and BAR moves as for
//! any function. It reaches the host only through two traits, so it needs no KVM and
//! can be tested against a fake:
//!
//! - [`VfioOps`]: one VFIO device (regions, IRQs, reset, mmap). [`open_group`] gives
//!   the real one over vfio-ioctls with the legacy container + group (type1v2 IOMMU);
//!   with the `vfio-cdev` feature `open_cdev` gives it over iommufd and the device's
//!   `/dev/vfio/devices/vfioN` cdev.
//! - [`DmaMapper`]: the IOMMU context of that device (the container, or the iommufd
//!   IOAS), driven through [`DmaMappings`], which remembers what is mapped.
//!
//! What the model virtualizes and what it passes through:
//!
//! | config space | served by |
//! |---|---|
//! | BARs 0..5 | emulated: sizes from the VFIO regions, type bits from the device; I/O-port BARs hidden |
//! | expansion ROM BAR | emulated: hidden (reads 0) unless [`VfioOptions::expose_rom`], then BAR index [`ROM_BAR`] |
//! | command register | emulated (memory space, bus master, INTx disable writable), those bits forwarded to the device; I/O space stays off |
//! | header type | emulated: the device's, multi-function bit cleared |
//! | interrupt pin / line | emulated: no INTx (pin 0), line is a scratch register |
//! | MSI-X capability | emulated with [`crate::msix::Msix`] (table and PBA trapped in the BAR) |
//! | MSI capability | emulated, routed through VFIO's MSI index |
//! | extended capabilities | SR-IOV, ARI, Resizable BAR and VF Resizable BAR removed from the list (bodies read 0); the kept headers get rewritten next pointers |
//! | everything else | the device's, read and written through the VFIO config region |
//!
//! Interrupts: each vector's eventfd from [`crate::MsiVectors`] (a KVM irqfd on a GSI
//! route with the guest's message, in ferrio) is handed to VFIO while the vector can be
//! delivered (enabled, function and vector unmasked, message programmed). While it
//! cannot, VFIO signals a model-owned eventfd instead, which the model turns into the
//! vector's pending bit, so no interrupt is lost across a mask. VFIO's MSI-X index is
//! enabled on the first deliverable vector and disabled when the guest disables MSI-X.

mod bars;
mod config;
mod device;
pub mod dma;
mod host;
mod interrupts;
mod msi;
pub mod ops;

#[cfg(test)]
mod tests;

pub use device::{vectors_needed, VfioOptions, VfioPciDevice};
pub use dma::{DmaError, DmaMapping, DmaMappings};
#[cfg(feature = "vfio-cdev")]
pub use host::open_cdev;
pub use host::open_group;
pub use ops::{DmaMapper, IrqInfo, MmapArea, OpenedDevice, RegionInfo, VfioOps};

use std::path::PathBuf;

/// VFIO region index of BAR `n` is `n`; the expansion ROM's.
pub const ROM_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_ROM_REGION_INDEX;
/// VFIO region index of the configuration space.
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
/// VFIO IRQ index of INTx.
pub const INTX_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
/// VFIO IRQ index of MSI.
pub const MSI_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
/// VFIO IRQ index of MSI-X.
pub const MSIX_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
/// Region flag: readable.
pub const REGION_READ: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_READ;
/// Region flag: writable.
pub const REGION_WRITE: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_WRITE;
/// Region flag: mmap-able (see [`RegionInfo::mmap_areas`]).
pub const REGION_MMAP: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
/// IRQ flag: the set of vectors cannot grow while enabled (enable them all at once).
pub const IRQ_NORESIZE: u32 = vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_NORESIZE;
/// The BAR index under which [`VfioPciDevice`] reports the expansion ROM (only with
/// [`VfioOptions::expose_rom`]): in [`crate::PciDevice::bars`], `set_bar_address`,
/// `bar_mapping`, [`crate::BarMapping`] and `read_bar` (read-only).
pub const ROM_BAR: u8 = 6;
/// Page size that direct (mmap-ed) BAR areas are aligned to (x86-64).
pub const PAGE_SIZE: u64 = 0x1000;

/// Why a function cannot be passed through. Messages are one line for the user,
/// with the fix where there is one.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The sysfs path does not name a PCI device.
    #[error(
        "{0}: no such PCI device (give its sysfs path, e.g. /sys/bus/pci/devices/0000:01:00.0)"
    )]
    NotFound(PathBuf),
    /// The device is not bound to a VFIO driver.
    #[error(
        "{path} is {}, not to vfio-pci: bind it with `echo vfio-pci > {path}/driver_override`, \
         unbind the current driver, then `echo <BDF> > /sys/bus/pci/drivers_probe`",
        .driver.as_deref().map_or("bound to no driver".to_string(), |d| format!("bound to {d}"))
    )]
    NotBoundToVfio {
        path: PathBuf,
        driver: Option<String>,
    },
    /// The device has no IOMMU group: no IOMMU on the host.
    #[error(
        "{0} has no IOMMU group: enable the host IOMMU (intel_iommu=on or amd_iommu=on on \
         the host kernel command line, VT-d/AMD-Vi in the firmware)"
    )]
    NoIommu(PathBuf),
    /// Another device of the group is bound to a host driver.
    #[error(
        "IOMMU group {group} is not viable: bind every device of \
         /sys/kernel/iommu_groups/{group}/devices to vfio-pci (or unbind it){}",
        if .others.is_empty() { String::new() } else { format!(" - still bound: {}", .others.join(", ")) }
    )]
    GroupNotViable { group: u32, others: Vec<String> },
    /// The VFIO or iommufd device node is missing.
    #[error("{path} does not exist: {fix}")]
    MissingNode { path: PathBuf, fix: &'static str },
    /// No permission on a device node.
    #[error("no permission to open {0}: run as root or give this user read/write access to it")]
    Permission(PathBuf),
    /// The group or device is already open elsewhere.
    #[error("{0} is busy: another process (another VM?) is using the device")]
    Busy(PathBuf),
    /// The host IOMMU cannot do what VFIO needs.
    #[error("the host IOMMU has no VFIO type1v2 support: enable the IOMMU (intel_iommu=on or amd_iommu=on)")]
    NoType1v2,
    /// The device has no VFIO device cdev (iommufd back end).
    #[error(
        "{0} has no VFIO device cdev: the host kernel needs CONFIG_VFIO_DEVICE_CDEV (Linux 6.6+) \
         and iommufd; use the group back end instead"
    )]
    NoCdev(PathBuf),
    /// Another VFIO failure while opening the device.
    #[error("VFIO failed on {path}: {source}")]
    Host {
        path: PathBuf,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A device ioctl failed.
    #[error("VFIO {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The device is not a usable PCI function.
    #[error("not a usable PCI function: {0}")]
    NotPci(&'static str),
    /// A BAR the device has cannot be emulated.
    #[error("BAR {index} of the device cannot be emulated: {source}")]
    Bar {
        index: u8,
        #[source]
        source: crate::BarError,
    },
    /// The MSI-X capability cannot be emulated.
    #[error("the device's MSI-X capability cannot be emulated: {0}")]
    Msix(#[from] crate::MsixError),
    /// The VMM gave no interrupt vectors for a device that has MSI or MSI-X.
    #[error("the device needs {need} MSI/MSI-X vectors but none were provided")]
    NoVectors { need: u16 },
}
