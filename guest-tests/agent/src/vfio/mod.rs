//! A thin VFIO client for the `vfio-in-guest` scenario: the container (type1 IOMMU,
//! DMA map/unmap), a group and a device (info, regions read and written with
//! pread/pwrite, IRQ set-up), plus the two resources they need from the kernel: an
//! eventfd and an anonymous DMA buffer. Raw ioctls through `libc`, constants and
//! structures in [`uapi`]; errors are the text the checks report.

mod buffer;
mod eventfd;
mod mmio;
pub mod pci;
pub mod uapi;

pub use buffer::DmaBuffer;
pub use eventfd::EventFd;
pub use mmio::Mmio;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use uapi::*;

/// `ioctl(fd, request, arg)` returning the non-negative result or the errno text.
fn ioctl(fd: &impl AsRawFd, request: u64, arg: libc::c_ulong, what: &str) -> Result<i32, String> {
    // SAFETY: the callers pass either a plain integer argument or a pointer to a
    // live, correctly sized `#[repr(C)]` structure (its `argsz` set) that outlives the
    // call; the kernel validates `argsz` before touching the memory.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg) };
    if rc < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

/// The argument pointer of an ioctl that reads and/or writes `*value`.
fn ptr<T>(value: &mut T) -> libc::c_ulong {
    value as *mut T as libc::c_ulong
}

fn open_rw(path: &str) -> Result<File, String> {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// What `VFIO_IOMMU_GET_INFO` says about the container's IOMMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    pub flags: u32,
    /// Bitmap of the supported page sizes.
    pub pgsizes: u64,
    /// Valid IOVA ranges (inclusive ends), from the IOVA-range capability.
    pub ranges: Vec<(u64, u64)>,
}

/// An open `/dev/vfio/vfio`.
pub struct Container {
    file: File,
}

impl Container {
    pub fn open() -> Result<Container, String> {
        open_rw("/dev/vfio/vfio").map(|file| Container { file })
    }

    pub fn api_version(&self) -> Result<i32, String> {
        ioctl(&self.file, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
    }

    pub fn check_extension(&self, extension: u64) -> Result<bool, String> {
        ioctl(
            &self.file,
            VFIO_CHECK_EXTENSION,
            extension,
            "VFIO_CHECK_EXTENSION",
        )
        .map(|v| v > 0)
    }

    pub fn set_iommu(&self, kind: u64) -> Result<(), String> {
        ioctl(&self.file, VFIO_SET_IOMMU, kind, "VFIO_SET_IOMMU").map(drop)
    }

    /// Page sizes and IOVA ranges: a first call learns the size with capabilities,
    /// a second fetches them.
    pub fn iommu_info(&self) -> Result<IommuInfo, String> {
        let mut head = IommuType1Info {
            argsz: argsz::<IommuType1Info>(),
            ..Default::default()
        };
        ioctl(
            &self.file,
            VFIO_IOMMU_GET_INFO,
            ptr(&mut head),
            "VFIO_IOMMU_GET_INFO",
        )?;
        let mut info = IommuInfo {
            flags: head.flags,
            pgsizes: head.iova_pgsizes,
            ranges: Vec::new(),
        };
        let want = head.argsz as usize;
        if head.flags & VFIO_IOMMU_INFO_CAPS == 0 || want <= std::mem::size_of::<IommuType1Info>() {
            return Ok(info);
        }
        if want > 1 << 16 {
            return Err(format!("VFIO_IOMMU_GET_INFO wants {want} bytes"));
        }
        // u64 storage: the structure and its capabilities are 8-byte aligned.
        let mut buf = vec![0u64; want.div_ceil(8)];
        let bytes_len = buf.len() * 8;
        // SAFETY: `buf` is at least `want` bytes, 8-byte aligned, and starts with an
        // `IommuType1Info` whose `argsz` tells the kernel how much it may write.
        unsafe {
            let head = buf.as_mut_ptr().cast::<IommuType1Info>();
            (*head).argsz = want as u32;
        }
        let arg = buf.as_mut_ptr() as libc::c_ulong;
        ioctl(
            &self.file,
            VFIO_IOMMU_GET_INFO,
            arg,
            "VFIO_IOMMU_GET_INFO (caps)",
        )?;
        // SAFETY: plain bytes of the u64 buffer, `bytes_len` long, alive below.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), bytes_len) };
        let bytes = &bytes[..want];
        let cap_offset = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or([0; 4]));
        info.ranges = pci::parse_iova_ranges(bytes, cap_offset as usize)?;
        Ok(info)
    }

    /// Maps `size` bytes at user address `vaddr` to `iova`, readable and writable by
    /// the device.
    pub fn map_dma(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        let mut map = DmaMap {
            argsz: argsz::<DmaMap>(),
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        ioctl(
            &self.file,
            VFIO_IOMMU_MAP_DMA,
            ptr(&mut map),
            "VFIO_IOMMU_MAP_DMA",
        )
        .map(drop)
    }

    /// Unmaps `[iova, iova + size)`; returns the size the kernel says it unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, String> {
        let mut unmap = DmaUnmap {
            argsz: argsz::<DmaUnmap>(),
            flags: 0,
            iova,
            size,
        };
        ioctl(
            &self.file,
            VFIO_IOMMU_UNMAP_DMA,
            ptr(&mut unmap),
            "VFIO_IOMMU_UNMAP_DMA",
        )?;
        Ok(unmap.size)
    }
}

/// An open `/dev/vfio/<group>`.
pub struct Group {
    file: File,
}

impl Group {
    pub fn open(id: u32) -> Result<Group, String> {
        open_rw(&format!("/dev/vfio/{id}")).map(|file| Group { file })
    }

    /// A group by its device node, e.g. `/dev/vfio/noiommu-0` (no-IOMMU mode).
    pub fn open_path(path: &str) -> Result<Group, String> {
        open_rw(path).map(|file| Group { file })
    }

    /// `VFIO_GROUP_FLAGS_*`.
    pub fn status(&self) -> Result<u32, String> {
        let mut status = GroupStatus {
            argsz: argsz::<GroupStatus>(),
            flags: 0,
        };
        ioctl(
            &self.file,
            VFIO_GROUP_GET_STATUS,
            ptr(&mut status),
            "VFIO_GROUP_GET_STATUS",
        )?;
        Ok(status.flags)
    }

    pub fn set_container(&self, container: &Container) -> Result<(), String> {
        let mut fd: i32 = container.file.as_raw_fd();
        ioctl(
            &self.file,
            VFIO_GROUP_SET_CONTAINER,
            ptr(&mut fd),
            "VFIO_GROUP_SET_CONTAINER",
        )
        .map(drop)
    }

    pub fn unset_container(&self) -> Result<(), String> {
        ioctl(
            &self.file,
            VFIO_GROUP_UNSET_CONTAINER,
            0,
            "VFIO_GROUP_UNSET_CONTAINER",
        )
        .map(drop)
    }

    /// The device fd of PCI function `bdf` (e.g. `0000:00:03.0`).
    pub fn device(&self, bdf: &str) -> Result<Device, String> {
        let name = std::ffi::CString::new(bdf).map_err(|e| format!("{bdf:?}: {e}"))?;
        let fd = ioctl(
            &self.file,
            VFIO_GROUP_GET_DEVICE_FD,
            name.as_ptr() as libc::c_ulong,
            "VFIO_GROUP_GET_DEVICE_FD",
        )?;
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Device { file })
    }
}

