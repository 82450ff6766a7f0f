//! Descriptor chains as guest buffers, and the `readv`/`writev` calls on the host end
//! that move frames straight between the host fd and those buffers.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::virtio::iov::Buffers;

/// Most `iovec`s one `readv`/`writev` takes (the kernel's UIO_MAXIOV).
pub const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// Why a chain is refused (it goes back to the used ring with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("broken descriptor chain (empty, loop, too long, index out of range or unreadable)")]
    Broken,
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    #[error("buffer outside guest memory")]
    Memory,
    #[error("chain of {0} bytes is shorter than the vnet header")]
    TooShort(u64),
    #[error("frame of {0} bytes is too long")]
    TooLong(u64),
    #[error("frame in too many pieces ({0})")]
    TooManyPieces(usize),
}

/// A chain's device-readable buffers, then its device-writable ones.
#[derive(Debug, Default)]
pub struct Split {
    pub readable: Buffers,
    pub writable: Buffers,
}

/// Walks a chain into its readable and writable streams, checking that readable
/// descriptors come first, that the chain ends properly and that every buffer lies in
/// guest memory with the access the device needs.
pub fn split<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M) -> Result<Split, ChainError> {
    // virtio-queue ends the iteration silently on a loop, an overlong chain, an index
    // out of range, an unreadable descriptor or a bad indirect table: the last
    // descriptor then still says NEXT.
    let mut out = Split::default();
    let mut last_has_next = true;
    for desc in chain {
        last_has_next = desc.has_next();
        let (buffers, access) = if desc.is_write_only() {
            (&mut out.writable, Permissions::Write)
        } else {
            if !out.writable.is_empty() {
                return Err(ChainError::WrongDirection);
            }
            (&mut out.readable, Permissions::Read)
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::Memory);
        }
        buffers.push(desc.addr(), desc.len());
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(out)
}

/// The buffers of a chain whose descriptors must all be device-writable (`writable`) or
/// all device-readable.
pub fn collect<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    writable: bool,
) -> Result<Buffers, ChainError> {
    let s = split(chain, mem)?;
    let (wanted, other) = if writable {
        (s.writable, s.readable)
    } else {
        (s.readable, s.writable)
    };
    if !other.is_empty() {
        return Err(ChainError::WrongDirection);
    }
    Ok(wanted)
}

/// One `readv` on `fd` (retried on EINTR).
pub fn readv(fd: RawFd, iovs: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec of `iovs` describes writable memory that the caller keeps
        // alive across the call (guest memory under pointer guards, or local buffers);
        // the kernel writes at most `iov_len` bytes to each. The count is bounded by
        // IOV_MAX, so it fits in c_int.
        let n = unsafe { libc::readv(fd, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `writev` on `fd` (retried on EINTR).
pub fn writev(fd: RawFd, iovs: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec of `iovs` describes readable memory that the caller keeps
        // alive across the call; the kernel only reads from it. The count is bounded by
        // IOV_MAX, so it fits in c_int.
        let n = unsafe { libc::writev(fd, iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An iovec over a local buffer the kernel reads from.
pub fn local_iovec(buf: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    }
}

/// An iovec over a local buffer the kernel writes into.
pub fn local_iovec_mut(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}
