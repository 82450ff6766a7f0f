//! A device's registers mapped into the agent's address space: a BAR through a VFIO
//! device fd (`mmap` at the region's offset), or physical memory through /dev/mem
//! (the ECAM window). Every access is one volatile load or store of its width, so the
//! CPU issues exactly that MMIO access (no syscall per access: a store is one exit to
//! the VMM, or none at all when KVM completes it on an ioeventfd).

use std::io;
use std::os::fd::AsRawFd;

/// A shared mapping of `len` bytes of a file at `offset`, unmapped when dropped.
pub struct Mmio {
    ptr: *mut u8,
    len: usize,
}

impl Mmio {
    /// Maps `len` bytes of `file` at `offset` (page-aligned), readable and writable.
    pub fn map(file: &impl AsRawFd, offset: u64, len: usize) -> Result<Mmio, String> {
        let off = libc::off_t::try_from(offset).map_err(|_| format!("offset {offset:#x}"))?;
        // SAFETY: a new shared mapping at an address of the kernel's choice; the result
        // is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len:#x} bytes at {offset:#x}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(Mmio {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The address of `width` bytes at `offset`, if they lie inside the mapping and
    /// are naturally aligned.
    fn at(&self, offset: u64, width: usize) -> Result<*mut u8, String> {
        let off = usize::try_from(offset).map_err(|_| format!("offset {offset:#x}"))?;
        match off.checked_add(width) {
            Some(end) if end <= self.len && off % width == 0 => {
                // SAFETY: off + width <= len: inside the mapping.
                Ok(unsafe { self.ptr.add(off) })
            }
            _ => Err(format!(
                "{width}-byte access at {offset:#x} outside or misaligned in a {:#x}-byte mapping",
                self.len
            )),
        }
    }

    pub fn read8(&self, offset: u64) -> Result<u8, String> {
        let p = self.at(offset, 1)?;
        // SAFETY: `p` is inside the live mapping (checked by `at`).
        Ok(unsafe { p.read_volatile() })
    }

    pub fn read16(&self, offset: u64) -> Result<u16, String> {
        let p = self.at(offset, 2)?.cast::<u16>();
        // SAFETY: inside the live mapping and 2-byte aligned (checked by `at`).
        Ok(unsafe { p.read_volatile() })
    }

    pub fn read32(&self, offset: u64) -> Result<u32, String> {
        let p = self.at(offset, 4)?.cast::<u32>();
        // SAFETY: inside the live mapping and 4-byte aligned (checked by `at`).
        Ok(unsafe { p.read_volatile() })
    }

    pub fn write8(&self, offset: u64, v: u8) -> Result<(), String> {
        let p = self.at(offset, 1)?;
        // SAFETY: `p` is inside the live mapping (checked by `at`).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    pub fn write16(&self, offset: u64, v: u16) -> Result<(), String> {
        let p = self.at(offset, 2)?.cast::<u16>();
        // SAFETY: inside the live mapping and 2-byte aligned (checked by `at`).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    pub fn write32(&self, offset: u64, v: u32) -> Result<(), String> {
        let p = self.at(offset, 4)?.cast::<u32>();
        // SAFETY: inside the live mapping and 4-byte aligned (checked by `at`).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    pub fn write64(&self, offset: u64, v: u64) -> Result<(), String> {
        let p = self.at(offset, 8)?.cast::<u64>();
        // SAFETY: inside the live mapping and 8-byte aligned (checked by `at`).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    /// `count` 16-bit stores of `v` at `offset` (a doorbell storm): the bounds are
    /// checked once, then the loop is nothing but stores.
    pub fn write16_repeat(&self, offset: u64, v: u16, count: u64) -> Result<(), String> {
        let p = self.at(offset, 2)?.cast::<u16>();
        for _ in 0..count {
            // SAFETY: inside the live mapping and 2-byte aligned (checked by `at`).
            unsafe { p.write_volatile(v) };
        }
        Ok(())
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_checks_bounds_and_alignment() {
        let path = std::env::temp_dir().join(format!("ferrio-mmio-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let m = Mmio::map(&file, 4096, 4096).unwrap();
        assert_eq!(m.len(), 4096);
        m.write32(8, 0x1122_3344).unwrap();
        m.write16(12, 0x5566).unwrap();
        m.write8(14, 0x77).unwrap();
        m.write64(16, u64::MAX).unwrap();
        m.write16_repeat(24, 0xabcd, 3).unwrap();
        assert_eq!(m.read32(8), Ok(0x1122_3344));
        assert_eq!(m.read16(12), Ok(0x5566));
        assert_eq!(m.read8(14), Ok(0x77));
        assert_eq!(m.read16(24), Ok(0xabcd));
        assert!(m.read32(4094).is_err(), "past the end");
        assert!(m.read32(2).is_err(), "misaligned");
        assert!(m.write64(4096, 0).is_err());
        drop(m);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[4096 + 8..4096 + 12], &0x1122_3344u32.to_le_bytes());
        std::fs::remove_file(&path).unwrap();
    }
}
