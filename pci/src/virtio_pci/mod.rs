//! The virtio-pci modern transport (virtio 1.2, 4.1).
//!
//! [`VirtioPciDevice`] turns any [`ferrio_devices::virtio::VirtioDevice`] into a PCIe
//! endpoint ([`crate::PciDevice`]):
//!
//! - identity: vendor 0x1af4, device 0x1040 + virtio device type, revision 1,
//!   subsystem 0x1af4:0x1100 (QEMU's values for modern-only devices; Linux ignores the
//!   subsystem ids of devices at 0x1040 and above), a class code per device type
//!   ([`class_code`]);
//! - capabilities: PCI Express (endpoint), MSI-X (one vector per queue plus one for
//!   configuration changes), and the five virtio structures COMMON, NOTIFY, ISR,
//!   DEVICE and PCI_CFG;
//! - one 64 KiB 64-bit memory BAR (BAR 0) with the virtio structures and the MSI-X
//!   table and PBA ([`layout`]);
//! - queue notifications through one eventfd per queue, exposed as ioeventfds
//!   ([`crate::PciDevice::ioevents`]); interrupts through MSI-X only (no INTx pin).
//!
//! The register file of the common configuration is the pure state machine in
//! [`common_cfg`]; the interrupt side shared with device workers is in [`interrupt`].

pub mod common_cfg;
mod device;
pub mod interrupt;
pub mod layout;
pub mod sriov;

pub use device::VirtioPciDevice;
pub use sriov::{
    MsiAllocator, SharedVirtioDevice, SriovRole, VfFunction, VirtioVf, VirtioVfFactory,
    VIRTIO_F_SR_IOV,
};

use ferrio_devices::virtio::{device_type, features};

use crate::msix::MsixError;
use crate::{BarError, CapabilityError};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device id of a modern virtio device is this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision id of modern-only (non-transitional) devices (virtio 1.2, 4.1.2.1).
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// Subsystem vendor id.
pub const VIRTIO_PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem id (QEMU's `PCI_SUBDEVICE_ID_QEMU`; drivers of modern devices do not
/// look at it).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

/// Ring/transport features this transport cannot provide and never offers, even if a
/// device lists them: packed rings (only split queues are built), SR-IOV, notification
/// data, notify config data, per-queue reset and admin queues (bits 34, 37..=41).
pub const TRANSPORT_UNSUPPORTED_FEATURES: u64 =
    (1 << 34) | (1 << 37) | (1 << 38) | (1 << 39) | (1 << 40) | (1 << 41);

/// The features the transport offers for a device offering `device_features`:
/// those bits minus [`TRANSPORT_UNSUPPORTED_FEATURES`], plus VIRTIO_F_VERSION_1 and,
/// behind an IOMMU (`access_platform`), VIRTIO_F_ACCESS_PLATFORM.
pub fn offered_features(device_features: u64, access_platform: bool) -> u64 {
    let mut offered =
        (device_features & !TRANSPORT_UNSUPPORTED_FEATURES) | features::VIRTIO_F_VERSION_1;
    if access_platform {
        offered |= features::VIRTIO_F_ACCESS_PLATFORM;
    }
    offered
}

/// PCI class code (base class << 16 | sub-class << 8 | prog-if) for a virtio device
/// type: network controller for net, mass storage (other) for block, simple
/// communication (other) for console, system peripheral (other) for the IOMMU, and
/// "unassigned" 0xff0000 for everything else.
pub fn class_code(virtio_type: u32) -> u32 {
    match virtio_type {
        device_type::NET => 0x02_00_00,
        device_type::BLOCK => 0x01_80_00,
        device_type::CONSOLE => 0x07_80_00,
        device_type::IOMMU => 0x08_80_00,
        _ => 0xff_00_00,
    }
}

/// Why a virtio-pci function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// A queue's maximum size is 0, above 32768 or not a power of two.
    #[error(
        "queue {index} has an invalid maximum size {max} (must be a power of two, at most 32768)"
    )]
    InvalidQueueMaxSize { index: usize, max: u16 },
    /// More queues than MSI-X vectors and notify slots allow.
    #[error("{0} queues is more than the transport supports (1023)")]
    TooManyQueues(usize),
    /// The device type does not fit the 0x1040..=0x107f device id range.
    #[error("virtio device type {0} has no modern PCI device id")]
    UnsupportedDeviceType(u32),
    /// BAR declaration failed.
    #[error("BAR: {0}")]
    Bar(#[from] BarError),
    /// A capability did not fit.
    #[error("capability: {0}")]
    Capability(#[from] CapabilityError),
    /// MSI-X set-up failed (e.g. the host side has too few vectors).
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The SR-IOV capability of a PF could not be built.
    #[error("SR-IOV: {0}")]
    Sriov(#[from] crate::sriov::SriovError),
}
