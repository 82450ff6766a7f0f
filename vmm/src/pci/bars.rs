//! Places PCI BARs on the VMM's MMIO bus and KVM ioeventfds inside them, and moves both
//! when the guest relocates a BAR or toggles memory decoding. Parts of a BAR backed by
//! host memory (a passed-through function's mmap-ed regions, [`ferrio_pci::DirectArea`])
//! become KVM memory slots at the BAR's address instead, so guest accesses to them do
//! not exit; they move with the BAR too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferrio_devices::{Bus, BusDevice, BusError};
use ferrio_pci::{BarMapping, IoEvent, PciDevice};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

/// A PCI function as the VMM holds it: the device, the ioeventfds it asked for, the
/// KVM memory slots its BARs' direct areas occupy now, and where its BARs are on the
/// MMIO bus.
pub struct PciFunction {
    pub device: Arc<Mutex<dyn PciDevice>>,
    pub ioevents: Vec<IoEvent>,
    pub direct_slots: Mutex<BTreeMap<u8, Vec<u32>>>,
    /// The base of each BAR the bus accepted (a placement over another range is
    /// refused and not recorded).
    on_bus: Mutex<BTreeMap<u8, u64>>,
}

impl PciFunction {
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, ioevents: Vec<IoEvent>) -> Self {
        Self {
            device,
            ioevents,
            direct_slots: Mutex::default(),
            on_bus: Mutex::default(),
        }
    }

    /// Takes BAR `bar` off `mmio` if the bus holds it for this function; returns the
    /// base it had. Only this function's own range is removed: when the guest moved the
    /// BAR exactly onto another device's range, the bus refused it, and the old
    /// address the config space reports next is that device's base.
    fn take_off_bus(&self, mmio: &Bus, bar: u8) -> Option<u64> {
        let base = self
            .on_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&bar)?;
        if let Err(e) = mmio.remove(base) {
            tracing::warn!("BAR {bar} at {base:#x} was not on the bus: {e}");
        }
        Some(base)
    }

    /// Puts BAR `bar` (`size` bytes) on `mmio` at `base`, unless that overlaps another
    /// range.
    fn put_on_bus(&self, mmio: &Bus, bar: u8, base: u64, size: u64) -> Result<(), BusError> {
        let region = Arc::new(Mutex::new(BarRegion {
            device: self.device.clone(),
            bar,
        }));
        mmio.insert(region, base, size)?;
        self.on_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bar, base);
        Ok(())
    }
}

/// KVM memory slot numbers for direct BAR areas (above the RAM slots); freed numbers
/// are reused.
#[derive(Debug)]
pub struct SlotAllocator {
    next: u32,
    free: Vec<u32>,
}

impl SlotAllocator {
    /// Hands out slots from `first` on.
    pub fn new(first: u32) -> Self {
        Self {
            next: first,
            free: Vec::new(),
        }
    }

    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn give(&mut self, slot: u32) {
        self.free.push(slot);
    }
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
    pub slots: Arc<Mutex<SlotAllocator>>,
}

