//! The victim virtio-net, driven raw from user space ([`Net`]): receiveq0 without
//! buffers, transmitq0 and the control queue. Frames carry the tags of
//! [`spec`]: the host's sniffer on the TAP must see every good frame and none of the
//! frames ferrio has to drop. The attacks are in `net_attacks`.

use std::time::Duration;

use super::attack::Victim;
use super::driver::{Driver, Queue, Reaction};
use super::session::Session;
use super::spec;
use crate::scenarios::vfio::virtio::{
    encode_desc, find_block, RingLayout, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1,
};
use crate::vfio::pci::VIRTIO_PCI_CAP_DEVICE_CFG;

pub const F_CSUM: u64 = 1 << 0;
pub const F_MAC: u64 = 1 << 5;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const WANTED: u64 = F_VERSION_1 | F_CSUM | F_MAC | F_HOST_TSO4 | F_CTRL_VQ | F_CTRL_RX;

pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;
/// Control queue: classes, commands, acks.
pub const CTRL_RX: u8 = 0;
pub const CTRL_RX_PROMISC: u8 = 0;
pub const CTRL_MAC: u8 = 1;
pub const CTRL_MAC_TABLE_SET: u8 = 0;
pub const CTRL_MQ: u8 = 4;
pub const CTRL_OK: u8 = 0;
pub const CTRL_ERR: u8 = 1;

pub const RX: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x0800,
    used: 0x1000,
};
pub const TX: RingLayout = RingLayout {
    desc: 0x2000,
    avail: 0x2800,
    used: 0x3000,
};
pub const CTRL: RingLayout = RingLayout {
    desc: 0x4000,
    avail: 0x4800,
    used: 0x5000,
};
/// Control commands and their acks.
pub const CMD: usize = 0x6000;
pub const ACK: usize = 0x7000;
/// Large frames (up to 960 KiB) and 2 KiB slots for small ones.
pub const BIG: usize = 0x10000;
pub const SMALL: usize = 0x10_0000;
pub const SMALL_SLOT: usize = 0x800;
pub const QUEUE_SIZE: u16 = 64;
pub const VNET_HDR_LEN: usize = 12;
pub const REACT: Duration = Duration::from_secs(5);

/// A `virtio_net_hdr_v1`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl Hdr {
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Header + broadcast Ethernet frame of `len` bytes (at least 14 + 24) from `mac`,
/// payload: `tag`, `n` as 8 bytes, then filler.
pub fn frame(hdr: Hdr, mac: [u8; 6], tag: &[u8; 16], n: u64, len: usize) -> Vec<u8> {
    let mut f = hdr.bytes().to_vec();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&spec::NET_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(tag);
    f.extend_from_slice(&n.to_le_bytes());
    let filler = len.saturating_sub(14 + 24);
    f.extend(std::iter::repeat_n(0x6e, filler));
    f.truncate(VNET_HDR_LEN + len);
    f
}

/// `52:54:00:...` notation.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The victim NIC's raw driver.
pub struct Net<'a> {
    pub d: Driver<'a>,
    pub tx: Option<Queue<'a>>,
    pub ctrl: Option<Queue<'a>>,
    rx: Option<Queue<'a>>,
    pub features: u64,
    pub mac: [u8; 6],
    /// The next transmitq descriptor to use.
    next: u16,
    /// Good frames sent.
    pub good: u64,
}

impl<'a> Net<'a> {
    pub fn new(s: &'a Session) -> Result<Net<'a>, String> {
        let d = Driver::new(s)?;
        let cfg = find_block(
            &s.dev,
            &s.cfg,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            "device-configuration",
        )?;
        let mut mac = [0u8; 6];
        s.dev.read(&cfg.region, cfg.base, &mut mac)?;
        Ok(Net {
            d,
            tx: None,
            ctrl: None,
            rx: None,
            features: 0,
            mac,
            next: 0,
            good: 0,
        })
    }

    fn size(&self, index: u16) -> Result<u16, String> {
        let max = self.d.t.queue_max(index)?;
        if max == 0 {
            return Err(format!("queue {index} does not exist"));
        }
        Ok(1 << (15 - max.min(QUEUE_SIZE).leading_zeros()))
    }

    /// Reset, features, receiveq0 (no buffers), transmitq0, the control queue when
    /// offered, DRIVER_OK.
    pub fn start(&mut self) -> Result<(), String> {
        (self.tx, self.ctrl, self.rx) = (None, None, None);
        self.d.reset()?;
        let offered = self.d.t.device_features()?;
        let mut plans = vec![(0, self.size(0)?, RX), (1, self.size(1)?, TX)];
        if offered & F_CTRL_VQ != 0 {
            plans.push((2, self.size(2)?, CTRL));
        }
        let (features, queues) = self.d.start(WANTED, &plans)?;
        self.features = features;
        let mut queues = queues.into_iter();
        self.rx = queues.next();
        self.tx = queues.next();
        self.ctrl = queues.next();
        self.next = 0;
        Ok(())
    }

    pub fn tx(&self) -> Result<&Queue<'a>, String> {
        self.tx
            .as_ref()
            .ok_or_else(|| "transmitq not set up".into())
    }

