//! Interrupt routing of a passed-through function: which eventfd VFIO signals for
//! each vector ([`VectorRouter`]), and the MSI-X glue around [`crate::msix::Msix`]
//! ([`MsixPassthrough`]).
//!
//! A vector that the guest can receive (MSI-X enabled, function and vector unmasked,
//! message programmed) has VFIO signal its [`MsiVectors`] eventfd directly (a KVM
//! irqfd whose GSI route carries the guest's message): no VMM thread in the path.
//! When it stops being deliverable, VFIO signals a *capture* eventfd owned by the
//! model instead; the model moves captured interrupts into the pending bit (the guest
//! sees them in the PBA, and they fire on unmask), so nothing is lost.

use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ops::VfioOps;
use crate::config::{ranges_overlap, ConfigSpace};
use crate::msix::{Msix, ENTRY_SIZE};
use crate::MsiVectors;

/// Where VFIO sends one vector's interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// Nowhere (never used since the index was enabled).
    Off,
    /// The vector's eventfd from [`MsiVectors`]: straight to the guest.
    Irqfd,
    /// The model's capture eventfd: becomes the pending bit.
    Capture,
}

/// The VFIO side of one IRQ index (MSI or MSI-X).
pub(crate) struct VectorRouter {
    index: u32,
    /// Vectors routed (the emulated capability's).
    count: u32,
    /// Enable the whole block in one call (VFIO's NORESIZE, always for MSI).
    block: bool,
    /// Whether VFIO has the index enabled.
    enabled: bool,
    current: Vec<Trigger>,
    capture: Vec<Option<EventFd>>,
}

