//! Interrupt routing with the in-kernel irqchip: the GSI routing table (legacy ISA
//! routes plus one MSI route per MSI-X vector in use) and, per PCI function, the
//! `MsiVectors` backend: an irqfd per vector, so a device worker raises an MSI with
//! one eventfd write and no VMM thread in between.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferrio_pci::{MsiMessage, MsiVectors};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::IOAPIC_PINS;

/// First GSI handed to MSI vectors (0..24 are the IOAPIC pins).
const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// GSIs KVM accepts in a routing table (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

/// The VM's GSI routing table. `KVM_SET_GSI_ROUTING` replaces the whole table, so the
/// legacy routes are part of every update.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

struct RoutingState {
    next_gsi: u32,
    /// Released GSI ranges (a VF's vectors after VF Disable), reused first.
    free: Vec<std::ops::Range<u32>>,
    msi: BTreeMap<u32, MsiMessage>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// ISA IRQs 0-15 on the 8259 pair, and GSI n on IOAPIC pin n, except that GSI 0 (the
/// PIT) goes to pin 2 and GSI 2 (the cascade) to none of them: what the MADT's
/// interrupt source override and the MP table tell the guest.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for irq in 0..16u32 {
        if irq == 2 {
            continue;
        }
        let chip = if irq < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        routes.push(irqchip_route(irq, chip, irq % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => routes.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            n => routes.push(irqchip_route(n, KVM_IRQCHIP_IOAPIC, n)),
        }
    }
    routes
}

impl GsiRouting {
    /// Installs the legacy routes.
    pub fn new(vm: Arc<VmFd>) -> std::io::Result<Arc<Self>> {
        let r = Arc::new(Self {
            vm,
            state: Mutex::new(RoutingState {
                next_gsi: FIRST_MSI_GSI,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
        });
        r.apply()?;
        Ok(r)
    }

    fn allocate(&self, n: u32) -> std::io::Result<std::ops::Range<u32>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = s.free.iter().position(|r| r.len() >= n as usize) {
            let r = s.free.swap_remove(i);
            let (taken, rest) = (r.start..r.start + n, r.start + n..r.end);
            if !rest.is_empty() {
                s.free.push(rest);
            }
            return Ok(taken);
        }
        let start = s.next_gsi;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= MAX_GSI)
            .ok_or_else(|| {
                std::io::Error::other(format!("out of GSIs: {n} more MSI vectors do not fit"))
            })?;
        s.next_gsi = end;
        Ok(start..end)
    }

    fn set(&self, gsi: u32, msg: MsiMessage) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .msi
            .insert(gsi, msg);
    }

    /// Gives `gsis` back: their MSI routes go at the next [`Self::apply`], the numbers
    /// are reused by later allocations.
    fn release(&self, gsis: std::ops::Range<u32>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for gsi in gsis.clone() {
            s.msi.remove(&gsi);
        }
        s.free.push(gsis);
    }

    /// Writes the whole table to KVM.
    pub fn apply(&self) -> std::io::Result<()> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = legacy_routes();
        entries.extend(s.msi.iter().map(|(&gsi, &msg)| msi_route(gsi, msg)));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(std::io::Error::from)
    }
}

/// One PCI function's MSI-X vectors: a GSI and an irqfd each.
pub struct KvmMsiVectors {
    routing: Arc<GsiRouting>,
    gsis: std::ops::Range<u32>,
    irqfds: Vec<EventFd>,
}

impl KvmMsiVectors {
    /// Allocates `count` GSIs and registers an irqfd on each. On failure, what was
    /// set up is undone (by `Drop`).
    pub fn new(routing: Arc<GsiRouting>, count: u16) -> std::io::Result<Self> {
        let gsis = routing.allocate(u32::from(count))?;
        let mut v = Self {
            routing,
            gsis: gsis.clone(),
            irqfds: Vec::with_capacity(usize::from(count)),
        };
        for gsi in gsis {
            let fd = EventFd::new(EFD_NONBLOCK)?;
            v.routing
                .vm
                .register_irqfd(&fd, gsi)
                .map_err(std::io::Error::from)?;
            v.irqfds.push(fd);
        }
        Ok(v)
    }
}

impl Drop for KvmMsiVectors {
    /// Detaches the irqfds, then frees the GSIs and their routes (a VF going away).
    fn drop(&mut self) {
        for (gsi, fd) in self.gsis.clone().zip(&self.irqfds) {
            if let Err(e) = self.routing.vm.unregister_irqfd(fd, gsi) {
                tracing::warn!(gsi, "KVM_IRQFD deassign: {e}");
            }
        }
        self.routing.release(self.gsis.clone());
        if let Err(e) = self.routing.apply() {
            tracing::warn!("GSI routing update after releasing vectors: {e}");
        }
    }
}

impl MsiVectors for KvmMsiVectors {
    fn count(&self) -> u16 {
        self.irqfds.len() as u16
    }

    fn set_message(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        if usize::from(vector) >= self.irqfds.len() {
            return Err(std::io::Error::other(format!(
                "MSI-X vector {vector} out of range"
            )));
        }
        self.routing.set(self.gsis.start + u32::from(vector), msg);
        Ok(())
    }

    fn commit(&self) -> std::io::Result<()> {
        self.routing.apply()
    }

    fn fire(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(std::io::Error::other(format!(
                "MSI-X vector {vector} out of range"
            ))),
        }
    }

    fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_the_madt_override() {
        let routes = legacy_routes();
        let ioapic: Vec<(u32, u32)> = routes
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: legacy routes are IRQCHIP routes, whose union member is `irqchip`.
                let chip = unsafe { e.u.irqchip };
                (e.gsi, chip)
            })
            .filter(|(_, chip)| chip.irqchip == KVM_IRQCHIP_IOAPIC)
            .map(|(gsi, chip)| (gsi, chip.pin))
            .collect();
        assert!(ioapic.contains(&(0, 2)));
        assert!(ioapic.contains(&(4, 4)));
        assert!(!ioapic.iter().any(|&(gsi, _)| gsi == 2));
        assert_eq!(ioapic.len(), IOAPIC_PINS as usize - 1);
        assert_eq!(
            routes.len() - ioapic.len(),
            15,
            "PIC routes for IRQs 0-15 but the cascade"
        );
    }

    #[test]
    fn msi_route_splits_the_address() {
        let e = msi_route(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        // SAFETY: msi_route builds an MSI route, whose union member is `msi`.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (e.type_, m.address_lo, m.address_hi, m.data),
            (KVM_IRQ_ROUTING_MSI, 0xfee0_1000, 1, 0x4041)
        );
    }
}
