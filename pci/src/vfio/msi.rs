//! The MSI capability (id 0x05) of a passed-through function, emulated: the guest's
//! message goes into the vector routes ([`MsiVectors`]) and VFIO's MSI index signals
//! their eventfds ([`VectorRouter`], block mode: VFIO enables all MSI vectors at once).
//!
//! Registers: message control (enable and multiple message enable writable; multiple
//! message capable capped at what the host and the VMM provide), address (and upper
//! address for a 64-bit capability), data (16 bits), and with per-vector masking the
//! mask bits (writable) and pending bits (read-only, set from captured interrupts).

use tracing::{debug, warn};

use super::interrupts::{Trigger, VectorRouter};
use super::ops::VfioOps;
use super::MSI_IRQ;
use crate::config::{ranges_overlap, ConfigSpace};
use crate::{MsiMessage, MsiVectors};

/// Message control: MSI enable.
const CTRL_ENABLE: u16 = 1;
/// Message control: multiple message capable (log2, bits 3:1).
const CTRL_MMC_SHIFT: u16 = 1;
/// Message control: multiple message enable (log2, bits 6:4).
const CTRL_MME_SHIFT: u16 = 4;
/// Message control: 64-bit address capable.
const CTRL_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
const CTRL_PVM: u16 = 1 << 8;

/// The emulated MSI capability.
#[derive(Debug)]
pub(crate) struct MsiPassthrough {
    cap: u16,
    is64: bool,
    pvm: bool,
    /// log2 of the vectors offered to the guest.
    mmc: u8,
    router: VectorRouter,
    /// Last message set per vector (`None`: not routed).
    routed: Vec<Option<MsiMessage>>,
}

impl MsiPassthrough {
    /// Length of the capability with these features.
    pub(crate) fn cap_len(ctrl: u16) -> u16 {
        let mut len = 10;
        if ctrl & CTRL_64BIT != 0 {
            len += 4;
        }
        if ctrl & CTRL_PVM != 0 {
            len += 10;
        }
        len
    }

    /// Vectors the device can use (its multiple message capable field).
    pub(crate) fn device_vectors(ctrl: u16) -> u16 {
        1 << ((ctrl >> CTRL_MMC_SHIFT) & 7).min(5)
    }

    /// Emulates the capability at `cap` of `cfg` (which holds the device's copy),
    /// offering at most `max_vectors` vectors (rounded down to a power of two).
    pub(crate) fn new(cfg: &mut ConfigSpace, cap: u16, max_vectors: u16) -> Self {
        let ctrl = cfg.read_u16(cap + 2);
        let is64 = ctrl & CTRL_64BIT != 0;
        let pvm = ctrl & CTRL_PVM != 0;
        let vectors = Self::device_vectors(ctrl).min(max_vectors.max(1));
        let mmc = (u16::BITS - 1 - vectors.leading_zeros()) as u8;
        let me = MsiPassthrough {
            cap,
            is64,
            pvm,
            mmc,
            router: VectorRouter::new(MSI_IRQ, 1, true),
            routed: vec![None; 1 << mmc],
        };
        // Message control: keep the device's capability bits, offer `mmc`, reset state.
        let ctrl = (ctrl & (CTRL_64BIT | CTRL_PVM)) | u16::from(mmc) << CTRL_MMC_SHIFT;
        cfg.set_u16(cap + 2, ctrl);
        cfg.set_write_mask(cap + 2, &(CTRL_ENABLE | 7 << CTRL_MME_SHIFT).to_le_bytes());
        cfg.set_u32(cap + 4, 0);
        cfg.set_write_mask(cap + 4, &0xffff_fffcu32.to_le_bytes());
        if is64 {
            cfg.set_u32(cap + 8, 0);
            cfg.set_write_mask(cap + 8, &[0xff; 4]);
        }
        cfg.set_u32(me.data_reg(), 0);
        cfg.set_write_mask(me.data_reg(), &[0xff, 0xff, 0, 0]);
        if pvm {
            let bits = me.vector_bits(1 << mmc);
            cfg.set_u32(me.mask_reg(), 0);
            cfg.set_write_mask(me.mask_reg(), &bits.to_le_bytes());
            cfg.set_u32(me.mask_reg() + 4, 0);
            cfg.set_write_mask(me.mask_reg() + 4, &[0; 4]);
        }
        debug!(
            cap,
            is64,
            pvm,
            vectors = 1u32 << mmc,
            "MSI capability emulated"
        );
        me
    }

    fn data_reg(&self) -> u16 {
        self.cap + if self.is64 { 12 } else { 8 }
    }

    fn mask_reg(&self) -> u16 {
        self.data_reg() + 4
    }

    fn vector_bits(&self, n: u32) -> u32 {
        if n >= 32 {
            u32::MAX
        } else {
            (1 << n) - 1
        }
    }

    fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.read_u16(self.cap + 2) & CTRL_ENABLE != 0
    }

    /// Vectors enabled by the guest (multiple message enable, capped at capable).
    fn enabled_vectors(&self, cfg: &ConfigSpace) -> u32 {
        let mme = (cfg.read_u16(self.cap + 2) >> CTRL_MME_SHIFT) & 7;
        1 << mme.min(u16::from(self.mmc))
    }

    fn message(&self, cfg: &ConfigSpace, v: u32, n: u32) -> MsiMessage {
        let lo = u64::from(cfg.read_u32(self.cap + 4));
        let hi = if self.is64 {
            u64::from(cfg.read_u32(self.cap + 8))
        } else {
            0
        };
        let data = u32::from(cfg.read_u16(self.data_reg()));
        MsiMessage {
            address: hi << 32 | lo,
            data: (data & !(n - 1)) | v,
        }
    }

    fn masked(&self, cfg: &ConfigSpace, v: u32) -> bool {
        self.pvm && cfg.read_u32(self.mask_reg()) & (1 << v) != 0
    }

    fn deliverable(&self, cfg: &ConfigSpace, v: u32, n: u32) -> bool {
        self.enabled(cfg) && v < n && !self.masked(cfg, v) && self.message(cfg, v, n).address != 0
    }

    /// Before a guest read: the pending bits show captured interrupts.
    pub(crate) fn config_read(&mut self, cfg: &mut ConfigSpace, offset: u16, len: usize) {
        if !self.pvm || !ranges_overlap(offset, len, self.mask_reg() + 4, self.mask_reg() + 8) {
            return;
        }
        self.collect_pending(cfg);
    }

    fn collect_pending(&mut self, cfg: &mut ConfigSpace) {
        if !self.pvm {
            return;
        }
        let pending_reg = self.mask_reg() + 4;
        let mut pending = cfg.read_u32(pending_reg);
        for v in 0..self.router.count().min(32) {
            if self.router.trigger(v) == Trigger::Capture && self.router.take_captured(v) {
                pending |= 1 << v;
            }
        }
        cfg.set_u32(pending_reg, pending);
    }

    /// After a guest config write (`cfg` already updated).
    pub(crate) fn config_write(
        &mut self,
        ops: &dyn VfioOps,
        msi: &dyn MsiVectors,
        cfg: &mut ConfigSpace,
        offset: u16,
        len: usize,
    ) {
        let end = self.cap + Self::cap_len(cfg.read_u16(self.cap + 2));
        if !ranges_overlap(offset, len, self.cap, end) {
            return;
        }
        self.collect_pending(cfg);
        if !self.enabled(cfg) {
            if self.router.is_enabled() {
                debug!("guest disabled MSI");
            }
            self.router.disable(ops);
            self.routed.fill(None);
            return;
        }
        let n = self.enabled_vectors(cfg);
        if self.router.count() != n {
            // VFIO cannot resize an enabled MSI block: start over with `n` vectors.
            self.router.disable(ops);
            self.router.set_count(n);
            self.routed.fill(None);
        }
        let mut changed = false;
        for v in 0..n {
            let msg = self.message(cfg, v, n);
            if !self.deliverable(cfg, v, n) || self.routed.get(v as usize) == Some(&Some(msg)) {
                continue;
            }
            if let Err(e) = msi.set_message(v as u16, msg) {
                warn!(vector = v, error = %e, "MSI route update failed");
            }
            if let Some(r) = self.routed.get_mut(v as usize) {
                *r = Some(msg);
            }
            changed = true;
        }
        if changed {
            if let Err(e) = msi.commit() {
                warn!(error = %e, "MSI route commit failed");
            }
        }
        let this = &*self;
        let deliverable: Vec<bool> = (0..n).map(|v| this.deliverable(cfg, v, n)).collect();
        self.router.update(ops, msi, 0..n, |v| {
            deliverable.get(v as usize).copied().unwrap_or(false)
        });
        // Interrupts that were pending (or captured) fire once deliverable.
        let pending_reg = self.mask_reg() + 4;
        let mut pending = if self.pvm {
            cfg.read_u32(pending_reg)
        } else {
            0
        };
        for v in 0..n {
            if self.router.trigger(v) != Trigger::Irqfd {
                continue;
            }
            let was_pending = v < 32 && pending & (1 << v) != 0;
            if self.router.take_captured(v) || was_pending {
                if let Err(e) = msi.fire(v as u16) {
                    warn!(vector = v, error = %e, "MSI delivery failed");
                }
                if v < 32 {
                    pending &= !(1 << v);
                }
            }
        }
        if self.pvm {
            cfg.set_u32(pending_reg, pending);
        }
    }

    /// Guest-visible reset: disabled, routes dropped.
    pub(crate) fn reset(&mut self, ops: &dyn VfioOps, cfg: &mut ConfigSpace) {
        self.router.disable(ops);
        self.routed.fill(None);
        let ctrl = cfg.read_u16(self.cap + 2);
        cfg.set_u16(self.cap + 2, ctrl & !(CTRL_ENABLE | 7 << CTRL_MME_SHIFT));
    }
}
