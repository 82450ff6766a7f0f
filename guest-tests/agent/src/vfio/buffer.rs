//! Anonymous memory the device DMAs to through the VFIO mapping.

use std::io;

/// Page-aligned anonymous memory for device DMA, unmapped when dropped. Accessed
/// with volatile reads and writes (the device writes it behind the compiler's back).
pub struct DmaBuffer {
    ptr: *mut u8,
    len: usize,
}

impl DmaBuffer {
    /// `len` zeroed bytes, populated (so the pages exist before VFIO pins them).
    pub fn new(len: usize) -> Result<DmaBuffer, String> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choice;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", io::Error::last_os_error()));
        }
        // Pinned pages and fork do not mix: the agent's child processes (busybox)
        // must not share them copy-on-write. Best effort.
        // SAFETY: advice on the mapping just made, `len` bytes long.
        unsafe { libc::madvise(ptr, len, libc::MADV_DONTFORK) };
        Ok(DmaBuffer {
            ptr: ptr.cast(),
            len,
        })
    }

    /// `len` bytes (a multiple of 2 MiB) of hugetlbfs memory, locked: physically
    /// contiguous within each 2 MiB page and never moved, so a device may DMA to its
    /// physical address ([`Self::physical_address`]) with no IOMMU in between (VFIO's
    /// no-IOMMU mode). Needs huge pages reserved in /proc/sys/vm/nr_hugepages.
    pub fn hugetlb(len: usize) -> Result<DmaBuffer, String> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choice;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_POPULATE
                    | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len} bytes of huge pages: {}",
                io::Error::last_os_error()
            ));
        }
        // SAFETY: advice on the mapping just made, `len` bytes long (see `new`).
        unsafe { libc::madvise(ptr, len, libc::MADV_DONTFORK) };
        let buf = DmaBuffer {
            ptr: ptr.cast(),
            len,
        };
        // Touch every page so that each is backed before its address is looked up.
        for page in (0..len).step_by(4096) {
            buf.write(page, &[0])?;
        }
        Ok(buf)
    }

    /// The physical address of the buffer's first byte, from /proc/self/pagemap (root
    /// only); an error unless every 4 KiB page follows the previous one physically.
    pub fn physical_address(&self) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
        let pages = self.len.div_ceil(4096);
        let mut entries = vec![0u8; pages * 8];
        file.read_exact_at(&mut entries, self.addr() / 4096 * 8)
            .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
        let mut first = None;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(entry);
            let entry = u64::from_le_bytes(raw);
            let pfn = entry & ((1 << 55) - 1);
            if entry & (1 << 63) == 0 || pfn == 0 {
                return Err(format!("page {i} not present (pagemap entry {entry:#x})"));
            }
            let base = *first.get_or_insert(pfn);
            if pfn != base + i as u64 {
                return Err(format!(
                    "page {i} at pfn {pfn:#x} does not follow pfn {base:#x}"
                ));
            }
        }
        first
            .map(|pfn| pfn * 4096)
            .ok_or_else(|| "empty buffer".into())
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(format!("{len} bytes at {offset:#x} outside the DMA buffer")),
        }
    }

    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), String> {
        self.check(offset, data.len())?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: offset + i < len (checked above): inside our mapping.
            unsafe { self.ptr.add(offset + i).write_volatile(b) };
        }
        Ok(())
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), String> {
        self.check(offset, out.len())?;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: offset + i < len (checked above): inside our mapping.
            *b = unsafe { self.ptr.add(offset + i).read_volatile() };
        }
        Ok(())
    }

    pub fn read_u16(&self, offset: usize) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing references.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_aligned_bounded_reads_and_writes() {
        let buf = DmaBuffer::new(64 << 10).unwrap();
        assert_eq!(buf.addr() % 4096, 0);
        assert_eq!(buf.len(), 64 << 10);
        buf.write(0xfffe, &[0x34, 0x12]).unwrap();
        assert_eq!(buf.read_u16(0xfffe), Ok(0x1234));
        let mut out = [0xffu8; 4];
        buf.read(0, &mut out).unwrap();
        assert_eq!(out, [0; 4]);
        assert!(buf.write(0xffff, &[1, 2]).is_err());
        assert!(buf.read(usize::MAX, &mut out).is_err());
        assert!(buf.read_u16(0x10000).is_err());
    }
}
