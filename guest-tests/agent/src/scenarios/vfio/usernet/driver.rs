//! The user-space virtio-net driver behind [`super::run`]: just a transmit path.
//! Features: VERSION_1, ACCESS_PLATFORM and MAC when offered, nothing else (no
//! MRG_RXBUF, no checksum or segmentation offloads, no control queue), so every
//! frame is one 12-byte `virtio_net_hdr_v1` of zeros followed by the Ethernet frame.
//! receiveq0 is enabled (ferrio activates a device only with pair 0 complete) with a
//! small ring and no buffers and no interrupt vector; transmitq0 (queue 1) uses MSI-X
//! vector 0. Both rings and the frames live in the DMA buffer.

use std::time::Duration;

use super::super::virtio::{
    find_block, queue_size_for, QueueInfo, RingLayout, SplitRing, Transport, UsedElem, Waited,
    DESC_F_NEXT, F_ACCESS_PLATFORM, F_VERSION_1, MAX_QUEUE_SIZE, NO_VECTOR,
};
use crate::vfio::pci::VIRTIO_PCI_CAP_DEVICE_CFG;
use crate::vfio::{DmaBuffer, EventFd};

/// VIRTIO_NET_F_MAC: the device configuration holds the function's MAC address.
pub const F_MAC: u64 = 1 << 5;
/// What the driver accepts when offered.
pub const WANTED: u64 = F_VERSION_1 | F_ACCESS_PLATFORM | F_MAC;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// The MSI-X vector of the transmitq.
pub const TX_VECTOR: u16 = 0;

/// `virtio_net_hdr_v1` without MRG_RXBUF is still 12 bytes with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
pub const ETH_HLEN: usize = 14;
/// IEEE 802 local experimental ethertype 1.
pub const ETHERTYPE: u16 = 0x88b5;
pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const PAYLOAD_LEN: usize = 64;
/// The payload of the frame whose second buffer lies at an unmapped IOVA: it must
/// never reach the host.
pub const BAD_PAYLOAD: [u8; PAYLOAD_LEN] =
    *b"ferrio-bad-iova!ferrio-bad-iova!ferrio-bad-iova!ferrio-bad-iova!";
/// Length of the unmapped buffer of that frame.
pub const BAD_LEN: u32 = 64;

/// Layout of the DMA buffer (offsets from its start / its IOVA).
const RX_RING: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x0400,
    used: 0x0800,
};
const TX_RING: RingLayout = RingLayout {
    desc: 0x1000,
    avail: 0x1400,
    used: 0x1800,
};
/// Frame slots of [`FRAME_SLOT`] bytes each.
const FRAMES: usize = 0x2000;
const FRAME_SLOT: usize = 0x800;
pub const FRAME_SLOTS: usize = 4;
/// Bytes of the DMA buffer the layout uses.
pub const BUFFER_LEN: usize = FRAMES + FRAME_SLOTS * FRAME_SLOT;

const _: () = {
    assert!(RX_RING.fits(MAX_QUEUE_SIZE, TX_RING.desc));
    assert!(TX_RING.fits(MAX_QUEUE_SIZE, FRAMES));
    assert!(VNET_HDR_LEN + ETH_HLEN + PAYLOAD_LEN <= FRAME_SLOT);
    assert!(BUFFER_LEN <= 64 << 10);
};

/// `tag` repeated to [`PAYLOAD_LEN`] bytes.
pub fn tag_payload(tag: &[u8; 16]) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    for chunk in p.chunks_mut(tag.len()) {
        chunk.copy_from_slice(&tag[..chunk.len()]);
    }
    p
}

/// What the driver hands the device for one frame: a zeroed `virtio_net_hdr_v1`,
/// then a broadcast Ethernet frame from `src` with [`ETHERTYPE`] and `payload`.
pub fn tx_bytes(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; VNET_HDR_LEN];
    b.extend_from_slice(&BROADCAST);
    b.extend_from_slice(&src);
    b.extend_from_slice(&ETHERTYPE.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A usable source address: not all zeros, not a group address.
pub fn is_unicast(mac: [u8; 6]) -> bool {
    mac != [0; 6] && mac[0] & 1 == 0
}

/// One frame handed to the device and what came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Head descriptor of its chain.
    pub head: u16,
    pub waited: Waited,
}

impl Sent {
    /// Completed with an interrupt, no error.
    pub fn ok(&self) -> bool {
        self.waited.elem.is_some() && self.waited.interrupts > 0 && self.waited.error.is_none()
    }

