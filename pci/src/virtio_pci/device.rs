//! [`VirtioPciDevice`]: a virtio device behind the virtio-pci modern transport.

use std::sync::Arc;

use ferrio_devices::dma::DmaTracker;
use ferrio_devices::virtio::features::VIRTIO_F_EVENT_IDX;
use ferrio_devices::virtio::VirtioInterrupt;
use ferrio_devices::virtio::{ActivateError, Activation, ActiveQueue, VirtioDevice};
use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_cfg::{CommonCfg, CommonCfgAction, QueueConfig};
use super::interrupt::{PciInterrupt, SharedState, VectorTrigger};
use super::layout::{self, cap, VirtioCaps};
use super::sriov::{self, SriovRole, VIRTIO_F_SR_IOV};
use super::{class_code, offered_features, VirtioPciError};
use crate::capability::PciePortType;
use crate::config::{ranges_overlap, ConfigSpace, PciIds};
use crate::msix::{Msix, MsixConfig, MsixTrigger};
use crate::sriov::{SriovCap, SriovState};
use crate::{BarInfo, BarKind, BarMapping, IoEvent, MsiVectors, PciDevice};

impl VectorTrigger for MsixTrigger {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        MsixTrigger::trigger(self, vector);
        Ok(())
    }
}

/// Why DRIVER_OK did not start the device (the transport then sets
/// DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum ActivationFailure {
    #[error("queue {index}: {source:?}")]
    Queue {
        index: u16,
        source: virtio_queue::Error,
    },
    #[error("queue {0}: rings outside guest memory")]
    Unreachable(u16),
    #[error("queue {index}: cannot clone the notify eventfd: {source}")]
    EventFd { index: u16, source: std::io::Error },
    #[error("device: {0}")]
    Device(#[from] ActivateError),
}

/// Where the function is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// Not running: after creation or a device reset.
    Idle,
    /// `device.activate` succeeded at DRIVER_OK and no reset happened since.
    Active,
    /// Quiesced before removal (a VF whose PF cleared VF Enable): the device is
    /// stopped for good and BAR accesses are ignored.
    Retired,
}

/// A virtio device on the virtio-pci modern transport: the PCI function the root
/// complex sees (see the [module docs](super) for identity and BAR layout).
pub struct VirtioPciDevice<M> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    config: ConfigSpace,
    msix: Msix,
    caps: VirtioCaps,
    common: CommonCfg,
    shared: Arc<SharedState>,
    notify: Vec<EventFd>,
    /// Handed to the device at activation ([`Activation::dma`]).
    dma: DmaTracker,
    lifecycle: Lifecycle,
    /// The SR-IOV capability of a PF.
    sriov: Option<SriovCap>,
}

impl<M> std::fmt::Debug for VirtioPciDevice<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.status())
            .field("lifecycle", &self.lifecycle)
            .finish_non_exhaustive()
    }
}

