//! The VMM side of the PCIe bus: builds one root complex per PCI segment (host bridge
//! plus the configured devices), gives BARs their initial addresses from the segment's
//! 32- and 64-bit windows, and connects config space (each segment's ECAM window on
//! the MMIO bus, 0xCF8/0xCFC on the port bus for segment 0) so that BAR moves reach
//! [`bars::BarMapper`]. SR-IOV PFs get their VF BAR windows here too; their VFs come
//! and go with the guest's VF Enable writes (see [`PciSegment::apply`]).

mod bars;
pub mod console;
pub mod disk;
pub mod net;
pub mod placement;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferrio_devices::dma::DmaTracker;
use ferrio_devices::virtio::VirtioDevice;
use ferrio_devices::{Bus, BusDevice};
use ferrio_pci::root::{PciAddress, PciRoot, SharedPciDevice};
use ferrio_pci::virtio_pci::{
    MsiAllocator, SriovRole, VfFunction, VirtioPciDevice, VirtioVfFactory,
};
use ferrio_pci::{BarInfo, BarKind, BarMapping, ConfigChange, MsiVectors};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemory;

use crate::error::Error;
use crate::interrupts::{GsiRouting, KvmMsiVectors};
use crate::layout::{pio, PciSegmentLayout, Window};
use bars::{BarMapper, PciFunction};

/// Builds the PCI topology before the guest runs.
pub struct PciBuilder {
    segments: Vec<SegmentBuilder>,
    routing: Arc<GsiRouting>,
}

/// One segment being built: its root complex, BAR windows and functions with BARs.
struct SegmentBuilder {
    layout: PciSegmentLayout,
    root: PciRoot,
    functions: BTreeMap<PciAddress, PciFunction>,
    mmio32: Option<AddressAllocator>,
    mmio64: Option<AddressAllocator>,
}

fn pci_err(e: impl std::fmt::Display) -> Error {
    Error::Pci(e.to_string())
}

