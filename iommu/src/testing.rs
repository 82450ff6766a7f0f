//! Test support for the virtio-iommu tests (an adaptation of `ferrio_devices`'
//! test-only `virtio::testing`, which is crate-private there): guest memory, a split
//! ring driver ([`Driver`]), an interrupt counter and a polling helper.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use ferrio_devices::virtio::VirtioInterrupt;

/// Guest memory of the tests: 16 MiB from 0.
pub(crate) type Mem = GuestMemoryMmap<()>;

pub(crate) const MEM_SIZE: u64 = 16 << 20;

pub(crate) fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A buffer descriptor as the test driver publishes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A device-readable buffer.
pub(crate) fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub(crate) fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver side of one split queue, laid out from `base` as a driver would
/// (descriptor table, available ring, used ring 4-aligned), publishing chains with
/// proper wrap-around of the ring indices.
///
/// `virtio_queue::mock::MockSplitQueue` is not used for the layout: in virtio-queue
/// 0.18 it places the used ring inside the available ring (`SplitQueueRing::end()`
/// counts elements as bytes; rust-vmm/vm-virtio#400), so writing the used flags
/// clobbers avail entries from size/2 on.
pub(crate) struct Driver<'a> {
    mem: &'a Mem,
    size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Next free descriptor slot (round robin).
    next_desc: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a Mem, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        // Zeroed rings, as a driver allocates them.
        mem.write_slice(&vec![0; (end - base) as usize], GuestAddress(base))
            .unwrap();
        Self {
            mem,
            size,
            desc_table: GuestAddress(base),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            next_desc: 0,
        }
    }

    /// The device's view of the queue (size, addresses, ready), as the transport
    /// configures it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(self.desc_table).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Writes `bufs` as one chain into the next free descriptor slots and publishes it;
    /// returns the head index.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let slot = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if buf.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = (slot + 1) % self.size;
            self.set_desc(slot, buf.addr, buf.len, flags, next);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Writes descriptor `slot` verbatim.
    pub fn set_desc(&self, slot: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc_table.unchecked_add(16 * u64::from(slot));
        self.mem
            .write_obj(Descriptor::new(addr, len, flags, next), at)
            .unwrap();
    }

    /// Publishes `head` in the next available ring entry.
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let entry = 4 + 2 * u64::from(idx % self.size);
        self.write_u16(self.avail, entry, head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.read_u16(self.avail, 2)
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.write_u16(self.avail, 2, idx);
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        self.write_u16(self.avail, 4 + 2 * u64::from(self.size), value);
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.read_u16(self.used, 4 + 8 * u64::from(self.size))
    }

    pub fn used_flags(&self) -> u16 {
        self.read_u16(self.used, 0)
    }

    pub fn used_idx(&self) -> u16 {
        self.read_u16(self.used, 2)
    }

    /// Used element `n` (counted from the start, wrapping in the ring): (id, len).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(n % self.size));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    fn read_u16(&self, base: GuestAddress, offset: u64) -> u16 {
        u16::from_le(self.mem.read_obj(base.unchecked_add(offset)).unwrap())
    }

    fn write_u16(&self, base: GuestAddress, offset: u64, value: u16) {
        self.mem
            .write_obj(value.to_le(), base.unchecked_add(offset))
            .unwrap();
    }
}

/// Counts what the device signals.
#[derive(Default)]
pub(crate) struct TestInterrupt {
    /// Signals per queue (queues 0 to 7).
    pub queue: [AtomicUsize; 8],
    pub config: AtomicUsize,
    pub errors: AtomicUsize,
}

impl TestInterrupt {
    pub fn queue_count(&self, queue: u16) -> usize {
        self.queue[usize::from(queue)].load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_queue(&self, queue: u16) -> io::Result<()> {
        self.queue[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn device_error(&self) {
        self.errors.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `cond` for up to 10 s.
pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Request bytes (device-readable part) as the Linux driver builds them.
pub(crate) mod req {
    use crate::request::{T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP};

    fn head(kind: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0] = kind;
        v
    }

    pub fn attach(domain: u32, endpoint: u32) -> Vec<u8> {
        let mut v = head(T_ATTACH, 20);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..12].copy_from_slice(&endpoint.to_le_bytes());
        v
    }

    pub fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
        let mut v = attach(domain, endpoint);
        v[0] = T_DETACH;
        v
    }

    pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys: u64, flags: u32) -> Vec<u8> {
        let mut v = head(T_MAP, 36);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..16].copy_from_slice(&virt_start.to_le_bytes());
        v[16..24].copy_from_slice(&virt_end.to_le_bytes());
        v[24..32].copy_from_slice(&phys.to_le_bytes());
        v[32..36].copy_from_slice(&flags.to_le_bytes());
        v
    }

    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Vec<u8> {
        let mut v = head(T_UNMAP, 28);
        v[4..8].copy_from_slice(&domain.to_le_bytes());
        v[8..16].copy_from_slice(&virt_start.to_le_bytes());
        v[16..24].copy_from_slice(&virt_end.to_le_bytes());
        v
    }

    pub fn probe(endpoint: u32) -> Vec<u8> {
        let mut v = head(T_PROBE, 72);
        v[4..8].copy_from_slice(&endpoint.to_le_bytes());
        v
    }
}