impl<M> VirtioPciDevice<M>
where
    M: GuestMemory + Clone + Send + Sync + 'static,
{
    /// Wraps `device`. `mem` is guest memory as the device sees it (what
    /// [`Activation::mem`] carries); `msi` delivers the function's MSI-X vectors and
    /// needs one per queue plus one; `access_platform` offers
    /// VIRTIO_F_ACCESS_PLATFORM (the device sits behind an IOMMU).
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        msi: Arc<dyn MsiVectors>,
        access_platform: bool,
    ) -> Result<Self, VirtioPciError> {
        Self::with_role(device, mem, msi, access_platform, SriovRole::None)
    }

    /// [`Self::new`] for a function with an SR-IOV `role`: a PF gets the SR-IOV
    /// capability and offers VIRTIO_F_SR_IOV, a VF gets a VF's header (see
    /// [`super::sriov`]).
    pub fn with_role(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        msi: Arc<dyn MsiVectors>,
        access_platform: bool,
        role: SriovRole,
    ) -> Result<Self, VirtioPciError> {
        let virtio_type = device.device_type();
        let device_id = u16::try_from(virtio_type)
            .ok()
            .filter(|&t| t < 0x40)
            .map(|t| super::VIRTIO_PCI_DEVICE_ID_BASE + t)
            .ok_or(VirtioPciError::UnsupportedDeviceType(virtio_type))?;
        let max_sizes = device.queue_max_sizes().to_vec();
        let mut offered = offered_features(device.device_features(), access_platform);
        if matches!(role, SriovRole::Pf { .. }) {
            offered |= VIRTIO_F_SR_IOV;
        }
        // `CommonCfg::new` bounds the queue count, so the vector count fits a u16.
        let vectors = u16::try_from(max_sizes.len() + 1)
            .map_err(|_| VirtioPciError::TooManyQueues(max_sizes.len()))?;
        let common = CommonCfg::new(offered, &max_sizes, vectors)?;

        let mut config = ConfigSpace::new(&PciIds {
            vendor: super::VIRTIO_PCI_VENDOR_ID,
            device: device_id,
            class: class_code(virtio_type),
            revision: super::VIRTIO_PCI_REVISION,
            subsystem_vendor: super::VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
            subsystem_device: super::VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_bar(BarInfo {
            index: layout::BAR_INDEX,
            kind: BarKind::Mmio64 {
                prefetchable: false,
            },
            size: layout::BAR_SIZE,
        })?;
        // On bus 0 with no root port above it: a root-complex integrated endpoint.
        config.add_pcie_capability(PciePortType::RootComplexIntegratedEndpoint)?;
        let msix = Msix::new(
            &mut config,
            MsixConfig {
                vectors,
                table_bar: layout::BAR_INDEX,
                table_offset: layout::MSIX_TABLE_OFFSET as u32,
                pba_bar: layout::BAR_INDEX,
                pba_offset: layout::MSIX_PBA_OFFSET as u32,
            },
            msi,
        )?;
        let caps = layout::add_virtio_caps(&mut config, common.num_queues())?;
        let sriov = match role {
            SriovRole::None => None,
            SriovRole::Pf { total_vfs } => {
                Some(sriov::add_pf_capability(&mut config, device_id, total_vfs)?)
            }
            SriovRole::Vf => {
                sriov::make_vf_header(&mut config);
                None
            }
        };
        let notify = (0..max_sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        debug!(
            virtio_type,
            queues = max_sizes.len(),
            offered = format_args!("{offered:#x}"),
            "virtio-pci function created"
        );
        Ok(Self {
            device,
            mem,
            config,
            msix,
            caps,
            common,
            shared: Arc::new(SharedState::new(max_sizes.len())),
            notify,
            dma: DmaTracker::untracked(),
            lifecycle: Lifecycle::Idle,
            sriov,
        })
    }

    /// The tracker the device marks its guest-memory accesses in (an IOMMU endpoint's,
    /// so that UNMAP waits for them); untracked by default.
    pub fn with_dma_tracker(mut self, dma: DmaTracker) -> Self {
        self.dma = dma;
        self
    }

    /// The device status byte as the driver reads it.
    pub fn status(&self) -> u8 {
        let mut status = self.common.status();
        if self.shared.needs_reset() {
            status |= ferrio_devices::virtio::status::DEVICE_NEEDS_RESET;
        }
        status
    }

    /// Whether the device is running (activated at DRIVER_OK, not reset since).
    pub fn is_active(&self) -> bool {
        self.lifecycle == Lifecycle::Active
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice<M> {
        self.device.as_ref()
    }

    /// The configuration space (for inspection; guest accesses go through
    /// [`PciDevice::read_config`] / [`PciDevice::write_config`]).
    pub fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    /// The MSI-X model (for inspection and PCI-level reset).
    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// Mirrors what workers changed (DEVICE_NEEDS_RESET, config generation) into the
    /// register file before the driver looks at it.
    fn sync_shared(&mut self) {
        if self.shared.needs_reset() {
            self.common.set_needs_reset();
        }
        self.common
            .set_config_generation(self.shared.config_generation());
    }

    fn interrupt(&self) -> Arc<PciInterrupt> {
        Arc::new(PciInterrupt::new(
            self.shared.clone(),
            Arc::new(self.msix.trigger_handle()),
        ))
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        self.sync_shared();
        let action = self.common.write(offset, data);
        self.shared
            .set_config_vector(self.common.config_msix_vector());
        match action {
            CommonCfgAction::None => {}
            CommonCfgAction::Reset => self.reset(),
            CommonCfgAction::FeaturesOk {
                features,
                driver_ok,
            } => {
                debug!(
                    features = format_args!("{features:#x}"),
                    "virtio-pci: FEATURES_OK"
                );
                self.device.set_acked_features(features);
                if driver_ok {
                    self.activate();
                }
            }
            CommonCfgAction::DriverOk => self.activate(),
        }
    }

    /// Device reset (status 0): stop the device, then clear the transport state.
    /// MSI-X state is PCI state and stays.
    fn reset(&mut self) {
        self.device.reset();
        if self.lifecycle == Lifecycle::Active {
            self.lifecycle = Lifecycle::Idle;
        }
        self.common.reset();
        self.shared.reset();
        for fd in &self.notify {
            // Drop notifications nobody will consume (EAGAIN when there are none).
            let _ = fd.read();
        }
        debug!("virtio-pci: device reset");
    }

    fn activate(&mut self) {
        match self.try_activate() {
            Ok(()) => {
                self.lifecycle = Lifecycle::Active;
                info!(
                    virtio_type = self.device.device_type(),
                    "virtio-pci: device activated"
                );
            }
            Err(e) => {
                warn!("virtio-pci: activation failed, DEVICE_NEEDS_RESET: {e}");
                self.common.set_needs_reset();
                self.interrupt().device_error();
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivationFailure> {
        let event_idx = self.common.driver_features() & VIRTIO_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, qc) in (0u16..).zip(self.common.queues()) {
            self.shared.set_queue_vector(index, qc.msix_vector);
            if !qc.enabled {
                continue;
            }
            let queue = self.build_queue(index, qc, event_idx)?;
            let notify = self
                .notify
                .get(usize::from(index))
                .map(EventFd::try_clone)
                .transpose()
                .map_err(|source| ActivationFailure::EventFd { index, source })?
                .ok_or(ActivationFailure::Unreachable(index))?;
            queues.push(ActiveQueue {
                index,
                queue,
                notify,
            });
        }
        self.shared
            .set_config_vector(self.common.config_msix_vector());
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt();
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt,
            dma: self.dma.clone(),
        })?;
        Ok(())
    }

    fn build_queue(
        &self,
        index: u16,
        qc: &QueueConfig,
        event_idx: bool,
    ) -> Result<Queue, ActivationFailure> {
        let err = |source| ActivationFailure::Queue { index, source };
        let max = self
            .device
            .queue_max_sizes()
            .get(usize::from(index))
            .copied()
            .unwrap_or(qc.size);
        let mut queue = Queue::new(max).map_err(err)?;
        queue.try_set_size(qc.size).map_err(err)?;
        queue
            .try_set_desc_table_address(GuestAddress(qc.desc))
            .map_err(err)?;
        queue
            .try_set_avail_ring_address(GuestAddress(qc.driver))
            .map_err(err)?;
        queue
            .try_set_used_ring_address(GuestAddress(qc.device))
            .map_err(err)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            return Err(ActivationFailure::Unreachable(index));
        }
        Ok(queue)
    }

    /// Offset of pci_cfg_data in configuration space.
    fn pci_cfg_data(&self) -> u16 {
        u16::from(self.caps.pci_cfg) + cap::EXTRA
    }

    /// The BAR access the PCI_CFG capability selects: `(offset, length)` when bar,
    /// offset and length describe an aligned 1/2/4-byte access inside BAR 0.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let base = u16::from(self.caps.pci_cfg);
        let bar = self.config.read_u8(base + cap::BAR);
        let offset = u64::from(self.config.read_u32(base + cap::OFFSET));
        let length = self.config.read_u32(base + cap::LENGTH);
        let valid = bar == layout::BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && offset % u64::from(length) == 0
            && offset + u64::from(length) <= layout::BAR_SIZE;
        if !valid {
            debug!(
                bar,
                offset, length, "virtio-pci: invalid PCI_CFG window access ignored"
            );
        }
        valid.then_some((offset, length as usize))
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if self.lifecycle == Lifecycle::Retired
            || !bar0_in_range(offset, data.len(), "read")
            || self.msix.read_bar(layout::BAR_INDEX, offset, data)
        {
            return;
        }
        let Some((region, rel)) = bar0_region(offset, data.len(), "read") else {
            return;
        };
        match region {
            layout::COMMON_OFFSET => {
                self.sync_shared();
                self.common.read(rel, data);
            }
            layout::ISR_OFFSET if rel == 0 => data[0] = self.shared.take_isr(),
            layout::DEVICE_OFFSET => self.device.read_config(rel, data),
            _ => {}
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        if self.lifecycle == Lifecycle::Retired
            || !bar0_in_range(offset, data.len(), "write")
            || self.msix.write_bar(layout::BAR_INDEX, offset, data)
        {
            return;
        }
        let Some((region, rel)) = bar0_region(offset, data.len(), "write") else {
            return;
        };
        match region {
            layout::COMMON_OFFSET => self.write_common(rel, data),
            layout::DEVICE_OFFSET => self.device.write_config(rel, data),
            layout::NOTIFY_OFFSET => self.notify_write(rel, data.len()),
            _ => debug!(
                offset,
                "virtio-pci: write to a read-only BAR 0 area ignored"
            ),
        }
    }

    /// A queue notification that did not go through an ioeventfd.
    fn notify_write(&mut self, rel: u64, len: usize) {
        let multiplier = u64::from(layout::NOTIFY_OFF_MULTIPLIER);
        let fd = (rel & (multiplier - 1) == 0 && matches!(len, 2 | 4))
            .then(|| usize::try_from(rel / multiplier).ok())
            .flatten()
            .and_then(|q| self.notify.get(q));
        match fd {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    warn!("virtio-pci: queue notify eventfd write failed: {e}");
                }
            }
            None => debug!(rel, len, "virtio-pci: bad queue notify write ignored"),
        }
    }
}

