//! The receiveq logic on hand-built rings and a fake TAP.

use super::{frame, read, Host};
use crate::virtio::net::header::{VnetHeader, MAX_GSO_FRAME, MAX_PLAIN_FRAME};
use crate::virtio::net::rx::{RxFill, RxParams, RxState};
use crate::virtio::testing::{memory, ro, wo, Driver};
use virtio_queue::QueueT;

const PLAIN: RxParams = RxParams {
    mrg_rxbuf: false,
    max_frame: MAX_PLAIN_FRAME,
    guest_csum: false,
};

const MERGEABLE: RxParams = RxParams {
    mrg_rxbuf: true,
    max_frame: MAX_GSO_FRAME,
    guest_csum: true,
};

/// Size of each receive buffer in the mergeable tests.
const CHAIN: u32 = 16384;

/// Guest address of receive buffer `i`.
fn addr(i: u64) -> u64 {
    0x10_0000 + 0x1_0000 * i
}

/// The header the device writes for a frame of `num_buffers` chains.
fn delivered(hdr: VnetHeader, num_buffers: u16) -> Vec<u8> {
    VnetHeader { num_buffers, ..hdr }.to_bytes().to_vec()
}

#[test]
fn rx_one_chain_per_frame_without_mrg_rxbuf() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    // The header straddles two descriptors in the first chain.
    let a = d.add(&[wo(0x10_0000, 8), wo(0x11_0000, 1522)]);
    let b = d.add(&[wo(0x20_0000, 1530)]);
    // DATA_VALID is cleared without GUEST_CSUM; num_buffers is the device's.
    let hdr = VnetHeader {
        flags: 2,
        num_buffers: 77,
        ..Default::default()
    };
    let f1 = frame(hdr, 60, 1);
    let f2 = frame(hdr, 1000, 2);
    h.peer.send(&f1);
    h.peer.send(&f2);

    let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
    assert_eq!((r.frames, r.completed, r.notify), (2, 2, true));
    // The ring is empty now: no third chain to read into.
    assert_eq!(r.state, RxState::NeedBuffers);
    assert_eq!(d.used(0), (u32::from(a), 72));
    assert_eq!(d.used(1), (u32::from(b), 1012));
    let clean = VnetHeader { flags: 0, ..hdr };
    let mut got = read(&mem, 0x10_0000, 8);
    got.extend(read(&mem, 0x11_0000, 64));
    assert_eq!(got[..12], delivered(clean, 1)[..]);
    assert_eq!(got[12..], f1[12..]);
    let got = read(&mem, 0x20_0000, 1012);
    assert_eq!(got[..12], delivered(clean, 1)[..]);
    assert_eq!(got[12..], f2[12..]);
    let s = h.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 1060));
}

#[test]
fn rx_mergeable_frame_spans_three_chains() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let heads: Vec<u16> = (0..6).map(|i| d.add(&[wo(addr(i), CHAIN)])).collect();
    let hdr = VnetHeader {
        flags: 1,
        gso_type: 1,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        hdr_len: 54,
        num_buffers: 0,
    };
    let big = frame(hdr, 40000, 5);
    let small = frame(VnetHeader::default(), 100, 9);
    h.peer.send(&big);
    h.peer.send(&small);

    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Full);
    assert_eq!((r.frames, r.completed), (1, 3));
    // Three chains (48 KiB) are left: not enough for a largest frame, so the small
    // frame is not read.
    assert_eq!(r.state, RxState::NeedBuffers);
    assert!(h.tap.has_frame());
    let lens = [CHAIN, CHAIN, big.len() as u32 - 2 * CHAIN];
    for (i, len) in lens.iter().enumerate() {
        assert_eq!(d.used(i as u16), (u32::from(heads[i]), *len));
    }
    assert_eq!(d.used_idx(), 3);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(read(&mem, addr(i as u64), *len as usize));
    }
    assert_eq!(got[..12], delivered(hdr, 3)[..]);
    assert_eq!(got[12..], big[12..]);
    // The chains gathered but not needed went back to the avail ring.
    assert_eq!(q.next_avail(), 3);

    // Three more chains: the small frame lands in the first chain given back.
    let more: Vec<u16> = (6..9).map(|i| d.add(&[wo(addr(i), CHAIN)])).collect();
    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Full);
    assert_eq!((r.frames, r.completed, r.state), (1, 1, RxState::Drained));
    assert_eq!(d.used(3), (u32::from(heads[3]), small.len() as u32));
    let got = read(&mem, addr(3), small.len());
    assert_eq!(got[..12], delivered(VnetHeader::default(), 1)[..]);
    assert_eq!(got[12..], small[12..]);
    assert_eq!(q.next_avail(), 4);
    assert!(!more.is_empty());
    let s = h.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 40100));
}

