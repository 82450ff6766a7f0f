//! A user-space virtio-blk driver over VFIO, just enough to prove that the device
//! DMAs to and from the IOVAs the guest's user space mapped, and interrupts through
//! VFIO's MSI-X eventfd: feature negotiation through the common configuration, one
//! split virtqueue inside the DMA buffer, and synchronous requests (one chain of
//! header, data and status at a time, each waited for on the eventfd).

use std::sync::atomic::{fence, Ordering};

use super::virtio::{
    queue_size_for, RingLayout, SplitRing, Transport, DESC_F_NEXT, DESC_F_WRITE, F_ACCESS_PLATFORM,
    F_VERSION_1, MAX_QUEUE_SIZE, NO_VECTOR,
};
use crate::vfio::{Device, DmaBuffer, EventFd};

/// virtio-blk request types and the sector size.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const SECTOR: u64 = 512;

/// Layout of the DMA buffer (offsets from its start / its IOVA).
const RING: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x1000,
    used: 0x2000,
};
const HEADERS: usize = 0x3000;
const STATUSES: usize = 0x3800;
/// Data slots of [`SLOT_LEN`] bytes each.
const DATA: usize = 0x4000;
pub const SLOT_LEN: usize = 4096;
pub const SLOTS: usize = 4;
/// Bytes of the DMA buffer the layout uses.
pub const BUFFER_LEN: usize = DATA + SLOTS * SLOT_LEN;

// The layout's parts do not overlap and fit the scenario's 64 KiB buffer.
const _: () = {
    assert!(RING.fits(MAX_QUEUE_SIZE, HEADERS));
    assert!(HEADERS + 16 * SLOTS <= STATUSES);
    assert!(STATUSES + SLOTS <= DATA);
    assert!(BUFFER_LEN <= 64 << 10);
};

/// How long a request may take (the guest kernel is emulated; the eventfd is
/// signalled from its MSI handler).
const REQUEST_TIMEOUT_MS: i32 = 20_000;

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
    transport: Transport<'a>,
    ring: SplitRing<'a>,
    buf: &'a DmaBuffer,
    irq: &'a EventFd,
    iova: u64,
    queue: super::virtio::QueueInfo,
    /// Features the driver accepted.
    pub features: u64,
}

impl<'a> UserBlk<'a> {
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
        let t = Transport::new(dev, cfg)?;
        t.reset()?;
        let (_, features) = t.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM)?;
        t.set_config_vector(NO_VECTOR)?;
        let max = t.queue_max(0)?;
        if max == 0 {
            return Err("queue 0 does not exist (queue_size 0)".into());
        }
        let ring = SplitRing::new(buf, iova, RING, queue_size_for(max))?;
        let queue = t.setup_queue(0, ring.size(), 0, ring.iovas())?;
        t.driver_ok()?;
        Ok(UserBlk {
            transport: t,
            ring,
            buf,
            irq,
            iova,
            queue,
            features,
        })
    }

    /// Writes 0 to the device status and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), String> {
        self.transport.reset()
    }

    pub fn queue_size(&self) -> u16 {
        self.ring.size()
    }

    /// The data bytes of slot `slot`.
    pub fn slot_offset(slot: usize) -> usize {
        DATA + slot * SLOT_LEN
    }

    /// One request of type `kind` for `SLOT_LEN` bytes at `sector`, with the data in
    /// slot `slot`; waits for its interrupt and completion.
    pub fn request(&mut self, slot: usize, kind: u32, sector: u64) -> Result<Completion, String> {
        let size = self.ring.size();
        if slot >= SLOTS || usize::from(size) < 3 {
            return Err(format!("slot {slot} / queue size {size}"));
        }
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr = HEADERS + 16 * slot;
        let status = STATUSES + slot;
        self.buf.write(hdr, &header)?;
        self.buf.write(status, &[0xff])?;
        // Three descriptors per request, reused round-robin over the queue.
        let head = (self.ring.next_avail() % (size / 3)) * 3;
        let data_flags = DESC_F_NEXT | if kind == T_IN { DESC_F_WRITE } else { 0 };
        let at = |off: usize| self.iova + off as u64;
        self.ring.desc(head, at(hdr), 16, DESC_F_NEXT, head + 1)?;
        let data = at(Self::slot_offset(slot));
        self.ring
            .desc(head + 1, data, SLOT_LEN as u32, data_flags, head + 2)?;
        self.ring.desc(head + 2, at(status), 1, DESC_F_WRITE, 0)?;
        let used_before = self.ring.used_idx()?;
        self.ring.publish(head)?;
        self.transport.notify(&self.queue)?;
        let interrupts = self.irq.wait(REQUEST_TIMEOUT_MS)?;
        fence(Ordering::SeqCst);
        let used = self.ring.used_idx()?;
        if used == used_before {
            return Err(format!(
                "no completion within {REQUEST_TIMEOUT_MS} ms (used idx {used}, eventfd {interrupts})"
            ));
        }
        let elem = self.ring.used_elem(used_before)?;
        if elem.id != u32::from(head) {
            return Err(format!(
                "used element names chain {}, expected {head}",
                elem.id
            ));
        }
        let mut s = [0u8; 1];
        self.buf.read(status, &mut s)?;
        Ok(Completion {
            status: s[0],
            used_len: elem.len,
            interrupts,
        })
    }
}
