//! A user-space virtio-blk driver over VFIO, just enough to prove that the device
//! DMAs to and from the IOVAs the guest's user space mapped, and interrupts through
//! VFIO's MSI-X eventfd: feature negotiation through the common configuration, one
//! split virtqueue inside the DMA buffer, and synchronous requests (one chain of
//! header, data and status at a time, each waited for on the eventfd).

use std::sync::atomic::{fence, Ordering};

use crate::vfio::pci::{self, VirtioCap};
use crate::vfio::uapi::RegionInfo;
use crate::vfio::{Device, DmaBuffer, EventFd};

/// Common configuration registers (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const NO_VECTOR: u16 = 0xffff;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// virtio-blk request types and the sector size.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const SECTOR: u64 = 512;

/// Layout of the DMA buffer (offsets from its start / its IOVA).
const DESC: usize = 0x0000;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HEADERS: usize = 0x3000;
const STATUSES: usize = 0x3800;
/// Data slots of [`SLOT_LEN`] bytes each.
const DATA: usize = 0x4000;
pub const SLOT_LEN: usize = 4096;
pub const SLOTS: usize = 4;
const MAX_QUEUE_SIZE: u16 = 16;
/// Bytes of the DMA buffer the layout uses.
pub const BUFFER_LEN: usize = DATA + SLOTS * SLOT_LEN;

// The layout's parts do not overlap and fit the scenario's 64 KiB buffer.
const _: () = {
    let q = MAX_QUEUE_SIZE as usize;
    assert!(DESC + 16 * q <= AVAIL);
    assert!(AVAIL + 6 + 2 * q <= USED);
    assert!(USED + 6 + 8 * q <= HEADERS);
    assert!(HEADERS + 16 * SLOTS <= STATUSES);
    assert!(STATUSES + SLOTS <= DATA);
    assert!(BUFFER_LEN <= 64 << 10);
};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// How long a request may take (the guest kernel is emulated; the eventfd is
/// signalled from its MSI handler).
const REQUEST_TIMEOUT_MS: i32 = 20_000;

/// The queue size the driver uses for a device maximum of `max` (> 0): the largest
/// power of two <= min(max, [`MAX_QUEUE_SIZE`]) (split rings need a power of two).
fn queue_size_for(max: u16) -> u16 {
    1u16 << (15 - max.clamp(1, MAX_QUEUE_SIZE).leading_zeros())
}

/// A register block: which region (BAR) and where in it.
#[derive(Debug, Clone, Copy)]
struct Block {
    region: RegionInfo,
    base: u64,
}

/// What one request returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The virtio-blk status byte (0 = OK).
    pub status: u8,
    /// The used element's `len` (bytes the device wrote).
    pub used_len: u32,
    /// The eventfd count seen while waiting.
    pub interrupts: u64,
}

/// The driver state of one device with one started queue.
pub struct UserBlk<'a> {
    dev: &'a Device,
    buf: &'a DmaBuffer,
    irq: &'a EventFd,
    iova: u64,
    common: Block,
    notify: Block,
    notify_at: u64,
    queue_size: u16,
    next_avail: u16,
    /// Features the driver accepted.
    pub features: u64,
}

/// The region of BAR `cap.bar` and the offset of the structure in it.
fn block(dev: &Device, cap: VirtioCap) -> Result<Block, String> {
    let region = dev.region(u32::from(cap.bar))?;
    Ok(Block {
        region,
        base: u64::from(cap.offset),
    })
}

impl<'a> UserBlk<'a> {
    /// The common-configuration block of a device whose config space is `cfg`.
    pub fn common_block(dev: &Device, cfg: &[u8]) -> Result<(RegionInfo, u64), String> {
        let cap = pci::virtio_cap(cfg, pci::VIRTIO_PCI_CAP_COMMON_CFG)
            .ok_or("no virtio common-configuration capability")?;
        let b = block(dev, cap)?;
        Ok((b.region, b.base))
    }