impl<M> PciDevice for VirtioPciDevice<M>
where
    M: GuestMemory + Clone + Send + Sync + 'static,
{
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let window = self.pci_cfg_data();
        if ranges_overlap(offset, data.len(), window, window + 4) {
            // Latch the selected BAR bytes into pci_cfg_data, then read as usual.
            let mut latch = [0u8; 4];
            if let Some((bar_off, len)) = self.pci_cfg_window() {
                self.bar0_read(bar_off, &mut latch[..len]);
            }
            self.config.set_bytes(window, &latch);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Vec<BarMapping> {
        let before = self.sriov();
        let mappings = self.config.write(offset, data);
        if let (Some(cap), Some(before)) = (&self.sriov, before) {
            cap.after_write(&mut self.config, &before, offset, data.len());
        }
        self.msix.config_write(&self.config, offset, data.len());
        let window = self.pci_cfg_data();
        if ranges_overlap(offset, data.len(), window, window + 4) {
            if let Some((bar_off, len)) = self.pci_cfg_window() {
                let mut latch = [0u8; 4];
                self.config.read(window, &mut latch);
                self.bar0_write(bar_off, &latch[..len]);
            }
        }
        mappings
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) {
        self.config.set_bar_address(index, addr);
    }

    fn bar_mapping(&self, index: u8) -> Option<u64> {
        self.config.bar_mapping(index)
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == layout::BAR_INDEX {
            self.bar0_read(offset, data);
        } else {
            debug!(bar, offset, "virtio-pci: read of an unknown BAR");
            data.fill(0);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == layout::BAR_INDEX {
            self.bar0_write(offset, data);
        } else {
            debug!(bar, offset, "virtio-pci: write to an unknown BAR");
        }
    }

    fn sriov(&self) -> Option<SriovState> {
        self.sriov.as_ref().map(|cap| cap.state(&self.config))
    }

    fn set_vf_bar_address(&mut self, index: u8, addr: u64) {
        if let Some(cap) = &self.sriov {
            cap.set_vf_bar_address(&mut self.config, index, addr);
        }
    }

    fn quiesce(&mut self) {
        self.reset();
        self.lifecycle = Lifecycle::Retired;
        debug!("virtio-pci: function quiesced");
    }

    fn ioevents(&self) -> Vec<IoEvent> {
        let mut events = Vec::with_capacity(self.notify.len());
        for (index, fd) in (0u64..).zip(&self.notify) {
            match fd.try_clone() {
                Ok(fd) => events.push(IoEvent {
                    bar: layout::BAR_INDEX,
                    offset: layout::NOTIFY_OFFSET
                        + index * u64::from(layout::NOTIFY_OFF_MULTIPLIER),
                    fd,
                }),
                Err(e) => warn!(index, "virtio-pci: cannot clone notify eventfd: {e}"),
            }
        }
        events
    }
}

impl<M> Drop for VirtioPciDevice<M> {
    /// A function that goes away stops its device (a VF's device outlives it).
    fn drop(&mut self) {
        if self.lifecycle == Lifecycle::Active {
            self.device.reset();
        }
    }
}

/// True when a non-empty access of `len` bytes at `offset` lies inside BAR 0.
fn bar0_in_range(offset: u64, len: usize, op: &'static str) -> bool {
    let ok = len > 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= layout::BAR_SIZE);
    if !ok {
        debug!(
            offset,
            len, op, "virtio-pci: BAR 0 access out of range ignored"
        );
    }
    ok
}

/// The 4 KiB region of BAR 0 an access falls in and its offset there; `None` when it
/// straddles two regions.
fn bar0_region(offset: u64, len: usize, op: &'static str) -> Option<(u64, u64)> {
    let region = offset - offset % layout::REGION_SIZE;
    let rel = offset - region;
    if rel + len as u64 > layout::REGION_SIZE {
        debug!(
            offset,
            len, op, "virtio-pci: BAR 0 access across regions ignored"
        );
        return None;
    }
    Some((region, rel))
}

#[cfg(test)]
mod tests;
