use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ferrio_devices::virtio::testing::{memory, ro, wo, Buf, Driver, Mem, MEM_SIZE};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::domain::State;
use crate::fault::{Fault, FaultReason};
use crate::request::{MAP_F_READ, MAP_F_WRITE};
use crate::testing::req;

const CTX: RequestCtx = RequestCtx {
    map_unmap: true,
    probe: true,
    probe_size: 64,
};
const RING: u64 = 0x1000;
const DATA: u64 = 0x10_0000;
/// Filler of device-writable buffers, to see what the device wrote.
const FILL: u8 = 0xee;

fn shared() -> Arc<Shared> {
    let mut state = State::new((1, 1000), 128);
    state.add_endpoint(0x8).unwrap();
    Arc::new(Shared {
        state: Mutex::new(state),
        faults: FaultQueue::new(8),
    })
}

/// A requestq (or eventq) with a driver and a bump allocator for buffers.
struct Harness<'m> {
    mem: &'m Mem,
    driver: Driver<'m>,
    queue: Queue,
    next: u64,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m Mem) -> Self {
        let driver = Driver::new(mem, RING, 16);
        let queue = driver.queue();
        Self {
            mem,
            driver,
            queue,
            next: DATA,
        }
    }

    /// A buffer holding `bytes` (device-readable).
    fn readable(&mut self, bytes: &[u8]) -> Buf {
        let at = self.alloc(bytes.len());
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        ro(at, bytes.len() as u32)
    }

    /// A device-writable buffer of `len` bytes filled with [`FILL`].
    fn writable(&mut self, len: u32) -> Buf {
        let at = self.alloc(len as usize);
        self.mem
            .write_slice(&vec![FILL; len as usize], GuestAddress(at))
            .unwrap();
        wo(at, len)
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next;
        self.next += (len as u64).max(1).next_multiple_of(64);
        at
    }

    fn bytes(&self, buf: Buf) -> Vec<u8> {
        let mut v = vec![0; buf.len as usize];
        self.mem.read_slice(&mut v, GuestAddress(buf.addr)).unwrap();
        v
    }

    fn run(&mut self, shared: &Shared, ctx: &RequestCtx) -> RequestStats {
        process_requests(&mut self.queue, self.mem, shared, ctx).unwrap()
    }

    /// Sends one request with a `writable`-byte writable part; (used length, bytes of
    /// the writable part).
    fn request(&mut self, shared: &Shared, readable: &[u8], writable: u32) -> (u32, Vec<u8>) {
        let r = self.readable(readable);
        let w = self.writable(writable);
        self.driver.add(&[r, w]);
        let n = self.driver.used_idx();
        self.run(shared, &CTX);
        assert_eq!(self.driver.used_idx(), n.wrapping_add(1));
        (self.driver.used(n).1, self.bytes(w))
    }

    /// The status of a request with a 4-byte tail (asserting the used length).
    fn status(&mut self, shared: &Shared, readable: &[u8]) -> u8 {
        let (used, out) = self.request(shared, readable, 4);
        assert_eq!(used, 4);
        assert_eq!(&out[1..], &[0, 0, 0]);
        out[0]
    }
}

#[test]
fn requests_get_their_status() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let rw = MAP_F_READ | MAP_F_WRITE;
    assert_eq!(h.status(&s, &req::attach(1, 0x8)), Status::Ok as u8);
    assert_eq!(
        h.status(&s, &req::map(1, 0x1000, 0x1fff, 0x8000, rw)),
        Status::Ok as u8
    );
    assert_eq!(
        h.status(&s, &req::map(2, 0x1000, 0x1fff, 0x8000, rw)),
        Status::NoEnt as u8
    );
    assert_eq!(
        h.status(&s, &req::map(1, 0x1800, 0x1fff, 0x8000, rw)),
        Status::Range as u8
    );
    assert_eq!(h.status(&s, &req::unmap(3, 0, 0xfff)), Status::NoEnt as u8);
    assert_eq!(h.status(&s, &req::detach(3, 0x8)), Status::NoEnt as u8);
    assert_eq!(h.status(&s, &req::attach(1, 0x99)), Status::NoEnt as u8);
    assert_eq!(
        h.status(&s, &req::unmap(1, 0x1000, 0x1fff)),
        Status::Ok as u8
    );
    assert_eq!(h.status(&s, &req::detach(1, 0x8)), Status::Ok as u8);
    assert_eq!(s.lock().domain_count(), 0);
}

#[test]
fn bad_lengths_give_inval_for_each_type() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    for r in [
        req::attach(1, 0x8),
        req::detach(1, 0x8),
        req::map(1, 0, 0xfff, 0, 1),
        req::unmap(1, 0, 0xfff),
        req::probe(0x8),
    ] {
        assert_eq!(
            h.status(&s, &r[..r.len() - 4]),
            Status::Inval as u8,
            "type {}",
            r[0]
        );
        let mut long = r.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(h.status(&s, &long), Status::Inval as u8);
    }
    // A writable part of the wrong size: zeroed, status at its end.
    let (used, out) = h.request(&s, &req::attach(1, 0x8), 12);
    assert_eq!(used, 12);
    assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 0, Status::Inval as u8, 0, 0, 0]);
    assert_eq!(s.lock().domain_count(), 0);
}

