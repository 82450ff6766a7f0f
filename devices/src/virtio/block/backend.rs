//! Disk backends: where the sectors of a virtio-blk disk live.
//!
//! A [`BlockBackend`] moves data between the disk and guest buffers described by
//! [`IoBuf`] / [`IoBufMut`]: raw `iovec`s pointing straight into guest memory, so a
//! request is one `preadv`/`pwritev` with no bounce copy. The request layer builds them
//! from `vm_memory` slices and keeps those slices (and their pointer guards) alive for
//! the duration of each call. [`FileBackend`] serves a raw image file (or a block
//! device) with synchronous system calls, and exposes its file to the io_uring engine.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Largest number of `iovec`s handed to one `preadv`/`pwritev` (the kernel's IOV_MAX).
const IOV_MAX: usize = libc::UIO_MAXIOV as usize;
/// Size of the zero buffer used when the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// A buffer the backend reads from (the data of a write request), borrowed for `'a`.
///
/// Layout-compatible with `struct iovec`. Guest memory may change under it at any time
/// (the guest owns it), so it is only ever handed to the kernel, never turned into a
/// Rust reference.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct IoBuf<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> IoBuf<'a> {
    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped and readable for all of `'a`.
    pub unsafe fn from_raw_parts(ptr: *const u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.iov.iov_base as *const u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a [u8]> for IoBuf<'a> {
    fn from(buf: &'a [u8]) -> Self {
        // SAFETY: the shared borrow keeps `buf` alive and readable for `'a`.
        unsafe { Self::from_raw_parts(buf.as_ptr(), buf.len()) }
    }
}

impl fmt::Debug for IoBuf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({:p}, {})", self.as_ptr(), self.len())
    }
}

/// A buffer the backend writes into (the data of a read request), borrowed for `'a`.
///
/// Layout-compatible with `struct iovec`; see [`IoBuf`].
#[repr(transparent)]
pub struct IoBufMut<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBufMut<'a> {
    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped and writable for all of `'a`, and nothing else
    /// may hold a Rust reference to it meanwhile.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.iov.iov_base.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a mut [u8]> for IoBufMut<'a> {
    fn from(buf: &'a mut [u8]) -> Self {
        // SAFETY: the exclusive borrow keeps `buf` alive, writable and unaliased for `'a`.
        unsafe { Self::from_raw_parts(buf.as_mut_ptr(), buf.len()) }
    }
}

impl fmt::Debug for IoBufMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBufMut({:p}, {})", self.as_mut_ptr(), self.len())
    }
}

/// Storage behind a virtio-blk disk. Offsets and lengths are in bytes; the device only
/// issues whole, in-range sectors. Shared by the queue workers, hence `Sync`.
pub trait BlockBackend: Send + Sync {
    /// Reads from `offset` into `bufs`, in order, until they are full or the end of the
    /// storage; returns the bytes read (short only at the end).
    fn read_vectored(&self, offset: u64, bufs: &mut [IoBufMut<'_>]) -> io::Result<usize>;
    /// Writes all of `bufs`, in order, from `offset`; returns the bytes written (all of
    /// them on success).
    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> io::Result<usize>;
    /// Makes every completed write durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;
    /// Lets the storage deallocate `len` bytes from `offset`; their contents become
    /// unspecified (zeroes for a file). Advisory: a backend may do nothing.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes from `offset` read as zeroes, deallocating them if `unmap`
    /// allows it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Size of the storage in bytes.
    fn size(&self) -> u64;
    /// The file holding the sectors as they are (offset for offset), for an engine that
    /// submits I/O on it directly (io_uring); `None` when the backend is not such a
    /// file. The descriptor stays open as long as the backend lives.
    fn raw_file(&self) -> Option<RawFd> {
        None
    }
}

/// A raw disk image (a regular file or a block device) served with
/// `preadv`/`pwritev`/`fdatasync`/`fallocate`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    /// Opens the image at `path`, for reading only when `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::new(file)
    }