/// A VFIO device fd.
pub struct Device {
    file: File,
}

impl Device {
    pub fn info(&self) -> Result<DeviceInfo, String> {
        let mut info = DeviceInfo {
            argsz: argsz::<DeviceInfo>(),
            ..Default::default()
        };
        ioctl(
            &self.file,
            VFIO_DEVICE_GET_INFO,
            ptr(&mut info),
            "VFIO_DEVICE_GET_INFO",
        )?;
        Ok(info)
    }

    pub fn region(&self, index: u32) -> Result<RegionInfo, String> {
        let mut info = RegionInfo {
            argsz: argsz::<RegionInfo>(),
            index,
            ..Default::default()
        };
        let what = format!("VFIO_DEVICE_GET_REGION_INFO {index}");
        ioctl(
            &self.file,
            VFIO_DEVICE_GET_REGION_INFO,
            ptr(&mut info),
            &what,
        )?;
        Ok(info)
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, String> {
        let mut info = IrqInfo {
            argsz: argsz::<IrqInfo>(),
            index,
            ..Default::default()
        };
        let what = format!("VFIO_DEVICE_GET_IRQ_INFO {index}");
        ioctl(&self.file, VFIO_DEVICE_GET_IRQ_INFO, ptr(&mut info), &what)?;
        Ok(info)
    }

    fn set_irqs(&self, mut set: IrqSet, what: &str) -> Result<(), String> {
        ioctl(&self.file, VFIO_DEVICE_SET_IRQS, ptr(&mut set), what).map(drop)
    }

    /// Routes vector `vector` of IRQ index `index` to `eventfd` (enabling the index).
    pub fn set_irq_eventfd(&self, index: u32, vector: u32, eventfd: i32) -> Result<(), String> {
        self.set_irqs(
            IrqSet {
                argsz: IRQ_SET_HEADER_LEN + 4,
                flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: vector,
                count: 1,
                data: eventfd.to_ne_bytes(),
            },
            "VFIO_DEVICE_SET_IRQS (eventfd)",
        )
    }

    /// Routes vectors `start..start + eventfds.len()` of IRQ index `index` to
    /// `eventfds`, in one call (enabling the index with that many vectors).
    pub fn set_irq_eventfds(&self, index: u32, start: u32, eventfds: &[i32]) -> Result<(), String> {
        let count = u32::try_from(eventfds.len()).map_err(|_| "too many eventfds")?;
        // u32 storage: `struct vfio_irq_set` is 4-byte aligned, its data follows it.
        let mut buf = vec![0u32; IRQ_SET_HEADER_LEN as usize / 4 + eventfds.len()];
        buf[0] = IRQ_SET_HEADER_LEN + 4 * count;
        buf[1] = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        buf[2] = index;
        buf[3] = start;
        buf[4] = count;
        for (slot, &fd) in buf[5..].iter_mut().zip(eventfds) {
            *slot = fd as u32;
        }
        ioctl(
            &self.file,
            VFIO_DEVICE_SET_IRQS,
            buf.as_mut_ptr() as libc::c_ulong,
            "VFIO_DEVICE_SET_IRQS (eventfds)",
        )
        .map(drop)
    }

    /// Maps all of `region` (a BAR the kernel allows to mmap) into the address space.
    pub fn map_region(&self, region: &RegionInfo) -> Result<Mmio, String> {
        if region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!("region {} cannot be mmapped", region.index));
        }
        let len = usize::try_from(region.size).map_err(|_| "region too large")?;
        Mmio::map(&self.file, region.offset, len)
    }

    /// Loopback: makes the kernel signal the vector's eventfd as if the device had.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<(), String> {
        self.set_irqs(
            IrqSet {
                argsz: IRQ_SET_HEADER_LEN + 1,
                flags: VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: vector,
                count: 1,
                data: [1, 0, 0, 0],
            },
            "VFIO_DEVICE_SET_IRQS (trigger)",
        )
    }

    /// Disables IRQ index `index` as a whole.
    pub fn disable_irqs(&self, index: u32) -> Result<(), String> {
        self.set_irqs(
            IrqSet {
                argsz: IRQ_SET_HEADER_LEN,
                flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count: 0,
                data: [0; 4],
            },
            "VFIO_DEVICE_SET_IRQS (disable)",
        )
    }

    /// The file offset of `[offset, offset + len)` of `region`, bounds-checked.
    fn at(region: &RegionInfo, offset: u64, len: usize) -> Result<u64, String> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= region.size => Ok(region.offset + offset),
            _ => Err(format!(
                "{len} bytes at {offset:#x} outside region {} ({:#x} bytes)",
                region.index, region.size
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of `region` (one pread: vfio-pci does
    /// naturally aligned accesses of the largest size that fits).
    pub fn read(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = Self::at(region, offset, buf.len())?;
        self.file.read_exact_at(buf, at).map_err(|e| {
            format!(
                "read {} bytes at {offset:#x} of region {}: {e}",
                buf.len(),
                region.index
            )
        })
    }

    pub fn write(&self, region: &RegionInfo, offset: u64, buf: &[u8]) -> Result<(), String> {
        let at = Self::at(region, offset, buf.len())?;
        self.file.write_all_at(buf, at).map_err(|e| {
            format!(
                "write {} bytes at {offset:#x} of region {}: {e}",
                buf.len(),
                region.index
            )
        })
    }

    pub fn read_u8(&self, region: &RegionInfo, offset: u64) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.read(region, offset, &mut b)?;
        Ok(b[0])
    }

    pub fn read_u16(&self, region: &RegionInfo, offset: u64) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.read(region, offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn read_u32(&self, region: &RegionInfo, offset: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read(region, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets memory decoding and bus mastering in the command register (vfio-pci
    /// leaves bus mastering to the user); returns the register read back.
    pub fn enable_bus_master(&self) -> Result<u16, String> {
        let cfg = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let cmd = self.read_u16(&cfg, pci::PCI_COMMAND)?;
        let bits = pci::COMMAND_MEMORY | pci::COMMAND_MASTER;
        self.write_u16(&cfg, pci::PCI_COMMAND, cmd | bits)?;
        self.read_u16(&cfg, pci::PCI_COMMAND)
    }

    pub fn write_u8(&self, region: &RegionInfo, offset: u64, v: u8) -> Result<(), String> {
        self.write(region, offset, &[v])
    }

    pub fn write_u16(&self, region: &RegionInfo, offset: u64, v: u16) -> Result<(), String> {
        self.write(region, offset, &v.to_le_bytes())
    }

    pub fn write_u32(&self, region: &RegionInfo, offset: u64, v: u32) -> Result<(), String> {
        self.write(region, offset, &v.to_le_bytes())
    }
}
