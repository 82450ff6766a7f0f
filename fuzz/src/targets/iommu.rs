//! `virtio_iommu`: the virtio-iommu device (`ferrio_iommu`): requestq parsing and
//! execution (ATTACH, DETACH, MAP, UNMAP, PROBE with exact lengths, domains, mapping
//! limits), fault reporting on the eventq, and DMA of the endpoints through
//! `IommuMemory<_, Endpoint>` (IOTLB fill and invalidation, input-range checks,
//! faults), with device resets in between. The device is served on the calling thread
//! (`VirtioIommu::serve_queues`, the worker's loop body).
//!
//! Input: guest (guest-physical: the IOMMU's own queues are not translated),
//! `u32 domain_start, u32 domain_end, u16 probe_size, u8 max_mappings, u8
//! max_pending_faults, u64 acked features`, requestq and eventq (up to 256 entries),
//! then ops: 0 serve, 1/2 publish requestq/eventq, 3 poke, 4 DMA by an endpoint (`u8`
//! endpoint and direction, `u64 iova`, `u16 len`), 5 device reset (`u64` features
//! acked again).
//!
//! Oracle: domains never outnumber the endpoints, pending faults stay bounded, a DMA
//! that succeeds moved every byte, no DMA guard is left in flight.

use ferrio_devices::virtio::VirtioDevice;
use ferrio_iommu::request::{T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP};
use ferrio_iommu::{Endpoint, IommuConfig, VirtioIommu};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, IommuMemory, Permissions};

use crate::guest::{self, physical_guest, Guest, Image, Mem, QueueSpec, Ring};
use crate::input::{Input, Seed};

const MAX_OPS: usize = 48;
const QUEUE_MAX: u16 = 256;
/// Endpoint ids (BDFs); the third comes from the input.
const ENDPOINTS: [u32; 2] = [0x08, 0x10];

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let guest = Guest::physical(&mut inp);
    let config = IommuConfig {
        domain_range: (inp.u32(), inp.u32()),
        probe_size: u32::from(inp.u16()),
        max_mappings: usize::from(inp.u8() % 16) + 1,
        max_pending_faults: usize::from(inp.u8() % 8) + 1,
    };
    let max_faults = config.max_pending_faults;
    let mut device = VirtioIommu::new(config);
    VirtioDevice::<Mem>::set_acked_features(&mut device, inp.u64());
    let third = inp.u32();
    let mut endpoints: Vec<Endpoint> = ENDPOINTS
        .iter()
        .map(|&id| device.add_endpoint(id).expect("fresh endpoint"))
        .collect();
    // A duplicate id is refused, not a panic.
    if let Ok(ep) = device.add_endpoint(third) {
        endpoints.push(ep);
    }
    let req_spec = QueueSpec::read(&mut inp, 8);
    let ev_spec = QueueSpec::read(&mut inp, 8);
    let mem = &guest.phys;
    let (Some(mut requests), Some(mut events)) = (
        req_spec.queue(mem, QUEUE_MAX),
        ev_spec.queue(mem, QUEUE_MAX),
    ) else {
        return;
    };
    let mut served = false;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 6 {
            0 => {
                served = true;
                if !serve(&device, &mut requests, &mut events, mem, endpoints.len()) {
                    return;
                }
            }
            1 => req_spec.publish(mem, u16::from(inp.u8() % 8)),
            2 => ev_spec.publish(mem, u16::from(inp.u8() % 8)),
            3 => guest::poke(mem, &mut inp),
            4 => {
                let which = inp.u8();
                let ep = &endpoints[usize::from(which >> 1) % endpoints.len()];
                dma(mem, ep, which & 1 != 0, inp.u64(), usize::from(inp.u16()));
            }
            _ => {
                VirtioDevice::<Mem>::reset(&mut device);
                assert_eq!(device.domain_count(), 0, "domains after reset");
                assert_eq!(device.pending_faults(), 0, "faults after reset");
                VirtioDevice::<Mem>::set_acked_features(&mut device, inp.u64());
                // The transport builds the queues again.
                requests = match req_spec.queue(mem, QUEUE_MAX) {
                    Some(q) => q,
                    None => return,
                };
                events = match ev_spec.queue(mem, QUEUE_MAX) {
                    Some(q) => q,
                    None => return,
                };
            }
        }
        assert!(device.pending_faults() <= max_faults, "pending faults");
    }
    if !served {
        serve(&device, &mut requests, &mut events, mem, endpoints.len());
    }
}

