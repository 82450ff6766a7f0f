//! The 12-byte `virtio_net_hdr_v1` (virtio 1.2, 5.1.6) that precedes every frame on
//! both queues and on the TAP, and the checks a transmitted header must pass.

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

/// Size of `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 is always negotiated).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with segmentation offloads (a 64 KiB GSO frame plus Ethernet and VLAN
/// headers), not counting the vnet header.
pub const MAX_GSO_FRAME: usize = 65550;
/// Largest frame without segmentation offloads: 1500-byte MTU, Ethernet header, one
/// VLAN tag.
pub const MAX_PLAIN_FRAME: usize = 1518;

/// `virtio_net_hdr_v1`, decoded (the wire format is little endian).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHeader {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// The transmit offloads the driver negotiated (feature dependencies applied): what a
/// transmitted header may ask of the host.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: partial checksums (NEEDS_CSUM).
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_HOST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_HOST_ECN.
    pub ecn: bool,
    /// VIRTIO_NET_F_HOST_UFO.
    pub ufo: bool,
}

/// The only `flags` bit a transmitted header passes on: the device ignores the others
/// (virtio 1.2, 5.1.6.2.2; DATA_VALID and RSC_INFO are receive-only).
pub const TX_FLAGS: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;

/// Why a transmitted header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("NEEDS_CSUM without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} outside the {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: usize },
    #[error("gso_type {0:#x} unknown or not negotiated")]
    GsoType(u8),
    #[error("ECN segmentation without VIRTIO_NET_F_HOST_ECN")]
    Ecn,
    #[error("segmentation with gso_size 0")]
    GsoSize,
}

/// Checks the header of a transmitted frame of `frame_len` bytes (header excluded)
/// against the negotiated offloads. Flag bits other than [`TX_FLAGS`] are ignored (the
/// caller clears them in what it passes on).
pub fn validate_tx(
    hdr: &VnetHeader,
    frame_len: usize,
    offloads: &TxOffloads,
) -> Result<(), HeaderError> {
    if hdr.flags & TX_FLAGS != 0 {
        if !offloads.csum {
            return Err(HeaderError::CsumNotNegotiated);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::CsumRange {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: frame_len,
            });
        }
    }
    let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    let kind = hdr.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8);
    let allowed = match u32::from(kind) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6,
        VIRTIO_NET_HDR_GSO_UDP => offloads.ufo && !ecn,
        _ => false,
    };
    if !allowed {
        return Err(HeaderError::GsoType(hdr.gso_type));
    }
    if ecn && !offloads.ecn {
        return Err(HeaderError::Ecn);
    }
    if u32::from(kind) != VIRTIO_NET_HDR_GSO_NONE && hdr.gso_size == 0 {
        return Err(HeaderError::GsoSize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        ufo: true,
    };

    #[test]
    fn header_round_trips_little_endian() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        assert_eq!(VnetHeader::from_bytes(&b), h);
    }

    #[test]
    fn tx_header_rules() {
        let plain = VnetHeader::default();
        assert_eq!(validate_tx(&plain, 60, &TxOffloads::default()), Ok(()));
        // Unknown flag bits are ignored, not refused.
        let odd_flags = VnetHeader {
            flags: 0xfe,
            ..plain
        };
        assert_eq!(validate_tx(&odd_flags, 60, &TxOffloads::default()), Ok(()));
        let csum = VnetHeader {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            ..plain
        };
        assert_eq!(validate_tx(&csum, 52, &ALL), Ok(()));
        assert!(matches!(
            validate_tx(&csum, 51, &ALL),
            Err(HeaderError::CsumRange { .. })
        ));
        assert_eq!(
            validate_tx(&csum, 52, &TxOffloads::default()),
            Err(HeaderError::CsumNotNegotiated)
        );
        let tso = VnetHeader {
            gso_type: 1,
            gso_size: 1448,
            ..plain
        };
        assert_eq!(validate_tx(&tso, 60, &ALL), Ok(()));
        let only_tso6 = TxOffloads {
            csum: true,
            tso6: true,
            ..Default::default()
        };
        assert_eq!(
            validate_tx(&tso, 60, &only_tso6),
            Err(HeaderError::GsoType(1))
        );
        let ecn = VnetHeader {
            gso_type: 0x81,
            ..tso
        };
        assert_eq!(validate_tx(&ecn, 60, &ALL), Ok(()));
        let no_ecn = TxOffloads { ecn: false, ..ALL };
        assert_eq!(validate_tx(&ecn, 60, &no_ecn), Err(HeaderError::Ecn));
        let ecn_alone = VnetHeader {
            gso_type: 0x80,
            ..plain
        };
        assert_eq!(
            validate_tx(&ecn_alone, 60, &ALL),
            Err(HeaderError::GsoType(0x80))
        );
        let zero_size = VnetHeader { gso_size: 0, ..tso };
        assert_eq!(validate_tx(&zero_size, 60, &ALL), Err(HeaderError::GsoSize));
        let udp = VnetHeader {
            gso_type: 3,
            gso_size: 1400,
            ..plain
        };
        assert_eq!(validate_tx(&udp, 60, &ALL), Ok(()));
        let no_ufo = TxOffloads { ufo: false, ..ALL };
        assert_eq!(validate_tx(&udp, 60, &no_ufo), Err(HeaderError::GsoType(3)));
        let unknown = VnetHeader {
            gso_type: 5,
            gso_size: 1400,
            ..plain
        };
        assert_eq!(
            validate_tx(&unknown, 60, &ALL),
            Err(HeaderError::GsoType(5))
        );
    }
}
