//! The virtio-pci modern transport (virtio 1.2, 4.1.4) and a split virtqueue (2.7),
//! driven from user space through a VFIO device fd and a DMA buffer mapped at an IOVA.
//! Shared by the user-space virtio-blk ([`super::userblk`]) and virtio-net
//! ([`super::usernet`]) drivers: register access to the common configuration, reset,
//! feature negotiation, queue set-up, notification, and the ring in the DMA buffer.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::vfio::pci::{self, VirtioCap};
use crate::vfio::uapi::RegionInfo;
use crate::vfio::{Device, DmaBuffer, EventFd};

/// Common configuration registers (virtio 1.2, 4.1.4.3).
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// "No MSI-X vector" for the config and queue vector registers.
pub const NO_VECTOR: u16 = 0xffff;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Largest queue the user-space drivers set up.
pub const MAX_QUEUE_SIZE: u16 = 16;

/// The queue size a driver uses for a device maximum of `max` (> 0): the largest
/// power of two <= min(max, [`MAX_QUEUE_SIZE`]) (split rings need a power of two).
pub fn queue_size_for(max: u16) -> u16 {
    1u16 << (15 - max.clamp(1, MAX_QUEUE_SIZE).leading_zeros())
}

/// A register block: which region (BAR) and where in it.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub region: RegionInfo,
    pub base: u64,
}

/// The region of BAR `cap.bar` and the offset of the structure in it.
pub fn block(dev: &Device, cap: VirtioCap) -> Result<Block, String> {
    let region = dev.region(u32::from(cap.bar))?;
    Ok(Block {
        region,
        base: u64::from(cap.offset),
    })
}

/// The block of the virtio structure `cfg_type` of a device whose config space is `cfg`.
pub fn find_block(dev: &Device, cfg: &[u8], cfg_type: u8, what: &str) -> Result<Block, String> {
    let cap =
        pci::virtio_cap(cfg, cfg_type).ok_or_else(|| format!("no virtio {what} capability"))?;
    block(dev, cap)
}

/// The common-configuration block of a device whose config space is `cfg`.
pub fn common_block(dev: &Device, cfg: &[u8]) -> Result<Block, String> {
    find_block(
        dev,
        cfg,
        pci::VIRTIO_PCI_CAP_COMMON_CFG,
        "common-configuration",
    )
}

/// Where a split ring's three parts live, as offsets into the DMA buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
}

impl RingLayout {
    /// True when the parts, for a queue of `size`, are aligned as 2.7 requires, do not
    /// overlap, and end at or before `end`.
    pub const fn fits(&self, size: u16, end: usize) -> bool {
        let q = size as usize;
        let parts = [
            (self.desc, 16 * q, 16),
            (self.avail, 6 + 2 * q, 2),
            (self.used, 6 + 8 * q, 4),
        ];
        let mut i = 0;
        while i < 3 {
            let (at, len, align) = parts[i];
            if at % align != 0 || at + len > end {
                return false;
            }
            let mut j = 0;
            while j < 3 {
                let (other, other_len, _) = parts[j];
                if i != j && at < other + other_len && other < at + len {
                    return false;
                }
                j += 1;
            }
            i += 1;
        }
        true
    }

    /// Offset of descriptor `index`.
    pub fn desc_at(&self, index: u16) -> usize {
        self.desc + 16 * usize::from(index)
    }

    /// Offset of the avail ring entry for the `n`th published chain (free-running).
    pub fn avail_entry_at(&self, n: u16, size: u16) -> usize {
        self.avail + 4 + 2 * usize::from(n % size)
    }

    /// Offset of the `n`th used element (free-running).
    pub fn used_elem_at(&self, n: u16, size: u16) -> usize {
        self.used + 4 + 8 * usize::from(n % size)
    }
}

/// A descriptor as the device reads it (little endian).
pub fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// The driver side of one split ring inside the DMA buffer `buf`, mapped at `iova`.
pub struct SplitRing<'a> {
    buf: &'a DmaBuffer,
    iova: u64,
    at: RingLayout,
    size: u16,
    next_avail: u16,
}

