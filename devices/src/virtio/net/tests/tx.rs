//! The transmitq logic on hand-built rings and a fake TAP.

use super::{frame, scatter, Host};
use crate::virtio::net::header::{TxOffloads, VnetHeader, MAX_GSO_FRAME};
use crate::virtio::net::tx::TxResult;
use crate::virtio::ring::RingError;
use crate::virtio::testing::{memory, ro, wo, Buf, Driver};

const CSUM: TxOffloads = TxOffloads {
    csum: true,
    tso4: true,
    tso6: true,
    ecn: false,
    ufo: false,
};

fn bufs(pieces: &[(u64, u32)]) -> Vec<Buf> {
    pieces.iter().map(|&(a, l)| ro(a, l)).collect()
}

#[test]
fn tx_frame_split_over_descriptors_arrives_intact() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let hdr = VnetHeader {
        flags: 1,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let f = frame(hdr, 100, 7);
    // The header itself is split: 5 bytes, then 7 + 40 payload bytes, then 60.
    let head = d.add(&bufs(&scatter(&mem, 0x10_0000, &f, &[5, 47, 60])));

    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert_eq!(
        r,
        TxResult {
            completed: 1,
            notify: true,
            blocked: false,
            more: false
        }
    );
    assert_eq!(h.peer.recv(), f);
    assert_eq!(h.peer.try_recv(), None);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (u32::from(head), 0));
    let s = h.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_malformed), (1, 100, 0));
}

#[test]
fn tx_bad_chains_are_dropped_and_counted() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let bad_gso = frame(
        VnetHeader {
            gso_type: 5,
            gso_size: 1000,
            ..Default::default()
        },
        60,
        0,
    );
    let bad_csum = frame(
        VnetHeader {
            flags: 1,
            csum_start: 50,
            csum_offset: 9,
            ..Default::default()
        },
        60,
        0,
    );
    let good = frame(VnetHeader::default(), 80, 3);
    let mut heads = vec![
        d.add(&bufs(&scatter(&mem, 0x10_0000, &bad_gso, &[72]))),
        d.add(&bufs(&scatter(&mem, 0x20_0000, &bad_csum, &[12, 60]))),
        // Shorter than the header.
        d.add(&[ro(0x30_0000, 8)]),
        // A device-writable descriptor.
        d.add(&[ro(0x40_0000, 12), wo(0x40_1000, 60)]),
        // Longer than a GSO frame.
        d.add(&[ro(0x50_0000, 12), ro(0x60_0000, MAX_GSO_FRAME as u32 + 1)]),
        // Outside guest memory.
        d.add(&[ro(0x50_0000, 12), ro(0xFFFF_0000, 64)]),
    ];
    heads.push(d.add(&bufs(&scatter(&mem, 0x70_0000, &good, &[92]))));

    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert_eq!(r.completed, heads.len());
    assert!(r.notify && !r.blocked);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(d.used(i as u16), (u32::from(*head), 0), "chain {i}");
    }
    // Only the good frame went out.
    assert_eq!(h.peer.recv(), good);
    assert_eq!(h.peer.try_recv(), None);
    let s = h.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_malformed, s.tx_error), (1, 6, 0));

    // NEEDS_CSUM is refused without VIRTIO_NET_F_CSUM.
    let csum = frame(
        VnetHeader {
            flags: 1,
            csum_start: 14,
            csum_offset: 6,
            ..Default::default()
        },
        60,
        0,
    );
    d.add(&bufs(&scatter(&mem, 0x10_0000, &csum, &[72])));
    let none = TxOffloads::default();
    h.tx(&mut q, &mem, &none, 64).unwrap();
    assert_eq!(h.peer.try_recv(), None);
    assert_eq!(h.stats.snapshot().tx_malformed, 7);
}

#[test]
fn tx_waits_for_room_when_the_host_is_full() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let filler = h.tap.fill();
    assert!(filler > 0);
    let f = frame(VnetHeader::default(), 1000, 9);
    let head = d.add(&bufs(&scatter(&mem, 0x10_0000, &f, &[12, 1000])));

    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert!(r.blocked);
    assert_eq!(r.completed, 0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(h.stats.snapshot(), Default::default());
    // Still blocked: nothing is dropped, the chain stays available.
    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert!(r.blocked);
    assert_eq!(d.used_idx(), 0);

    for _ in 0..filler {
        assert!(h.peer.try_recv().is_some());
    }
    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert!(!r.blocked);
    assert_eq!(r.completed, 1);
    assert_eq!(d.used(0), (u32::from(head), 0));
    assert_eq!(h.peer.recv(), f);
    assert_eq!(h.stats.snapshot().tx_frames, 1);
}

#[test]
fn tx_budget_and_ring_errors() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let f = frame(VnetHeader::default(), 60, 1);
    for i in 0..3 {
        d.add(&bufs(&scatter(&mem, 0x10_0000 * (i + 1), &f, &[72])));
    }
    let r = h.tx(&mut q, &mem, &CSUM, 2).unwrap();
    assert_eq!((r.completed, r.more), (2, true));
    let r = h.tx(&mut q, &mem, &CSUM, 2).unwrap();
    assert_eq!((r.completed, r.more), (1, false));
    for _ in 0..3 {
        assert_eq!(h.peer.recv(), f);
    }
    // An avail index more than the queue size ahead is a ring error.
    d.set_avail_idx(d.avail_idx().wrapping_add(100));
    let err = h.tx(&mut q, &mem, &CSUM, 64).unwrap_err();
    assert!(matches!(err, RingError::AvailRing(_)), "{err}");
}

/// virtio 1.2, 5.1.6.2.2: "The device MUST ignore flag bits that it does not
/// recognize": such a frame is sent, with only NEEDS_CSUM passed on to the host.
#[test]
fn tx_unknown_header_flags_are_ignored() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue();
    let h = Host::new();
    let hdr = VnetHeader {
        // NEEDS_CSUM, DATA_VALID and RSC_INFO (which a driver must not set) and 0x80.
        flags: 0x87,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let f = frame(hdr, 100, 7);
    let head = d.add(&bufs(&scatter(&mem, 0x10_0000, &f, &[112])));
    let r = h.tx(&mut q, &mem, &CSUM, 64).unwrap();
    assert_eq!(r.completed, 1);
    assert_eq!(d.used(0), (u32::from(head), 0));
    let mut expected = f.clone();
    expected[0] = 1;
    assert_eq!(h.peer.recv(), expected);
    let s = h.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_malformed), (1, 0));
}