impl BarMapper {
    /// Unmaps what `f`'s BAR holds (`m.old`, if the bus accepted it there) and maps
    /// `m.new`. A range the bus refuses (overlapping another device: the guest
    /// programmed a bad address) stays unmapped, and the other device keeps its own.
    pub fn apply(&self, f: &PciFunction, m: BarMapping) {
        let events = || f.ioevents.iter().filter(move |e| e.bar == m.index);
        if m.old.is_some() {
            self.unmap_direct(f, m.index);
        }
        if let Some(old) = f.take_off_bus(&self.mmio, m.index) {
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
        if let Err(e) = f.put_on_bus(&self.mmio, m.index, new, m.size) {
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
        self.map_direct(f, m.index, new);
    }

    /// Maps BAR `bar`'s direct areas as KVM memory slots at `base` (the BAR's address).
    /// An area KVM refuses stays trapped: the device still serves it through the BAR.
    fn map_direct(&self, f: &PciFunction, bar: u8, base: u64) {
        let areas = f
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .direct_areas(bar);
        if areas.is_empty() {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = Vec::with_capacity(areas.len());
        for a in areas {
            let slot = slots.take();
            let Some(gpa) = base.checked_add(a.offset) else {
                slots.give(slot);
                continue;
            };
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: a.size,
                userspace_addr: a.host_addr,
            };
            // SAFETY: `host_addr..+size` is a mapping the device model owns and keeps
            // alive while it exists; the `PciFunction` holds the device, and the slot
            // is removed (unmap_direct) before the function is dropped or the BAR moves.
            match unsafe { self.vm.set_user_memory_region(region) } {
                Ok(()) => taken.push(slot),
                Err(e) => {
                    tracing::warn!(bar, gpa, size = a.size, "direct BAR area left trapped: {e}");
                    slots.give(slot);
                }
            }
        }
        f.direct_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bar, taken);
    }

    /// Removes the KVM memory slots of BAR `bar`'s direct areas.
    fn unmap_direct(&self, f: &PciFunction, bar: u8) {
        let Some(taken) = f
            .direct_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&bar)
        else {
            return;
        };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in taken {
            let region = kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
                tracing::warn!(slot, "removing a direct BAR slot: {e}");
            }
            slots.give(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrio_pci::BarInfo;

    /// A function whose BARs read their index (and nothing else matters here).
    struct Function;

    impl PciDevice for Function {
        fn read_config(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u16, _data: &[u8]) -> Vec<BarMapping> {
            Vec::new()
        }
        fn bars(&self) -> Vec<BarInfo> {
            Vec::new()
        }
        fn set_bar_address(&mut self, _index: u8, _addr: u64) {}
        fn bar_mapping(&self, _index: u8) -> Option<u64> {
            None
        }
        fn read_bar(&mut self, bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(bar);
        }
        fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
    }

    /// Another range on the bus (the ECAM window, say): reads 0xec.
    struct Other;

    impl BusDevice for Other {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0xec);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn read(bus: &Bus, addr: u64) -> u8 {
        let mut b = [0u8; 1];
        bus.read(addr, &mut b);
        b[0]
    }

    /// Regression (the `hostile` guest scenario, `bar_over_other_ranges`): a BAR the
    /// guest moves exactly onto another range and back must not take that range off
    /// the bus (the removal used to go by the old address the config space reported,
    /// which was the other range's base).
    #[test]
    fn a_bar_moved_onto_another_range_and_back_leaves_that_range_alone() {
        let bus = Bus::new();
        let (ecam, bar) = (0xe000_0000u64, 0xc000_0000u64);
        bus.insert(Arc::new(Mutex::new(Other)), ecam, 0x1000_0000)
            .unwrap();
        let f = PciFunction::new(Arc::new(Mutex::new(Function)), Vec::new());
        f.put_on_bus(&bus, 3, bar, 0x1_0000).unwrap();
        assert_eq!(read(&bus, bar + 8), 3);
        // The guest moves the BAR onto the other range: refused, nothing recorded.
        assert_eq!(f.take_off_bus(&bus, 3), Some(bar));
        assert!(f.put_on_bus(&bus, 3, ecam, 0x1_0000).is_err());
        assert_eq!(read(&bus, ecam), 0xec);
        // And back: the other range stays; the BAR is mapped again.
        assert_eq!(f.take_off_bus(&bus, 3), None);
        assert_eq!(
            read(&bus, ecam),
            0xec,
            "the other range was taken off the bus"
        );
        f.put_on_bus(&bus, 3, bar, 0x1_0000).unwrap();
        assert_eq!(read(&bus, bar), 3);
        // Decoding off: the BAR leaves the bus, and only once.
        assert_eq!(f.take_off_bus(&bus, 3), Some(bar));
        assert_eq!(read(&bus, bar), 0xff);
        assert_eq!(f.take_off_bus(&bus, 3), None);
        assert_eq!(read(&bus, ecam), 0xec);
    }
}