    pub fn describe(&self) -> String {
        let w = &self.waited;
        let mut s = match w.elem {
            Some(UsedElem { id, len }) => format!("used idx {} (chain {id} len {len})", w.used),
            None => format!("chain {} not used, used idx {}", self.head, w.used),
        };
        s.push_str(&format!(", interrupts {}", w.interrupts));
        if let Some(e) = &w.error {
            s.push_str(&format!(", error: {e}"));
        }
        s
    }
}

/// The driver state: the transport, the transmit ring and where the queues are.
pub struct UserNet<'a> {
    pub transport: Transport<'a>,
    buf: &'a DmaBuffer,
    irq: &'a EventFd,
    iova: u64,
    tx: Option<(SplitRing<'a>, QueueInfo)>,
    /// Next free descriptor of the transmitq (descriptors are not reused).
    next_desc: u16,
}

impl<'a> UserNet<'a> {
    /// A driver for the device behind `transport`; touches nothing yet.
    pub fn new(
        transport: Transport<'a>,
        buf: &'a DmaBuffer,
        iova: u64,
        irq: &'a EventFd,
    ) -> Result<Self, String> {
        if buf.len() < BUFFER_LEN {
            return Err(format!("DMA buffer of {} bytes < {BUFFER_LEN}", buf.len()));
        }
        Ok(UserNet {
            transport,
            buf,
            irq,
            iova,
            tx: None,
            next_desc: 0,
        })
    }

    /// Resets the device and negotiates [`WANTED`]; returns (offered, accepted).
    pub fn negotiate(&self) -> Result<(u64, u64), String> {
        self.transport.reset()?;
        self.transport.negotiate(WANTED)
    }

    /// Sets up receiveq0 (no vector, no buffers) and transmitq0 (vector
    /// [`TX_VECTOR`]); returns a description.
    pub fn setup_queues(&mut self) -> Result<String, String> {
        let t = &self.transport;
        t.set_config_vector(NO_VECTOR)?;
        let mut sizes = [0u16; 2];
        for (q, size) in [RX_QUEUE, TX_QUEUE].into_iter().zip(sizes.iter_mut()) {
            let max = t.queue_max(q)?;
            if max == 0 {
                return Err(format!("queue {q} does not exist (queue_size 0)"));
            }
            *size = queue_size_for(max);
        }
        let rx = SplitRing::new(self.buf, self.iova, RX_RING, sizes[0])?;
        t.setup_queue(RX_QUEUE, rx.size(), NO_VECTOR, rx.iovas())?;
        let tx = SplitRing::new(self.buf, self.iova, TX_RING, sizes[1])?;
        let txq = t.setup_queue(TX_QUEUE, tx.size(), TX_VECTOR, tx.iovas())?;
        let text = format!(
            "rx size {} (no buffers, no vector), tx size {} vector {TX_VECTOR} at iova {:#x}",
            rx.size(),
            tx.size(),
            tx.iovas()[0]
        );
        self.tx = Some((tx, txq));
        Ok(text)
    }

    /// The MAC address in the device configuration.
    pub fn mac(&self, cfg: &[u8]) -> Result<[u8; 6], String> {
        let dev = self.transport.dev();
        let b = find_block(dev, cfg, VIRTIO_PCI_CAP_DEVICE_CFG, "device-configuration")?;
        let mut mac = [0u8; 6];
        dev.read(&b.region, b.base, &mut mac)?;
        Ok(mac)
    }

    /// The IOVA the DMA buffer is mapped at.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The IOVA of frame slot `slot`.
    fn slot_iova(&self, slot: usize) -> u64 {
        self.iova + (FRAMES + slot * FRAME_SLOT) as u64
    }

    /// Sends `bytes` (header and frame) from frame slot `slot`, followed by `extra`
    /// (an `(iova, len)` buffer outside the slots) when given, as one chain; waits up
    /// to `timeout` for its completion and an interrupt.
    pub fn send(
        &mut self,
        slot: usize,
        bytes: &[u8],
        extra: Option<(u64, u32)>,
        timeout: Duration,
    ) -> Result<Sent, String> {
        if slot >= FRAME_SLOTS || bytes.len() > FRAME_SLOT {
            return Err(format!("slot {slot} / {} bytes", bytes.len()));
        }
        self.buf.write(FRAMES + slot * FRAME_SLOT, bytes)?;
        let mut chain = vec![(self.slot_iova(slot), bytes.len() as u32)];
        chain.extend(extra);
        let (ring, txq) = self.tx.as_mut().ok_or("the transmitq is not set up")?;
        let head = self.next_desc;
        self.next_desc += write_chain(ring, head, &chain)?;
        let since = ring.used_idx()?;
        ring.publish(head)?;
        self.transport.notify(txq)?;
        let waited = ring.wait_chain(self.irq, since, head, timeout);
        Ok(Sent { head, waited })
    }
}

