//! A compact virtio-net driver that plays the guest against ferrio's passthrough
//! model: every register access is a [`PciDevice::read_bar`] / `write_bar` on BAR 0
//! (the model traps or forwards it to VFIO), the rings and buffers live in the
//! session's `GuestMemoryMmap` at their GPA (= IOVA), and completions are waited for
//! on the MSI-X eventfds the model handed to VFIO. Features: VERSION_1,
//! ACCESS_PLATFORM and MAC only (one 12-byte header per frame, one buffer per frame).

use std::collections::BTreeMap;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use ferrio_pci::PciDevice;
use vm_memory::{Bytes, GuestAddress};

use super::model::{Session, VirtioCap, RAM_GPA};

pub const F_MAC: u64 = 1 << 5;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const WANTED: u64 = F_VERSION_1 | F_ACCESS_PLATFORM | F_MAC;

const COMMON: u8 = 1;
const NOTIFY: u8 = 2;
const DEVICE: u8 = 4;
// Common configuration registers (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
pub const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
const NO_VECTOR: u16 = 0xffff;
const DESC_F_WRITE: u16 = 2;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const TX_VECTOR: u16 = 0;
pub const RX_VECTOR: u16 = 1;
pub const VNET_HDR_LEN: usize = 12;
/// Queue size used (or the device's maximum if smaller).
const QUEUE_SIZE_WANTED: u16 = 16;
/// Per queue: descriptor table, avail ring, used ring (offsets from RAM_GPA), and
/// the buffers, one [`BUF_LEN`] slot per descriptor.
const RINGS: [u64; 2] = [0x0000, 0x4000];
const BUFFERS: [u64; 2] = [0x10_000, 0x20_000];
const BUF_LEN: u64 = 0x800;

/// One queue the driver set up.
#[derive(Debug, Clone, Copy)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify_at: u64,
    next_avail: u16,
    last_used: u16,
}

/// The driver over a [`Session`].
pub struct Net<'s> {
    s: &'s mut Session,
    common: VirtioCap,
    notify: VirtioCap,
    device: VirtioCap,
    queues: [Option<Queue>; 2],
    pub tx_interrupts: u64,
    pub rx_interrupts: u64,
}

/// What the receive loop saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Frames that carried our tag, by seq: their payload.
    pub frames: BTreeMap<u32, Vec<u8>>,
    /// Used buffers that were not a tagged frame of this back end, or were wrong.
    pub others: u32,
    pub bad: Vec<String>,
}

impl<'s> Net<'s> {
    pub fn new(s: &'s mut Session, caps: &[VirtioCap]) -> Result<Self, String> {
        let find = |t: u8, what: &str| {
            caps.iter()
                .find(|c| c.cfg_type == t)
                .copied()
                .ok_or_else(|| format!("no virtio {what} structure"))
        };
        Ok(Net {
            common: find(COMMON, "common")?,
            notify: find(NOTIFY, "notify")?,
            device: find(DEVICE, "device")?,
            s,
            queues: [None, None],
            tx_interrupts: 0,
            rx_interrupts: 0,
        })
    }

    pub fn session(&mut self) -> &mut Session {
        self.s
    }