#[test]
fn rx_without_buffers_leaves_frames_in_the_host_queue() {
    for event_idx in [false, true] {
        let mem = memory();
        let mut d = Driver::new(&mem, 0, 16);
        let mut q = d.queue();
        q.set_event_idx(event_idx);
        let h = Host::new();
        let f = frame(VnetHeader::default(), 500, 3);
        h.peer.send(&f);

        for _ in 0..3 {
            let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
            assert_eq!((r.frames, r.completed, r.notify), (0, 0, false));
            assert_eq!((r.state, r.short), (RxState::NeedBuffers, false));
            assert!(h.tap.has_frame(), "the frame must stay in the host queue");
        }
        assert_eq!(h.stats.snapshot(), Default::default());
        // The driver is asked to notify the next buffer.
        if event_idx {
            assert_eq!(d.avail_event(), 0);
        } else {
            assert_eq!(d.used_flags(), 0);
        }

        let head = d.add(&[wo(0x10_0000, 1530)]);
        let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
        assert_eq!(r.frames, 1);
        assert_eq!(d.used(0), (u32::from(head), f.len() as u32));
        assert_eq!(read(&mem, 0x10_0000 + 12, 500), f[12..]);
        assert!(!h.tap.has_frame());
    }
}

#[test]
fn rx_mergeable_without_enough_room_reads_nothing() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    q.set_event_idx(true);
    let h = Host::new();
    for i in 0..3 {
        d.add(&[wo(0x10_0000 + 0x1_0000 * i, 4096)]);
    }
    h.peer.send(&frame(VnetHeader::default(), 60, 0));
    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Full);
    assert_eq!(
        (r.frames, r.completed, r.state),
        (0, 0, RxState::NeedBuffers)
    );
    assert!(h.tap.has_frame());
    assert_eq!(q.next_avail(), 0);
    // Notify when the driver publishes entry 3 (the ring ran out there).
    assert_eq!(d.avail_event(), 3);
    // With a plain MTU a 12 KiB ring is enough.
    let plain = RxParams {
        mrg_rxbuf: true,
        ..PLAIN
    };
    let r = h.rx(&mut q, &mem, &plain, RxFill::Full);
    assert_eq!((r.frames, r.completed, r.state), (1, 1, RxState::Drained));
    assert_eq!(q.next_avail(), 1);
}

#[test]
fn rx_refused_chains_are_returned_empty() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let read_only = d.add(&[ro(0x10_0000, 2000)]);
    let short = d.add(&[wo(0x11_0000, 11)]);
    let outside = d.add(&[wo(0xFFFF_0000, 2000)]);
    let good = d.add(&[wo(0x12_0000, 2000)]);
    let f = frame(VnetHeader::default(), 100, 4);
    h.peer.send(&f);
    let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
    assert_eq!((r.frames, r.completed), (1, 4));
    assert_eq!(d.used(0), (u32::from(read_only), 0));
    assert_eq!(d.used(1), (u32::from(short), 0));
    assert_eq!(d.used(2), (u32::from(outside), 0));
    assert_eq!(d.used(3), (u32::from(good), f.len() as u32));
    assert_eq!(read(&mem, 0x12_0000 + 12, 100), f[12..]);
    assert_eq!(h.stats.snapshot().rx_malformed, 3);
}

