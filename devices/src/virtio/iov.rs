//! Guest buffers as byte streams and as `iovec`s: the ranges of a descriptor chain
//! ([`Buffers`]), small copies in and out of them, and pointer guards plus `iovec`s
//! ([`GuestIovecs`]) so that the kernel moves data straight between a host fd and guest
//! memory (preadv/pwritev of virtio-blk, readv/writev of virtio-net) with no bounce
//! copy.

use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

/// Guest memory failed under a checked buffer (an IOMMU mapping changed, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access failed")]
pub struct MemoryError;

/// An ordered list of guest buffers seen as one byte stream (the device-readable or the
/// device-writable part of a chain). Empty descriptors are left out.
#[derive(Debug, Default, Clone)]
pub struct Buffers {
    parts: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Buffers {
    /// Appends a buffer (nothing for an empty one).
    pub fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.parts.push((addr, len));
            self.len += u64::from(len);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces of `start..start + len` (clipped to the stream), as (address, length).
    pub fn range(&self, start: u64, len: u64) -> Vec<(GuestAddress, usize)> {
        let end = start.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut at = 0u64;
        for &(addr, part_len) in &self.parts {
            let part_end = at + u64::from(part_len);
            let from = start.max(at);
            let to = end.min(part_end);
            if from < to {
                // Offsets inside a part fit in u32, and the lengths in usize.
                out.push((addr.unchecked_add(from - at), (to - from) as usize));
            }
            at = part_end;
            if at >= end {
                break;
            }
        }
        out
    }

    /// Copies `buf.len()` bytes from offset `start` of the stream into `buf`.
    pub fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), MemoryError> {
        let mut done = 0;
        for (addr, len) in self.range(start, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(|_| MemoryError)?;
            done += len;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(MemoryError)
        }
    }

    /// Copies `data` to the start of the stream (clipped to its length); returns the
    /// bytes written.
    pub fn write_start<M: GuestMemory>(&self, mem: &M, data: &[u8]) -> Result<usize, MemoryError> {
        let mut done = 0;
        for (addr, len) in self.range(0, data.len() as u64) {
            mem.write_slice(&data[done..done + len], addr)
                .map_err(|_| MemoryError)?;
            done += len;
        }
        Ok(done)
    }
}

/// The guest memory behind `parts`, as volatile slices borrowed from `mem`.
pub(crate) fn slices<'m, M: GuestMemory>(
    mem: &'m M,
    parts: &[(GuestAddress, usize)],
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m, vm_memory::bitmap::BS<'m, M::Bitmap>>>, MemoryError> {
    let mut out = Vec::with_capacity(parts.len());
    for &(addr, len) in parts {
        for slice in mem.get_slices(addr, len, access).map_err(|_| MemoryError)? {
            out.push(slice.map_err(|_| MemoryError)?);
        }
    }
    Ok(out)
}

/// Pointer guards on guest buffers and the `iovec`s describing them, for an engine that
/// hands the buffers to the kernel (readv/writev, or io_uring, which gives them back
/// later). Owned: the guards live as long as this value.
pub struct GuestIovecs {
    /// Keep the mappings of the buffers alive (they unmap nothing for plain mmap'ed
    /// memory, but do for on-demand mappings such as Xen's).
    _guards: Guards,
    /// One per guest slice, in stream order. Its heap buffer never moves, so pointers
    /// into it stay valid while the value is moved around.
    pub iovs: Vec<libc::iovec>,
}

// The guards are only held, never read.
#[allow(dead_code)]
enum Guards {
    Read(Vec<PtrGuard>),
    Write(Vec<PtrGuardMut>),
}

impl GuestIovecs {
    /// The guest buffers `parts`: device-writable (`to_guest`, the data of a read) or
    /// device-readable.
    pub fn new<M: GuestMemory>(
        mem: &M,
        parts: &[(GuestAddress, usize)],
        to_guest: bool,
    ) -> Result<Self, MemoryError> {
        let access = if to_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let slices = slices(mem, parts, access)?;
        let (guards, iovs) = if to_guest {
            let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
            let iovs = guards.iter().map(|g| iovec(g.as_ptr(), g.len())).collect();
            (Guards::Write(guards), iovs)
        } else {
            let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
            let iovs = guards
                .iter()
                .map(|g| iovec(g.as_ptr().cast_mut(), g.len()))
                .collect();
            (Guards::Read(guards), iovs)
        };
        Ok(Self {
            _guards: guards,
            iovs,
        })
    }
}

fn iovec(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

/// Marks the guest buffers `parts` dirty after the kernel wrote into them through raw
/// pointers (which bypass the dirty bitmap).
pub fn mark_dirty<M: GuestMemory>(mem: &M, parts: &[(GuestAddress, usize)]) {
    if let Ok(slices) = slices(mem, parts, Permissions::Write) {
        for slice in &slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}