#[test]
fn unknown_type_is_unsupp() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let mut r = req::attach(1, 0x8);
    r[0] = 0x42;
    assert_eq!(h.status(&s, &r), Status::Unsupp as u8);
}

#[test]
fn request_split_over_descriptors() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let r = req::attach(4, 0x8);
    let (a, b) = (h.readable(&r[..4]), h.readable(&r[4..]));
    let (w1, w2) = (h.writable(1), h.writable(3));
    h.driver.add(&[a, b, w1, w2]);
    h.run(&s, &CTX);
    assert_eq!(h.driver.used(0).1, 4);
    assert_eq!(h.bytes(w1), [0]);
    assert_eq!(h.bytes(w2), [0, 0, 0]);
    assert_eq!(s.lock().endpoint_domain(0x8), Some(4));
}

#[test]
fn unparsable_chains_are_returned_unwritten() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let r = req::attach(1, 0x8);
    // No writable part; a writable part shorter than the tail; readable after
    // writable; larger than any reply; outside guest memory.
    let cases: Vec<Vec<Buf>> = vec![
        vec![h.readable(&r)],
        vec![h.readable(&r), h.writable(3)],
        vec![h.writable(4), h.readable(&r)],
        vec![h.readable(&r), h.writable(64 + 4 + 1)],
        vec![h.readable(&r), wo(MEM_SIZE - 2, 4)],
    ];
    for (i, bufs) in cases.iter().enumerate() {
        h.driver.add(bufs);
        let stats = h.run(&s, &CTX);
        assert_eq!(stats.unparsable, 1, "case {i}");
        assert_eq!(h.driver.used(i as u16).1, 0, "case {i}");
        for b in bufs.iter().filter(|b| b.write && b.addr < DATA + 0x10_0000) {
            assert!(h.bytes(*b).iter().all(|&x| x == FILL), "case {i} wrote");
        }
    }
    assert_eq!(s.lock().domain_count(), 0);
}

#[test]
fn broken_chain_is_returned_unwritten() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let r = h.readable(&req::attach(1, 0x8));
    // Descriptors 0 and 1 point at each other.
    let next = VRING_DESC_F_NEXT as u16;
    h.driver.set_desc(0, r.addr, r.len, next, 1);
    h.driver.set_desc(1, r.addr, r.len, next, 0);
    h.driver.publish(0);
    let stats = h.run(&s, &CTX);
    assert_eq!((stats.chains, stats.unparsable), (1, 1));
    assert_eq!(h.driver.used(0), (0, 0));
}

#[test]
fn malformed_avail_ring_is_a_ring_error() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    h.driver.set_avail_idx(100);
    assert!(process_requests(&mut h.queue, &mem, &s, &CTX).is_err());
}

#[test]
fn probe_writes_the_msi_region() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let (used, out) = h.request(&s, &req::probe(0x8), 64 + 4);
    assert_eq!(used, 68);
    let mut expect = vec![0u8; 68];
    expect[..24].copy_from_slice(&[
        1, 0, 20, 0, 1, 0, 0, 0, // RESV_MEM, length 20, subtype MSI
        0, 0, 0xe0, 0xfe, 0, 0, 0, 0, // 0xfee00000
        0xff, 0xff, 0xef, 0xfe, 0, 0, 0, 0, // 0xfeefffff
    ]);
    assert_eq!(out, expect, "properties, zero padding, status OK");
    let (used, out) = h.request(&s, &req::probe(0x99), 68);
    assert_eq!(used, 68);
    assert_eq!(out[64], Status::NoEnt as u8);
    assert!(out[..64].iter().all(|&b| b == 0));
    // Not negotiated: returned unwritten.
    let no_probe = RequestCtx {
        probe: false,
        ..CTX
    };
    let r = h.readable(&req::probe(0x8));
    let w = h.writable(68);
    h.driver.add(&[r, w]);
    h.run(&s, &no_probe);
    assert_eq!(h.driver.used(2).1, 0);
    assert!(h.bytes(w).iter().all(|&b| b == FILL));
}