/// A used element: the head of the chain and the bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

impl<'a> SplitRing<'a> {
    /// A ring of `size` (a power of two) at `at`; zeroes its avail and used headers.
    pub fn new(buf: &'a DmaBuffer, iova: u64, at: RingLayout, size: u16) -> Result<Self, String> {
        if !size.is_power_of_two() || !at.fits(size, buf.len()) {
            return Err(format!(
                "ring of {size} at {at:?} does not fit the DMA buffer"
            ));
        }
        buf.write(at.avail, &[0; 4])?;
        buf.write(at.used, &[0; 4])?;
        Ok(SplitRing {
            buf,
            iova,
            at,
            size,
            next_avail: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The avail index the driver published last.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The IOVAs of the descriptor table, driver (avail) and device (used) areas.
    pub fn iovas(&self) -> [u64; 3] {
        [self.at.desc, self.at.avail, self.at.used].map(|off| self.iova + off as u64)
    }

    /// Writes descriptor `index`.
    pub fn desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), String> {
        if index >= self.size {
            return Err(format!(
                "descriptor {index} outside a queue of {}",
                self.size
            ));
        }
        self.buf
            .write(self.at.desc_at(index), &encode_desc(addr, len, flags, next))
    }

    /// Puts chain `head` in the avail ring and publishes it: the descriptors and the
    /// entry before the index, the index before the caller's notify.
    pub fn publish(&mut self, head: u16) -> Result<(), String> {
        let entry = self.at.avail_entry_at(self.next_avail, self.size);
        self.buf.write(entry, &head.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.buf
            .write(self.at.avail + 2, &self.next_avail.to_le_bytes())?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16, String> {
        fence(Ordering::SeqCst);
        self.buf.read_u16(self.at.used + 2)
    }

    /// The `n`th used element (free-running position).
    pub fn used_elem(&self, n: u16) -> Result<UsedElem, String> {
        let mut e = [0u8; 8];
        self.buf.read(self.at.used_elem_at(n, self.size), &mut e)?;
        Ok(UsedElem {
            id: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            len: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
    }

    /// Waits (up to `timeout`) until chain `head` shows up among the used elements
    /// from position `since` on and the eventfd `irq` has fired at least once;
    /// returns what it saw either way.
    pub fn wait_chain(&self, irq: &EventFd, since: u16, head: u16, timeout: Duration) -> Waited {
        let deadline = Instant::now() + timeout;
        let mut seen = Waited::default();
        loop {
            if let Err(e) = self.scan(since, head, &mut seen) {
                seen.error = Some(e);
                return seen;
            }
            if seen.elem.is_some() && seen.interrupts > 0 {
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return seen;
            }
            let slice = left.min(Duration::from_millis(100)).as_millis() as i32;
            match irq.wait(slice.max(1)) {
                Ok(n) => seen.interrupts += n,
                Err(e) => {
                    seen.error = Some(e);
                    return seen;
                }
            }
        }
    }

    /// Reads the used index into `seen` and looks for chain `head` in the elements
    /// from `since` (at most one ring's worth) up to it.
    fn scan(&self, since: u16, head: u16, seen: &mut Waited) -> Result<(), String> {
        seen.used = self.used_idx()?;
        if seen.elem.is_some() {
            return Ok(());
        }
        let new = seen.used.wrapping_sub(since).min(self.size);
        for n in 0..new {
            let elem = self.used_elem(since.wrapping_add(n))?;
            if elem.id == u32::from(head) {
                seen.elem = Some(elem);
                break;
            }
        }
        Ok(())
    }
}

/// What [`SplitRing::wait_chain`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Waited {
    /// The used index when the wait ended.
    pub used: u16,
    /// Eventfd count read while waiting.
    pub interrupts: u64,
    /// The chain's used element, if it was completed.
    pub elem: Option<UsedElem>,
    /// Reading the ring or the eventfd failed.
    pub error: Option<String>,
}

/// One set-up queue: its index, size and where to notify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub index: u16,
    pub size: u16,
    /// Offset of its notification address in the notify block.
    pub notify_at: u64,
}

/// The modern virtio-pci transport of one device, through its VFIO device fd.
pub struct Transport<'a> {
    dev: &'a Device,
    common: Block,
    notify: Block,
    notify_multiplier: u32,
}

impl<'a> Transport<'a> {
    /// Finds the common and notification structures of a device whose config space
    /// is `cfg`.
    pub fn new(dev: &'a Device, cfg: &[u8]) -> Result<Self, String> {
        let common = common_block(dev, cfg)?;
        let notify = pci::virtio_cap(cfg, pci::VIRTIO_PCI_CAP_NOTIFY_CFG)
            .ok_or("no virtio notification capability")?;
        Ok(Transport {
            dev,
            common,
            notify: block(dev, notify)?,
            notify_multiplier: notify.notify_off_multiplier,
        })
    }

    pub fn dev(&self) -> &'a Device {
        self.dev
    }

    fn w8(&self, off: u64, v: u8) -> Result<(), String> {
        self.dev
            .write_u8(&self.common.region, self.common.base + off, v)
    }
    fn w16(&self, off: u64, v: u16) -> Result<(), String> {
        self.dev
            .write_u16(&self.common.region, self.common.base + off, v)
    }
    fn w32(&self, off: u64, v: u32) -> Result<(), String> {
        self.dev
            .write_u32(&self.common.region, self.common.base + off, v)
    }
    /// A 64-bit register as two 32-bit writes, low half first (as Linux does).
    fn w64(&self, off: u64, v: u64) -> Result<(), String> {
        self.w32(off, v as u32)?;
        self.w32(off + 4, (v >> 32) as u32)
    }
    fn r8(&self, off: u64) -> Result<u8, String> {
        self.dev
            .read_u8(&self.common.region, self.common.base + off)
    }
    fn r16(&self, off: u64) -> Result<u16, String> {
        self.dev
            .read_u16(&self.common.region, self.common.base + off)
    }
    fn r32(&self, off: u64) -> Result<u32, String> {
        self.dev
            .read_u32(&self.common.region, self.common.base + off)
    }

    pub fn status(&self) -> Result<u8, String> {
        self.r8(DEVICE_STATUS)
    }

    pub fn set_status(&self, status: u8) -> Result<(), String> {
        self.w8(DEVICE_STATUS, status)
    }

    /// Writes 0 to the device status and waits (up to 1 s) until it reads back 0.
    pub fn reset(&self) -> Result<(), String> {
        self.set_status(0)?;
        for _ in 0..100 {
            if self.status()? == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("device status did not return to 0 after reset".into())
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> Result<u64, String> {
        self.w32(DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.r32(DEVICE_FEATURE)?;
        self.w32(DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.r32(DEVICE_FEATURE)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    /// From a reset device: ACKNOWLEDGE | DRIVER, then accepts the offered features
    /// among `wanted` (VERSION_1 must be offered) and sets FEATURES_OK, which the
    /// device must keep. Returns (offered, accepted).
    pub fn negotiate(&self, wanted: u64) -> Result<(u64, u64), String> {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        let offered = self.device_features()?;
        if offered & F_VERSION_1 == 0 {
            return Err(format!("VERSION_1 not offered (features {offered:#x})"));
        }
        let accepted = offered & wanted;
        for (select, half) in [(0u32, accepted as u32), (1, (accepted >> 32) as u32)] {
            self.w32(DRIVER_FEATURE_SELECT, select)?;
            self.w32(DRIVER_FEATURE, half)?;
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)?;
        let got = self.status()?;
        if got & STATUS_FEATURES_OK == 0 {
            return Err(format!(
                "device refused features {accepted:#x} (status {got:#x})"
            ));
        }
        Ok((offered, accepted))
    }

    /// The configuration-change MSI-X vector.
    pub fn set_config_vector(&self, vector: u16) -> Result<(), String> {
        self.w16(CONFIG_MSIX_VECTOR, vector)
    }

    /// The device's maximum size of queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u16) -> Result<u16, String> {
        self.w16(QUEUE_SELECT, index)?;
        self.r16(QUEUE_SIZE)
    }

    /// Sets up and enables queue `index` with `size` entries (from
    /// [`queue_size_for`]), MSI-X vector `vector` (or [`NO_VECTOR`]), and its three
    /// parts at `iovas` (descriptor table, driver area, device area).
    pub fn setup_queue(
        &self,
        index: u16,
        size: u16,
        vector: u16,
        iovas: [u64; 3],
    ) -> Result<QueueInfo, String> {
        self.w16(QUEUE_SELECT, index)?;
        self.w16(QUEUE_SIZE, size)?;
        self.w16(QUEUE_MSIX_VECTOR, vector)?;
        let got = self.r16(QUEUE_MSIX_VECTOR)?;
        if got != vector {
            return Err(format!(
                "queue {index} MSI-X vector reads back {got:#x}, not {vector:#x}"
            ));
        }
        self.w64(QUEUE_DESC, iovas[0])?;
        self.w64(QUEUE_DRIVER, iovas[1])?;
        self.w64(QUEUE_DEVICE, iovas[2])?;
        self.w16(QUEUE_ENABLE, 1)?;
        let notify_off = self.r16(QUEUE_NOTIFY_OFF)?;
        Ok(QueueInfo {
            index,
            size,
            notify_at: u64::from(notify_off) * u64::from(self.notify_multiplier),
        })
    }

    /// Sets DRIVER_OK on top of FEATURES_OK; returns the status read back.
    pub fn driver_ok(&self) -> Result<u8, String> {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(status | STATUS_DRIVER_OK)?;
        self.status()
    }

    /// Raw write of `bytes` at `offset` of the common configuration (one access of
    /// that width, whatever the register): for drivers that test how a device takes
    /// writes a well-behaved driver never makes.
    pub fn write_common(&self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        self.dev
            .write(&self.common.region, self.common.base + offset, bytes)
    }

    /// Raw read of `out.len()` bytes at `offset` of the common configuration.
    pub fn read_common(&self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        self.dev
            .read(&self.common.region, self.common.base + offset, out)
    }

    /// Where queue `q`'s doorbell is: the region (BAR) index and the offset in it.
    pub fn notify_location(&self, q: &QueueInfo) -> (u32, u64) {
        (self.notify.region.index, self.notify.base + q.notify_at)
    }

    /// Notifies queue `q` (writes its index at its notification address).
    pub fn notify(&self, q: &QueueInfo) -> Result<(), String> {
        self.dev
            .write_u16(&self.notify.region, self.notify.base + q.notify_at, q.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes_are_powers_of_two_within_the_device_maximum() {
        assert_eq!(queue_size_for(256), 16);
        assert_eq!(queue_size_for(16), 16);
        assert_eq!(queue_size_for(12), 8);
        assert_eq!(queue_size_for(3), 2);
        assert_eq!(queue_size_for(1), 1);
        assert_eq!(queue_size_for(0), 1);
    }

    #[test]
    fn ring_layouts_check_alignment_overlap_and_end() {
        let at = RingLayout {
            desc: 0,
            avail: 0x100,
            used: 0x200,
        };
        assert!(at.fits(16, 0x1000));
        assert!(
            !at.fits(32, 0x1000),
            "32 descriptors overlap the avail ring"
        );
        assert!(
            !at.fits(16, 0x200 + 6 + 8 * 16 - 1),
            "used ring past the end"
        );
        assert!(
            !RingLayout { used: 0x202, ..at }.fits(16, 0x1000),
            "used misaligned"
        );
        assert!(
            !RingLayout { desc: 8, ..at }.fits(4, 0x1000),
            "desc misaligned"
        );
        assert_eq!(at.desc_at(3), 0x30);
        assert_eq!(at.avail_entry_at(17, 16), 0x100 + 4 + 2);
        assert_eq!(at.used_elem_at(15, 16), 0x200 + 4 + 8 * 15);
    }

    #[test]
    fn descriptors_are_little_endian() {
        let d = encode_desc(0x1122_3344_5566_7788, 0x99aa_bbcc, DESC_F_NEXT, 0x0102);
        assert_eq!(
            d,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 1, 0, 2, 1]
        );
    }

    #[test]
    fn ring_publishes_and_reads_used_elements() {
        let buf = DmaBuffer::new(0x1000).unwrap();
        let at = RingLayout {
            desc: 0,
            avail: 0x100,
            used: 0x200,
        };
        let iova = 0x8_0000_0000;
        let mut ring = SplitRing::new(&buf, iova, at, 4).unwrap();
        assert_eq!(ring.iovas(), [iova, iova + 0x100, iova + 0x200]);
        ring.desc(1, iova + 0x800, 90, 0, 0).unwrap();
        assert!(ring.desc(4, 0, 0, 0, 0).is_err());
        for _ in 0..5 {
            ring.publish(1).unwrap();
        }
        assert_eq!(ring.next_avail(), 5);
        assert_eq!(buf.read_u16(0x102), Ok(5));
        assert_eq!(
            buf.read_u16(0x104 + 2),
            Ok(1),
            "the 5th entry wrapped to slot 1"
        );
        let mut d = [0u8; 16];
        buf.read(16, &mut d).unwrap();
        assert_eq!(d, encode_desc(iova + 0x800, 90, 0, 0));
        // The device completes chain 1 as the 2nd used element.
        buf.write(0x204 + 8, &[1, 0, 0, 0, 42, 0, 0, 0]).unwrap();
        buf.write(0x202, &2u16.to_le_bytes()).unwrap();
        assert_eq!(ring.used_idx(), Ok(2));
        assert_eq!(ring.used_elem(5), Ok(UsedElem { id: 1, len: 42 }));
        assert!(SplitRing::new(&buf, iova, at, 3).is_err());
        assert!(SplitRing::new(&buf, iova, at, 64).is_err());
    }

    #[test]
    fn waiting_for_a_chain_is_bounded() {
        let buf = DmaBuffer::new(0x1000).unwrap();
        let at = RingLayout {
            desc: 0,
            avail: 0x100,
            used: 0x200,
        };
        let ring = SplitRing::new(&buf, 0, at, 4).unwrap();
        let irq = EventFd::new().unwrap();
        let signal = || {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from `one` to our own eventfd.
            assert_eq!(unsafe { libc::write(irq.raw(), one.as_ptr().cast(), 8) }, 8);
        };
        let short = Duration::from_millis(50);
        assert_eq!(ring.wait_chain(&irq, 0, 2, short), Waited::default());
        // Chain 0 completes first (a late completion), then chain 2.
        buf.write(0x204, &[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        buf.write(0x202, &1u16.to_le_bytes()).unwrap();
        signal();
        let w = ring.wait_chain(&irq, 0, 2, short);
        assert_eq!((w.used, w.interrupts, w.elem), (1, 1, None));
        buf.write(0x20c, &[2, 0, 0, 0, 7, 0, 0, 0]).unwrap();
        buf.write(0x202, &2u16.to_le_bytes()).unwrap();
        signal();
        let w = ring.wait_chain(&irq, 0, 2, Duration::from_secs(5));
        let elem = Some(UsedElem { id: 2, len: 7 });
        assert_eq!((w.used, w.interrupts, w.elem, w.error), (2, 1, elem, None));
        // Completed without an interrupt: waits out the deadline, says so.
        let w = ring.wait_chain(&irq, 1, 2, short);
        assert_eq!((w.interrupts, w.elem), (0, elem));
    }
}