    fn read(&mut self, c: VirtioCap, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.s.dev.read_bar(c.bar, c.offset + off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn write(&mut self, c: VirtioCap, off: u64, len: usize, v: u64) {
        self.s
            .dev
            .write_bar(c.bar, c.offset + off, &v.to_le_bytes()[..len]);
    }
    fn r8(&mut self, off: u64) -> u8 {
        self.read(self.common, off, 1) as u8
    }
    fn r16(&mut self, off: u64) -> u16 {
        self.read(self.common, off, 2) as u16
    }
    fn r32(&mut self, off: u64) -> u32 {
        self.read(self.common, off, 4) as u32
    }
    fn w8(&mut self, off: u64, v: u8) {
        self.write(self.common, off, 1, v.into());
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.write(self.common, off, 2, v.into());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.write(self.common, off, 4, v.into());
    }
    fn w64(&mut self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&mut self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    /// Device reset (status 0 until it reads back 0, up to 1 s).
    pub fn reset(&mut self) -> Result<(), String> {
        self.w8(DEVICE_STATUS, 0);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.status() != 0 {
            if Instant::now() >= deadline {
                return Err("device status did not return to 0".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Reset, ACKNOWLEDGE | DRIVER, the features of [`WANTED`] offered, FEATURES_OK.
    /// Returns (offered, accepted).
    pub fn negotiate(&mut self) -> Result<(u64, u64), String> {
        self.reset()?;
        self.w8(DEVICE_STATUS, 1 | 2);
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(DEVICE_FEATURE);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        let accepted = offered & WANTED;
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, accepted as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (accepted >> 32) as u32);
        self.w8(DEVICE_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        let st = self.status();
        if st & STATUS_FEATURES_OK == 0 {
            return Err(format!("features {accepted:#x} refused (status {st:#x})"));
        }
        Ok((offered, accepted))
    }

    /// The MAC in the device configuration.
    pub fn mac(&mut self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = self.read(self.device, i as u64, 1) as u8;
        }
        mac
    }

    /// Sets up queue `q` on MSI-X vector `vector`; returns its size.
    pub fn setup_queue(&mut self, q: u16, vector: u16) -> Result<u16, String> {
        if usize::from(q) >= RINGS.len() {
            return Err(format!("queue {q}: the driver only sets up queues 0 and 1"));
        }
        self.w16(QUEUE_SELECT, q);
        let max = self.r16(QUEUE_SIZE);
        if max == 0 {
            return Err(format!("queue {q} does not exist"));
        }
        let size = 1u16 << (15 - max.min(QUEUE_SIZE_WANTED).leading_zeros());
        self.w16(QUEUE_SIZE, size);
        self.w16(QUEUE_MSIX_VECTOR, vector);
        let got = self.r16(QUEUE_MSIX_VECTOR);
        if got != vector {
            return Err(format!("queue {q}: vector {vector} reads back {got:#x}"));
        }
        let base = RAM_GPA + RINGS[usize::from(q)];
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        self.w64(QUEUE_DESC, desc);
        self.w64(QUEUE_DRIVER, avail);
        self.w64(QUEUE_DEVICE, used);
        let off = u64::from(self.r16(QUEUE_NOTIFY_OFF));
        self.w16(QUEUE_ENABLE, 1);
        if self.r16(QUEUE_ENABLE) != 1 {
            return Err(format!("queue {q} not enabled"));
        }
        self.queues[usize::from(q)] = Some(Queue {
            size,
            desc,
            avail,
            used,
            notify_at: off * u64::from(self.notify.multiplier),
            next_avail: 0,
            last_used: 0,
        });
        Ok(size)
    }

    /// No config interrupt; then DRIVER_OK. Returns the status read back.
    pub fn driver_ok(&mut self) -> u8 {
        self.w16(CONFIG_MSIX_VECTOR, NO_VECTOR);
        let st = self.status();
        self.w8(DEVICE_STATUS, st | STATUS_DRIVER_OK);
        self.status()
    }

    fn queue(&self, q: u16) -> Result<Queue, String> {
        self.queues
            .get(usize::from(q))
            .copied()
            .flatten()
            .ok_or_else(|| format!("queue {q} not set up"))
    }

    fn mem_write(&self, at: u64, data: &[u8]) -> Result<(), String> {
        self.s
            .mem
            .write_slice(data, GuestAddress(at))
            .map_err(|e| format!("guest memory write at {at:#x}: {e}"))
    }

    fn mem_u16(&self, at: u64) -> Result<u16, String> {
        self.s
            .mem
            .read_obj::<u16>(GuestAddress(at))
            .map_err(|e| format!("guest memory read at {at:#x}: {e}"))
    }

    /// Descriptor `i` of queue `q`: buffer slot `i`, `len` bytes, `flags`.
    fn put_desc(&self, q: u16, i: u16, len: u32, flags: u16) -> Result<(), String> {
        let qu = self.queue(q)?;
        let addr = RAM_GPA + BUFFERS[usize::from(q)] + u64::from(i) * BUF_LEN;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        self.mem_write(qu.desc + 16 * u64::from(i), &d)
    }

    /// Puts heads in queue `q`'s avail ring, publishes the index, notifies once.
    fn publish(&mut self, q: u16, heads: &[u16]) -> Result<(), String> {
        let mut qu = self.queue(q)?;
        for &h in heads {
            let slot = u64::from(qu.next_avail % qu.size);
            self.mem_write(qu.avail + 4 + 2 * slot, &h.to_le_bytes())?;
            qu.next_avail = qu.next_avail.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        self.mem_write(qu.avail + 2, &qu.next_avail.to_le_bytes())?;
        fence(Ordering::SeqCst);
        self.queues[usize::from(q)] = Some(qu);
        let n = self.notify;
        self.write(n, qu.notify_at, 2, u64::from(q));
        Ok(())
    }

    /// New used elements of queue `q` as (id, len).
    fn take_used(&mut self, q: u16) -> Result<Vec<(u16, u32)>, String> {
        let mut qu = self.queue(q)?;
        let idx = self.mem_u16(qu.used + 2)?;
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while qu.last_used != idx && out.len() < usize::from(qu.size) {
            let at = qu.used + 4 + 8 * u64::from(qu.last_used % qu.size);
            let mut e = [0u8; 8];
            self.s
                .mem
                .read_slice(&mut e, GuestAddress(at))
                .map_err(|e| format!("used element: {e}"))?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            out.push((u16::try_from(id).unwrap_or(u16::MAX), len));
            qu.last_used = qu.last_used.wrapping_add(1);
        }
        self.queues[usize::from(q)] = Some(qu);
        Ok(out)
    }

    /// Posts every receive buffer (device-writable, one slot each).
    pub fn post_rx(&mut self) -> Result<u16, String> {
        let size = self.queue(RX_QUEUE)?.size;
        let heads: Vec<u16> = (0..size).collect();
        for &h in &heads {
            self.put_desc(RX_QUEUE, h, BUF_LEN as u32, DESC_F_WRITE)?;
        }
        self.publish(RX_QUEUE, &heads)?;
        Ok(size)
    }

    /// Sends `frames` (Ethernet frames), a ring's worth at a time, each batch waited
    /// for (up to `timeout` per batch) on the transmit vector. Returns the frames
    /// completed.
    pub fn send(&mut self, frames: &[Vec<u8>], timeout: Duration) -> Result<usize, String> {
        let size = usize::from(self.queue(TX_QUEUE)?.size);
        let mut done = 0;
        for batch in frames.chunks(size) {
            let mut heads = Vec::new();
            for (i, f) in (0u16..).zip(batch) {
                let mut bytes = vec![0u8; VNET_HDR_LEN];
                bytes.extend_from_slice(f);
                if bytes.len() as u64 > BUF_LEN {
                    return Err(format!("frame of {} bytes", f.len()));
                }
                let at = RAM_GPA + BUFFERS[usize::from(TX_QUEUE)] + u64::from(i) * BUF_LEN;
                self.mem_write(at, &bytes)?;
                self.put_desc(TX_QUEUE, i, bytes.len() as u32, 0)?;
                heads.push(i);
            }
            self.publish(TX_QUEUE, &heads)?;
            let deadline = Instant::now() + timeout;
            let mut got = 0;
            while got < heads.len() {
                got += self.take_used(TX_QUEUE)?.len();
                if got >= heads.len() {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "{} of {} frames completed; batch of {} stuck at {got} after {timeout:?}",
                        done + got,
                        frames.len(),
                        heads.len()
                    ));
                }
                self.tx_interrupts += self
                    .s
                    .vectors
                    .wait(TX_VECTOR, left.min(Duration::from_millis(200)))?;
            }
            done += got;
        }
        // An interrupt that came after the last used index was read.
        self.tx_interrupts += self.s.vectors.wait(TX_VECTOR, Duration::ZERO)?;
        Ok(done)
    }

    /// Receives until `want` distinct frames accepted by `accept` arrived or
    /// `timeout` passed; used buffers go back to the ring.
    pub fn receive(
        &mut self,
        want: usize,
        timeout: Duration,
        accept: impl Fn(&[u8]) -> Result<Option<(u32, Vec<u8>)>, String>,
    ) -> Result<Received, String> {
        let mut got = Received::default();
        let deadline = Instant::now() + timeout;
        loop {
            let used = self.take_used(RX_QUEUE)?;
            let mut heads = Vec::new();
            for (id, len) in used {
                let base = RAM_GPA + BUFFERS[usize::from(RX_QUEUE)] + u64::from(id) * BUF_LEN;
                let len = u64::from(len).min(BUF_LEN) as usize;
                let mut buf = vec![0u8; len];
                self.s
                    .mem
                    .read_slice(&mut buf, GuestAddress(base))
                    .map_err(|e| format!("rx buffer {id}: {e}"))?;
                match buf.get(VNET_HDR_LEN..).map(&accept) {
                    Some(Ok(Some((seq, payload)))) => {
                        got.frames.insert(seq, payload);
                    }
                    Some(Ok(None)) => got.others += 1,
                    Some(Err(e)) => got.bad.push(e),
                    None => got.bad.push(format!("used buffer {id} of {len} bytes")),
                }
                heads.push(id);
            }
            if !heads.is_empty() {
                self.publish(RX_QUEUE, &heads)?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if got.frames.len() >= want || left.is_zero() {
                return Ok(got);
            }
            self.rx_interrupts += self
                .s
                .vectors
                .wait(RX_VECTOR, left.min(Duration::from_millis(200)))?;
        }
    }
}
