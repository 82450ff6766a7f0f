//! Test support shared by the virtio device tests: guest memory (plain, or behind a
//! test IOMMU: [`IoMem`]) with [`put`]/[`get`], a hand-built split ring driver
//! ([`Driver`]), [`activation`]s of its queues, an interrupt counter and a polling
//! helper. Other crates' tests get it with the `test-utils`
//! feature.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Iotlb, Permissions,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dma::DmaTracker;
use crate::virtio::{Activation, ActiveQueue, VirtioInterrupt};

/// Guest memory of the tests: 16 MiB from 0.
pub type Mem = GuestMemoryMmap<()>;

pub const MEM_SIZE: u64 = 16 << 20;

pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Test memory as the driver sees it: guest-physical, around any IOMMU.
pub trait Physical {
    fn physical(&self) -> &Mem;
}

impl Physical for Mem {
    fn physical(&self) -> &Mem {
        self
    }
}

impl Physical for IoMem {
    fn physical(&self) -> &Mem {
        self.get_backend()
    }
}

/// Writes `bytes` at guest-physical `addr`.
pub fn put(mem: &impl Physical, addr: u64, bytes: &[u8]) {
    mem.physical()
        .write_slice(bytes, GuestAddress(addr))
        .unwrap();
}

/// Reads `len` bytes at guest-physical `addr`.
pub fn get(mem: &impl Physical, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.physical()
        .read_slice(&mut v, GuestAddress(addr))
        .unwrap();
    v
}

/// An activation of the queues of `drivers` (queue index, driver) over `mem`, DMA
/// untracked (set `dma` for a device behind an IOMMU); also the test's handle on each
/// queue's notify eventfd, in order.
pub fn activation<M: Clone>(
    mem: &M,
    drivers: &[(u16, &Driver)],
    irq: &Arc<TestInterrupt>,
) -> (Activation<M>, Vec<EventFd>) {
    let mut kicks = Vec::new();
    let queues = drivers
        .iter()
        .map(|&(index, d)| {
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(notify.try_clone().unwrap());
            ActiveQueue {
                index,
                queue: d.queue(),
                notify,
            }
        })
        .collect();
    let act = Activation {
        mem: mem.clone(),
        queues,
        interrupt: irq.clone(),
        dma: DmaTracker::default(),
    };
    (act, kicks)
}

/// A buffer descriptor as the test driver publishes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A device-readable buffer.
pub fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub fn wo(addr: u64, len: u32) -> Buf {
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
pub struct Driver<'a> {
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
pub struct TestInterrupt {
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
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An IOMMU UNMAP's wait on another thread; the receiver hears when it returned.
pub fn unmap_wait(dma: &DmaTracker) -> (Receiver<()>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let dma = dma.clone();
    let handle = std::thread::spawn(move || {
        dma.wait_for_inflight();
        let _ = tx.send(());
    });
    (rx, handle)
}

/// Guest memory as a device behind an IOMMU sees it: [`Mem`] translated by a
/// [`TestIommu`] (addresses map to themselves; only the ranges the test maps are
/// accessible, with the permissions it gives).
pub type IoMem = IommuMemory<Mem, TestIommu>;

/// Test memory behind a [`TestIommu`] with nothing mapped; the driver writes the
/// rings through `get_backend()` (guest-physical = I/O virtual addresses).
pub fn iommu_memory() -> IoMem {
    IommuMemory::new(memory(), TestIommu::default(), true, ())
}

/// A range to unmap after some more translations that touch it.
#[derive(Debug)]
struct Revoke {
    range: Range<u64>,
    /// Translations touching `range` that still succeed.
    left: usize,
}

/// A tiny IOMMU for tests: identity mappings of chosen ranges. It counts translations,
/// faults (refused translations) and translations done while the watched
/// [`DmaTracker`] had no guard in flight (a device breaking the DMA contract).
#[derive(Debug, Default)]
pub struct TestIommu {
    iotlb: RwLock<Iotlb>,
    revoke: Mutex<Option<Revoke>>,
    watched: Mutex<Option<DmaTracker>>,
    translations: AtomicUsize,
    faults: AtomicUsize,
    unguarded: AtomicUsize,
}

impl TestIommu {
    /// Maps `[addr, addr + len)` to itself with `perm`.
    pub fn map(&self, addr: u64, len: u64, perm: Permissions) {
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        iotlb
            .set_mapping(GuestAddress(addr), GuestAddress(addr), len as usize, perm)
            .unwrap();
    }

    /// Maps all of the test memory read-write.
    pub fn map_all(&self) {
        self.map(0, MEM_SIZE, Permissions::ReadWrite);
    }

    /// Removes any mapping in `[addr, addr + len)`.
    pub fn unmap(&self, addr: u64, len: u64) {
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        iotlb.invalidate_mapping(GuestAddress(addr), len as usize);
    }

    /// Unmaps `[addr, addr + len)` after `left` more translations touching it succeeded
    /// (as a guest UNMAP racing with a request would).
    pub fn revoke_after(&self, addr: u64, len: u64, left: usize) {
        *self.revoke.lock().unwrap_or_else(PoisonError::into_inner) = Some(Revoke {
            range: addr..addr + len,
            left,
        });
    }

    /// Counts translations made while `tracker` has no guard in flight.
    pub fn watch(&self, tracker: &DmaTracker) {
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) = Some(tracker.clone());
    }

    pub fn translations(&self) -> usize {
        self.translations.load(Ordering::SeqCst)
    }

    pub fn faults(&self) -> usize {
        self.faults.load(Ordering::SeqCst)
    }

    /// Translations made while the watched tracker had no guard in flight.
    pub fn unguarded(&self) -> usize {
        self.unguarded.load(Ordering::SeqCst)
    }

    fn apply_revoke(&self, iova: u64, len: usize) {
        let mut revoke = self.revoke.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = revoke.as_mut() else {
            return;
        };
        let end = iova.saturating_add(len as u64);
        if iova >= r.range.end || end <= r.range.start {
            return;
        }
        if r.left > 0 {
            r.left -= 1;
            return;
        }
        let range = r.range.clone();
        *revoke = None;
        self.unmap(range.start, range.end - range.start);
    }
}

impl Iommu for TestIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        self.translations.fetch_add(1, Ordering::SeqCst);
        let watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if watched.as_ref().is_some_and(|t| t.inflight() == 0) {
            self.unguarded.fetch_add(1, Ordering::SeqCst);
        }
        drop(watched);
        self.apply_revoke(iova.raw_value(), length);
        let iotlb = self.iotlb.read().unwrap_or_else(PoisonError::into_inner);
        Iotlb::lookup(iotlb, iova, length, access).map_err(|fails| {
            self.faults.fetch_add(1, Ordering::SeqCst);
            IommuError::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: format!("{fails:?}"),
            }
        })
    }
}