impl PciBuilder {
    /// One root complex with only the host bridge per segment of `segments`
    /// ([`crate::layout::pci_segments`]); BARs go to the windows the DSDT describes.
    pub fn new(routing: Arc<GsiRouting>, segments: &[PciSegmentLayout]) -> Result<Self, Error> {
        let allocator = |w: Option<Window>| {
            w.map(|w| AddressAllocator::new(w.start, w.size))
                .transpose()
                .map_err(pci_err)
        };
        let segments = segments
            .iter()
            .map(|layout| {
                Ok(SegmentBuilder {
                    layout: *layout,
                    root: PciRoot::with_segment(layout.id),
                    functions: BTreeMap::new(),
                    mmio32: allocator(layout.mmio32)?,
                    mmio64: allocator(layout.mmio64)?,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self { segments, routing })
    }

    /// Adds a virtio device behind a virtio-pci transport on segment 0 at `slot` (or
    /// the first free one) and returns its address. `mem` is guest memory as the device
    /// sees it; `iommu` (the endpoint's DMA tracker) places it behind the virtio-iommu:
    /// VIRTIO_F_ACCESS_PLATFORM is offered and UNMAPs wait for its accesses.
    pub fn add_virtio<M>(
        &mut self,
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        slot: Option<u8>,
        iommu: Option<DmaTracker>,
    ) -> Result<PciAddress, Error>
    where
        M: GuestMemory + Clone + Send + Sync + 'static,
    {
        let dev = self.virtio_function(device, mem, iommu, SriovRole::None)?;
        self.segments[0].add(dev, slot)
    }

    /// Adds a virtio SR-IOV PF (as [`Self::add_virtio`]) whose VF `i` is `vfs[i]`,
    /// built when the guest sets VF Enable. The VFs' devfns are kept for them.
    pub fn add_virtio_pf<M>(
        &mut self,
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        slot: Option<u8>,
        iommu: Option<DmaTracker>,
        vfs: Vec<Box<dyn VfFunction>>,
    ) -> Result<PciAddress, Error>
    where
        M: GuestMemory + Clone + Send + Sync + 'static,
    {
        let total_vfs = u16::try_from(vfs.len()).map_err(pci_err)?;
        let dev = self.virtio_function(device, mem, iommu, SriovRole::Pf { total_vfs })?;
        let routing = self.routing.clone();
        let msi: MsiAllocator = Box::new(move |_, vectors| {
            Ok(Arc::new(KvmMsiVectors::new(routing.clone(), vectors)?) as Arc<dyn MsiVectors>)
        });
        self.segments[0].add_pf(dev, slot, Box::new(VirtioVfFactory::new(vfs, msi)))
    }

    fn virtio_function<M>(
        &self,
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        iommu: Option<DmaTracker>,
        role: SriovRole,
    ) -> Result<SharedPciDevice, Error>
    where
        M: GuestMemory + Clone + Send + Sync + 'static,
    {
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).map_err(pci_err)?;
        let msi: Arc<dyn MsiVectors> =
            Arc::new(KvmMsiVectors::new(self.routing.clone(), vectors).map_err(pci_err)?);
        let mut dev =
            VirtioPciDevice::with_role(device, mem, msi, iommu.is_some(), role).map_err(pci_err)?;
        if let Some(dma) = iommu {
            dev = dev.with_dma_tracker(dma);
        }
        Ok(Arc::new(Mutex::new(dev)))
    }

    /// Adds any PCI function (a passed-through one) on segment 0 at `slot` (or the
    /// first free one), with its BARs placed.
    pub fn add_function(
        &mut self,
        dev: SharedPciDevice,
        slot: Option<u8>,
    ) -> Result<PciAddress, Error> {
        self.segments[0].add(dev, slot)
    }

    /// The GSI routing table the functions' MSI vectors live in.
    pub fn routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    /// The address [`Self::add_virtio`] will give a device for `slot` (segment 0).
    pub fn next_address(&self, slot: Option<u8>) -> Result<PciAddress, Error> {
        self.segments[0].root.next_address(slot).map_err(pci_err)
    }

    /// The address [`Self::add_virtio_pf`] will give a PF with `total_vfs` VFs.
    pub fn next_pf_address(&self, slot: Option<u8>, total_vfs: u16) -> Result<PciAddress, Error> {
        self.segments[0]
            .root
            .next_pf_address(slot, total_vfs)
            .map_err(pci_err)
    }

    /// Connects config space to the buses. BARs get mapped when the guest enables
    /// memory decoding (as it does in `pci_enable_device`).
    /// KVM memory slots from `first_free_slot` on hold passed-through BAR areas.
    pub fn attach(
        self,
        vm: Arc<VmFd>,
        mmio: &Arc<Bus>,
        pio_bus: &Bus,
        first_free_slot: u32,
    ) -> Result<(), Error> {
        let slots = Arc::new(Mutex::new(bars::SlotAllocator::new(first_free_slot)));
        for s in self.segments {
            let ecam = s.layout.ecam();
            let segment = Arc::new(PciSegment {
                state: Mutex::new(SegmentState {
                    root: s.root,
                    functions: s.functions,
                }),
                mapper: BarMapper {
                    mmio: mmio.clone(),
                    vm: vm.clone(),
                    slots: slots.clone(),
                },
            });
            segment.map_decoded_bars();
            mmio.insert(
                Arc::new(Mutex::new(EcamDevice(segment.clone()))),
                ecam.start,
                ecam.size,
            )?;
            // Mechanism #1 has no segment number: it reaches segment 0 only.
            if s.layout.id == 0 {
                pio_bus.insert(
                    Arc::new(Mutex::new(ConfigIoDevice(segment))),
                    pio::PCI_CONFIG,
                    pio::PCI_CONFIG_LEN,
                )?;
            }
        }
        Ok(())
    }
}

impl SegmentBuilder {
    /// Takes a `size`-byte range aligned to `align` from the window for `kind`.
    fn allocate(&mut self, kind: BarKind, size: u64, align: u64) -> Result<u64, Error> {
        let id = self.layout.id;
        let (window, bits) = match kind {
            BarKind::Mmio32 => (&mut self.mmio32, "32"),
            BarKind::Mmio64 { .. } => (&mut self.mmio64, "64"),
        };
        let window = window
            .as_mut()
            .ok_or_else(|| Error::Pci(format!("PCI segment {id} has no {bits}-bit BAR window")))?;
        let range = window
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map_err(|e| Error::Pci(format!("no room for a {size:#x}-byte BAR: {e}")))?;
        Ok(range.start())
    }

    /// Places `dev`'s BARs (and a PF's VF BARs: `size * TotalVFs` each, aligned to the
    /// per-VF size, as Linux expects) in this segment's windows; returns its ioevents.
    fn place(&mut self, dev: &SharedPciDevice) -> Result<Vec<ferrio_pci::IoEvent>, Error> {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        for bar in d.bars() {
            let at = self.allocate(bar.kind, bar.size, bar.size)?;
            d.set_bar_address(bar.index, at);
        }
        if let Some(sriov) = d.sriov() {
            let vf_bars: Vec<BarInfo> = sriov.bars.iter().flatten().map(|(b, _)| *b).collect();
            for bar in vf_bars {
                let total = bar
                    .size
                    .checked_mul(u64::from(sriov.total_vfs))
                    .ok_or_else(|| Error::Pci("VF BAR window overflows".into()))?;
                let at = self.allocate(bar.kind, total, bar.size)?;
                d.set_vf_bar_address(bar.index, at);
            }
        }
        Ok(d.ioevents())
    }

    /// Places `dev`'s BARs in this segment's windows and plugs it in.
    fn add(&mut self, dev: SharedPciDevice, slot: Option<u8>) -> Result<PciAddress, Error> {
        let ioevents = self.place(&dev)?;
        let address = self.root.add_device(slot, dev.clone()).map_err(pci_err)?;
        self.functions
            .insert(address, PciFunction::new(dev, ioevents));
        Ok(address)
    }

    /// [`Self::add`] for an SR-IOV PF, with the factory of its VFs.
    fn add_pf(
        &mut self,
        dev: SharedPciDevice,
        slot: Option<u8>,
        vfs: Box<dyn ferrio_pci::VfFactory>,
    ) -> Result<PciAddress, Error> {
        let ioevents = self.place(&dev)?;
        let address = self
            .root
            .add_sriov_pf(slot, dev.clone(), vfs)
            .map_err(pci_err)?;
        self.functions
            .insert(address, PciFunction::new(dev, ioevents));
        Ok(address)
    }
}

/// A running segment's root complex and what the VMM needs to follow BAR moves.
struct PciSegment {
    /// Config accesses from every vCPU (ECAM and 0xCF8) serialize here.
    state: Mutex<SegmentState>,
    mapper: BarMapper,
}

struct SegmentState {
    root: PciRoot,
    functions: BTreeMap<PciAddress, PciFunction>,
}

impl PciSegment {
    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the BARs of functions whose memory decoding is already on (none at reset).
    fn map_decoded_bars(&self) {
        let state = self.lock();
        for (address, f) in &state.functions {
            let d = f.device.lock().unwrap_or_else(|e| e.into_inner());
            let mapped: Vec<BarMapping> = d
                .bars()
                .iter()
                .filter_map(|b| {
                    d.bar_mapping(b.index).map(|at| BarMapping {
                        index: b.index,
                        old: None,
                        new: Some(at),
                        size: b.size,
                    })
                })
                .collect();
            drop(d);
            for m in mapped {
                tracing::debug!(%address, "BAR {} at {:#x}", m.index, m.new.unwrap_or(0));
                self.mapper.apply(f, m);
            }
        }
    }

    /// Applies what a config write changed, in order. A VF that goes away has had its
    /// BARs (and the ioeventfds in them) unmapped by the changes before; it is then
    /// quiesced (workers stopped and joined, in-flight requests completed) and dropped,
    /// which releases its irqfds and GSI routes.
    fn apply(&self, functions: &mut BTreeMap<PciAddress, PciFunction>, changes: Vec<ConfigChange>) {
        for change in changes {
            match change {
                ConfigChange::Bar(address, m) => match functions.get(&address) {
                    Some(f) => self.mapper.apply(f, m),
                    None => tracing::debug!(%address, "BAR change of a function without BARs"),
                },
                ConfigChange::VfAdded(address, device) => {
                    let ioevents = device.lock().unwrap_or_else(|e| e.into_inner()).ioevents();
                    functions.insert(address, PciFunction::new(device, ioevents));
                }
                ConfigChange::VfRemoved(address, device) => {
                    device.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
                    functions.remove(&address);
                }
            }
        }
    }

    fn ecam_write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        let SegmentState { root, functions } = &mut *state;
        let changes = root.ecam_write(offset, data);
        self.apply(functions, changes);
    }

    fn pio_write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        let SegmentState { root, functions } = &mut *state;
        let changes = root.pio_write(offset, data);
        self.apply(functions, changes);
    }
}

/// A segment's ECAM window on the MMIO bus.
struct EcamDevice(Arc<PciSegment>);

impl BusDevice for EcamDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().root.ecam_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.ecam_write(offset, data);
    }
}

/// Configuration mechanism #1 (ports 0xCF8-0xCFF) on the port bus.
struct ConfigIoDevice(Arc<PciSegment>);

impl BusDevice for ConfigIoDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().root.pio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.pio_write(offset, data);
    }
}
