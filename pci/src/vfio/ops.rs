//! The narrow host interface of the passthrough model: [`VfioOps`] (one VFIO device)
//! and [`DmaMapper`] (its IOMMU context). The real implementations over vfio-ioctls
//! are in `host.rs` ([`super::open_group`], `open_cdev`); tests use a fake.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

/// A VFIO region (a BAR, the ROM, the config space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// VFIO region index (BAR n = n, ROM = 6, config = 7).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*` ([`super::REGION_READ`], [`super::REGION_WRITE`],
    /// [`super::REGION_MMAP`]).
    pub flags: u32,
    /// `(offset, size)` inside the region that the host lets us mmap: the whole region,
    /// the sparse mmap areas, or none.
    pub mmap_areas: Vec<(u64, u64)>,
}

/// A VFIO interrupt index (INTx, MSI, MSI-X, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// VFIO IRQ index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
    /// `VFIO_IRQ_INFO_*` ([`super::IRQ_NORESIZE`]).
    pub flags: u32,
}

/// One VFIO device, as the function model uses it.
pub trait VfioOps: Send + Sync {
    /// Region `index`, if the device has it (size > 0).
    fn region(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `data.len()` bytes at `offset` of region `index`. The caller has checked
    /// that the range lies inside the region (VFIO reports no error).
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` of region `index` (range checked by the caller).
    fn write(&self, index: u32, offset: u64, data: &[u8]);
    /// IRQ index `index`, if the device has it.
    fn irq(&self, index: u32) -> Option<IrqInfo>;
    /// Eventfd triggers for vectors `start..start + fds.len()` of IRQ `index`
    /// (VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | ACTION_TRIGGER); `None` removes that
    /// vector's trigger. Enables the index if it is not enabled.
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<RawFd>]) -> io::Result<()>;
    /// Disables every vector of IRQ `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// Whether the device supports VFIO_DEVICE_RESET.
    fn has_reset(&self) -> bool;
    /// VFIO_DEVICE_RESET.
    fn reset(&self) -> io::Result<()>;
    /// Maps `size` bytes at `offset` of region `index` into this process (MAP_SHARED,
    /// read/write).
    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea>;
    /// The fd a VMM adds to its KVM VFIO pseudo-device (KVM_DEV_VFIO_FILE_ADD) so KVM
    /// knows about the device (non-coherent DMA): the device cdev with the iommufd back
    /// end; `None` with the group back end, whose group fd vfio-ioctls keeps private.
    fn kvm_vfio_fd(&self) -> Option<RawFd> {
        None
    }
}

/// The IOMMU context of a device: the type1 container or the iommufd IOAS.
pub trait DmaMapper: Send + Sync {
    /// Maps `size` bytes of this process's memory at `host_addr` for device DMA at
    /// `iova` (read/write). `host_addr..host_addr + size` must be guest memory (shared
    /// with the guest, never borrowed as a Rust reference) that stays mapped until
    /// [`DmaMapper::unmap`]: the device may write it at any time.
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;
    /// Removes the mapping of `iova..iova + size` (as mapped).
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// An opened device and its IOMMU context (what [`super::open_group`] and
/// `open_cdev` return).
pub type OpenedDevice = (Arc<dyn VfioOps>, Arc<dyn DmaMapper>);

/// A memory mapping owned by this value (unmapped on drop): a device region mmap-ed
/// for direct guest access, or anonymous memory (tests).
#[derive(Debug)]
pub struct MmapArea {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory owned by this value; it is only handed
// out as a raw address (never as a Rust reference), so it may move between threads
// and be shared like any address.
unsafe impl Send for MmapArea {}
// SAFETY: as above: `&MmapArea` only exposes the address and length.
unsafe impl Sync for MmapArea {}

impl MmapArea {
    /// Maps `size` bytes of `fd` at file offset `offset`, shared and read/write.
    pub fn map_fd(fd: RawFd, offset: u64, size: u64) -> io::Result<Self> {
        let len = Self::checked_len(size)?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: a new mapping chosen by the kernel (no fixed address, so nothing
        // existing is replaced); the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        Self::from_raw(ptr, len)
    }

    /// Anonymous private zeroed memory of `size` bytes.
    pub fn anonymous(size: u64) -> io::Result<Self> {
        let len = Self::checked_len(size)?;
        // SAFETY: a new anonymous mapping chosen by the kernel; checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_raw(ptr, len)
    }

    fn checked_len(size: u64) -> io::Result<usize> {
        usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad mmap size"))
    }

    fn from_raw(ptr: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(MmapArea { ptr, len })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have a size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping this value created and owns;
        // nothing refers to it through a Rust reference.
        let ret = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if ret != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of a VFIO area failed");
        }
    }
}
