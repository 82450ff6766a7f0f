//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the pending
//! bit array, delivered through [`MsiVectors`].
//!
//! [`Msix::new`] adds the capability (id 0x11) to a [`ConfigSpace`] whose BARs already
//! hold the table and the PBA. The device then forwards:
//!
//! - every guest config write: [`Msix::config_write`] (picks up enable / function
//!   mask changes from the message control register);
//! - BAR accesses: [`Msix::read_bar`] / [`Msix::write_bar`] (return `false` when the
//!   access is not in the table or PBA), or [`Msix::table_read`],
//!   [`Msix::table_write`], [`Msix::pba_read`] with offsets inside the structures.
//!
//! Device workers raise vectors through [`MsixTrigger::trigger`] (a cloneable handle,
//! no lock): a vector fires only while MSI-X is enabled, the function is not masked and
//! the vector is not masked; otherwise its pending bit is set, and it fires (clearing
//! the bit) when the guest unmasks the vector or the function, or enables MSI-X.
//! [`MsiVectors::set_message`] is called when an unmasked entry's message changes or an
//! entry gets unmasked, and [`MsiVectors::commit`] once per guest write that did so.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::capability::{CapabilityError, CAP_END, CAP_ID_MSIX, CAP_START};
use crate::config::{ranges_overlap, ConfigSpace};
use crate::{MsiMessage, MsiVectors};

/// Maximum number of MSI-X vectors of a function.
pub const MAX_VECTORS: u16 = 2048;
/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
pub const VECTOR_MASKED: u32 = 1;

const ENABLED: u8 = 1;
const FUNCTION_MASKED: u8 = 2;

/// Where the table and PBA live, and how many vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixConfig {
    /// Number of vectors (1..=2048).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixConfig {
    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// Errors of MSI-X set-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsixError {
    /// The vector count is 0 or above 2048.
    #[error("invalid MSI-X vector count {0}")]
    InvalidVectorCount(u16),
    /// The host side has fewer vectors than the table.
    #[error("MsiVectors provides {have} vectors, the table needs {need}")]
    NotEnoughVectors { have: u16, need: u16 },
    /// A table/PBA offset is not 8-byte aligned.
    #[error("MSI-X structure offset {0:#x} is not 8-byte aligned")]
    Misaligned(u32),
    /// The table or PBA does not fit in its BAR (or the BAR is not declared).
    #[error("MSI-X structure does not fit in BAR {0}")]
    OutsideBar(u8),
    /// The table and the PBA overlap.
    #[error("MSI-X table and PBA overlap")]
    Overlap,
    /// No room for the capability.
    #[error(transparent)]
    Capability(#[from] CapabilityError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

const RESET_ENTRY: Entry = Entry {
    addr_lo: 0,
    addr_hi: 0,
    data: 0,
    ctrl: VECTOR_MASKED,
};

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn word(&self, i: u64) -> u32 {
        match i {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.ctrl,
        }
    }

    fn set_word(&mut self, i: u64, v: u32) {
        match i {
            0 => self.addr_lo = v & !3,
            1 => self.addr_hi = v,
            2 => self.data = v,
            _ => self.ctrl = v & VECTOR_MASKED,
        }
    }
}

/// Shared MSI-X state: the trigger side uses only atomics; guest-side updates are
/// serialized by the table lock.
struct MsixState {
    vectors: Arc<dyn MsiVectors>,
    count: u16,
    /// `ENABLED` | `FUNCTION_MASKED`.
    flags: AtomicU8,
    masked: Box<[AtomicU64]>,
    pending: Box<[AtomicU64]>,
    table: Mutex<Vec<Entry>>,
}

fn bit(v: u16) -> (usize, u64) {
    (usize::from(v / 64), 1u64 << (v % 64))
}

impl MsixState {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn test(bits: &[AtomicU64], v: u16) -> bool {
        let (w, m) = bit(v);
        bits.get(w).is_some_and(|a| a.load(SeqCst) & m != 0)
    }

