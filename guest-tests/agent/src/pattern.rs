//! Deterministic test data and its checksum, shared by the agent (guest) and the
//! harness (host, through `#[path]`), so each side can check what the other sent.

/// Fills `out` with pseudo-random bytes from `seed` (xorshift64*).
pub fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for word in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// `len` pseudo-random bytes from `seed` (see [`fill`]).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill(seed, &mut out);
    out
}

/// Streaming FNV-1a 64-bit hash: `update` any number of times, then `hex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    pub const fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0 = data.iter().fold(self.0, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    }

    /// The hash so far, as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// FNV-1a 64-bit hash, as 16 hex digits.
pub fn fnv1a(data: &[u8]) -> String {
    let mut h = Fnv1a::new();
    h.update(data);
    h.hex()
}

/// Seed of the bytes the guest writes to a console port.
pub const GUEST_TO_HOST_SEED: u64 = 0xfe11_0000_0000_0001;
/// Seed of the bytes the host sends to the guest.
pub const HOST_TO_GUEST_SEED: u64 = 0xfe11_0000_0000_0002;

/// Disk data is generated (and checked) in chunks of this size.
pub const CHUNK: usize = 1 << 20;
/// Seed of the data the `blk` scenario writes over the whole of /dev/vda.
pub const BLK_SEED: u64 = 0xfe11_0000_0000_0b1c;
/// The range of /dev/vda the `blk` scenario discards after writing (whole chunks).
pub const BLK_DISCARD_OFFSET: u64 = 64 << 20;
pub const BLK_DISCARD_LEN: u64 = 8 << 20;
/// Seed and disk offset of the 4 KiB block the `blk-durable` scenario writes.
pub const DURABLE_SEED: u64 = 0xfe11_0000_0000_d0ab;
pub const DURABLE_OFFSET: u64 = (5 << 20) + (12 << 10);
pub const DURABLE_LEN: usize = 4096;

/// Seed of chunk `index` (of [`CHUNK`] bytes) of a disk pattern with seed `seed`:
/// distinct per chunk, so a chunk landing at the wrong offset is caught.
pub fn chunk_seed(seed: u64, index: u64) -> u64 {
    // splitmix64 of seed + index, so neighbouring chunks are unrelated.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What chunk `index` of /dev/vda holds after the `blk` scenario: the pattern, or
/// zeros inside the discarded range. `out` is one chunk long.
pub fn blk_expected_chunk(index: u64, out: &mut [u8]) {
    let start = index * CHUNK as u64;
    let discard = BLK_DISCARD_OFFSET..BLK_DISCARD_OFFSET + BLK_DISCARD_LEN;
    if discard.contains(&start) {
        out.fill(0);
    } else {
        fill(chunk_seed(BLK_SEED, index), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        assert_eq!(bytes(7, 100), bytes(7, 100));
        assert_ne!(bytes(7, 100), bytes(8, 100));
        assert_eq!(bytes(7, 13).len(), 13);
        assert_eq!(bytes(7, 13)[..], bytes(7, 16)[..13]);
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
        // Same bytes as the original Vec-growing generator (the pci test depends on it).
        let reference = |seed: u64, len: usize| {
            let mut x = seed | 1;
            let mut out = Vec::new();
            while out.len() < len {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            out.truncate(len);
            out
        };
        assert_eq!(bytes(0xfe11, 4099), reference(0xfe11, 4099));
    }

    #[test]
    fn streaming_fnv_matches_one_shot() {
        let data = bytes(42, 10_000);
        let mut h = Fnv1a::default();
        for piece in data.chunks(333) {
            h.update(piece);
        }
        assert_eq!(h.hex(), fnv1a(&data));
        let mut empty = Fnv1a::new();
        empty.update(&[]);
        assert_eq!(empty.hex(), fnv1a(b""));
        // "foobar" from the FNV reference test vectors.
        let mut fb = Fnv1a::new();
        fb.update(b"foo");
        fb.update(b"bar");
        assert_eq!(fb.hex(), "85944171f73967e8");
    }

    #[test]
    fn chunk_seeds_are_distinct_and_stable() {
        let seeds: std::collections::HashSet<u64> =
            (0..4096).map(|i| chunk_seed(BLK_SEED, i)).collect();
        assert_eq!(seeds.len(), 4096);
        assert_eq!(chunk_seed(BLK_SEED, 3), chunk_seed(BLK_SEED, 3));
        assert_ne!(chunk_seed(BLK_SEED, 0), chunk_seed(DURABLE_SEED, 0));
        assert_ne!(chunk_seed(BLK_SEED, 0), BLK_SEED);
    }

    #[test]
    fn expected_chunks_are_zero_only_in_the_discarded_range() {
        let mut buf = vec![0xaa; CHUNK];
        let first = BLK_DISCARD_OFFSET / CHUNK as u64;
        let last = (BLK_DISCARD_OFFSET + BLK_DISCARD_LEN) / CHUNK as u64 - 1;
        for i in [first, last] {
            blk_expected_chunk(i, &mut buf);
            assert!(buf.iter().all(|&b| b == 0), "chunk {i}");
        }
        for i in [0, first - 1, last + 1] {
            blk_expected_chunk(i, &mut buf);
            assert_eq!(buf, bytes(chunk_seed(BLK_SEED, i), CHUNK), "chunk {i}");
        }
        assert_eq!(BLK_DISCARD_OFFSET % CHUNK as u64, 0);
        assert_eq!(BLK_DISCARD_LEN % CHUNK as u64, 0);
        assert_eq!(DURABLE_OFFSET % 4096, 0);
    }
}
