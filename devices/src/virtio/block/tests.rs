//! Tests of virtio-blk: helpers shared by the backend, request, device and worker
//! tests.

mod backend;
mod device;
mod discard;
mod dma;
mod iommu;
mod request;
mod uring;
mod worker;

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

use super::backend::{BlockBackend, IoBuf, IoBufMut};
use super::uring::{UringEngine, UringRing};
use super::{Disk, FileBackend, Limits};
use crate::dma::DmaTracker;
use crate::virtio::testing::Mem;
pub(super) use crate::virtio::testing::{get, put};

/// The io_uring engine over `disk`'s file for a queue of `size` entries.
pub(super) fn uring_engine(disk: &Disk, size: u16, dma: DmaTracker) -> UringEngine {
    let fd = disk.backend.raw_file().unwrap();
    UringEngine::new(UringRing::new(fd, size).unwrap(), dma)
}

/// What a [`HookedBackend`] is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BackendOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// A file backend that runs a test hook before each operation (to count it, or hold
/// it until the test lets it go). Without a raw file: the sync engine only.
pub(super) struct HookedBackend {
    inner: FileBackend,
    hook: Box<dyn Fn(BackendOp) + Send + Sync>,
}

impl HookedBackend {
    pub fn new(image: &TempImage, hook: impl Fn(BackendOp) + Send + Sync + 'static) -> Self {
        Self {
            inner: image.open(false),
            hook: Box::new(hook),
        }
    }
}

impl BlockBackend for HookedBackend {
    fn read_vectored(&self, offset: u64, bufs: &mut [IoBufMut<'_>]) -> io::Result<usize> {
        (self.hook)(BackendOp::Read);
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        (self.hook)(BackendOp::Write);
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        (self.hook)(BackendOp::Flush);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (self.hook)(BackendOp::Discard);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        (self.hook)(BackendOp::WriteZeroes);
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
}

/// A disk image in the temporary directory, removed on drop.
pub(super) struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    /// An image of `size` bytes where byte `i` is `pattern(i)`.
    pub fn new(size: usize) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("ferrio-blk-test-{}-{n}.img", std::process::id()));
        let data: Vec<u8> = (0..size).map(pattern).collect();
        std::fs::write(&path, data).unwrap();
        Self { path }
    }

    /// The image opened read-write (or read-only).
    pub fn open(&self, read_only: bool) -> FileBackend {
        FileBackend::open(&self.path, read_only).unwrap()
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut out = Vec::new();
        File::open(&self.path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Allocated bytes (st_blocks * 512).
    pub fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).unwrap().blocks() * 512
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The initial image contents: never zero, varies within and across sectors.
pub(super) fn pattern(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

/// The limits the tests run with (small enough to hit).
pub(super) const LIMITS: Limits = Limits {
    seg_max: 8,
    size_max: 64 * 1024,
    max_discard_sectors: 1024,
    max_discard_seg: 4,
    max_write_zeroes_sectors: 1024,
    max_write_zeroes_seg: 4,
};

/// Features a driver typically negotiates.
pub(super) const FEATURES: u64 =
    1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// A disk on `image` as the workers would see it.
pub(super) fn disk(image: &TempImage, read_only: bool, features: u64) -> Disk {
    let backend = image.open(read_only);
    let size = std::fs::metadata(&image.path).unwrap().len();
    let mut id = [0u8; 20];
    id[..9].copy_from_slice(b"ferrio-42");
    Disk {
        backend: Arc::new(backend),
        capacity: size / 512,
        read_only,
        id,
        limits: LIMITS,
        features,
    }
}

/// Writes a request header `{kind, 0, sector}` at `addr`.
pub(super) fn put_header(mem: &Mem, addr: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Writes discard / write-zeroes segments `(sector, num_sectors, flags)` at `addr`;
/// returns their length in bytes.
pub(super) fn put_segments(mem: &Mem, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
    let mut raw = Vec::new();
    for &(sector, num, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&num.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    raw.len() as u32
}

pub(super) fn status_at(mem: &Mem, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
