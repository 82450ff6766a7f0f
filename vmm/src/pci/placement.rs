//! Places virtio devices on the PCI bus, directly or behind the virtio-iommu.
//!
//! A device with `iommu=on` gets its own IOMMU endpoint (id = its BDF, as the VIOT
//! says), sees guest memory through `IommuMemory` (every access translated by the
//! endpoint) and marks its accesses in the endpoint's DMA tracker. The virtio-iommu
//! function itself is added last, once every endpoint is registered, and the VIOT
//! description comes out of [`Placement::finish`].
//!
//! An SR-IOV PF's VFs are endpoints of their own (id = the VF's BDF), registered at
//! boot for every VF the PF can have, so the VIOT covers them before they exist.
//!
//! Every device placed (VFs and the virtio-iommu included) gets the placement's
//! [`ThreadHook`], which installs the seccomp filter of each worker thread it starts.

use ferrio_devices::dma::DmaTracker;
use ferrio_devices::virtio::worker_util::ThreadHook;
use ferrio_devices::virtio::VirtioDevice;
use ferrio_iommu::{Endpoint, IommuConfig, VirtioIommu};
use ferrio_pci::root::PciAddress;
use ferrio_pci::virtio_pci::{VfFunction, VirtioVf};
use ferrio_pci::SriovState;
use vm_memory::{GuestMemoryMmap, IommuMemory};

use super::PciBuilder;
use crate::acpi::viot::{endpoint_id, ViotConfig};
use crate::error::Error;

/// Guest memory as a device behind the virtio-iommu sees it.
pub type TranslatedMemory = IommuMemory<GuestMemoryMmap, Endpoint>;

/// The virtio-iommu being set up and the endpoints registered with it.
struct IommuSetup {
    device: VirtioIommu,
    endpoints: Vec<PciAddress>,
}

/// Adds devices to a [`PciBuilder`].
pub struct Placement<'a> {
    pci: &'a mut PciBuilder,
    mem: GuestMemoryMmap,
    iommu: Option<IommuSetup>,
    hook: ThreadHook,
}

impl<'a> Placement<'a> {
    /// With `iommu`, a virtio-iommu is created for the devices added with `iommu=on`.
    pub fn new(pci: &'a mut PciBuilder, mem: GuestMemoryMmap, iommu: bool) -> Self {
        let iommu = iommu.then(|| IommuSetup {
            device: VirtioIommu::new(IommuConfig::default()),
            endpoints: Vec::new(),
        });
        Self {
            pci,
            mem,
            iommu,
            hook: ThreadHook::default(),
        }
    }

    /// Gives every device placed from now on (and the virtio-iommu) `hook`, run first
    /// in each of their worker threads.
    pub fn with_thread_hook(mut self, hook: ThreadHook) -> Self {
        if let Some(iommu) = &mut self.iommu {
            VirtioDevice::<GuestMemoryMmap>::set_thread_hook(&mut iommu.device, hook.clone());
        }
        self.hook = hook;
        self
    }

    /// Adds `device` at `slot` (or the first free one), behind the IOMMU if
    /// `behind_iommu`.
    pub fn add<D>(
        &mut self,
        mut device: D,
        slot: Option<u8>,
        behind_iommu: bool,
    ) -> Result<PciAddress, Error>
    where
        D: VirtioDevice<GuestMemoryMmap> + VirtioDevice<TranslatedMemory> + 'static,
    {
        VirtioDevice::<GuestMemoryMmap>::set_thread_hook(&mut device, self.hook.clone());
        if !behind_iommu {
            return self.pci.add_virtio::<GuestMemoryMmap>(
                Box::new(device),
                self.mem.clone(),
                slot,
                None,
            );
        }
        let address = self.pci.next_address(slot)?;
        let (mem, dma) = self.endpoint(address)?;
        let added =
            self.pci
                .add_virtio::<TranslatedMemory>(Box::new(device), mem, slot, Some(dma))?;
        debug_assert_eq!(added, address);
        Ok(address)
    }

