//! SR-IOV for virtio-pci functions: what makes a [`super::VirtioPciDevice`] a Physical
//! Function or a Virtual Function, and the shared device a VF is built around.
//!
//! A **PF** is a normal virtio-pci function with the SR-IOV extended capability
//! ([`crate::sriov`]): TotalVFs VFs of the same virtio type (VF Device ID = the PF's
//! device ID), one 64 KiB 64-bit VF BAR 0 per VF with the same layout as the PF's
//! BAR 0, and VIRTIO_F_SR_IOV offered so the guest's virtio_pci driver accepts
//! `sriov_numvfs` writes.
//!
//! A **VF** is the same transport with the config space a VF has (PCIe 6.0, 9.3.4):
//! vendor and device ID read 0xFFFF (the guest takes them from the PF), the BAR
//! registers read 0 (the PF's VF BARs place it), the command register's memory space
//! bit is read-only 0 (the PF's VF MSE decides) and only bus master is writable. It
//! keeps the PCI Express and MSI-X capabilities and the virtio structures.
//!
//! A VF function exists only while its PF has VF Enable set; its virtio device (the
//! backend: a TAP, an image) lives as long as the VMM and is shared by the successive
//! VF functions through [`SharedVirtioDevice`].

use std::sync::{Arc, Mutex};

use ferrio_devices::dma::DmaTracker;
use ferrio_devices::virtio::{ActivateError, Activation, VirtioDevice};
use vm_memory::GuestMemory;

use crate::config::{ConfigSpace, COMMAND, COMMAND_BUS_MASTER, DEVICE_ID, VENDOR_ID};
use crate::root::SharedPciDevice;
use crate::sriov::{SriovCap, SriovConfig, SriovError, VfFactory};
use crate::{BarInfo, BarKind, MsiVectors, PciAddress};

use super::{layout, VirtioPciDevice, VirtioPciError};

/// VIRTIO_F_SR_IOV: the device supports SR-IOV (offered by a PF only).
pub const VIRTIO_F_SR_IOV: u64 = 1 << 37;

/// What a virtio-pci function is in SR-IOV terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SriovRole {
    /// Neither PF nor VF.
    #[default]
    None,
    /// A Physical Function with `total_vfs` Virtual Functions.
    Pf { total_vfs: u16 },
    /// A Virtual Function.
    Vf,
}

/// The VF BAR a virtio PF declares: each VF gets a BAR 0 like the PF's.
pub fn vf_bar() -> BarInfo {
    BarInfo {
        index: layout::BAR_INDEX,
        kind: BarKind::Mmio64 {
            prefetchable: false,
        },
        size: layout::BAR_SIZE,
    }
}

/// Adds the SR-IOV capability of a virtio PF whose VFs have `device_id`.
pub(super) fn add_pf_capability(
    config: &mut ConfigSpace,
    device_id: u16,
    total_vfs: u16,
) -> Result<SriovCap, SriovError> {
    SriovCap::add(
        config,
        &SriovConfig {
            total_vfs,
            vf_device_id: device_id,
            function_link: 0,
            vf_bars: vec![vf_bar()],
        },
    )
}

/// Turns a function's header into a VF's: IDs read 0xFFFF, BAR registers read 0 and
/// are read-only, memory space enable is read-only 0 (INTx disable too: a VF has no
/// INTx), bus master stays writable.
pub(super) fn make_vf_header(config: &mut ConfigSpace) {
    config.set_u16(VENDOR_ID, 0xffff);
    config.set_u16(DEVICE_ID, 0xffff);
    config.hide_bar_registers();
    config.set_write_mask(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
}

/// A virtio device shared by the successive functions of one VF: each VF Enable builds
/// a new function around it, and the function's reset (at quiesce) stops it. The
/// static answers (type, queue sizes, offer) are read once at construction.
pub struct SharedVirtioDevice<M> {
    device: Arc<Mutex<Box<dyn VirtioDevice<M>>>>,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    features: u64,
}

impl<M> SharedVirtioDevice<M> {
    /// Wraps `device`.
    pub fn new(device: Arc<Mutex<Box<dyn VirtioDevice<M>>>>) -> Self {
        let (device_type, queue_max_sizes, features) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.device_features(),
            )
        };
        Self {
            device,
            device_type,
            queue_max_sizes,
            features,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn VirtioDevice<M>>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<M> VirtioDevice<M> for SharedVirtioDevice<M> {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.lock().set_acked_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.lock().write_config(offset, data);
    }

    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        self.lock().activate(activation)
    }

    fn reset(&mut self) {
        self.lock().reset();
    }
}

