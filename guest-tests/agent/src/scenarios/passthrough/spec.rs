//! What the guest's `vfio-passthrough` scenario and the host's test
//! (`guest-tests/tests/vfio_passthrough.rs`, which includes this file with `#[path]`)
//! agree on: the machine (one virtio-net PF with one VF, each on its own TAP), the
//! tag on the command line, the frames both ways (format, counts, payload pattern)
//! and the names of the checks. No dependencies: both sides compile it as is.

/// The PF's MAC and its VF's, as the host declares them.
pub const PF_MAC: &str = "52:54:00:12:34:56";
pub const VF_MAC: &str = "52:54:00:00:02:01";
/// The VF's MAC as bytes (the host's frames go to it).
pub const VF_MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x02, 0x01];
/// Source MAC of the frames the host writes onto the VF's TAP (locally administered).
pub const HOST_MAC_BYTES: [u8; 6] = [0x02, 0xfe, 0x11, 0x00, 0x00, 0x01];
/// TAPs by link: 0 = the PF, 1 = the VF.
pub const TAPS: [&str; 2] = ["ftap0", "ftap1"];
pub const PREFIX_LEN: u8 = 24;
/// Pings of the VF's TAP after it is given back to virtio-pci.
pub const PINGS: u32 = 3;

/// Why the nested case (`ferrio run --device` inside this guest) did not run.
pub const NESTED_SKIP: &str = "no /dev/kvm in the guest (this host has no nested virtualization)";

/// The VFIO back ends, in the order the guest runs them (index = the byte in frames).
pub const BACKENDS: [&str; 2] = ["group", "cdev"];

/// `ferrio.passthrough.tag=32 hex digits`: 16 bytes that start every frame's payload.
pub const TAG_PARAM: &str = "ferrio.passthrough.tag";
pub const TAG_LEN: usize = 16;

/// IEEE 802 local experimental ethertype 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// Bytes of every frame's payload (after the 14-byte Ethernet header).
pub const PAYLOAD_LEN: usize = 1000;
/// Frames the guest sends per back end (seq 0..TX_FRAMES).
pub const TX_FRAMES: u32 = 64;
/// Frames the host sends per back end once it saw the guest's first frame of that
/// back end (seq 0..RX_FRAMES, [`RX_GAP_MS`] apart).
pub const RX_FRAMES: u32 = 32;
pub const RX_GAP_MS: u64 = 20;
/// Direction byte of the payload: sent by the guest (out) or by the host (in).
pub const OUT: u8 = b'O';
pub const IN: u8 = b'I';
/// Header of a payload: tag, direction, back end, seq (u32 little endian).
pub const PAYLOAD_HEADER: usize = TAG_LEN + 2 + 4;

/// The host end of link `link` (0 = PF, 1 = VF): 10.0.(2 + link).2.
pub fn host_ip(link: usize) -> [u8; 4] {
    [10, 0, (2 + link).min(255) as u8, 2]
}

/// The guest end of link `link`: 10.0.(2 + link).15.
pub fn guest_ip(link: usize) -> [u8; 4] {
    [10, 0, (2 + link).min(255) as u8, 15]
}

/// The payload of frame `seq` of back end `backend` in direction `dir`: the header,
/// then bytes of a xorshift64 stream seeded from it.
pub fn payload(tag: &[u8; TAG_LEN], dir: u8, backend: u8, seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAYLOAD_LEN);
    p.extend_from_slice(tag);
    p.push(dir);
    p.push(backend);
    p.extend_from_slice(&seq.to_le_bytes());
    let mut x = 0xcbf2_9ce4_8422_2325u64;
    for &b in &p {
        x = (x ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    x |= 1;
    while p.len() < PAYLOAD_LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.extend_from_slice(&x.to_le_bytes()[..(PAYLOAD_LEN - p.len()).min(8)]);
    }
    p
}

/// `(dir, backend, seq)` of a payload that starts with `tag`.
pub fn parse_payload(tag: &[u8; TAG_LEN], p: &[u8]) -> Option<(u8, u8, u32)> {
    if p.len() < PAYLOAD_HEADER || &p[..TAG_LEN] != tag {
        return None;
    }
    let s = &p[TAG_LEN + 2..PAYLOAD_HEADER];
    Some((
        p[TAG_LEN],
        p[TAG_LEN + 1],
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
    ))
}

/// An Ethernet frame with [`ETHERTYPE`] around `payload`.
pub fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Parses a tag from 32 hex digits.
pub fn parse_tag(hex: &str) -> Option<[u8; TAG_LEN]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * TAG_LEN {
        return None;
    }
    let mut tag = [0u8; TAG_LEN];
    for (byte, pair) in tag.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(tag)
}

/// The tag as 32 lower-case hex digits.
pub fn tag_hex(tag: &[u8; TAG_LEN]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

/// `pt_<backend>_<what>`, e.g. `pt_cdev_tx_sha256`.
pub fn backend_check(backend: &str, what: &str) -> String {
    format!("pt_{backend}_{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_distinct_and_parse_back() {
        let tag: [u8; TAG_LEN] = std::array::from_fn(|i| i as u8 * 3);
        let a = payload(&tag, OUT, 0, 7);
        assert_eq!(a.len(), PAYLOAD_LEN);
        assert_eq!(parse_payload(&tag, &a), Some((OUT, 0, 7)));
        assert_ne!(a, payload(&tag, OUT, 0, 8));
        assert_ne!(
            a[PAYLOAD_HEADER..],
            payload(&tag, IN, 0, 7)[PAYLOAD_HEADER..]
        );
        assert_eq!(parse_payload(&[0; TAG_LEN], &a), None);
        assert_eq!(parse_tag(&tag_hex(&tag)), Some(tag));
        assert_eq!(parse_tag("zz"), None);
        let f = frame(VF_MAC_BYTES, HOST_MAC_BYTES, &a);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(host_ip(1), [10, 0, 3, 2]);
        assert_eq!(backend_check("cdev", "tx"), "pt_cdev_tx");
    }
}