/// Writes the descriptors of one chain of `(iova, len)` device-readable buffers from
/// descriptor `head` on; returns how many it used.
fn write_chain(ring: &SplitRing, head: u16, chain: &[(u64, u32)]) -> Result<u16, String> {
    let n = u16::try_from(chain.len()).unwrap_or(u16::MAX);
    if n == 0 || u32::from(head) + u32::from(n) > u32::from(ring.size()) {
        return Err(format!(
            "no room for {n} descriptors from {head} (queue size {})",
            ring.size()
        ));
    }
    for (i, &(addr, len)) in (0u16..).zip(chain) {
        let last = i + 1 == n;
        let flags = if last { 0 } else { DESC_F_NEXT };
        let next = if last { 0 } else { head + i + 1 };
        ring.desc(head + i, addr, len, flags, next)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn frames_carry_a_zero_header_and_a_broadcast_ethernet_frame() {
        let src = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let payload = tag_payload(&TAG);
        assert_eq!(&payload[..16], &TAG);
        assert_eq!(&payload[48..], &TAG);
        let b = tx_bytes(src, &payload);
        assert_eq!(b.len(), VNET_HDR_LEN + ETH_HLEN + PAYLOAD_LEN);
        assert_eq!(&b[..12], &[0; 12], "flags, gso, lengths and num_buffers 0");
        assert_eq!(&b[12..18], &[0xff; 6]);
        assert_eq!(&b[18..24], &src);
        assert_eq!(&b[24..26], &[0x88, 0xb5]);
        assert_eq!(&b[26..], &payload);
        assert_eq!(format_mac(src), "52:54:00:12:34:56");
        assert!(is_unicast(src));
        assert!(!is_unicast([0; 6]));
        assert!(!is_unicast([0x01, 0, 0x5e, 0, 0, 1]));
    }

    #[test]
    fn the_bad_payload_differs_from_any_tag_frame() {
        let b = tx_bytes([2, 0, 0, 0, 0, 1], &BAD_PAYLOAD);
        assert_eq!(&b[26..], &BAD_PAYLOAD);
        assert_ne!(BAD_PAYLOAD, tag_payload(&TAG));
        assert!(BAD_PAYLOAD.is_ascii());
    }

    #[test]
    fn layout_fits_the_queues_and_frames() {
        assert_eq!(BUFFER_LEN, 0x4000);
        assert!(RX_RING.fits(queue_size_for(256), 0x1000));
        assert!(TX_RING.fits(queue_size_for(256), FRAMES));
    }

    #[test]
    fn chains_are_linked_descriptors_of_readable_buffers() {
        let buf = DmaBuffer::new(BUFFER_LEN).unwrap();
        let iova = 0x8_0000_0000;
        let mut ring = SplitRing::new(&buf, iova, TX_RING, 4).unwrap();
        let slot = iova + (FRAMES + FRAME_SLOT) as u64;
        let bad = iova + (1 << 30);
        assert_eq!(write_chain(&ring, 1, &[(slot, 90), (bad, BAD_LEN)]), Ok(2));
        ring.publish(1).unwrap();
        let desc = |i: usize| {
            let mut d = [0u8; 16];
            buf.read(TX_RING.desc + 16 * i, &mut d).unwrap();
            d
        };
        use super::super::super::virtio::encode_desc;
        assert_eq!(desc(1), encode_desc(slot, 90, DESC_F_NEXT, 2));
        assert_eq!(
            desc(2),
            encode_desc(bad, BAD_LEN, 0, 0),
            "last: no NEXT, not WRITE"
        );
        assert_eq!(buf.read_u16(TX_RING.avail + 2), Ok(1));
        assert_eq!(buf.read_u16(TX_RING.avail + 4), Ok(1));
        assert_eq!(write_chain(&ring, 3, &[(slot, 90)]), Ok(1));
        assert!(write_chain(&ring, 3, &[(slot, 90), (slot, 1)]).is_err());
        assert!(write_chain(&ring, 0, &[]).is_err());
    }
}