    /// Adds an SR-IOV PF at `slot` (or the first slot with room for it and its VFs)
    /// with VF `i` = `vfs[i]`; each device goes behind the IOMMU if its flag says so.
    /// Returns the PF's address and the addresses its VFs will have.
    pub fn add_pf<D>(
        &mut self,
        pf: (D, bool),
        vfs: Vec<(D, bool)>,
        slot: Option<u8>,
    ) -> Result<(PciAddress, Vec<PciAddress>), Error>
    where
        D: VirtioDevice<GuestMemoryMmap> + VirtioDevice<TranslatedMemory> + 'static,
    {
        let total = u16::try_from(vfs.len()).map_err(|e| Error::Pci(e.to_string()))?;
        let address = self.pci.next_pf_address(slot, total)?;
        let mut functions: Vec<Box<dyn VfFunction>> = Vec::with_capacity(vfs.len());
        let mut vf_addresses = Vec::with_capacity(vfs.len());
        for (index, (mut device, behind_iommu)) in (0u16..).zip(vfs) {
            VirtioDevice::<GuestMemoryMmap>::set_thread_hook(&mut device, self.hook.clone());
            let vf = SriovState::vf_address(address, index)
                .ok_or_else(|| Error::Pci(format!("VF {index} of {address} is off the bus")))?;
            vf_addresses.push(vf);
            functions.push(if behind_iommu {
                let (mem, dma) = self.endpoint(vf)?;
                let device: Box<dyn VirtioDevice<TranslatedMemory>> = Box::new(device);
                Box::new(VirtioVf::new(device, mem, Some(dma)))
            } else {
                let device: Box<dyn VirtioDevice<GuestMemoryMmap>> = Box::new(device);
                Box::new(VirtioVf::new(device, self.mem.clone(), None))
            });
        }
        let (mut device, behind_iommu) = pf;
        VirtioDevice::<GuestMemoryMmap>::set_thread_hook(&mut device, self.hook.clone());
        let added = if behind_iommu {
            let (mem, dma) = self.endpoint(address)?;
            self.pci.add_virtio_pf::<TranslatedMemory>(
                Box::new(device),
                mem,
                slot,
                Some(dma),
                functions,
            )?
        } else {
            self.pci.add_virtio_pf::<GuestMemoryMmap>(
                Box::new(device),
                self.mem.clone(),
                slot,
                None,
                functions,
            )?
        };
        debug_assert_eq!(added, address);
        Ok((address, vf_addresses))
    }

    /// The GSI routing table (for the MSI vectors of passed-through functions).
    pub fn routing(&self) -> &std::sync::Arc<crate::interrupts::GsiRouting> {
        self.pci.routing()
    }

    /// Adds a passed-through function at `slot` (or the first free one). With `mirror`
    /// it is a hardware endpoint of the virtio-iommu: the mappings of the domain the
    /// guest attaches it to are kept in `mirror` (the host IOMMU).
    pub fn add_passthrough(
        &mut self,
        device: ferrio_pci::SharedPciDevice,
        slot: Option<u8>,
        mirror: Option<std::sync::Arc<dyn ferrio_iommu::DmaMirror>>,
    ) -> Result<PciAddress, Error> {
        let address = self.pci.next_address(slot)?;
        if let Some(mirror) = mirror {
            let iommu = self.iommu.as_mut().ok_or_else(|| {
                Error::Pci("iommu=on for a device but there is no virtio-iommu".into())
            })?;
            iommu
                .device
                .add_hardware_endpoint(endpoint_id(address), mirror)
                .map_err(|e| Error::Pci(e.to_string()))?;
            iommu.endpoints.push(address);
        }
        let added = self.pci.add_function(device, slot)?;
        debug_assert_eq!(added, address);
        Ok(address)
    }

    /// Registers the function at `address` as an endpoint of the virtio-iommu: guest
    /// memory as it sees it, and the tracker UNMAPs wait on.
    fn endpoint(&mut self, address: PciAddress) -> Result<(TranslatedMemory, DmaTracker), Error> {
        let iommu = self.iommu.as_mut().ok_or_else(|| {
            Error::Pci("iommu=on for a device but there is no virtio-iommu".into())
        })?;
        let endpoint = iommu
            .device
            .add_endpoint(endpoint_id(address))
            .map_err(|e| Error::Pci(e.to_string()))?;
        let dma = endpoint.dma_tracker();
        iommu.endpoints.push(address);
        Ok((IommuMemory::new(self.mem.clone(), endpoint, true, ()), dma))
    }

    /// Adds the virtio-iommu function (if any) and returns what the VIOT must say.
    pub fn finish(self) -> Result<Option<ViotConfig>, Error> {
        let Some(iommu) = self.iommu else {
            return Ok(None);
        };
        let address = self.pci.add_virtio::<GuestMemoryMmap>(
            Box::new(iommu.device),
            self.mem.clone(),
            None,
            None,
        )?;
        tracing::info!(%address, endpoints = iommu.endpoints.len(), "virtio-iommu");
        Ok(Some(ViotConfig {
            iommu: address,
            endpoints: iommu.endpoints,
        }))
    }
}