fn serve(
    device: &VirtioIommu,
    requests: &mut virtio_queue::Queue,
    events: &mut virtio_queue::Queue,
    mem: &Mem,
    endpoints: usize,
) -> bool {
    let (req_before, ev_before) = (requests.next_used(), events.next_used());
    let Ok((r, e)) = device.serve_queues(requests, events, mem) else {
        crate::note!("iommu: ring error");
        return false;
    };
    crate::note!("iommu: {r:?} {e:?}, {} domain(s)", device.domain_count());
    assert_eq!(
        requests.next_used().wrapping_sub(req_before),
        r.chains as u16
    );
    let moved = events.next_used().wrapping_sub(ev_before);
    assert!(usize::from(moved) <= e.posted + e.invalid);
    assert!(
        device.domain_count() <= endpoints,
        "more domains than endpoints"
    );
    true
}

/// A DMA access of `len` bytes at `iova` by `ep`, under its DMA guard.
fn dma(mem: &Mem, ep: &Endpoint, write: bool, iova: u64, len: usize) {
    let tracker = ep.dma_tracker();
    let view = IommuMemory::new(mem.clone(), ep.clone(), true, ());
    {
        let _guard = tracker.begin();
        let addr = GuestAddress(iova);
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let ok = view.check_range(addr, len, access);
        crate::note!("iommu: DMA {iova:#x}+{len} write={write}: {ok}");
        let mut buf = vec![0x3c; len];
        let moved = if write {
            view.write_slice(&buf, addr).is_ok()
        } else {
            view.read_slice(&mut buf, addr).is_ok()
        };
        // A range the IOMMU allows is accessible as a whole (nothing changes it in
        // between: no request runs meanwhile).
        assert_eq!(
            ok, moved,
            "check_range and the access disagree at {iova:#x}+{len}"
        );
    }
    assert_eq!(tracker.inflight(), 0);
}

fn request(kind: u8, fields: &[(usize, u64, usize)], size: usize) -> Vec<u8> {
    let mut r = vec![0u8; size];
    r[0] = kind;
    for &(at, value, width) in fields {
        r[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
    r
}

/// Seeds: a Linux-like session (ATTACH, MAP, PROBE, DMA hits and faults, events,
/// UNMAP, DETACH), malformed requests, a reset.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let attach = request(T_ATTACH, &[(4, 1, 4), (8, 8, 4)], 20);
    let map = request(
        T_MAP,
        &[
            (4, 1, 4),
            (8, 0x10000, 8),
            (16, 0x11fff, 8),
            (24, 0x4000, 8),
            (32, 3, 4),
        ],
        36,
    );
    let probe = request(T_PROBE, &[(4, 8, 4)], 72);
    let unmap = request(T_UNMAP, &[(4, 1, 4), (8, 0x10000, 8), (16, 0x11fff, 8)], 28);
    let detach = request(T_DETACH, &[(4, 1, 4), (8, 8, 4)], 20);
    let bad = request(T_MAP, &[(4, 1, 4)], 30);
    let mut img = Image::new();
    let mut req = Ring::new(&mut img, 0, 16);
    let mut ev = Ring::new(&mut img, 0x400, 16);
    let reqs = [&attach, &map, &probe, &unmap, &detach, &bad];
    for (i, r) in reqs.iter().enumerate() {
        let at = 0x600 + 0x60 * i as u64;
        img.put(at, r);
        let (out, len) = if r[0] == T_PROBE {
            (0xa00, 512 + 4)
        } else {
            (at + 0x4c, 4)
        };
        req.add(&mut img, &[(at, r.len() as u32, false), (out, len, true)]);
    }
    for i in 0..4 {
        ev.add(&mut img, &[(0x880 + 0x20 * i, 24, true)]);
    }
    // Only ATTACH, MAP and PROBE are published at first.
    img.put(req.spec.avail + 2, &3u16.to_le_bytes());
    let head = |seed: Seed, features: u64| {
        let seed = physical_guest(seed, &img)
            .u32(1)
            .u32(0xffff)
            .u16(512)
            .u8(15)
            .u8(7)
            .u64(features)
            .u32(0x18);
        let seed = req.spec.write(seed, req.size_log2(), 0);
        ev.spec.write(seed, ev.size_log2(), 0)
    };
    // Serve ATTACH, MAP and PROBE; DMA inside the mapping, outside it and past the
    // input range; serve (the faults go to the eventq); publish and serve the rest.
    let session = head(Seed::new(), 0x1f | 1 << 29)
        .u8(0)
        .u8(4)
        .u8(0)
        .u64(0x10010)
        .u16(64)
        .u8(4)
        .u8(1)
        .u64(0x12000)
        .u16(8)
        .u8(4)
        .u8(2)
        .u64(u64::MAX - 4)
        .u16(16)
        .u8(0)
        .u8(1)
        .u8(3)
        .u8(0);
    let mut out = vec![("session", session.build())];
    out.push(("no_map_unmap", head(Seed::new(), 0).build()));
    let reset = head(Seed::new(), 0x1f)
        .u8(0)
        .u8(5)
        .u64(0x1f)
        .u8(4)
        .u8(0)
        .u64(0x10000)
        .u16(4);
    out.push(("reset", reset.build()));
    out
}