    fn set(bits: &[AtomicU64], v: u16, on: bool) -> bool {
        let (w, m) = bit(v);
        let Some(a) = bits.get(w) else { return false };
        let old = if on {
            a.fetch_or(m, SeqCst)
        } else {
            a.fetch_and(!m, SeqCst)
        };
        old & m != 0
    }

    fn can_fire(&self, v: u16) -> bool {
        self.flags.load(SeqCst) == ENABLED && !Self::test(&self.masked, v)
    }

    fn fire(&self, v: u16) {
        if let Err(e) = self.vectors.fire(v) {
            tracing::warn!(vector = v, error = %e, "MSI-X delivery failed");
        }
    }

    fn trigger(&self, v: u16) {
        if v >= self.count {
            tracing::debug!(vector = v, count = self.count, "MSI-X vector out of range");
            return;
        }
        if self.can_fire(v) {
            self.fire(v);
            return;
        }
        Self::set(&self.pending, v, true);
        // An unmask may have raced with the check above: whoever clears the pending
        // bit delivers, so the message is sent exactly once.
        if self.can_fire(v) && Self::set(&self.pending, v, false) {
            self.fire(v);
        }
    }

    /// Delivers the pending vectors that may fire now (after an unmask or enable).
    fn deliver_pending(&self) {
        for (w, word) in self.pending.iter().enumerate() {
            let mut bits = word.load(SeqCst);
            while bits != 0 {
                let v = (w * 64) as u16 + bits.trailing_zeros() as u16;
                bits &= bits - 1;
                if self.can_fire(v) && Self::set(&self.pending, v, false) {
                    self.fire(v);
                }
            }
        }
    }
}

/// A cheap cloneable handle that raises MSI-X vectors from any thread.
#[derive(Clone)]
pub struct MsixTrigger(Arc<MsixState>);

impl std::fmt::Debug for MsixTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTrigger")
            .field("vectors", &self.0.count)
            .field("flags", &self.0.flags.load(SeqCst))
            .finish()
    }
}

impl MsixTrigger {
    /// Raises `vector`: fires it if MSI-X is enabled and neither the function nor the
    /// vector is masked, else sets its pending bit. Out-of-range vectors (including
    /// virtio's `NO_VECTOR` 0xffff) are ignored.
    pub fn trigger(&self, vector: u16) {
        self.0.trigger(vector);
    }

    /// Whether MSI-X is enabled and the function is not masked.
    pub fn is_active(&self) -> bool {
        self.0.flags.load(SeqCst) == ENABLED
    }

    /// Whether MSI-X is enabled (function mask ignored).
    pub fn is_enabled(&self) -> bool {
        self.0.flags.load(SeqCst) & ENABLED != 0
    }

    /// Number of vectors in the table.
    pub fn vector_count(&self) -> u16 {
        self.0.count
    }

    /// Whether `vector` is masked in its table entry (true when out of range).
    pub fn is_masked(&self, vector: u16) -> bool {
        vector >= self.0.count || MsixState::test(&self.0.masked, vector)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        MsixState::test(&self.0.pending, vector)
    }
}

/// The MSI-X capability and structures of one function.
pub struct Msix {
    state: Arc<MsixState>,
    config: MsixConfig,
    cap: u8,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("config", &self.config)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// Adds the MSI-X capability to `cfg` (after its BARs are declared: the table and
    /// PBA must fit in them) with every vector masked and MSI-X disabled.
    pub fn new(
        cfg: &mut ConfigSpace,
        config: MsixConfig,
        vectors: Arc<dyn MsiVectors>,
    ) -> Result<Self, MsixError> {
        Self::validate(cfg, &config, vectors.as_ref())?;
        let cap = cfg.add_capability(CAP_ID_MSIX, &Self::body(&config), &Self::ctrl_wmask())?;
        Ok(Self::build(cap, config, vectors))
    }