    /// Sends one chain of device-readable `(addr, len)` buffers; waits for it.
    pub fn send_parts(&mut self, parts: &[(u64, u32)]) -> Result<Reaction, String> {
        let size = self.tx()?.ring.size();
        let n = parts.len() as u16;
        if n == 0 || n > size {
            return Err(format!("{n} buffers for a queue of {size}"));
        }
        if self.next + n > size {
            self.next = 0;
        }
        let head = self.next;
        for (i, &(addr, len)) in (0u16..).zip(parts) {
            let last = i + 1 == n;
            let flags = if last { 0 } else { DESC_F_NEXT };
            self.tx()?.ring.desc(
                head + i,
                addr,
                len,
                flags,
                if last { 0 } else { head + i + 1 },
            )?;
        }
        self.next += n;
        self.publish_tx(head)
    }

    /// Publishes transmit chain `head` (already written) and waits for it.
    pub fn publish_tx(&mut self, head: u16) -> Result<Reaction, String> {
        let q = self.tx.as_mut().ok_or("transmitq not set up")?;
        let since = q.ring.used_idx()?;
        q.ring.publish(head)?;
        self.d.kick(&q.info)?;
        Ok(self.d.watch(&self.tx()?.ring, since, head, REACT))
    }

    /// Sends `bytes` (header + frame) from small slot `slot` (or the big area).
    pub fn send(&mut self, slot: usize, bytes: &[u8]) -> Result<Reaction, String> {
        let off = if bytes.len() > SMALL_SLOT {
            BIG
        } else {
            SMALL + slot * SMALL_SLOT
        };
        self.d.s.mem.write(off, bytes)?;
        let addr = self.d.at(off);
        self.send_parts(&[(addr, bytes.len() as u32)])
    }

    /// A good tagged frame; an error unless it comes back with an interrupt.
    pub fn send_good(&mut self, n: u64) -> Result<Reaction, String> {
        let f = frame(Hdr::default(), self.mac, spec::NET_GOOD_TAG, n, 64);
        let r = self.send(0, &f)?;
        if r.elem.is_none() || r.irqs == 0 || r.needs_reset() {
            return Err(format!("good frame: {}", r.describe()));
        }
        self.good += 1;
        Ok(r)
    }

    /// One control command: `readable` buffers of command bytes, then writable ack
    /// buffers of `ack_lens`; returns the reaction and the first ack byte.
    pub fn command(
        &mut self,
        readable: &[&[u8]],
        ack_lens: &[u32],
    ) -> Result<(Reaction, u8), String> {
        let q = self.ctrl.as_ref().ok_or("no control queue")?;
        let mut descs = Vec::new();
        let mut off = CMD;
        for part in readable {
            self.d.s.mem.write(off, part)?;
            descs.push((self.d.at(off), part.len() as u32, 0));
            off += part.len().max(1).next_multiple_of(16);
        }
        let mut ack_off = ACK;
        for &len in ack_lens {
            self.d.s.mem.write(ack_off, &vec![0xee; len as usize])?;
            descs.push((self.d.at(ack_off), len, DESC_F_WRITE));
            ack_off += (len as usize).max(1).next_multiple_of(16);
        }
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in (0u16..).zip(&descs) {
            let last = i + 1 == n;
            let next = if last { 0 } else { i + 1 };
            let f = flags | if last { 0 } else { DESC_F_NEXT };
            self.d.s.mem.write(
                CTRL.desc + 16 * usize::from(i),
                &encode_desc(addr, len, f, next),
            )?;
        }
        let since = q.ring.used_idx()?;
        let q = self.ctrl.as_mut().ok_or("no control queue")?;
        q.ring.publish(0)?;
        self.d.kick(&q.info)?;
        let r = self.d.watch(
            &self.ctrl.as_ref().ok_or("no control queue")?.ring,
            since,
            0,
            REACT,
        );
        let mut ack = [0u8; 1];
        self.d.s.mem.read(ACK, &mut ack)?;
        Ok((r, ack[0]))
    }
}

impl Victim for Net<'_> {
    fn recover(&mut self, n: u64) -> Result<String, String> {
        let before = self.d.status()?;
        self.start()?;
        let r = self.send_good(n)?;
        Ok(format!(
            "status was {before:#04x}; reset; good frame {}",
            r.describe()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_header_ethernet_tag_and_filler() {
        let mac = [0x52, 0x54, 0, 0, 0x0a, 1];
        let hdr = Hdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 14,
            csum_offset: 16,
        };
        let f = frame(hdr, mac, spec::NET_GOOD_TAG, 7, 100);
        assert_eq!(f.len(), VNET_HDR_LEN + 100);
        assert_eq!(&f[..10], &[1, 1, 2, 1, 4, 3, 14, 0, 16, 0]);
        assert_eq!(&f[12..18], &[0xff; 6]);
        assert_eq!(&f[18..24], &mac);
        assert_eq!(&f[24..26], &[0x88, 0xb5]);
        assert_eq!(&f[26..42], spec::NET_GOOD_TAG);
        assert_eq!(&f[42..50], &7u64.to_le_bytes());
        // Shorter than the Ethernet header and tag: cut, not padded.
        assert_eq!(
            frame(Hdr::default(), mac, spec::NET_DROP_TAG, 0, 0).len(),
            12
        );
        assert_eq!(format_mac(mac), "52:54:00:00:0a:01");
    }
}