#[test]
fn unmap_waits_for_inflight_dma() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    let tracker = s.lock().tracker(0x8).unwrap();
    assert_eq!(h.status(&s, &req::attach(1, 0x8)), 0);
    assert_eq!(h.status(&s, &req::map(1, 0, 0xfff, 0, MAP_F_READ)), 0);
    let guard = tracker.begin();
    let r = h.readable(&req::unmap(1, 0, 0xfff));
    let w = h.writable(4);
    h.driver.add(&[r, w]);
    let (done_tx, done_rx) = mpsc::channel();
    let worker = {
        let (s, mem) = (s.clone(), mem.clone());
        let mut queue = std::mem::replace(&mut h.queue, h.driver.queue());
        std::thread::spawn(move || {
            process_requests(&mut queue, &mem, &s, &CTX).unwrap();
            done_tx.send(()).unwrap();
        })
    };
    assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
    // Not completed, but already invalid: nothing new can translate through it.
    assert_eq!(h.driver.used_idx(), 2);
    assert!(s.lock().find_mapping(1, 0).is_none());
    drop(guard);
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("UNMAP never completed");
    worker.join().unwrap();
    assert_eq!(h.driver.used_idx(), 3);
    assert_eq!(h.bytes(w)[0], Status::Ok as u8);
}

fn fault(address: u64) -> Fault {
    Fault {
        endpoint: 0x8,
        reason: FaultReason::Mapping,
        address,
        access: Permissions::Write,
    }
}

#[test]
fn faults_become_events() {
    let mem = memory();
    let faults = FaultQueue::new(8);
    let mut h = Harness::new(&mem);
    // No buffer: the fault waits.
    faults.record(fault(0x5000));
    let stats = post_faults(&mut h.queue, &mem, &faults).unwrap();
    assert_eq!(stats.posted, 0);
    assert_eq!(faults.len(), 1);
    let (a, b) = (h.writable(24), h.writable(24));
    h.driver.add(&[a]);
    h.driver.add(&[b]);
    let stats = post_faults(&mut h.queue, &mem, &faults).unwrap();
    assert_eq!((stats.posted, stats.invalid, stats.notify), (1, 0, true));
    assert_eq!(h.driver.used(0), (0, 24));
    let ev = h.bytes(a);
    assert_eq!(ev[0], FaultReason::Mapping as u8);
    assert_eq!(&ev[1..4], &[0, 0, 0]);
    assert_eq!(u32::from_le_bytes(ev[4..8].try_into().unwrap()), 0x102);
    assert_eq!(u32::from_le_bytes(ev[8..12].try_into().unwrap()), 0x8);
    assert_eq!(&ev[12..16], &[0; 4]);
    assert_eq!(u64::from_le_bytes(ev[16..24].try_into().unwrap()), 0x5000);
    // The second buffer stays available for the next fault.
    assert_eq!(h.driver.used_idx(), 1);
    assert!(h.bytes(b).iter().all(|&x| x == FILL));
}

#[test]
fn unusable_event_buffers_are_returned_and_the_fault_kept() {
    let mem = memory();
    let faults = FaultQueue::new(8);
    let mut h = Harness::new(&mem);
    faults.record(fault(0x6000));
    let small = h.writable(16);
    let readable = h.readable(&[0; 24]);
    let (x, y) = (h.writable(8), h.writable(16));
    h.driver.add(&[small]);
    h.driver.add(&[readable]);
    h.driver.add(&[x, y]);
    let stats = post_faults(&mut h.queue, &mem, &faults).unwrap();
    assert_eq!((stats.posted, stats.invalid), (1, 2));
    assert_eq!(h.driver.used(0).1, 0);
    assert_eq!(h.driver.used(1).1, 0);
    assert_eq!(h.driver.used(2).1, 24);
    assert!(h.bytes(small).iter().all(|&b| b == FILL));
    // Written across the two descriptors of the last chain.
    let mut ev = h.bytes(x);
    ev.extend(h.bytes(y));
    assert_eq!(&ev[..], &fault(0x6000).to_bytes()[..]);
    assert_eq!(faults.len(), 0);
}

#[test]
fn notifications_follow_event_idx() {
    let mem = memory();
    let s = shared();
    let mut h = Harness::new(&mem);
    // Without EVENT_IDX: kicks are re-enabled after the batch, every batch interrupts.
    let r = h.readable(&req::attach(1, 0x8));
    let w = h.writable(4);
    h.driver.add(&[r, w]);
    assert!(h.run(&s, &CTX).notify);
    assert_eq!(h.driver.used_flags(), 0);
    // With EVENT_IDX: the device asks for a kick at the next request, and interrupts
    // only when the used index passes the driver's used_event.
    h.queue.set_event_idx(true);
    h.driver.set_used_event(5);
    let r = h.readable(&req::detach(1, 0x8));
    let w = h.writable(4);
    h.driver.add(&[r, w]);
    assert!(!h.run(&s, &CTX).notify);
    assert_eq!(h.driver.avail_event(), 2);
    h.driver.set_used_event(2);
    let r = h.readable(&req::attach(1, 0x8));
    let w = h.writable(4);
    h.driver.add(&[r, w]);
    assert!(h.run(&s, &CTX).notify);
    assert_eq!(h.driver.used_idx(), 3);
}