    /// Emulates an MSI-X capability that already sits at `cap` in `cfg` (a
    /// passed-through function's, whose capability list stays as the device has it):
    /// rewrites its message control, table and PBA registers from `config` and makes
    /// the enable and function mask bits guest-writable; the ID and next pointer stay.
    /// Same checks as [`Self::new`]; `cap` must leave room for the 12-byte capability.
    pub fn with_capability_at(
        cfg: &mut ConfigSpace,
        cap: u8,
        config: MsixConfig,
        vectors: Arc<dyn MsiVectors>,
    ) -> Result<Self, MsixError> {
        Self::validate(cfg, &config, vectors.as_ref())?;
        let start = u16::from(cap);
        if start < CAP_START || start + 12 > CAP_END {
            return Err(MsixError::Capability(CapabilityError::NoSpace {
                id: CAP_ID_MSIX.into(),
                len: 12,
            }));
        }
        cfg.set_bytes(start + 2, &Self::body(&config));
        cfg.set_write_mask(start + 2, &Self::ctrl_wmask());
        Ok(Self::build(cap, config, vectors))
    }

    fn validate(
        cfg: &ConfigSpace,
        config: &MsixConfig,
        vectors: &dyn MsiVectors,
    ) -> Result<(), MsixError> {
        let n = config.vectors;
        if n == 0 || n > MAX_VECTORS {
            return Err(MsixError::InvalidVectorCount(n));
        }
        if vectors.count() < n {
            return Err(MsixError::NotEnoughVectors {
                have: vectors.count(),
                need: n,
            });
        }
        let bars = cfg.bars();
        let regions = [
            (config.table_bar, config.table_offset, config.table_size()),
            (config.pba_bar, config.pba_offset, config.pba_size()),
        ];
        for (bar, off, len) in regions {
            if off % 8 != 0 {
                return Err(MsixError::Misaligned(off));
            }
            if !bars
                .iter()
                .any(|b| b.index == bar && u64::from(off) + len <= b.size)
            {
                return Err(MsixError::OutsideBar(bar));
            }
        }
        let (t, p) = (regions[0], regions[1]);
        let (t_end, p_end) = (u64::from(t.1) + t.2, u64::from(p.1) + p.2);
        if t.0 == p.0 && u64::from(t.1) < p_end && u64::from(p.1) < t_end {
            return Err(MsixError::Overlap);
        }
        Ok(())
    }

