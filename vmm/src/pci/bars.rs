//! Places PCI BARs on the VMM's MMIO bus and KVM ioeventfds inside them, and moves both
//! when the guest relocates a BAR or toggles memory decoding.

use std::sync::{Arc, Mutex};

use ferrio_devices::{Bus, BusDevice};
use ferrio_pci::{BarMapping, IoEvent, PciDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

/// A PCI function as the VMM holds it: the device and the ioeventfds it asked for.
pub struct PciFunction {
    pub device: Arc<Mutex<dyn PciDevice>>,
    pub ioevents: Vec<IoEvent>,
}

/// One BAR of a function, as a device on the MMIO bus.
struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.bar, offset, data);
    }
}

/// Applies BAR mapping changes to the MMIO bus and KVM.
pub struct BarMapper {
    pub mmio: Arc<Bus>,
    pub vm: Arc<VmFd>,
}

impl BarMapper {
    /// Unmaps `m.old` and maps `m.new` for `f`. A range the bus refuses (overlapping
    /// another device: the guest programmed a bad address) stays unmapped.
    pub fn apply(&self, f: &PciFunction, m: BarMapping) {
        let events = || f.ioevents.iter().filter(move |e| e.bar == m.index);
        if let Some(old) = m.old {
            if let Err(e) = self.mmio.remove(old) {
                tracing::debug!("BAR {} at {old:#x} was not mapped: {e}", m.index);
            }
            for ev in events() {
                let addr = IoEventAddress::Mmio(old + ev.offset);
                if let Err(e) = self.vm.unregister_ioevent(&ev.fd, &addr, NoDatamatch) {
                    tracing::debug!(
                        "ioeventfd at {:#x} was not registered: {e}",
                        old + ev.offset
                    );
                }
            }
        }
        let Some(new) = m.new else { return };
        let region = Arc::new(Mutex::new(BarRegion {
            device: f.device.clone(),
            bar: m.index,
        }));
        if let Err(e) = self.mmio.insert(region, new, m.size) {
            tracing::warn!(
                "guest placed BAR {} at {new:#x}+{:#x}: {e}; left unmapped",
                m.index,
                m.size
            );
            return;
        }
        for ev in events() {
            let addr = IoEventAddress::Mmio(new + ev.offset);
            if let Err(e) = self.vm.register_ioevent(&ev.fd, &addr, NoDatamatch) {
                // The device still sees the write through the BAR and signals itself.
                tracing::warn!(
                    "ioeventfd at {:#x}: {e}; notifications will exit to the VMM",
                    new + ev.offset
                );
            }
        }
    }
}
