//! A device's view through the virtio-iommu, set up as a guest driver does it: a
//! `VirtioIommu` with one endpoint attached to domain 1, mappings made with MAP requests
//! on the IOMMU's own requestq (in a scratch memory of its own, served on the calling
//! thread). The device targets then see memory as `IommuMemory<_, Endpoint>`: the very
//! translation path of `--iommu` with `iommu=on`.

use ferrio_devices::virtio::VirtioDevice;
use ferrio_iommu::request::{T_ATTACH, T_MAP, T_UNMAP};
use ferrio_iommu::{Endpoint, IommuConfig, VirtioIommu};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::Mem;

/// Endpoint id (a BDF) and domain of the device.
pub const ENDPOINT: u32 = 8;
pub const DOMAIN: u32 = 1;

/// Scratch layout: requestq (16 entries) at 0, eventq at 0x400, request at 0x1000,
/// its tail at 0x1100.
const RING: u16 = 16;
const REQ_AVAIL: u64 = 0x100;
const REQ_USED: u64 = 0x200;
const EVENTS: u64 = 0x400;
const REQUEST: u64 = 0x1000;
const TAIL: u64 = 0x1100;

pub struct IommuView {
    pub device: VirtioIommu,
    pub endpoint: Endpoint,
    scratch: Mem,
    requests: Queue,
    events: Queue,
    sent: u16,
}

fn queue(mem: &Mem, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(RING).expect("queue");
    q.try_set_desc_table_address(GuestAddress(desc))
        .expect("desc");
    q.try_set_avail_ring_address(GuestAddress(avail))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(used))
        .expect("used");
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

impl IommuView {
    /// The IOMMU with every feature acked and the endpoint attached to [`DOMAIN`].
    pub fn new() -> Self {
        let mut device = VirtioIommu::new(IommuConfig::default());
        VirtioDevice::<Mem>::set_acked_features(&mut device, u64::MAX);
        let endpoint = device.add_endpoint(ENDPOINT).expect("endpoint");
        let scratch = Mem::from_ranges(&[(GuestAddress(0), 0x2000)]).expect("scratch");
        let requests = queue(&scratch, 0, REQ_AVAIL, REQ_USED);
        let events = queue(&scratch, EVENTS, EVENTS + 0x100, EVENTS + 0x200);
        let mut view = Self {
            device,
            endpoint,
            scratch,
            requests,
            events,
            sent: 0,
        };
        let mut attach = [0u8; 20];
        attach[0] = T_ATTACH;
        attach[4..8].copy_from_slice(&DOMAIN.to_le_bytes());
        attach[8..12].copy_from_slice(&ENDPOINT.to_le_bytes());
        assert_eq!(view.request(&attach), Some(0), "ATTACH");
        view
    }

    /// MAPs `[iova, iova + len)` to `phys` with `flags` (READ = 1, WRITE = 2); returns
    /// the status (the guest may ask for anything; a refusal is fine).
    pub fn map(&mut self, iova: u64, len: u64, phys: u64, flags: u32) -> Option<u8> {
        let mut map = [0u8; 36];
        map[0] = T_MAP;
        map[4..8].copy_from_slice(&DOMAIN.to_le_bytes());
        map[8..16].copy_from_slice(&iova.to_le_bytes());
        map[16..24].copy_from_slice(&(iova + len - 1).to_le_bytes());
        map[24..32].copy_from_slice(&phys.to_le_bytes());
        map[32..36].copy_from_slice(&flags.to_le_bytes());
        self.request(&map)
    }

    /// UNMAPs `[iova, iova + len)`.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Option<u8> {
        let mut unmap = [0u8; 28];
        unmap[0] = T_UNMAP;
        unmap[4..8].copy_from_slice(&DOMAIN.to_le_bytes());
        unmap[8..16].copy_from_slice(&iova.to_le_bytes());
        unmap[16..24].copy_from_slice(&(iova + len - 1).to_le_bytes());
        self.request(&unmap)
    }

    /// Sends one request (`readable` then a 4-byte tail) and serves the requestq; the
    /// status, `None` when the chain came back unanswered.
    fn request(&mut self, readable: &[u8]) -> Option<u8> {
        let m = &self.scratch;
        let slot = (self.sent * 2) % RING;
        let desc = |slot: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&d, GuestAddress(16 * u64::from(slot)))
                .expect("descriptor");
        };
        m.write_slice(readable, GuestAddress(REQUEST))
            .expect("request");
        m.write_obj(0xffu8, GuestAddress(TAIL)).expect("tail");
        desc(slot, REQUEST, readable.len() as u32, 1, slot + 1);
        desc(slot + 1, TAIL, 4, 2, 0);
        let entry = REQ_AVAIL + 4 + 2 * u64::from(self.sent % RING);
        m.write_obj(slot.to_le(), GuestAddress(entry))
            .expect("avail entry");
        self.sent = self.sent.wrapping_add(1);
        m.write_obj(self.sent.to_le(), GuestAddress(REQ_AVAIL + 2))
            .expect("avail idx");
        let (stats, _) = self
            .device
            .serve_queues(&mut self.requests, &mut self.events, m)
            .expect("the scratch rings are well formed");
        assert_eq!(stats.chains, 1);
        let status: u8 = m.read_obj(GuestAddress(TAIL)).expect("tail");
        (status != 0xff).then_some(status)
    }
}

impl Default for IommuView {
    fn default() -> Self {
        Self::new()
    }
}
