//! The raw virtio-pci driver the attacks share, on top of a [`Session`]: the shared
//! transport (`scenarios/vfio/virtio.rs`) for registers and feature negotiation, split
//! rings in the session's huge page addressed by physical address, doorbells as plain
//! stores into the mapped BAR, and [`Driver::watch`], which waits (bounded) for what
//! the device does about a chain: put it in the used ring, set DEVICE_NEEDS_RESET,
//! interrupt, or nothing at all.

use std::time::{Duration, Instant};

use super::session::Session;
use crate::scenarios::vfio::virtio::{
    common_block, QueueInfo, RingLayout, SplitRing, Transport, UsedElem, DEVICE_STATUS,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
};

/// MSI-X vectors: every queue on 0, configuration changes on 1.
pub const QUEUE_VECTOR: u16 = 0;
pub const CONFIG_VECTOR: u16 = 1;

/// One set-up queue.
pub struct Queue<'a> {
    pub ring: SplitRing<'a>,
    pub info: QueueInfo,
}

/// What the device did about a chain within the wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaction {
    /// The chain's used element, if it came back.
    pub elem: Option<UsedElem>,
    /// The used index when the wait ended.
    pub used: u16,
    /// The device status when the wait ended.
    pub status: u8,
    /// Interrupts on the queue and configuration vectors.
    pub irqs: u64,
    pub config_irqs: u64,
    /// Reading the ring, the status or the eventfds failed.
    pub error: Option<String>,
}

impl Reaction {
    pub fn needs_reset(&self) -> bool {
        self.status & STATUS_DEVICE_NEEDS_RESET != 0
    }

    /// Returned with used length 0 (nothing written).
    pub fn returned_empty(&self) -> bool {
        self.elem.is_some_and(|e| e.len == 0)
    }

    /// One phrase: what came back and how.
    pub fn describe(&self) -> String {
        let mut s = match self.elem {
            Some(e) => format!("used len {}", e.len),
            None => "not returned".to_owned(),
        };
        if self.needs_reset() {
            s.push_str(", DEVICE_NEEDS_RESET");
        }
        s.push_str(&format!(
            " (status {:#04x}, irqs {}+{} cfg)",
            self.status, self.irqs, self.config_irqs
        ));
        if let Some(e) = &self.error {
            s.push_str(&format!(", error: {e}"));
        }
        s
    }
}

/// The driver of one attacked device.
pub struct Driver<'a> {
    pub s: &'a Session,
    pub t: Transport<'a>,
    /// Offset of the device status register in BAR 0.
    status_at: u64,
}

impl<'a> Driver<'a> {
    pub fn new(s: &'a Session) -> Result<Driver<'a>, String> {
        let t = Transport::new(&s.dev, &s.cfg)?;
        let common = common_block(&s.dev, &s.cfg)?;
        if common.region.index != 0 {
            return Err(format!(
                "common configuration in BAR {}, not BAR 0",
                common.region.index
            ));
        }
        Ok(Driver {
            s,
            t,
            status_at: common.base + DEVICE_STATUS,
        })
    }

    /// The physical address of offset `off` of the DMA page.
    pub fn at(&self, off: usize) -> u64 {
        self.s.phys + off as u64
    }

    /// The device status, read through the mapped BAR (one MMIO read, no syscall).
    pub fn status(&self) -> Result<u8, String> {
        self.s.bar0.read8(self.status_at)
    }

    /// Writes the device status through the mapped BAR (one MMIO store).
    pub fn write_status(&self, v: u8) -> Result<(), String> {
        self.s.bar0.write8(self.status_at, v)
    }

    /// Resets the device: writes 0, waits (up to 1 s) for the status to read 0.
    pub fn reset(&self) -> Result<(), String> {
        self.t.reset()
    }

    /// Reset, features (`wanted` ∩ offered, VERSION_1 required), the configuration
    /// vector, the queues `plans` (index, size, layout: MSI-X vector 0), DRIVER_OK.
    /// Returns the accepted features and the queues.
    pub fn start(
        &self,
        wanted: u64,
        plans: &[(u16, u16, RingLayout)],
    ) -> Result<(u64, Vec<Queue<'a>>), String> {
        let (features, queues) = self.setup(wanted, plans)?;
        let status = self.t.driver_ok()?;
        if status & STATUS_DRIVER_OK == 0 || status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(format!("status after DRIVER_OK: {status:#04x}"));
        }
        Ok((features, queues))
    }

