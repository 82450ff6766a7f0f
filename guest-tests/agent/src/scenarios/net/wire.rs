//! What the guest's `net` scenario and the host's peer (`guest-tests/src/net_peer.rs`,
//! which includes this file with `#[path]`) agree on: addresses, the per-connection
//! header, the deterministic byte stream each flow carries, its sha256, and the names
//! of the virtio-net feature bits.
//!
//! One TCP connection is one flow. The guest connects to the peer and sends a
//! [`Header`]. Upload (guest to host): the guest then sends `len` stream bytes and the
//! peer answers with the sha256 of what it received. Download (host to guest): the
//! peer sends `len` stream bytes and the guest answers with the sha256 of what it
//! received. The receiver's 32-byte answer also tells the sender that everything
//! arrived, which ends the sender's clock.

use sha2::{Digest, Sha256};

/// The host end (on the TAP, inside the test's network namespace).
pub const PEER_IP: [u8; 4] = [10, 0, 2, 2];
/// The guest's address.
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
pub const PREFIX_LEN: u8 = 24;
/// The peer's TCP port.
pub const PORT: u16 = 5201;
/// The MAC the tests give the guest's NIC.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// Kernel command-line knobs of the scenario, with their defaults.
pub const MIB_PARAM: &str = "ferrio.net.mib";
pub const DEFAULT_MIB: u64 = 64;
pub const FLOWS_PARAM: &str = "ferrio.net.flows";
pub const DEFAULT_FLOWS: u8 = 2;
pub const PINGS_PARAM: &str = "ferrio.net.pings";
pub const DEFAULT_PINGS: u32 = 20;
/// `ferrio.net.verify=0`: the guest does not hash (benchmarks; it answers zeros).
pub const VERIFY_PARAM: &str = "ferrio.net.verify";
/// `net.ipv4.tcp_min_tso_segs` for both ends (0: leave the kernel's 2). A slow
/// (emulated) guest kernel makes TCP's pacing rate low, so TSO would build packets of
/// 2 segments; every packet costs the guest milliseconds, so we ask for 64 KiB ones.
pub const TSO_SEGS_PARAM: &str = "ferrio.net.tso_segs";
pub const DEFAULT_TSO_SEGS: u32 = 44;
/// Where that sysctl lives (per network namespace).
pub const TSO_SEGS_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_min_tso_segs";

/// Header magic ("FNET" little-endian) and length.
const MAGIC: u32 = u32::from_le_bytes(*b"FNET");
pub const HEADER_LEN: usize = 32;
/// Largest flow the peer accepts (a bad header must not make it stream for hours).
pub const MAX_FLOW_LEN: u64 = 16 << 30;
/// The receiver's answer: a sha256.
pub const ANSWER_LEN: usize = 32;

/// Which way a flow's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Guest to host.
    Upload,
    /// Host to guest.
    Download,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Upload, Direction::Download];

    /// The prefix of the scenario's check names: `g2h` or `h2g`.
    pub fn tag(self) -> &'static str {
        match self {
            Direction::Upload => "g2h",
            Direction::Download => "h2g",
        }
    }

    fn code(self) -> u8 {
        match self {
            Direction::Upload => 1,
            Direction::Download => 2,
        }
    }
}

/// What the guest sends first on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub direction: Direction,
    /// Flow number within the direction (0, 1, ...).
    pub flow: u8,
    /// Stream bytes to move.
    pub len: u64,
    /// Seed of the stream (see [`flow_seed`]).
    pub seed: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.direction.code();
        b[5] = self.flow;
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seed.to_le_bytes());
        b
    }

    /// Parses and validates a header (it comes from the guest: checked, never trusted).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(w)
        };
        if word(0..4) != u64::from(MAGIC) {
            return Err(format!("bad magic {:#x}", word(0..4)));
        }
        let direction = match b[4] {
            1 => Direction::Upload,
            2 => Direction::Download,
            d => return Err(format!("bad direction {d}")),
        };
        let len = word(8..16);
        if len > MAX_FLOW_LEN {
            return Err(format!("flow of {len} bytes is over {MAX_FLOW_LEN}"));
        }
        Ok(Header {
            direction,
            flow: b[5],
            len,
            seed: word(16..24),
        })
    }
}

/// The stream seed of flow `flow` in `direction`: distinct per flow and direction.
pub fn flow_seed(direction: Direction, flow: u8) -> u64 {
    0xfe11_0000_4e70_0000 | (u64::from(direction.code()) << 8) | u64::from(flow)
}

/// Bytes of one independently seeded block of the stream.
const BLOCK: usize = 64 << 10;

/// The deterministic pseudo-random byte stream of a seed, read in any piece sizes:
/// block `i` (64 KiB) is xorshift64* from splitmix64(seed + i).
pub struct Stream {
    seed: u64,
    block_index: u64,
    block: Vec<u8>,
    pos: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            seed,
            block_index: 0,
            block: vec![0; BLOCK],
            pos: BLOCK,
        }
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == BLOCK {
                fill_block(self.seed, self.block_index, &mut self.block);
                self.block_index += 1;
                self.pos = 0;
            }
            let n = (out.len() - done).min(BLOCK - self.pos);
            out[done..done + n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
    }
}

