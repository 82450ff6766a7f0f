//! Places virtio devices on the PCI bus, directly or behind the virtio-iommu.
//!
//! A device with `iommu=on` gets its own IOMMU endpoint (id = its BDF, as the VIOT
//! says), sees guest memory through `IommuMemory` (every access translated by the
//! endpoint) and marks its accesses in the endpoint's DMA tracker. The virtio-iommu
//! function itself is added last, once every endpoint is registered, and the VIOT
//! description comes out of [`Placement::finish`].

use ferrio_devices::virtio::VirtioDevice;
use ferrio_iommu::{Endpoint, IommuConfig, VirtioIommu};
use ferrio_pci::root::PciAddress;
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
}

impl<'a> Placement<'a> {
    /// With `iommu`, a virtio-iommu is created for the devices added with `iommu=on`.
    pub fn new(pci: &'a mut PciBuilder, mem: GuestMemoryMmap, iommu: bool) -> Self {
        let iommu = iommu.then(|| IommuSetup {
            device: VirtioIommu::new(IommuConfig::default()),
            endpoints: Vec::new(),
        });
        Self { pci, mem, iommu }
    }

    /// Adds `device` at `slot` (or the first free one), behind the IOMMU if
    /// `behind_iommu`.
    pub fn add<D>(
        &mut self,
        device: D,
        slot: Option<u8>,
        behind_iommu: bool,
    ) -> Result<PciAddress, Error>
    where
        D: VirtioDevice<GuestMemoryMmap> + VirtioDevice<TranslatedMemory> + 'static,
    {
        if !behind_iommu {
            return self.pci.add_virtio::<GuestMemoryMmap>(
                Box::new(device),
                self.mem.clone(),
                slot,
                None,
            );
        }
        let iommu = self.iommu.as_mut().ok_or_else(|| {
            Error::Pci("iommu=on for a device but there is no virtio-iommu".into())
        })?;
        let address = self.pci.next_address(slot)?;
        let endpoint = iommu
            .device
            .add_endpoint(endpoint_id(address))
            .map_err(|e| Error::Pci(e.to_string()))?;
        let dma = endpoint.dma_tracker();
        let mem = IommuMemory::new(self.mem.clone(), endpoint, true, ());
        let added =
            self.pci
                .add_virtio::<TranslatedMemory>(Box::new(device), mem, slot, Some(dma))?;
        debug_assert_eq!(added, address);
        iommu.endpoints.push(address);
        Ok(address)
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
