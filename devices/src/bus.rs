//! Address-range bus that routes guest port-I/O and MMIO accesses to devices.
//!
//! The VMM owns two buses (PIO and MMIO). A vCPU exit looks up the device whose range
//! contains the address and forwards the access with the offset inside that range.
//! Ranges never overlap: an insert that would overlap is rejected.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers guest reads and writes on a bus range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A bus device shared between the vCPU threads and the I/O thread.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// No device is registered at that base.
    #[error("no device registered at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A map of non-overlapping address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` on `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The closest range starting at or below `end - 1` is the only one that can overlap.
        if let Some((&b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device registered at exactly `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// The device covering `addr` and the offset of `addr` inside its range, if the
    /// whole access `[addr, addr + size)` fits in that range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(SharedDevice, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Forwards a read; returns false (and fills `data` with 0xff, as an unclaimed
    /// bus would) when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Forwards a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let d: SharedDevice = p.clone();
        (p, d)
    }

    #[test]
    fn routes_by_range_with_offset() {
        let bus = Bus::new();
        let (a, da) = probe();
        let (_b, db) = probe();
        bus.insert(da, 0x100, 0x10).unwrap();
        bus.insert(db, 0x110, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x104, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(bus.read(0x110, &mut buf));
        assert_eq!(buf, [0, 0]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(a.lock().unwrap().last_write, Some((0xe, vec![1, 2])));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        bus.insert(probe().1, 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 4), (0x0, 0x1000)] {
            assert_eq!(
                bus.insert(probe().1, base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        assert!(bus.insert(probe().1, 0xf0, 0x10).is_ok());
        assert!(bus.insert(probe().1, 0x110, 0x10).is_ok());
        assert!(matches!(
            bus.insert(probe().1, 0x1000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe().1, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn unclaimed_and_straddling_accesses() {
        let bus = Bus::new();
        bus.insert(probe().1, 0x100, 0x10).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x50, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        // An access that starts inside the range but ends past it is not forwarded.
        assert!(!bus.read(0x10e, &mut buf));
        assert!(!bus.write(0x10e, &[0; 4]));
        assert!(!bus.read(u64::MAX - 1, &mut buf));
    }

    #[test]
    fn remove_frees_the_range() {
        let bus = Bus::new();
        bus.insert(probe().1, 0x100, 0x10).unwrap();
        assert!(bus.remove(0x100).is_ok());
        assert!(matches!(bus.remove(0x100), Err(BusError::NotFound(0x100))));
        assert!(bus.insert(probe().1, 0x100, 0x10).is_ok());
    }
}
