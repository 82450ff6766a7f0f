//! Guest memory and split rings built from the fuzz input, and the driver-side ring
//! builder the seed generators use.
//!
//! Input format of a virtio scenario (read by [`Guest::read`] then [`QueueSpec::read`]):
//!
//! | field | meaning |
//! |---|---|
//! | u8 layout | `% 3`: one 128 KiB region; two adjacent 64 KiB regions; 60 KiB, a 4 KiB hole, 64 KiB |
//! | u8 iommu | 0: the device sees guest-physical memory; `n > 0`: it sits behind a virtio-iommu endpoint (the real `ferrio_iommu::Endpoint`) attached to a domain with `n % 5` mappings, each `u32 iova, u16 pages, u32 phys, u8 flags` |
//! | blob image | written at guest-physical 0 (at most [`MAX_IMAGE`] bytes) |
//! | queue | `u8 size_log2, u32 desc, u32 avail, u32 used, u8 flags (bit 0: EVENT_IDX), u16 start` (the device's next avail = next used) |

use ferrio_devices::dma::DmaTracker;
use ferrio_iommu::Endpoint;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

use crate::input::{Input, Seed};
use crate::iommu_view::IommuView;

/// Guest-physical memory.
pub type Mem = GuestMemoryMmap<()>;
/// Guest memory as a device behind the virtio-iommu sees it.
pub type IoMem = IommuMemory<Mem, Endpoint>;

/// Size of the guest memory of every virtio target.
pub const MEM_SIZE: u64 = 0x2_0000;
/// Largest memory image.
pub const MAX_IMAGE: usize = 0x8000;
/// Ring and IOMMU addresses are taken modulo this: about half of them lie in memory.
pub const ADDR_SPAN: u32 = 2 * MEM_SIZE as u32;

/// Guest memory from the input: the physical view and, for a device behind the
/// virtio-iommu, its translated view and the IOMMU (for UNMAPs between kicks).
pub struct Guest {
    pub phys: Mem,
    pub io: Option<IoMem>,
    pub iommu: Option<IommuView>,
}

/// Runs `$body` with `$m` bound to the memory the device sees (generic code is
/// instantiated for both views).
#[macro_export]
macro_rules! with_view {
    ($guest:expr, |$m:ident| $body:expr) => {
        match &$guest.io {
            None => {
                let $m = &$guest.phys;
                $body
            }
            Some(io) => {
                let $m = io;
                $body
            }
        }
    };
}

impl Guest {
    /// A guest for a device that may sit behind the virtio-iommu.
    pub fn read(inp: &mut Input<'_>) -> Guest {
        Self::read_with(inp, true)
    }

    /// A guest for a device that sees guest-physical memory (the `iommu` byte is
    /// absent from the input).
    pub fn physical(inp: &mut Input<'_>) -> Guest {
        Self::read_with(inp, false)
    }

    fn read_with(inp: &mut Input<'_>, allow_iommu: bool) -> Guest {
        let ranges: &[(GuestAddress, usize)] = match inp.u8() % 3 {
            0 => &[(GuestAddress(0), MEM_SIZE as usize)],
            1 => &[
                (GuestAddress(0), 0x1_0000),
                (GuestAddress(0x1_0000), 0x1_0000),
            ],
            _ => &[
                (GuestAddress(0), 0xf000),
                (GuestAddress(0x1_0000), 0x1_0000),
            ],
        };
        let phys = Mem::from_ranges(ranges).expect("guest memory");
        let mappings = if allow_iommu { inp.u8() } else { 0 };
        let (io, iommu) = if mappings == 0 {
            (None, None)
        } else {
            let mut view = IommuView::new();
            for _ in 0..mappings % 5 {
                let iova = u64::from(inp.u32() % ADDR_SPAN) & !0xfff;
                let len = u64::from(inp.u16() % 64 + 1) << 12;
                let phys_addr = u64::from(inp.u32() % ADDR_SPAN) & !0xfff;
                view.map(iova, len, phys_addr, u32::from(inp.u8() % 4));
            }
            let io = IommuMemory::new(phys.clone(), view.endpoint.clone(), true, ());
            (Some(io), Some(view))
        };
        let image = inp.blob();
        let image = &image[..image.len().min(MAX_IMAGE)];
        phys.write_slice(image, GuestAddress(0))
            .expect("image fits the first region");
        Guest { phys, io, iommu }
    }

    /// The DMA fence the device marks its accesses in (the endpoint's, or untracked).
    pub fn dma(&self) -> DmaTracker {
        match &self.iommu {
            Some(view) => view.endpoint.dma_tracker(),
            None => DmaTracker::untracked(),
        }
    }

    /// An op: the guest UNMAPs `u32 iova, u16 pages` (nothing without an IOMMU).
    pub fn unmap(&mut self, inp: &mut Input<'_>) {
        let iova = u64::from(inp.u32() % ADDR_SPAN) & !0xfff;
        let len = u64::from(inp.u16() % 64 + 1) << 12;
        if let Some(view) = &mut self.iommu {
            view.unmap(iova, len);
        }
    }
}

/// A split queue as the transport configured it.
#[derive(Debug, Clone, Copy)]
pub struct QueueSpec {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub event_idx: bool,
    pub start: u16,
}

impl QueueSpec {
    pub fn read(inp: &mut Input<'_>, max_log2: u8) -> QueueSpec {
        let size = 1u16 << (inp.u8() % (max_log2 + 1));
        let mut addr = |align: u32| u64::from((inp.u32() % ADDR_SPAN) & !(align - 1));
        let desc = addr(16);
        let avail = addr(2);
        let used = addr(4);
        QueueSpec {
            size,
            desc,
            avail,
            used,
            event_idx: inp.u8() & 1 != 0,
            start: inp.u16(),
        }
    }