/// One VF's host side: its virtio device (kept across VF Enable cycles), guest memory
/// as the VF sees it, and the DMA tracker of its IOMMU endpoint (if it has one).
pub struct VirtioVf<M> {
    device: Arc<Mutex<Box<dyn VirtioDevice<M>>>>,
    mem: M,
    iommu: Option<DmaTracker>,
}

impl<M> VirtioVf<M>
where
    M: GuestMemory + Clone + Send + Sync + 'static,
{
    /// `iommu`: the VF is behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM offered) and marks
    /// its accesses in this tracker.
    pub fn new(device: Box<dyn VirtioDevice<M>>, mem: M, iommu: Option<DmaTracker>) -> Self {
        Self {
            device: Arc::new(Mutex::new(device)),
            mem,
            iommu,
        }
    }
}

/// A VF whose functions can be built, whatever memory type it sees.
pub trait VfFunction: Send {
    /// MSI-X vectors a function needs (one per queue plus one).
    fn vectors(&self) -> u16;
    /// A new function for the VF, delivering interrupts through `msi`.
    fn build(&self, msi: Arc<dyn MsiVectors>) -> Result<SharedPciDevice, VirtioPciError>;
}

impl<M> VfFunction for VirtioVf<M>
where
    M: GuestMemory + Clone + Send + Sync + 'static,
{
    fn vectors(&self) -> u16 {
        let queues = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        u16::try_from(queues + 1).unwrap_or(u16::MAX)
    }

    fn build(&self, msi: Arc<dyn MsiVectors>) -> Result<SharedPciDevice, VirtioPciError> {
        let shared = SharedVirtioDevice::new(self.device.clone());
        let mut dev = VirtioPciDevice::with_role(
            Box::new(shared),
            self.mem.clone(),
            msi,
            self.iommu.is_some(),
            SriovRole::Vf,
        )?;
        if let Some(dma) = &self.iommu {
            dev = dev.with_dma_tracker(dma.clone());
        }
        Ok(Arc::new(Mutex::new(dev)))
    }
}

/// Gives a new VF function its MSI-X vectors (`address`, vector count); the host
/// side (KVM GSI routes and irqfds in ferrio) is released when the returned value is
/// dropped, i.e. when the VF function goes away.
pub type MsiAllocator =
    Box<dyn FnMut(PciAddress, u16) -> std::io::Result<Arc<dyn MsiVectors>> + Send>;

/// The [`VfFactory`] of a virtio PF: VF `i` is `vfs[i]`, given fresh MSI-X vectors
/// by `msi` at each VF Enable.
pub struct VirtioVfFactory {
    vfs: Vec<Box<dyn VfFunction>>,
    msi: MsiAllocator,
}

impl VirtioVfFactory {
    /// The factory of a PF with these VFs, in VF index order.
    pub fn new(vfs: Vec<Box<dyn VfFunction>>, msi: MsiAllocator) -> Self {
        Self { vfs, msi }
    }
}

impl VfFactory for VirtioVfFactory {
    fn create(&mut self, index: u16, address: PciAddress) -> Result<SharedPciDevice, String> {
        let vf = self
            .vfs
            .get(usize::from(index))
            .ok_or_else(|| format!("no VF {index}"))?;
        let msi = (self.msi)(address, vf.vectors())
            .map_err(|e| format!("MSI-X vectors for VF {index}: {e}"))?;
        vf.build(msi).map_err(|e| e.to_string())
    }
}