    /// Serves an already open image. Its size is taken now (the end offset, so block
    /// devices work too) and assumed fixed.
    pub fn new(file: File) -> io::Result<Self> {
        let size = (&file).seek(SeekFrom::End(0))?;
        Ok(Self { file, size })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `fallocate(mode)` on a byte range, retried on EINTR.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = to_off(offset)?;
        let len = to_off(len)?;
        loop {
            // SAFETY: plain system call on an fd this backend owns; no memory is passed.
            let ret = unsafe { libc::fallocate(self.fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Zeroes a range by writing zeroes (for file systems without ZERO_RANGE).
    pub(crate) fn zero_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(ZERO_CHUNK, |rest| rest.min(ZERO_CHUNK));
            let at = offset.checked_add(done).ok_or_else(too_far)?;
            self.write_vectored(at, &[IoBuf::from(&zeroes[..n])])?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn read_vectored(&self, offset: u64, bufs: &mut [IoBufMut<'_>]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = bufs.iter().map(|b| b.iov).collect();
        // SAFETY: every iovec comes from an `IoBufMut`, whose contract keeps its memory
        // mapped and writable while `bufs` is borrowed, i.e. for this whole call.
        unsafe { transfer(self.fd(), offset, &mut iovs, Direction::Read) }
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = bufs.iter().map(|b| b.iov).collect();
        // SAFETY: every iovec comes from an `IoBuf`, whose contract keeps its memory
        // mapped and readable while `bufs` is borrowed, i.e. for this whole call;
        // pwritev only reads it.
        unsafe { transfer(self.fd(), offset, &mut iovs, Direction::Write) }
    }

    fn flush(&self) -> io::Result<()> {
        // fdatasync, retried on EINTR by the standard library.
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported(&e) => {
                tracing::debug!("virtio-blk: the image cannot punch holes; discard ignored");
                Ok(())
            }
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported(&e) => self.zero_fill(offset, len),
            other => other,
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn raw_file(&self) -> Option<RawFd> {
        Some(self.fd())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// `preadv`/`pwritev` over all of `iovs` from `offset`, in batches of [`IOV_MAX`],
/// resuming after short transfers and EINTR. A read stops early at end of file; a write
/// that makes no progress fails with `WriteZero`. `iovs` is consumed (advanced).
///
/// # Safety
///
/// Every iovec must describe memory that stays mapped for the whole call, writable for
/// [`Direction::Read`] and readable for [`Direction::Write`].
unsafe fn transfer(
    fd: RawFd,
    mut offset: u64,
    iovs: &mut [libc::iovec],
    dir: Direction,
) -> io::Result<usize> {
    let mut done = 0usize;
    let mut first = 0usize;
    loop {
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
        if first == iovs.len() {
            return Ok(done);
        }
        let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
        let off = to_off(offset)?;
        // The batch holds at most IOV_MAX (1024) entries, so the count fits a c_int.
        let count = batch.len() as libc::c_int;
        let ret = match dir {
            // SAFETY: `batch` is a live array of `count` iovecs, each valid for writes
            // per this function's contract; the kernel writes only inside them.
            Direction::Read => unsafe { libc::preadv(fd, batch.as_ptr(), count, off) },
            // SAFETY: as above, each iovec valid for reads; pwritev only reads them.
            Direction::Write => unsafe { libc::pwritev(fd, batch.as_ptr(), count, off) },
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Non-negative and at most the batch length, so it fits a usize.
        let mut n = ret as usize;
        if n == 0 {
            return match dir {
                Direction::Read => Ok(done),
                Direction::Write => Err(io::ErrorKind::WriteZero.into()),
            };
        }
        done += n;
        offset = offset.checked_add(n as u64).ok_or_else(too_far)?;
        while n > 0 {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| too_far())
}

fn too_far() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "offset beyond the file size limit",
    )
}

/// The file (system) does not support this fallocate mode.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}
