//! Attacks on the victim virtio-net ([`Net`]): transmit headers with bogus
//! segmentation and checksum fields, frames of 0 and 64 KiB+ bytes, control commands
//! of the wrong length, a looping transmit chain, an avail index that jumps, a reset
//! with frames in flight.

use std::time::{Duration, Instant};

use super::attack::Seen;
use super::net::*;
use super::spec;
use crate::scenarios::vfio::virtio::DESC_F_NEXT;

/// Sends each `(name, header, frame length, tag)` frame; every one must come back
/// (sent or dropped, never kept or answered with a reset).
fn frames(net: &mut Net, cases: &[(&str, Hdr, usize, &[u8; 16])]) -> Result<Seen, String> {
    net.start()?;
    let mut ok = true;
    let mut seen = Vec::new();
    for (i, (what, hdr, len, tag)) in cases.iter().enumerate() {
        let f = frame(*hdr, net.mac, tag, i as u64, *len);
        let r = net.send(1, &f)?;
        ok &= r.elem.is_some() && !r.needs_reset();
        seen.push(format!("{what}: {}", r.describe()));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

fn gso(gso_type: u8, gso_size: u16, hdr_len: u16) -> Hdr {
    Hdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len,
        gso_size,
        csum_start: 14,
        csum_offset: 16,
    }
}

/// Segmentation requests the device must refuse (size 0, unknown or not negotiated
/// types, ECN without HOST_ECN) and odd ones it may pass to the TAP (size 1, 65535,
/// a header length past the frame) for the host kernel to judge.
pub fn tx_bogus_gso(net: &mut Net) -> Result<Seen, String> {
    let (d, h) = (spec::NET_DROP_TAG, spec::NET_HOST_TAG);
    frames(
        net,
        &[
            ("TCPV4 gso_size 0", gso(GSO_TCPV4, 0, 54), 200, d),
            ("gso_type 0x7f", gso(0x7f, 1000, 54), 200, d),
            ("TCPV4|ECN", gso(GSO_TCPV4 | GSO_ECN, 1000, 54), 200, d),
            ("UDP (UFO)", gso(GSO_UDP, 1000, 42), 200, d),
            ("TCPV6", gso(GSO_TCPV6, 1000, 74), 200, d),
            ("NONE|ECN", gso(GSO_NONE | GSO_ECN, 0, 0), 200, d),
            ("TCPV4 gso_size 1", gso(GSO_TCPV4, 1, 54), 200, h),
            ("TCPV4 gso_size 65535", gso(GSO_TCPV4, 0xffff, 54), 200, h),
            ("TCPV4 hdr_len 65535", gso(GSO_TCPV4, 100, 0xffff), 200, h),
        ],
    )
}

/// Checksum offsets past the frame: the device must refuse them all.
pub fn tx_bogus_csum(net: &mut Net) -> Result<Seen, String> {
    let d = spec::NET_DROP_TAG;
    let csum = |start: u16, offset: u16| Hdr {
        flags: HDR_F_NEEDS_CSUM,
        csum_start: start,
        csum_offset: offset,
        ..Hdr::default()
    };
    frames(
        net,
        &[
            ("csum_start 65535", csum(0xffff, 0), 100, d),
            ("csum_offset 65535", csum(14, 0xffff), 100, d),
            ("start+offset+2 = len+1", csum(90, 9), 100, d),
            ("both 65535", csum(0xffff, 0xffff), 100, d),
        ],
    )
}

/// Frames of 0 bytes: the header alone, less than a header, empty descriptors.
pub fn tx_frame_0(net: &mut Net) -> Result<Seen, String> {
    net.start()?;
    let hdr = Hdr::default().bytes();
    net.d.s.mem.write(SMALL, &hdr)?;
    let at = net.d.at(SMALL);
    let cases: [(&str, Vec<(u64, u32)>); 4] = [
        ("header only", vec![(at, 12)]),
        ("11 bytes", vec![(at, 11)]),
        ("one empty descriptor", vec![(at, 0)]),
        ("header + empty descriptor", vec![(at, 12), (at + 12, 0)]),
    ];
    let mut ok = true;
    let mut seen = Vec::new();
    for (what, parts) in cases {
        let r = net.send_parts(&parts)?;
        ok &= r.elem.is_some() && !r.needs_reset();
        seen.push(format!("{what}: {}", r.describe()));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// Frames of 65535 and 65550 bytes (at the device's limit: passed to the TAP),
/// 65551 and 70000 (over it), and a 4 GiB descriptor.
pub fn tx_frame_64k(net: &mut Net) -> Result<Seen, String> {
    let (d, h) = (spec::NET_DROP_TAG, spec::NET_HOST_TAG);
    let mut seen = frames(
        net,
        &[
            ("65535 bytes", Hdr::default(), 65535, h),
            ("65550 bytes", Hdr::default(), 65550, h),
            ("65551 bytes", Hdr::default(), 65551, d),
            ("70000 bytes", Hdr::default(), 70000, d),
        ],
    )?;
    let f = frame(Hdr::default(), net.mac, d, 99, 64);
    net.d.s.mem.write(BIG, &f)?;
    let r = net.send_parts(&[(net.d.at(BIG), u32::MAX)])?;
    seen.ok &= r.elem.is_some() && !r.needs_reset();
    seen.text.push_str(&format!(
        "; descriptor of 0xffffffff bytes: {}",
        r.describe()
    ));
    Ok(seen)
}

/// A control command: name, readable parts, ack buffer lengths, and the ack it must
/// get (`Some(value)` in a 1-byte reply; `None`: returned empty).
type Command<'c> = (&'c str, Vec<&'c [u8]>, Vec<u32>, Option<u8>);

/// Control commands of the wrong length: every one must come back, with VIRTIO_NET_ERR
/// where there is an ack byte; a well-formed one must still get VIRTIO_NET_OK.
pub fn ctrl_wrong_lengths(net: &mut Net) -> Result<Seen, String> {
    net.start()?;
    if net.ctrl.is_none() {
        return Ok(Seen::new(false, "no control queue negotiated"));
    }
    let promisc = [CTRL_RX, CTRL_RX_PROMISC];
    let mac_set = [CTRL_MAC, CTRL_MAC_TABLE_SET];
    let five = 5u32.to_le_bytes();
    let lots = u32::MAX.to_le_bytes();
    let cases: Vec<Command> = vec![
        (
            "PROMISC without data",
            vec![&promisc],
            vec![1],
            Some(CTRL_ERR),
        ),
        (
            "PROMISC with 2 bytes",
            vec![&promisc, &[1, 1]],
            vec![1],
            Some(CTRL_ERR),
        ),
        (
            "PROMISC with 100 bytes",
            vec![&promisc, &[1; 100]],
            vec![1],
            Some(CTRL_ERR),
        ),
        (
            "MAC table of 5 with 1 entry",
            vec![&mac_set, &five, &[2, 0, 0, 0, 0, 1]],
            vec![1],
            Some(CTRL_ERR),
        ),
        (
            "MAC table of 2^32-1",
            vec![&mac_set, &lots],
            vec![1],
            Some(CTRL_ERR),
        ),
        (
            "MQ pairs in 1 byte",
            vec![&[CTRL_MQ, 0], &[1]],
            vec![1],
            Some(CTRL_ERR),
        ),
        ("1-byte header", vec![&[CTRL_RX]], vec![1], Some(CTRL_ERR)),
        ("no command", vec![], vec![1], Some(CTRL_ERR)),
        (
            "class 0xff",
            vec![&[0xff, 0xff, 0]],
            vec![1],
            Some(CTRL_ERR),
        ),
        ("no ack", vec![&promisc, &[1]], vec![], None),
        ("empty ack", vec![&promisc, &[1]], vec![0], None),
        ("64-byte ack", vec![&promisc, &[1]], vec![64], Some(CTRL_OK)),
        (
            "well-formed PROMISC on",
            vec![&promisc, &[1]],
            vec![1],
            Some(CTRL_OK),
        ),
    ];
    let mut ok = true;
    let mut seen = Vec::new();
    for (what, readable, acks, want) in cases {
        let (r, ack) = net.command(&readable, &acks)?;
        let good = match want {
            Some(v) => r.elem.is_some_and(|e| e.len == 1) && ack == v,
            None => r.returned_empty(),
        };
        ok &= good && !r.needs_reset();
        let ack = if want.is_some() {
            format!(" ack {ack:#04x}")
        } else {
            String::new()
        };
        seen.push(format!("{what}: {}{ack}", r.describe()));
    }
    Ok(Seen::new(ok, seen.join("; ")))
}

/// A transmit chain 0 -> 1 -> 0.
pub fn loop_chain(net: &mut Net) -> Result<Seen, String> {
    net.start()?;
    let f = frame(Hdr::default(), net.mac, spec::NET_DROP_TAG, 0, 64);
    net.d.s.mem.write(SMALL, &f)?;
    let at = net.d.at(SMALL);
    let ring = &net.tx()?.ring;
    ring.desc(0, at, 12, DESC_F_NEXT, 1)?;
    ring.desc(1, at + 12, 64, DESC_F_NEXT, 0)?;
    let r = net.publish_tx(0)?;
    Ok(Seen::new(
        r.returned_empty() || r.needs_reset(),
        format!("transmit chain 0->1->0: {}", r.describe()),
    ))
}

/// The transmitq's avail index moved by more than the queue size.
pub fn avail_idx_jump(net: &mut Net) -> Result<Seen, String> {
    net.start()?;
    let q = net.tx()?;
    let size = q.ring.size();
    let f = frame(Hdr::default(), net.mac, spec::NET_DROP_TAG, 0, 64);
    net.d.s.mem.write(SMALL, &f)?;
    q.ring.desc(0, net.d.at(SMALL), f.len() as u32, 0, 0)?;
    net.d.s.mem.write(TX.avail + 4, &0u16.to_le_bytes())?;
    net.d.s.mem.write(TX.avail + 2, &(size + 3).to_le_bytes())?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    net.d.kick(&q.info)?;
    let r = net.d.watch(&q.ring, 0, 0, REACT);
    Ok(Seen::new(
        r.needs_reset(),
        format!(
            "transmitq avail idx 0 -> {} (queue {size}): {}",
            size + 3,
            r.describe()
        ),
    ))
}

/// A queue's worth of frames in flight when the driver resets the device.
pub fn reset_in_flight(net: &mut Net) -> Result<Seen, String> {
    net.start()?;
    let size = net.tx()?.ring.size();
    let n = size.min(32);
    let since = net.tx()?.ring.used_idx()?;
    for i in 0..n {
        let f = frame(
            Hdr::default(),
            net.mac,
            spec::NET_HOST_TAG,
            1000 + u64::from(i),
            1514,
        );
        let off = SMALL + usize::from(i) * SMALL_SLOT;
        net.d.s.mem.write(off, &f)?;
        net.tx()?
            .ring
            .desc(i, net.d.at(off), f.len() as u32, 0, 0)?;
        net.tx
            .as_mut()
            .ok_or("transmitq not set up")?
            .ring
            .publish(i)?;
    }
    net.d.kick(&net.tx()?.info)?;
    let start = Instant::now();
    net.d.write_status(0)?;
    let mut status = net.d.status()?;
    while status != 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
        status = net.d.status()?;
    }
    let took = start.elapsed();
    let used = net.tx()?.ring.used_idx()?.wrapping_sub(since);
    const MARK: u16 = 0xbeef;
    net.d.s.mem.write(TX.used + 2, &MARK.to_le_bytes())?;
    std::thread::sleep(Duration::from_millis(300));
    let mark = net.d.s.mem.read_u16(TX.used + 2)?;
    net.tx = None;
    Ok(Seen::new(
        status == 0 && mark == MARK,
        format!(
            "{n} frames in flight; reset read 0 after {:.1} ms; {used} sent before it; used \
             ring {} after",
            took.as_secs_f64() * 1000.0,
            if mark == MARK { "untouched" } else { "WRITTEN" }
        ),
    ))
}