    /// The queue the device gets; `None` when the transport would refuse it (rings not
    /// in memory as the device sees it).
    pub fn queue<M: vm_memory::GuestMemory>(&self, mem: &M, max: u16) -> Option<Queue> {
        let mut q = Queue::new(max).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return None;
        }
        q.set_next_avail(self.start);
        q.set_next_used(self.start);
        Some(q)
    }

    /// The driver publishes `n` more entries (avail idx += n, guest-physical).
    pub fn publish(&self, phys: &Mem, n: u16) {
        let at = GuestAddress(self.avail + 2);
        if let Ok(idx) = phys.read_obj::<u16>(at) {
            let _ = phys.write_obj(u16::from_le(idx).wrapping_add(n).to_le(), at);
        }
    }

    pub fn write(&self, seed: Seed, size_log2: u8, flags: u8) -> Seed {
        seed.u8(size_log2)
            .u32(self.desc as u32)
            .u32(self.avail as u32)
            .u32(self.used as u32)
            .u8(flags)
            .u16(self.start)
    }
}

/// The driver writes `bytes` at guest-physical `addr` (an op of most targets: a
/// driver changing buffers or descriptors between kicks).
pub fn poke(phys: &Mem, inp: &mut Input<'_>) {
    let addr = u64::from(inp.u32()) % MEM_SIZE;
    let bytes = inp.blob();
    let _ = phys.write_slice(bytes, GuestAddress(addr));
}

/// A memory image and driver-built split rings in it, for seeds.
pub struct Image {
    pub bytes: Vec<u8>,
}

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

impl Image {
    pub fn new() -> Self {
        Self { bytes: Vec::new() }
    }

    pub fn put(&mut self, addr: u64, data: &[u8]) {
        let at = addr as usize;
        if self.bytes.len() < at + data.len() {
            self.bytes.resize(at + data.len(), 0);
        }
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    pub fn desc(&mut self, table: u64, slot: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(slot), &d);
    }
}

impl Default for Image {
    fn default() -> Self {
        Self::new()
    }
}

/// The driver side of one split ring in an [`Image`].
pub struct Ring {
    pub spec: QueueSpec,
    next_desc: u16,
    avail_idx: u16,
}

/// A buffer of a chain: (address, length, device-writable).
pub type Buf = (u64, u32, bool);

impl Ring {
    /// A ring of `size` entries: descriptors at `base`, then the avail and used rings.
    pub fn new(img: &mut Image, base: u64, size: u16) -> Ring {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        img.put(base, &vec![0; (end - base) as usize]);
        Ring {
            spec: QueueSpec {
                size,
                desc: base,
                avail,
                used,
                event_idx: false,
                start: 0,
            },
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Device and driver indexes start at `start` (a ring that has wrapped).
    pub fn start_at(&mut self, img: &mut Image, start: u16) {
        self.spec.start = start;
        self.avail_idx = start;
        img.put(self.spec.avail + 2, &start.to_le_bytes());
    }

    pub fn size_log2(&self) -> u8 {
        self.spec.size.trailing_zeros() as u8
    }

    /// Writes `bufs` as one chain and publishes it; returns the head.
    pub fn add(&mut self, img: &mut Image, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let slot = (head + i as u16) % self.spec.size;
            let mut flags = if write { WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= NEXT;
            }
            let next = (slot + 1) % self.spec.size;
            img.desc(self.spec.desc, slot, addr, len, flags, next);
        }
        self.next_desc = (head + bufs.len() as u16) % self.spec.size;
        self.publish(img, head);
        head
    }

    /// Writes `bufs` as an indirect table at `table` behind one descriptor; publishes it.
    pub fn add_indirect(&mut self, img: &mut Image, table: u64, bufs: &[Buf]) -> u16 {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= NEXT;
            }
            img.desc(table, i as u16, addr, len, flags, i as u16 + 1);
        }
        let head = self.next_desc;
        let len = 16 * bufs.len() as u32;
        img.desc(self.spec.desc, head, table, len, INDIRECT, 0);
        self.next_desc = (head + 1) % self.spec.size;
        self.publish(img, head);
        head
    }

    /// Publishes `head` in the next avail entry.
    pub fn publish(&mut self, img: &mut Image, head: u16) {
        let entry = self.spec.avail + 4 + 2 * u64::from(self.avail_idx % self.spec.size);
        img.put(entry, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        img.put(self.spec.avail + 2, &self.avail_idx.to_le_bytes());
    }
}

/// The guest part of a seed for [`Guest::physical`]: layout 0, `img`.
pub fn physical_guest(seed: Seed, img: &Image) -> Seed {
    seed.u8(0).blob(&img.bytes)
}

/// The guest part of a seed: layout 0, no IOMMU, `img`.
pub fn plain_guest(seed: Seed, img: &Image) -> Seed {
    seed.u8(0).u8(0).blob(&img.bytes)
}

/// The guest part of a seed behind the virtio-iommu: all of memory mapped read-write at
/// IOVA = guest-physical address.
pub fn iommu_guest(seed: Seed, img: &Image) -> Seed {
    seed.u8(0)
        .u8(1)
        .u32(0)
        .u16((MEM_SIZE >> 12) as u16 - 1)
        .u32(0)
        .u8(3)
        .blob(&img.bytes)
}