    fn w8(&self, b: &Block, off: u64, v: u8) -> Result<(), String> {
        self.dev.write_u8(&b.region, b.base + off, v)
    }
    fn w16(&self, b: &Block, off: u64, v: u16) -> Result<(), String> {
        self.dev.write_u16(&b.region, b.base + off, v)
    }
    fn w32(&self, b: &Block, off: u64, v: u32) -> Result<(), String> {
        self.dev.write_u32(&b.region, b.base + off, v)
    }
    /// A 64-bit register as two 32-bit writes, low half first (as Linux does).
    fn w64(&self, b: &Block, off: u64, v: u64) -> Result<(), String> {
        self.w32(b, off, v as u32)?;
        self.w32(b, off + 4, (v >> 32) as u32)
    }
    fn r8(&self, b: &Block, off: u64) -> Result<u8, String> {
        self.dev.read_u8(&b.region, b.base + off)
    }
    fn r16(&self, b: &Block, off: u64) -> Result<u16, String> {
        self.dev.read_u16(&b.region, b.base + off)
    }
    fn r32(&self, b: &Block, off: u64) -> Result<u32, String> {
        self.dev.read_u32(&b.region, b.base + off)
    }

    /// Resets the device, negotiates VERSION_1 (+ ACCESS_PLATFORM when offered),
    /// sets up queue 0 in `buf` at `iova` with MSI-X vector 0, and sets DRIVER_OK.
    pub fn start(
        dev: &'a Device,
        cfg: &[u8],
        buf: &'a DmaBuffer,
        iova: u64,
        irq: &'a EventFd,
    ) -> Result<UserBlk<'a>, String> {
        if buf.len() < BUFFER_LEN {
            return Err(format!("DMA buffer of {} bytes < {BUFFER_LEN}", buf.len()));
        }
        let common = pci::virtio_cap(cfg, pci::VIRTIO_PCI_CAP_COMMON_CFG)
            .ok_or("no virtio common-configuration capability")?;
        let notify = pci::virtio_cap(cfg, pci::VIRTIO_PCI_CAP_NOTIFY_CFG)
            .ok_or("no virtio notification capability")?;
        let mut d = UserBlk {
            dev,
            buf,
            irq,
            iova,
            common: block(dev, common)?,
            notify: block(dev, notify)?,
            notify_at: 0,
            queue_size: 0,
            next_avail: 0,
            features: 0,
        };
        let c = d.common;
        d.reset()?;
        d.w8(&c, DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        let offered = d.device_features()?;
        if offered & F_VERSION_1 == 0 {
            return Err(format!("VERSION_1 not offered (features {offered:#x})"));
        }
        d.features = offered & (F_VERSION_1 | F_ACCESS_PLATFORM);
        for (select, half) in [(0u32, d.features as u32), (1, (d.features >> 32) as u32)] {
            d.w32(&c, DRIVER_FEATURE_SELECT, select)?;
            d.w32(&c, DRIVER_FEATURE, half)?;
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        d.w8(&c, DEVICE_STATUS, status)?;
        let got = d.r8(&c, DEVICE_STATUS)?;
        if got & STATUS_FEATURES_OK == 0 {
            return Err(format!(
                "device refused features {:#x} (status {got:#x})",
                d.features
            ));
        }
        d.w16(&c, CONFIG_MSIX_VECTOR, NO_VECTOR)?;
        d.w16(&c, QUEUE_SELECT, 0)?;
        let max = d.r16(&c, QUEUE_SIZE)?;
        if max == 0 {
            return Err("queue 0 does not exist (queue_size 0)".into());
        }
        let size = queue_size_for(max);
        d.queue_size = size;
        d.w16(&c, QUEUE_SIZE, size)?;
        d.w16(&c, QUEUE_MSIX_VECTOR, 0)?;
        let vector = d.r16(&c, QUEUE_MSIX_VECTOR)?;
        if vector != 0 {
            return Err(format!("queue 0 MSI-X vector reads back {vector:#x}"));
        }
        d.w64(&c, QUEUE_DESC, iova + DESC as u64)?;
        d.w64(&c, QUEUE_DRIVER, iova + AVAIL as u64)?;
        d.w64(&c, QUEUE_DEVICE, iova + USED as u64)?;
        d.w16(&c, QUEUE_ENABLE, 1)?;
        let notify_off = d.r16(&c, QUEUE_NOTIFY_OFF)?;
        d.notify_at = u64::from(notify_off) * u64::from(notify.notify_off_multiplier);
        d.w8(&c, DEVICE_STATUS, status | STATUS_DRIVER_OK)?;
        Ok(d)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> Result<u64, String> {
        let c = self.common;
        self.w32(&c, DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.r32(&c, DEVICE_FEATURE)?;
        self.w32(&c, DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.r32(&c, DEVICE_FEATURE)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    /// Writes 0 to the device status and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), String> {
        let c = self.common;
        self.w8(&c, DEVICE_STATUS, 0)?;
        for _ in 0..100 {
            if self.r8(&c, DEVICE_STATUS)? == 0 {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err("device status did not return to 0 after reset".into())
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The data bytes of slot `slot`.
    pub fn slot_offset(slot: usize) -> usize {
        DATA + slot * SLOT_LEN
    }

    /// Writes descriptor `index`.
    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), String> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.buf.write(DESC + 16 * usize::from(index), &d)
    }

    /// One request of type `kind` for `SLOT_LEN` bytes at `sector`, with the data in
    /// slot `slot`; waits for its interrupt and completion.
    pub fn request(&mut self, slot: usize, kind: u32, sector: u64) -> Result<Completion, String> {
        if slot >= SLOTS || usize::from(self.queue_size) < 3 {
            return Err(format!("slot {slot} / queue size {}", self.queue_size));
        }
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr = HEADERS + 16 * slot;
        let status = STATUSES + slot;
        self.buf.write(hdr, &header)?;
        self.buf.write(status, &[0xff])?;
        // Three descriptors per request, reused round-robin over the queue.
        let head = (self.next_avail % (self.queue_size / 3)) * 3;
        let data_flags = DESC_F_NEXT | if kind == T_IN { DESC_F_WRITE } else { 0 };
        let at = |off: usize| self.iova + off as u64;
        self.desc(head, at(hdr), 16, DESC_F_NEXT, head + 1)?;
        let data = at(Self::slot_offset(slot));
        self.desc(head + 1, data, SLOT_LEN as u32, data_flags, head + 2)?;
        self.desc(head + 2, at(status), 1, DESC_F_WRITE, 0)?;
        let ring_at = AVAIL + 4 + 2 * usize::from(self.next_avail % self.queue_size);
        self.buf.write(ring_at, &head.to_le_bytes())?;
        let used_before = self.buf.read_u16(USED + 2)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Descriptors and ring entry before the index; the index before the notify.
        fence(Ordering::SeqCst);
        self.buf.write(AVAIL + 2, &self.next_avail.to_le_bytes())?;
        fence(Ordering::SeqCst);
        self.dev
            .write_u16(&self.notify.region, self.notify.base + self.notify_at, 0)?;
        let interrupts = self.irq.wait(REQUEST_TIMEOUT_MS)?;
        fence(Ordering::SeqCst);
        let used = self.buf.read_u16(USED + 2)?;
        if used == used_before {
            return Err(format!(
                "no completion within {REQUEST_TIMEOUT_MS} ms (used idx {used}, eventfd {interrupts})"
            ));
        }
        let elem = USED + 4 + 8 * usize::from(used_before % self.queue_size);
        let mut e = [0u8; 8];
        self.buf.read(elem, &mut e)?;
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        if id != u32::from(head) {
            return Err(format!("used element names chain {id}, expected {head}"));
        }
        let mut s = [0u8; 1];
        self.buf.read(status, &mut s)?;
        Ok(Completion {
            status: s[0],
            used_len: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            interrupts,
        })
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
}