impl std::fmt::Debug for VectorRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorRouter")
            .field("index", &self.index)
            .field("count", &self.count)
            .field("block", &self.block)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl VectorRouter {
    pub(crate) fn new(index: u32, count: u32, block: bool) -> Self {
        let n = count as usize;
        VectorRouter {
            index,
            count,
            block,
            enabled: false,
            current: vec![Trigger::Off; n],
            capture: (0..n).map(|_| None).collect(),
        }
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Changes the number of vectors (MSI's multiple message enable); only while
    /// VFIO has the index disabled.
    pub(crate) fn set_count(&mut self, count: u32) {
        debug_assert!(!self.enabled);
        let n = count as usize;
        self.count = count;
        self.current = vec![Trigger::Off; n];
        self.capture.resize_with(n, || None);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn trigger(&self, v: u32) -> Trigger {
        self.current
            .get(v as usize)
            .copied()
            .unwrap_or(Trigger::Off)
    }

    fn want(&self, v: u32, deliverable: bool) -> Trigger {
        if deliverable {
            Trigger::Irqfd
        } else if self.trigger(v) == Trigger::Off {
            Trigger::Off
        } else {
            Trigger::Capture
        }
    }

    /// The fd for `t` on vector `v` (creating its capture eventfd on first use).
    fn fd(&mut self, v: u32, t: Trigger, msi: &dyn MsiVectors) -> (Trigger, Option<RawFd>) {
        match t {
            Trigger::Off => (Trigger::Off, None),
            Trigger::Irqfd => match u16::try_from(v).ok().and_then(|v| msi.eventfd(v)) {
                Some(fd) => (Trigger::Irqfd, Some(fd.as_raw_fd())),
                None => {
                    warn!(
                        vector = v,
                        "no eventfd for the vector: its interrupts are captured"
                    );
                    self.fd(v, Trigger::Capture, msi)
                }
            },
            Trigger::Capture => {
                let Some(slot) = self.capture.get_mut(v as usize) else {
                    return (Trigger::Off, None);
                };
                if slot.is_none() {
                    match EventFd::new(EFD_NONBLOCK) {
                        Ok(fd) => *slot = Some(fd),
                        Err(e) => {
                            warn!(vector = v, error = %e, "cannot create a capture eventfd");
                            return (Trigger::Off, None);
                        }
                    }
                }
                (Trigger::Capture, slot.as_ref().map(|fd| fd.as_raw_fd()))
            }
        }
    }

    /// Brings VFIO's triggers for the vectors in `range` in line with `deliverable`.
    /// While the index is disabled nothing happens until a vector is deliverable;
    /// then the index is enabled (the whole block at once in block mode, with every
    /// vector's trigger).
    pub(crate) fn update(
        &mut self,
        ops: &dyn VfioOps,
        msi: &dyn MsiVectors,
        range: Range<u32>,
        deliverable: impl Fn(u32) -> bool,
    ) {
        let range = range.start.min(self.count)..range.end.min(self.count);
        if !self.enabled && self.block {
            if !(0..self.count).any(&deliverable) {
                return;
            }
            let mut wanted = Vec::with_capacity(self.count as usize);
            for v in 0..self.count {
                let t = self.want(v, deliverable(v));
                wanted.push(self.fd(v, t, msi));
            }
            let fds: Vec<Option<RawFd>> = wanted.iter().map(|w| w.1).collect();
            match ops.set_irq_eventfds(self.index, 0, &fds) {
                Ok(()) => {
                    self.enabled = true;
                    self.current = wanted.into_iter().map(|w| w.0).collect();
                    debug!(
                        index = self.index,
                        vectors = self.count,
                        "VFIO interrupts enabled"
                    );
                }
                Err(e) => warn!(index = self.index, error = %e, "VFIO interrupt enable failed"),
            }
            return;
        }
        let mut run: Vec<(Trigger, Option<RawFd>)> = Vec::new();
        let mut run_start = range.start;
        for v in range.clone() {
            let t = self.want(v, deliverable(v));
            if t == self.trigger(v) {
                self.flush(ops, run_start, &mut run);
                run_start = v + 1;
                continue;
            }
            let w = self.fd(v, t, msi);
            run.push(w);
        }
        self.flush(ops, run_start, &mut run);
    }

    /// Sends one contiguous run of changed vectors to VFIO.
    fn flush(&mut self, ops: &dyn VfioOps, start: u32, run: &mut Vec<(Trigger, Option<RawFd>)>) {
        if run.is_empty() {
            return;
        }
        let fds: Vec<Option<RawFd>> = run.iter().map(|w| w.1).collect();
        match ops.set_irq_eventfds(self.index, start, &fds) {
            Ok(()) => {
                if !self.enabled {
                    debug!(index = self.index, "VFIO interrupts enabled");
                }
                self.enabled = true;
                for (i, w) in run.iter().enumerate() {
                    if let Some(c) = self.current.get_mut(start as usize + i) {
                        *c = w.0;
                    }
                }
            }
            Err(e) => warn!(index = self.index, start, error = %e, "VFIO trigger update failed"),
        }
        run.clear();
    }

    /// Disables the index in VFIO (the guest disabled MSI/MSI-X, or teardown) and
    /// drops whatever the capture eventfds held.
    pub(crate) fn disable(&mut self, ops: &dyn VfioOps) {
        if self.enabled {
            if let Err(e) = ops.disable_irq(self.index) {
                warn!(index = self.index, error = %e, "VFIO interrupt disable failed");
            }
            self.enabled = false;
            debug!(index = self.index, "VFIO interrupts disabled");
        }
        self.current.fill(Trigger::Off);
        for v in 0..self.count {
            self.take_captured(v);
        }
    }

    /// Whether vector `v`'s capture eventfd was signalled since the last call.
    pub(crate) fn take_captured(&mut self, v: u32) -> bool {
        self.capture
            .get(v as usize)
            .and_then(Option::as_ref)
            .is_some_and(|fd| fd.read().is_ok_and(|n| n > 0))
    }
}

/// Where the device's own MSI-X table and PBA are (for trapping: the emulated table
/// may be smaller than the device's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsixLayout {
    pub table_bar: u8,
    pub table_offset: u64,
    pub table_size: u64,
    pub pba_bar: u8,
    pub pba_offset: u64,
    pub pba_size: u64,
}

/// The emulated MSI-X capability/table/PBA and its VFIO routing.
#[derive(Debug)]
pub(crate) struct MsixPassthrough {
    pub msix: Msix,
    pub router: VectorRouter,
    pub layout: MsixLayout,
}

impl MsixPassthrough {
    fn deliverable(msix: &Msix, v: u32) -> bool {
        let Ok(v) = u16::try_from(v) else {
            return false;
        };
        msix.trigger_handle().is_active()
            && msix
                .entry(v)
                .is_some_and(|(msg, masked)| !masked && msg.address != 0)
    }

    /// Re-routes the vectors in `range` and delivers what their capture eventfds
    /// caught while they could not be delivered.
    fn sync(&mut self, ops: &dyn VfioOps, msi: &dyn MsiVectors, range: Range<u32>) {
        let msix = &self.msix;
        self.router
            .update(ops, msi, range.clone(), |v| Self::deliverable(msix, v));
        for v in range.start..range.end.min(self.router.count()) {
            if self.router.trigger(v) == Trigger::Irqfd && self.router.take_captured(v) {
                // Deliverable now: Msix fires it.
                self.msix.trigger(v as u16);
            }
        }
    }

    /// Moves captured interrupts of vectors that are not deliverable into their
    /// pending bits.
    fn collect_pending(&mut self) {
        for v in 0..self.router.count() {
            if self.router.trigger(v) == Trigger::Capture && self.router.take_captured(v) {
                self.msix.trigger(v as u16);
            }
        }
    }

    /// After a guest config write (`cfg` already updated): message control changes.
    pub(crate) fn config_write(
        &mut self,
        ops: &dyn VfioOps,
        msi: &dyn MsiVectors,
        cfg: &ConfigSpace,
        offset: u16,
        len: usize,
    ) {
        let ctrl = u16::from(self.msix.cap_offset()) + 2;
        if !ranges_overlap(offset, len, ctrl, ctrl + 2) {
            return;
        }
        self.collect_pending();
        self.msix.config_write(cfg, offset, len);
        if self.msix.trigger_handle().is_enabled() {
            self.sync(ops, msi, 0..self.router.count());
        } else {
            self.router.disable(ops);
        }
    }

    /// Guest read in BAR `bar`; `false` when not in the emulated table or PBA.
    pub(crate) fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let c = *self.msix.config();
        let pba = bar == c.pba_bar
            && offset
                .checked_sub(u64::from(c.pba_offset))
                .is_some_and(|rel| rel < c.pba_size());
        if pba {
            self.collect_pending();
        }
        self.msix.read_bar(bar, offset, data)
    }

    /// Guest write in BAR `bar`; `false` when not in the emulated table or PBA.
    pub(crate) fn write_bar(
        &mut self,
        ops: &dyn VfioOps,
        msi: &dyn MsiVectors,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> bool {
        let c = *self.msix.config();
        let vector = (bar == c.table_bar)
            .then(|| offset.checked_sub(u64::from(c.table_offset)))
            .flatten()
            .filter(|&rel| rel < c.table_size())
            .map(|rel| (rel / ENTRY_SIZE) as u32);
        if let Some(v) = vector {
            // A captured interrupt becomes pending before an unmask delivers it.
            if self.router.trigger(v) == Trigger::Capture && self.router.take_captured(v) {
                self.msix.trigger(v as u16);
            }
        }
        if !self.msix.write_bar(bar, offset, data) {
            return false;
        }
        if let (Some(v), true) = (vector, self.msix.trigger_handle().is_enabled()) {
            self.sync(ops, msi, v..v + 1);
        }
        true
    }

    /// Guest-visible reset of the capability (device reset): disabled, all masked.
    pub(crate) fn reset(&mut self, ops: &dyn VfioOps, cfg: &mut ConfigSpace) {
        self.router.disable(ops);
        self.msix.reset(cfg);
    }
}