#[test]
fn rx_refused_chain_between_mergeable_buffers() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let g0 = d.add(&[wo(addr(0), CHAIN)]);
    let bad = d.add(&[ro(addr(1), CHAIN)]);
    let g1 = d.add(&[wo(addr(2), CHAIN)]);
    let bad2 = d.add(&[wo(addr(3), CHAIN), ro(addr(4), 16)]);
    let rest: Vec<u16> = (5..9).map(|i| d.add(&[wo(addr(i), CHAIN)])).collect();
    let f = frame(VnetHeader::default(), 20000, 6);
    h.peer.send(&f);
    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Full);
    assert_eq!(r.frames, 1);
    // The refused chain before the frame's last buffer is returned first, then the
    // frame's buffers, consecutive; the later refused one went back with the rest.
    assert_eq!(d.used(0), (u32::from(bad), 0));
    assert_eq!(d.used(1), (u32::from(g0), CHAIN));
    assert_eq!(d.used(2), (u32::from(g1), f.len() as u32 - CHAIN));
    assert_eq!(read(&mem, addr(0), 12), delivered(VnetHeader::default(), 2));
    let mut got = read(&mem, addr(0), CHAIN as usize);
    got.extend(read(&mem, addr(2), f.len() - CHAIN as usize));
    assert_eq!(got[12..], f[12..]);
    // Gathering for the next frame refuses it right away (nothing gathered before it),
    // then finds the four chains left too small for a largest frame: given back.
    assert_eq!(d.used(3), (u32::from(bad2), 0));
    assert_eq!(d.used_idx(), 4);
    assert_eq!(q.next_avail(), 4);
    assert_eq!(r.state, RxState::NeedBuffers);
    assert_eq!(h.stats.snapshot().rx_malformed, 2);
    assert_eq!(rest.len(), 4);
}

#[test]
fn rx_short_fill_reads_into_a_short_ring() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let heads: Vec<u16> = (0..3).map(|i| d.add(&[wo(addr(i), 4096)])).collect();
    let f1 = frame(VnetHeader::default(), 5000, 1);
    let f2 = frame(VnetHeader::default(), 60, 2);
    h.peer.send(&f1);
    h.peer.send(&f2);
    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Full);
    assert_eq!(
        (r.frames, r.state, r.short),
        (0, RxState::NeedBuffers, true)
    );
    assert!(h.tap.has_frame());

    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Short);
    // Both frames fit: the first in two chains, the second in the last one.
    assert_eq!((r.frames, r.completed), (2, 3));
    assert_eq!((r.state, r.short), (RxState::NeedBuffers, false));
    assert_eq!(d.used(0), (u32::from(heads[0]), 4096));
    assert_eq!(d.used(1), (u32::from(heads[1]), f1.len() as u32 - 4096));
    assert_eq!(d.used(2), (u32::from(heads[2]), f2.len() as u32));
    let mut got = read(&mem, addr(0), 4096);
    got.extend(read(&mem, addr(1), f1.len() - 4096));
    assert_eq!(got[..12], delivered(VnetHeader::default(), 2)[..]);
    assert_eq!(got[12..], f1[12..]);
    assert_eq!(read(&mem, addr(2), f2.len())[12..], f2[12..]);
}

/// A TAP (like a datagram socket) silently truncates a frame longer than the iovecs
/// and returns their total length: the device must notice and drop the frame instead
/// of delivering a truncated one as good.
#[test]
fn rx_frame_longer_than_the_buffers_is_dropped_not_truncated() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let small = d.add(&[wo(0x10_0000, 12 + 100)]);
    let exact = d.add(&[wo(0x20_0000, 12 + 100)]);
    h.peer.send(&frame(VnetHeader::default(), 101, 1));
    let fits = frame(VnetHeader::default(), 100, 2);
    h.peer.send(&fits);
    let r = h.rx(&mut q, &mem, &PLAIN, RxFill::Full);
    assert_eq!((r.frames, r.completed), (1, 2));
    assert_eq!(d.used(0), (u32::from(small), 0));
    // A frame filling its buffers exactly is delivered.
    assert_eq!(d.used(1), (u32::from(exact), fits.len() as u32));
    assert_eq!(read(&mem, 0x20_0000 + 12, 100), fits[12..]);
    let s = h.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes, s.rx_too_big), (1, 100, 1));

    // Same with mergeable buffers read into a short ring.
    let heads: Vec<u16> = (0..2)
        .map(|i| d.add(&[wo(0x30_0000 + 0x1_0000 * i, 1000)]))
        .collect();
    h.peer.send(&frame(VnetHeader::default(), 3000, 3));
    let r = h.rx(&mut q, &mem, &MERGEABLE, RxFill::Short);
    assert_eq!(r.frames, 0);
    assert_eq!(d.used(2), (u32::from(heads[0]), 0));
    assert_eq!(h.stats.snapshot().rx_too_big, 2);
    // The second chain went back to the ring.
    assert_eq!(q.next_avail(), 3);
}