    /// [`Self::start`] without DRIVER_OK.
    pub fn setup(
        &self,
        wanted: u64,
        plans: &[(u16, u16, RingLayout)],
    ) -> Result<(u64, Vec<Queue<'a>>), String> {
        self.reset()?;
        self.s.irqs.drain()?;
        let (_, features) = self.t.negotiate(wanted)?;
        self.t.set_config_vector(CONFIG_VECTOR)?;
        let mut queues = Vec::new();
        for &(index, size, layout) in plans {
            let ring = SplitRing::new(&self.s.mem, self.s.phys, layout, size)?;
            let info = self
                .t
                .setup_queue(index, size, QUEUE_VECTOR, ring.iovas())?;
            queues.push(Queue { ring, info });
        }
        Ok((features, queues))
    }

    /// Rings queue `q`'s doorbell with one store into the mapped BAR.
    pub fn kick(&self, q: &QueueInfo) -> Result<(), String> {
        let (region, offset) = self.t.notify_location(q);
        if region != 0 {
            return Err(format!("doorbells in BAR {region}, not BAR 0"));
        }
        self.s.bar0.write16(offset, q.index)
    }

    /// Waits up to `timeout` for chain `head` to come back in the used elements from
    /// position `since` on, or for DEVICE_NEEDS_RESET; then collects the interrupts
    /// that follow within 100 ms.
    pub fn watch(&self, ring: &SplitRing, since: u16, head: u16, timeout: Duration) -> Reaction {
        let deadline = Instant::now() + timeout;
        let mut r = Reaction::default();
        loop {
            if let Err(e) = self.scan(ring, since, head, &mut r) {
                r.error = Some(e);
                return r;
            }
            if r.elem.is_some() || r.needs_reset() || Instant::now() >= deadline {
                break;
            }
            if let Err(e) = self.count_irqs(&mut r, 10) {
                r.error = Some(e);
                return r;
            }
        }
        // The interrupt follows the used element (or the status change) closely.
        let settle = Instant::now() + Duration::from_millis(100);
        while Instant::now() < settle {
            if let Err(e) = self.count_irqs(&mut r, 20) {
                r.error = Some(e);
                break;
            }
        }
        r
    }

    fn count_irqs(&self, r: &mut Reaction, ms: i32) -> Result<(), String> {
        let (q, c) = self.s.irqs.poll(ms)?;
        r.irqs += q;
        r.config_irqs += c;
        Ok(())
    }

    fn scan(
        &self,
        ring: &SplitRing,
        since: u16,
        head: u16,
        r: &mut Reaction,
    ) -> Result<(), String> {
        r.status = self.status()?;
        r.used = ring.used_idx()?;
        if r.elem.is_none() {
            let new = r.used.wrapping_sub(since).min(ring.size());
            for n in 0..new {
                let elem = ring.used_elem(since.wrapping_add(n))?;
                if elem.id == u32::from(head) {
                    r.elem = Some(elem);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Waits for `count` more used elements than `since` (bounded); returns how many
    /// came and the interrupts seen.
    pub fn wait_used(
        &self,
        ring: &SplitRing,
        since: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<(u16, u64), String> {
        let deadline = Instant::now() + timeout;
        let mut irqs = 0;
        loop {
            let done = ring.used_idx()?.wrapping_sub(since);
            if done >= count || Instant::now() >= deadline {
                let (q, _) = self.s.irqs.poll(0)?;
                return Ok((done, irqs + q));
            }
            irqs += self.s.irqs.poll(10)?.0;
        }
    }
}
