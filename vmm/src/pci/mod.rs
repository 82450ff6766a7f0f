//! The VMM side of the PCIe bus: builds the root complex (host bridge plus the
//! configured devices), gives BARs their initial addresses from the 32- and 64-bit
//! windows, and connects config space (ECAM on the MMIO bus, 0xCF8/0xCFC on the port
//! bus) so that BAR moves reach [`bars::BarMapper`].

mod bars;
pub mod console;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferrio_devices::virtio::VirtioDevice;
use ferrio_devices::{Bus, BusDevice};
use ferrio_pci::root::{PciAddress, PciRoot, SharedPciDevice};
use ferrio_pci::virtio_pci::VirtioPciDevice;
use ferrio_pci::{BarKind, BarMapping, MsiVectors};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;

use crate::error::Error;
use crate::interrupts::{GsiRouting, KvmMsiVectors};
use crate::layout::{self, pio};
use bars::{BarMapper, PciFunction};

/// Builds the PCI topology before the guest runs.
pub struct PciBuilder {
    root: PciRoot,
    functions: BTreeMap<PciAddress, PciFunction>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    routing: Arc<GsiRouting>,
}

fn pci_err(e: impl std::fmt::Display) -> Error {
    Error::Pci(e.to_string())
}

impl PciBuilder {
    /// A root complex with only the host bridge; BARs go to the windows the DSDT
    /// describes (`ram_end` places the 64-bit one).
    pub fn new(routing: Arc<GsiRouting>, ram_end: u64) -> Result<Self, Error> {
        let mmio32 = AddressAllocator::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE)
            .map_err(pci_err)?;
        let mmio64 =
            AddressAllocator::new(layout::pci_mmio64_start(ram_end), layout::PCI_MMIO64_SIZE)
                .map_err(pci_err)?;
        Ok(Self {
            root: PciRoot::new(),
            functions: BTreeMap::new(),
            mmio32,
            mmio64,
            routing,
        })
    }

    /// Adds a virtio device behind a virtio-pci transport at `slot` (or the first free
    /// one) and returns its address.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice<GuestMemoryMmap>>,
        mem: GuestMemoryMmap,
        slot: Option<u8>,
    ) -> Result<PciAddress, Error> {
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).map_err(pci_err)?;
        let msi: Arc<dyn MsiVectors> =
            Arc::new(KvmMsiVectors::new(self.routing.clone(), vectors).map_err(pci_err)?);
        let dev = VirtioPciDevice::new(device, mem, msi, false).map_err(pci_err)?;
        self.add(Arc::new(Mutex::new(dev)), slot)
    }

    /// Places `dev`'s BARs and plugs it in.
    fn add(&mut self, dev: SharedPciDevice, slot: Option<u8>) -> Result<PciAddress, Error> {
        let ioevents = {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            for bar in d.bars() {
                let window = match bar.kind {
                    BarKind::Mmio32 => &mut self.mmio32,
                    BarKind::Mmio64 { .. } => &mut self.mmio64,
                };
                let range = window
                    .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
                    .map_err(|e| {
                        Error::Pci(format!("no room for a {:#x}-byte BAR: {e}", bar.size))
                    })?;
                d.set_bar_address(bar.index, range.start());
            }
            d.ioevents()
        };
        let address = self.root.add_device(slot, dev.clone()).map_err(pci_err)?;
        self.functions.insert(
            address,
            PciFunction {
                device: dev,
                ioevents,
            },
        );
        Ok(address)
    }

    /// Connects config space to the buses. BARs get mapped when the guest enables
    /// memory decoding (as it does in `pci_enable_device`).
    pub fn attach(self, vm: Arc<VmFd>, mmio: &Arc<Bus>, pio_bus: &Bus) -> Result<(), Error> {
        let system = Arc::new(PciSystem {
            root: self.root,
            functions: self.functions,
            mapper: BarMapper {
                mmio: mmio.clone(),
                vm,
            },
        });
        // Functions whose memory decoding is already on (none at reset) are mapped now.
        for (address, f) in &system.functions {
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
                system.mapper.apply(f, m);
            }
        }
        mmio.insert(
            Arc::new(Mutex::new(EcamDevice(system.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;
        pio_bus.insert(
            Arc::new(Mutex::new(ConfigIoDevice(system))),
            pio::PCI_CONFIG,
            pio::PCI_CONFIG_LEN,
        )?;
        Ok(())
    }
}

/// The running root complex and what the VMM needs to follow BAR moves.
struct PciSystem {
    root: PciRoot,
    functions: BTreeMap<PciAddress, PciFunction>,
    mapper: BarMapper,
}

impl PciSystem {
    fn apply(&self, changes: Vec<(PciAddress, BarMapping)>) {
        for (address, m) in changes {
            match self.functions.get(&address) {
                Some(f) => self.mapper.apply(f, m),
                None => tracing::debug!(%address, "BAR change of a function without BARs"),
            }
        }
    }
}

/// ECAM window on the MMIO bus.
struct EcamDevice(Arc<PciSystem>);

impl BusDevice for EcamDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.root.ecam_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let changes = self.0.root.ecam_write(offset, data);
        self.0.apply(changes);
    }
}

/// Configuration mechanism #1 (ports 0xCF8-0xCFF) on the port bus.
struct ConfigIoDevice(Arc<PciSystem>);

impl BusDevice for ConfigIoDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.root.pio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let changes = self.0.root.pio_write(offset, data);
        self.0.apply(changes);
    }
}