    /// The capability body after the 2-byte header: message control (table size),
    /// table and PBA offset/BIR.
    fn body(config: &MsixConfig) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(config.vectors - 1).to_le_bytes());
        body[2..6]
            .copy_from_slice(&(config.table_offset | u32::from(config.table_bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(config.pba_offset | u32::from(config.pba_bar)).to_le_bytes());
        body
    }

    fn ctrl_wmask() -> [u8; 2] {
        (CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes()
    }

    fn build(cap: u8, config: MsixConfig, vectors: Arc<dyn MsiVectors>) -> Self {
        let n = config.vectors;
        let words = usize::from(n).div_ceil(64);
        let state = MsixState {
            vectors,
            count: n,
            flags: AtomicU8::new(0),
            masked: (0..words).map(|_| AtomicU64::new(u64::MAX)).collect(),
            pending: (0..words).map(|_| AtomicU64::new(0)).collect(),
            table: Mutex::new(vec![RESET_ENTRY; usize::from(n)]),
        };
        Msix {
            state: Arc::new(state),
            config,
            cap,
        }
    }

    /// The placement and size given at creation.
    pub fn config(&self) -> &MsixConfig {
        &self.config
    }

    /// Offset of the capability in configuration space.
    pub fn cap_offset(&self) -> u8 {
        self.cap
    }

    /// A handle for device workers.
    pub fn trigger_handle(&self) -> MsixTrigger {
        MsixTrigger(self.state.clone())
    }

    /// Raises `vector` (see [`MsixTrigger::trigger`]).
    pub fn trigger(&self, vector: u16) {
        self.state.trigger(vector);
    }

    /// The message and mask bit of `vector`'s entry.
    pub fn entry(&self, vector: u16) -> Option<(MsiMessage, bool)> {
        let table = self.state.lock();
        let e = table.get(usize::from(vector))?;
        Some((e.message(), e.ctrl & VECTOR_MASKED != 0))
    }

    /// To be called after every guest write to configuration space (with the
    /// written range): applies message control changes (enable, function mask).
    pub fn config_write(&self, cfg: &ConfigSpace, offset: u16, len: usize) {
        let ctrl_reg = u16::from(self.cap) + 2;
        if !ranges_overlap(offset, len, ctrl_reg, ctrl_reg + 2) {
            return;
        }
        let ctrl = cfg.read_u16(ctrl_reg);
        let mut flags = 0;
        if ctrl & CTRL_ENABLE != 0 {
            flags |= ENABLED;
        }
        if ctrl & CTRL_FUNCTION_MASK != 0 {
            flags |= FUNCTION_MASKED;
        }
        let _table = self.state.lock();
        let old = self.state.flags.swap(flags, SeqCst);
        if old != flags {
            tracing::debug!(ctrl, "MSI-X message control changed");
        }
        if flags == ENABLED && old != ENABLED {
            self.state.deliver_pending();
        }
    }

    /// Returns to the reset state: MSI-X disabled and unmasked at the function level
    /// (message control cleared in `cfg`), every entry zeroed and masked, no pending.
    pub fn reset(&self, cfg: &mut ConfigSpace) {
        let ctrl_reg = u16::from(self.cap) + 2;
        let ctrl = cfg.read_u16(ctrl_reg);
        cfg.set_u16(ctrl_reg, ctrl & !(CTRL_ENABLE | CTRL_FUNCTION_MASK));
        let mut table = self.state.lock();
        self.state.flags.store(0, SeqCst);
        table.fill(RESET_ENTRY);
        self.state
            .masked
            .iter()
            .for_each(|a| a.store(u64::MAX, SeqCst));
        self.state.pending.iter().for_each(|a| a.store(0, SeqCst));
    }

    /// Guest read inside BAR `bar` at `offset`; `false` if not in the table or PBA.
    pub fn read_bar(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let c = &self.config;
        if let Some(off) = inside(bar, offset, c.table_bar, c.table_offset, c.table_size()) {
            self.table_read(off, data);
            true
        } else if let Some(off) = inside(bar, offset, c.pba_bar, c.pba_offset, c.pba_size()) {
            self.pba_read(off, data);
            true
        } else {
            false
        }
    }

    /// Guest write inside BAR `bar` at `offset`; `false` if not in the table or PBA
    /// (PBA writes are accepted and ignored).
    pub fn write_bar(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let c = &self.config;
        if let Some(off) = inside(bar, offset, c.table_bar, c.table_offset, c.table_size()) {
            self.table_write(off, data);
            true
        } else if inside(bar, offset, c.pba_bar, c.pba_offset, c.pba_size()).is_some() {
            tracing::debug!(offset, "guest write to the read-only MSI-X PBA ignored");
            true
        } else {
            false
        }
    }

    /// Guest read of the table at `offset` (4 or 8 bytes, naturally aligned; other
    /// accesses and offsets past the table read as all-ones).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(words) = access_words(offset, data.len(), self.config.table_size()) else {
            tracing::debug!(offset, len = data.len(), "unsupported MSI-X table read");
            return;
        };
        let table = self.state.lock();
        let Some(e) = table.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let first = offset % ENTRY_SIZE / 4;
        for (k, chunk) in data.chunks_exact_mut(4).take(words).enumerate() {
            chunk.copy_from_slice(&e.word(first + k as u64).to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (4 or 8 bytes, naturally aligned; others
    /// are ignored). Updates the host routes and delivers pending vectors as needed.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let Some(words) = access_words(offset, data.len(), self.config.table_size()) else {
            tracing::debug!(offset, len = data.len(), "unsupported MSI-X table write");
            return;
        };
        let v = (offset / ENTRY_SIZE) as u16;
        let mut table = self.state.lock();
        let Some(e) = table.get_mut(usize::from(v)) else {
            return;
        };
        let old = *e;
        let first = offset % ENTRY_SIZE / 4;
        for (k, chunk) in data.chunks_exact(4).take(words).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            e.set_word(first + k as u64, u32::from_le_bytes(b));
        }
        let new = *e;
        // Still under the table lock: guest-side updates stay serialized.
        self.entry_changed(v, old, new);
        drop(table);
    }

    fn entry_changed(&self, v: u16, old: Entry, new: Entry) {
        let was_masked = old.ctrl & VECTOR_MASKED != 0;
        let masked = new.ctrl & VECTOR_MASKED != 0;
        if masked {
            if !was_masked {
                MsixState::set(&self.state.masked, v, true);
            }
            return;
        }
        if was_masked || old.message() != new.message() {
            let vectors = &self.state.vectors;
            if let Err(e) = vectors.set_message(v, new.message()) {
                tracing::warn!(vector = v, error = %e, "MSI-X route update failed");
            }
            if let Err(e) = vectors.commit() {
                tracing::warn!(vector = v, error = %e, "MSI-X route commit failed");
            }
        }
        if was_masked {
            MsixState::set(&self.state.masked, v, false);
            if self.state.can_fire(v) && MsixState::set(&self.state.pending, v, false) {
                self.state.fire(v);
            }
        }
    }

    /// Guest read of the PBA at `offset` (4 or 8 bytes, naturally aligned; other
    /// accesses and offsets past the PBA read as all-ones).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if access_words(offset, data.len(), self.config.pba_size()).is_none() {
            tracing::debug!(offset, len = data.len(), "unsupported MSI-X PBA read");
            return;
        }
        let Some(word) = self.state.pending.get((offset / 8) as usize) else {
            return;
        };
        let bytes = word.load(SeqCst).to_le_bytes();
        let start = (offset % 8) as usize;
        if let Some(src) = bytes.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }
}