fn fill_block(seed: u64, index: u64, out: &mut [u8]) {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut x = (z ^ (z >> 31)) | 1;
    for word in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// sha256 of the first `len` bytes of the stream of `seed`, as 64 hex digits.
pub fn stream_sha256(seed: u64, len: u64) -> String {
    let mut stream = Stream::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        stream.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&hash.finalize())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// virtio-net feature bits (virtio 1.2, 5.1.3, plus the transport's) and their names.
pub const FEATURES: &[(u32, &str)] = &[
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (2, "CTRL_GUEST_OFFLOADS"),
    (3, "MTU"),
    (5, "MAC"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (9, "GUEST_ECN"),
    (10, "GUEST_UFO"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (13, "HOST_ECN"),
    (14, "HOST_UFO"),
    (15, "MRG_RXBUF"),
    (16, "STATUS"),
    (17, "CTRL_VQ"),
    (18, "CTRL_RX"),
    (19, "CTRL_VLAN"),
    (20, "CTRL_RX_EXTRA"),
    (21, "GUEST_ANNOUNCE"),
    (22, "MQ"),
    (23, "CTRL_MAC_ADDR"),
    (28, "RING_INDIRECT_DESC"),
    (29, "RING_EVENT_IDX"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
    (41, "ADMIN_VQ"),
    (52, "VQ_NOTF_COAL"),
    (53, "NOTF_COAL"),
    (54, "GUEST_USO4"),
    (55, "GUEST_USO6"),
    (56, "HOST_USO"),
    (57, "HASH_REPORT"),
    (59, "GUEST_HDRLEN"),
    (60, "RSS"),
    (61, "RSC_EXT"),
    (62, "STANDBY"),
    (63, "SPEED_DUPLEX"),
];

/// The bit numbers set in a sysfs `features` string (`'1'` at position i = bit i).
pub fn feature_bits(text: &str) -> Vec<u32> {
    (0u32..)
        .zip(text.trim().bytes())
        .filter(|&(_, c)| c == b'1')
        .map(|(i, _)| i)
        .collect()
}

/// The name of feature bit `bit` (`bit<N>` when unknown).
pub fn feature_name(bit: u32) -> String {
    FEATURES
        .iter()
        .find(|(b, _)| *b == bit)
        .map_or_else(|| format!("bit{bit}"), |(_, n)| (*n).to_owned())
}

/// The bit number of feature `name`.
pub fn feature_bit(name: &str) -> Option<u32> {
    FEATURES.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_rejected() {
        let h = Header {
            direction: Direction::Download,
            flow: 1,
            len: 64 << 20,
            seed: flow_seed(Direction::Download, 1),
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[4] = 9;
        assert!(Header::decode(&bad).unwrap_err().contains("direction"));
        let mut bad = h.encode();
        bad[8..16].copy_from_slice(&(MAX_FLOW_LEN + 1).to_le_bytes());
        assert!(Header::decode(&bad).is_err());
        assert_ne!(
            flow_seed(Direction::Upload, 0),
            flow_seed(Direction::Download, 0)
        );
        assert_ne!(
            flow_seed(Direction::Upload, 0),
            flow_seed(Direction::Upload, 1)
        );
    }

    #[test]
    fn the_stream_does_not_depend_on_piece_sizes() {
        let mut whole = vec![0u8; 3 * BLOCK + 100];
        Stream::new(7).fill(&mut whole);
        let mut pieces = vec![0u8; whole.len()];
        let mut s = Stream::new(7);
        let mut at = 0;
        for size in [1, 7, BLOCK - 8, 3, BLOCK + 5, 2 * BLOCK].iter().cycle() {
            if at == pieces.len() {
                break;
            }
            let n = (*size).min(pieces.len() - at);
            s.fill(&mut pieces[at..at + n]);
            at += n;
        }
        assert_eq!(whole, pieces);
        assert_ne!(whole[..BLOCK], whole[BLOCK..2 * BLOCK]);
        let mut other = vec![0u8; 64];
        Stream::new(8).fill(&mut other);
        assert_ne!(whole[..64], other[..]);
    }

    #[test]
    fn sha256_of_streams_and_known_vectors() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut data = vec![0u8; (1 << 20) + 3];
        Stream::new(5).fill(&mut data);
        assert_eq!(
            stream_sha256(5, data.len() as u64),
            hex(&Sha256::digest(&data))
        );
        assert_eq!(stream_sha256(5, 0), hex(&Sha256::digest(b"")));
    }

    #[test]
    fn feature_strings() {
        let mut text = "0".repeat(64);
        text.replace_range(0..1, "1");
        text.replace_range(22..23, "1");
        text.replace_range(32..33, "1");
        assert_eq!(feature_bits(&format!("{text}\n")), vec![0, 22, 32]);
        assert_eq!(feature_name(22), "MQ");
        assert_eq!(feature_name(4), "bit4");
        assert_eq!(feature_bit("VERSION_1"), Some(32));
        assert_eq!(feature_bit("NOPE"), None);
    }
}
