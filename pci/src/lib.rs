//! ferrio's PCIe emulation: type-0 configuration space with capabilities, BARs, MSI-X,
//! the root complex (ECAM and 0xCF8/0xCFC access, host bridge at 00:00.0) and the
//! virtio-pci (modern) transport.
//!
//! The crate sees the host only through the traits below, so another VMM can embed it:
//! interrupts go through [`MsiVectors`] (KVM GSI routes + irqfds in ferrio's VMM), BAR
//! placement changes are returned as [`BarMapping`] for the VMM to (re)register MMIO
//! ranges and ioeventfds, and guest memory is any `vm_memory::GuestMemory`. A
//! passed-through host function ([`vfio`]) reaches its VFIO device and IOMMU context
//! through [`vfio::VfioOps`] and [`vfio::DmaMapper`] (vfio-ioctls without KVM).

pub mod bar;
pub mod capability;
pub mod config;
pub mod host_bridge;
pub mod msix;
pub mod root;
pub mod sriov;
pub mod vfio;
pub mod virtio_pci;

pub use bar::BarError;
pub use capability::{CapabilityError, PciePortType};
pub use config::{ConfigSpace, PciIds};
pub use host_bridge::HostBridge;
pub use msix::{Msix, MsixConfig, MsixError, MsixTrigger};
pub use root::{ConfigAddressPort, ConfigChange, PciAddress, PciError, PciRoot, SharedPciDevice};
pub use sriov::{SriovCap, SriovConfig, SriovError, SriovState, VfFactory};

use vmm_sys_util::eventfd::EventFd;

/// An MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The host side of one device's MSI-X vectors (an interrupt route per vector).
/// Mask and pending-bit semantics live in the device model; this only delivers.
pub trait MsiVectors: Send + Sync {
    /// Number of vectors.
    fn count(&self) -> u16;
    /// Sets the message of `vector` (called when the guest rewrites an unmasked entry,
    /// or unmasks one). Takes effect at the next [`MsiVectors::commit`].
    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()>;
    /// Applies the messages set since the last commit (one routing update per batch).
    fn commit(&self) -> std::io::Result<()>;
    /// Delivers `vector` now.
    fn fire(&self, vector: u16) -> std::io::Result<()>;
    /// The eventfd that delivers `vector` when written, for workers that signal
    /// without going through the device model (only valid while the vector is
    /// unmasked and MSI-X is enabled).
    fn eventfd(&self, vector: u16) -> Option<&EventFd>;
}

/// Kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit, non-prefetchable, placed below 4 GiB.
    Mmio32,
    /// 64-bit (two BAR registers), placed above 4 GiB.
    Mmio64 { prefetchable: bool },
}

/// A BAR a device exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR register index (0..6; a 64-bit BAR uses `index` and `index + 1`); 6 is the
    /// expansion ROM of a passed-through function ([`vfio::ROM_BAR`], read-only).
    pub index: u8,
    pub kind: BarKind,
    /// Size in bytes, a power of two, at least 4 KiB.
    pub size: u64,
}

/// A change in where a BAR is decoded in guest physical memory: `None` means not
/// decoded (memory space disabled in the command register, or not yet assigned).
/// The VMM removes the old MMIO range (and ioeventfds inside it) and inserts the new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    pub index: u8,
    pub old: Option<u64>,
    pub new: Option<u64>,
    pub size: u64,
}

/// An ioeventfd a device wants at an offset inside one of its BARs (virtio queue
/// notifications): a guest write there signals `fd` without a vCPU exit to userspace.
pub struct IoEvent {
    pub bar: u8,
    pub offset: u64,
    /// Write size the device expects (virtio notify: 2 or 4 bytes); the VMM may
    /// register without data match.
    pub fd: EventFd,
}

/// A part of a BAR backed directly by host memory (a passed-through function's
/// mmap-ed region): the VMM maps it into the guest (a KVM memory slot at the BAR's
/// address + `offset`) instead of trapping accesses to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectArea {
    /// Offset inside the BAR (page aligned).
    pub offset: u64,
    /// Size in bytes (page aligned).
    pub size: u64,
    /// Where the memory is in the VMM's address space.
    pub host_addr: u64,
}

/// A PCI function as the root complex sees it.
pub trait PciDevice: Send {
    /// Reads configuration space. The root complex guarantees `offset < 4096`, a size
    /// of 1, 2 or 4 and natural alignment.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space (same guarantees). Returns the BAR decoding changes
    /// the write caused.
    fn write_config(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping>;
    /// The device's BARs.
    fn bars(&self) -> Vec<BarInfo>;
    /// Places BAR `index` at `addr` before the guest runs (firmware-style assignment);
    /// memory decoding stays as the command register says.
    fn set_bar_address(&mut self, index: u8, addr: u64);
    /// Where BAR `index` is decoded now, if it is.
    fn bar_mapping(&self, index: u8) -> Option<u64>;
    /// MMIO read inside BAR `bar` at `offset` (the VMM checked the range).
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// MMIO write inside BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// ioeventfds inside the device's BARs (cloned fds; registered by the VMM at the
    /// BAR's current address and moved with it).
    fn ioevents(&self) -> Vec<IoEvent> {
        Vec::new()
    }
    /// Parts of BAR `bar` the VMM maps straight into the guest (see [`DirectArea`]);
    /// accesses elsewhere in the BAR come through [`PciDevice::read_bar`] /
    /// [`PciDevice::write_bar`].
    fn direct_areas(&self, _bar: u8) -> Vec<DirectArea> {
        Vec::new()
    }
    /// What the SR-IOV capability of a Physical Function says now (`None` for every
    /// function that is not a PF). The root complex compares it around each config
    /// write to add, remove and move the PF's VFs.
    fn sriov(&self) -> Option<SriovState> {
        None
    }
    /// Firmware-style placement of a PF's VF BAR `index` (VF 0's address; VF `i`
    /// follows at `addr + i * size`). Ignored by functions that are not PFs.
    fn set_vf_bar_address(&mut self, _index: u8, _addr: u64) {}
    /// Stops all device activity before the function goes away (a VF whose PF cleared
    /// VF Enable): workers stopped and joined, in-flight requests completed. Accesses
    /// after this are ignored.
    fn quiesce(&mut self) {}
}
