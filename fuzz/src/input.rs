//! The fuzz input as a stream of little-endian fields ([`Input`]), and the writer the
//! seed generators use to build inputs in the same format ([`Seed`]).
//!
//! Reading past the end yields zeros, so every byte string is a valid input and a
//! truncated one simply stops early ([`Input::is_empty`] ends the op loops).

/// A cursor over the fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.bytes(usize::from(n))
    }
}

/// Builds an input field by field, in the order [`Input`] reads it.
#[derive(Default, Clone)]
pub struct Seed(pub Vec<u8>);

impl Seed {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub fn bool(self, v: bool) -> Self {
        self.u8(u8::from(v))
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A length-prefixed (u16) byte string.
    pub fn blob(self, b: &[u8]) -> Self {
        let n = u16::try_from(b.len()).expect("seed blob too long");
        self.u16(n).bytes(b)
    }

    pub fn build(self) -> Vec<u8> {
        self.0
    }
}
