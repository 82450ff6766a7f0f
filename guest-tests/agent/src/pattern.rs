//! Deterministic test data and its checksum, shared by the agent (guest) and the
//! harness (host, through `#[path]`), so each side can check what the other sent.

/// `len` pseudo-random bytes from `seed` (xorshift64*).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a 64-bit hash, as 16 hex digits.
pub fn fnv1a(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Seed of the bytes the guest writes to a console port.
pub const GUEST_TO_HOST_SEED: u64 = 0xfe11_0000_0000_0001;
/// Seed of the bytes the host sends to the guest.
pub const HOST_TO_GUEST_SEED: u64 = 0xfe11_0000_0000_0002;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        assert_eq!(bytes(7, 100), bytes(7, 100));
        assert_ne!(bytes(7, 100), bytes(8, 100));
        assert_eq!(bytes(7, 13).len(), 13);
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
