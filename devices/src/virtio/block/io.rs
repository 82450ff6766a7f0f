//! Guest buffers of a request: byte ranges of a descriptor chain, small copies (the
//! header, the segment list, the device id) and zero-copy transfers between the backend
//! and guest memory. The buffer types are shared with other devices (`virtio::iov`).

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::backend::{BlockBackend, IoBuf, IoBufMut};
use crate::virtio::iov::slices;
pub use crate::virtio::iov::{mark_dirty, Buffers, GuestIovecs, MemoryError};

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("backend I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads from the backend at `offset` straight into the guest buffers `parts`; returns
/// the bytes read (fewer than asked only at the end of the backend). The written guest
/// pages are marked dirty.
pub fn read_into_guest<M: GuestMemory>(
    mem: &M,
    parts: &[(GuestAddress, usize)],
    backend: &dyn BlockBackend,
    offset: u64,
) -> Result<usize, TransferError> {
    let slices = slices(mem, parts, Permissions::Write)?;
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut bufs: Vec<IoBufMut<'_>> = guards
        .iter()
        // SAFETY: each guard comes from a slice of `slices`, which borrows `mem` (so
        // the guest memory stays mapped) until the end of this function; the guard
        // keeps its own mapping alive as long as it lives, and `bufs` (borrowing
        // `guards`) is dropped before both. Guest memory is never a Rust reference, so
        // the kernel writing into it aliases nothing.
        .map(|g| unsafe { IoBufMut::from_raw_parts(g.as_ptr(), g.len()) })
        .collect();
    let result = backend.read_vectored(offset, &mut bufs);
    drop(bufs);
    // Pointer writes bypass the dirty bitmap: account for them (all of the buffers,
    // whatever was read, to stay on the safe side).
    for slice in &slices {
        slice.bitmap().mark_dirty(0, slice.len());
    }
    Ok(result?)
}

/// Writes the guest buffers `parts` to the backend at `offset`, straight from guest
/// memory; returns the bytes written.
pub fn write_from_guest<M: GuestMemory>(
    mem: &M,
    parts: &[(GuestAddress, usize)],
    backend: &dyn BlockBackend,
    offset: u64,
) -> Result<usize, TransferError> {
    let slices = slices(mem, parts, Permissions::Read)?;
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let bufs: Vec<IoBuf<'_>> = guards
        .iter()
        // SAFETY: each guard comes from a slice of `slices`, which borrows `mem` (so
        // the guest memory stays mapped) until the end of this function; the guard
        // keeps its own mapping alive as long as it lives, and `bufs` borrows `guards`.
        .map(|g| unsafe { IoBuf::from_raw_parts(g.as_ptr(), g.len()) })
        .collect();
    Ok(backend.write_vectored(offset, &bufs)?)
}