/// `offset - start` if `(bar, offset)` falls in `[start, start + len)` of `want_bar`.
fn inside(bar: u8, offset: u64, want_bar: u8, start: u32, len: u64) -> Option<u64> {
    let rel = offset.checked_sub(u64::from(start))?;
    (bar == want_bar && rel < len).then_some(rel)
}

/// Number of dwords of a valid access (4 or 8 bytes, aligned, inside `size`).
fn access_words(offset: u64, len: usize, size: u64) -> Option<usize> {
    let ok = matches!(len, 4 | 8)
        && offset & (len as u64 - 1) == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
    ok.then_some(len / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_helpers() {
        assert_eq!(access_words(0, 4, 16), Some(1));
        assert_eq!(access_words(8, 8, 16), Some(2));
        assert_eq!(access_words(4, 8, 16), None);
        assert_eq!(access_words(12, 8, 16), None);
        assert_eq!(access_words(16, 4, 16), None);
        assert_eq!(access_words(u64::MAX - 3, 4, u64::MAX), None);
        assert_eq!(access_words(0, 2, 16), None);
        assert_eq!(inside(0, 0x810, 0, 0x800, 0x20), Some(0x10));
        assert_eq!(inside(1, 0x810, 0, 0x800, 0x20), None);
        assert_eq!(inside(0, 0x7ff, 0, 0x800, 0x20), None);
        assert_eq!(inside(0, 0x820, 0, 0x800, 0x20), None);
    }
}
