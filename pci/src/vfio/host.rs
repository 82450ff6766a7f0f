//! [`VfioOps`] and [`DmaMapper`] over vfio-ioctls: the legacy container + group
//! (type1v2) back end, and with the `vfio-cdev` feature the iommufd + device cdev one.
//!
//! vfio-ioctls is used for opening (group/container/iommufd set-up, region and IRQ
//! discovery) and DMA mapping; the few ioctls whose wrappers lose the errno or cannot
//! address a single vector (SET_IRQS with a start, RESET, GET_INFO) are issued here on
//! the device fd.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr};

use super::ops::{DmaMapper, IrqInfo, MmapArea, OpenedDevice, RegionInfo, VfioOps};
use super::{VfioError, CONFIG_REGION, REGION_MMAP};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// Size of `struct vfio_irq_set` without its data (argsz, flags, index, start, count).
const IRQ_SET_HEADER_WORDS: usize = 5;

/// A VFIO device opened through vfio-ioctls.
struct HostDevice {
    device: VfioDevice,
    regions: Vec<RegionInfo>,
    has_reset: bool,
    cdev: bool,
}

impl HostDevice {
    fn new(device: VfioDevice, cdev: bool) -> Result<Self, VfioError> {
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO on a VFIO device fd writes at most `argsz`
        // bytes into `info`, which is a live, correctly sized vfio_device_info.
        let ret = unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_INFO(), &mut info) };
        if ret < 0 {
            return Err(VfioError::Ioctl {
                what: "DEVICE_GET_INFO",
                source: io::Error::last_os_error(),
            });
        }
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioError::NotPci("VFIO reports a non-PCI device"));
        }
        let regions = (0..=CONFIG_REGION)
            .filter_map(|index| region_info(&device, index))
            .collect::<Vec<_>>();
        if !regions.iter().any(|r| r.index == CONFIG_REGION) {
            return Err(VfioError::NotPci("VFIO gives no config space region"));
        }
        Ok(HostDevice {
            device,
            regions,
            has_reset: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            cdev,
        })
    }

    fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        fds: &[Option<RawFd>],
    ) -> io::Result<()> {
        let count =
            u32::try_from(fds.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // struct vfio_irq_set { argsz, flags, index, start, count, data[] } with one
        // __s32 fd per vector (-1: no trigger).
        let mut buf = Vec::with_capacity(IRQ_SET_HEADER_WORDS + fds.len());
        let argsz = (IRQ_SET_HEADER_WORDS + fds.len()) * 4;
        let argsz = u32::try_from(argsz).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        buf.extend_from_slice(&[argsz, flags, index, start, count]);
        buf.extend(fds.iter().map(|fd| fd.unwrap_or(-1) as u32));
        // SAFETY: `buf` is a complete vfio_irq_set of `argsz` bytes (u32-aligned header
        // followed by the fds); the kernel only reads it.
        let ret = unsafe { ioctl_with_ptr(&self.device, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn region_ref(&self, index: u32) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.index == index)
    }
}

/// Region `index` as [`RegionInfo`], if the device has it.
fn region_info(device: &VfioDevice, index: u32) -> Option<RegionInfo> {
    let size = device.get_region_size(index);
    if size == 0 {
        return None;
    }
    let flags = device.get_region_flags(index);
    let mut mmap_areas = Vec::new();
    if flags & REGION_MMAP != 0 {
        let sparse = device
            .get_region_caps(index)
            .into_iter()
            .find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(s),
                _ => None,
            });
        match sparse {
            Some(s) => mmap_areas.extend(s.areas.iter().map(|a| (a.offset, a.size))),
            None => mmap_areas.push((0, size)),
        }
    }
    Some(RegionInfo {
        index,
        size,
        flags,
        mmap_areas,
    })
}

impl VfioOps for HostDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.region_ref(index).cloned()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.device.get_irq_info(index).map(|i| IrqInfo {
            index: i.index,
            count: i.count,
            flags: i.flags,
        })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<RawFd>]) -> io::Result<()> {
        self.set_irqs(
            index,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            start,
            fds,
        )
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.set_irqs(
            index,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &[],
        )
    }

    fn has_reset(&self) -> bool {
        self.has_reset
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a VFIO device.
        let ret = unsafe { ioctl(&self.device, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<MmapArea> {
        let region = self
            .region_ref(index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let inside = region.flags & REGION_MMAP != 0
            && offset
                .checked_add(size)
                .is_some_and(|end| end <= region.size);
        if !inside {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let file_offset = self
            .device
            .get_region_offset(index)
            .checked_add(offset)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        MmapArea::map_fd(self.device.as_raw_fd(), file_offset, size)
    }

    fn kvm_vfio_fd(&self) -> Option<RawFd> {
        self.cdev.then(|| self.device.as_raw_fd())
    }
}

/// The type1v2 container as a [`DmaMapper`].
struct ContainerDma(Arc<VfioContainer>);

impl DmaMapper for ContainerDma {
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the DmaMapper contract: `host_addr..+size` is guest memory, only
        // accessed through raw pointers/volatile accesses and shared with the guest,
        // that stays mapped until unmap. The kernel pins it or fails the ioctl.
        unsafe { self.0.vfio_dma_map(iova, size, host_addr as *mut u8) }.map_err(to_io)
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.0.vfio_dma_unmap(iova, size).map_err(to_io)
    }
}

/// A vfio-ioctls error as an `io::Error`, keeping the errno when it has one.
fn to_io(e: vfio_ioctls::VfioError) -> io::Error {
    errno_of(&e).map_or_else(
        || io::Error::other(e.to_string()),
        io::Error::from_raw_os_error,
    )
}

/// The errno somewhere in `e`'s source chain.
fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(sys.errno());
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(code) = io.raw_os_error() {
                return Some(code);
            }
        }
        cur = err.source();
    }
    None
}

/// What sysfs says about the device: its canonical path and IOMMU group.
struct SysfsDevice {
    path: PathBuf,
    group: u32,
}

fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Checks the device exists, is bound to a VFIO driver and has an IOMMU group.
/// A bare BDF (`0000:01:00.0`, or `01:00.0` in domain 0) stands for its sysfs
/// directory.
fn sysfs_dir(given: &Path) -> PathBuf {
    let text = given.to_string_lossy();
    if given.components().count() != 1 || !text.contains(':') {
        return given.to_path_buf();
    }
    let bdf = if text.matches(':').count() == 1 {
        format!("0000:{text}")
    } else {
        text.into_owned()
    };
    PathBuf::from("/sys/bus/pci/devices").join(bdf)
}

fn check_sysfs(sysfs_path: &Path) -> Result<SysfsDevice, VfioError> {
    let path = std::fs::canonicalize(sysfs_dir(sysfs_path))
        .ok()
        .filter(|p| p.join("config").exists())
        .ok_or_else(|| VfioError::NotFound(sysfs_path.to_path_buf()))?;
    let driver = link_name(&path.join("driver"));
    if !driver.as_deref().is_some_and(|d| d.contains("vfio")) {
        return Err(VfioError::NotBoundToVfio { path, driver });
    }
    let group = link_name(&path.join("iommu_group"))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| VfioError::NoIommu(path.clone()))?;
    Ok(SysfsDevice { path, group })
}

/// The devices of `group` that are bound to a driver other than a VFIO one.
fn group_blockers(group: u32) -> Vec<String> {
    let dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let driver = link_name(&e.path().join("driver"))?;
            (!driver.contains("vfio"))
                .then(|| format!("{} ({driver})", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Turns a vfio-ioctls error from opening `dev` into a [`VfioError`] with a fix.
fn open_error(e: vfio_ioctls::VfioError, dev: &SysfsDevice) -> VfioError {
    use vfio_ioctls::VfioError as E;
    let node = |p: &str| PathBuf::from(p);
    let io_kind = |io: &io::Error, p: PathBuf, fix: &'static str| match io.raw_os_error() {
        Some(libc::ENOENT) => Some(VfioError::MissingNode { path: p, fix }),
        Some(libc::EACCES) | Some(libc::EPERM) => Some(VfioError::Permission(p)),
        Some(libc::EBUSY) => Some(VfioError::Busy(p)),
        _ => None,
    };
    let mapped = match &e {
        E::OpenContainer(io) => io_kind(
            io,
            node("/dev/vfio/vfio"),
            "load vfio-pci (modprobe vfio-pci)",
        ),
        E::OpenGroup(io, id) => io_kind(
            io,
            node(&format!("/dev/vfio/{id}")),
            "bind the device to vfio-pci (the group node appears then)",
        ),
        E::GroupViable => Some(VfioError::GroupNotViable {
            group: dev.group,
            others: group_blockers(dev.group),
        }),
        E::VfioExtension | E::VfioType1V2 | E::VfioInvalidType => Some(VfioError::NoType1v2),
        E::GroupGetDeviceFD(sys) if sys.errno() == libc::EBUSY => {
            Some(VfioError::Busy(dev.path.clone()))
        }
        #[cfg(feature = "vfio-cdev")]
        E::InvalidVfioDev => Some(VfioError::NoCdev(dev.path.clone())),
        #[cfg(feature = "vfio-cdev")]
        E::OpenDeviceCdev(io) => io_kind(io, dev.path.join("vfio-dev"), "needs a VFIO device cdev"),
        _ => None,
    };
    mapped.unwrap_or_else(|| VfioError::Host {
        path: dev.path.clone(),
        source: e,
    })
}

/// Opens the function at `sysfs_path` (e.g. `/sys/bus/pci/devices/0000:01:00.0`, or
/// just its BDF; bound to vfio-pci) with the legacy back end: a new type1v2 container holding its
/// IOMMU group. Returns the device and the container as its IOMMU context.
pub fn open_group(sysfs_path: impl AsRef<Path>) -> Result<OpenedDevice, VfioError> {
    let dev = check_sysfs(sysfs_path.as_ref())?;
    let container = Arc::new(VfioContainer::new(None).map_err(|e| open_error(e, &dev))?);
    let ops: Arc<dyn vfio_ioctls::VfioOps> = container.clone();
    let device = VfioDevice::new(&dev.path, ops, false).map_err(|e| open_error(e, &dev))?;
    let host = HostDevice::new(device, false)?;
    tracing::info!(path = %dev.path.display(), group = dev.group, "VFIO device opened (container/group)");
    Ok((Arc::new(host), Arc::new(ContainerDma(container))))
}

#[cfg(feature = "vfio-cdev")]
mod cdev {
    use super::*;
    use iommufd_ioctls::IommuFd;
    use vfio_ioctls::VfioIommufd;

    /// The iommufd IOAS as a [`DmaMapper`].
    struct IoasDma(Arc<VfioIommufd>);

    impl DmaMapper for IoasDma {
        fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
            let size =
                usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: as for the container: the DmaMapper contract makes the range
            // guest memory that stays mapped until unmap; the kernel pins or fails.
            unsafe { self.0.vfio_dma_map(iova, size, host_addr as *mut u8) }.map_err(to_io)
        }

        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            let size =
                usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.0.vfio_dma_unmap(iova, size).map_err(to_io)
        }
    }

    /// Opens the function at `sysfs_path` (bound to vfio-pci) through its VFIO device
    /// cdev (`/dev/vfio/devices/vfioN`) bound to a new iommufd, attached to a new IOAS
    /// that is returned as its IOMMU context.
    pub fn open_cdev(sysfs_path: impl AsRef<Path>) -> Result<OpenedDevice, VfioError> {
        let dev = check_sysfs(sysfs_path.as_ref())?;
        if !dev.path.join("vfio-dev").is_dir() {
            return Err(VfioError::NoCdev(dev.path));
        }
        let iommufd = IommuFd::new().map_err(|e| match e {
            iommufd_ioctls::IommufdError::OpenIommufd(io) => match io.raw_os_error() {
                Some(libc::ENOENT) => VfioError::MissingNode {
                    path: PathBuf::from("/dev/iommu"),
                    fix: "load iommufd (modprobe iommufd)",
                },
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    VfioError::Permission(PathBuf::from("/dev/iommu"))
                }
                _ => VfioError::Ioctl {
                    what: "open /dev/iommu",
                    source: io,
                },
            },
            other => VfioError::Ioctl {
                what: "iommufd",
                source: io::Error::other(other.to_string()),
            },
        })?;
        let ioas = Arc::new(
            VfioIommufd::new(Arc::new(iommufd), None, None).map_err(|e| open_error(e, &dev))?,
        );
        let ops: Arc<dyn vfio_ioctls::VfioOps> = ioas.clone();
        let device = VfioDevice::new(&dev.path, ops, true).map_err(|e| open_error(e, &dev))?;
        let host = HostDevice::new(device, true)?;
        tracing::info!(path = %dev.path.display(), "VFIO device opened (iommufd cdev)");
        Ok((Arc::new(host), Arc::new(IoasDma(ioas))))
    }
}

#[cfg(feature = "vfio-cdev")]
pub use cdev::open_cdev;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_kept() {
        let e = vfio_ioctls::VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(libc::EFAULT));
        assert_eq!(to_io(e).raw_os_error(), Some(libc::EFAULT));
        let e = vfio_ioctls::VfioError::GroupViable;
        assert_eq!(to_io(e).raw_os_error(), None);
    }

    #[test]
    fn bdf_names_its_sysfs_directory() {
        let dir = |s: &str| sysfs_dir(Path::new(s));
        assert_eq!(
            dir("0000:01:00.0"),
            Path::new("/sys/bus/pci/devices/0000:01:00.0")
        );
        assert_eq!(
            dir("01:00.0"),
            Path::new("/sys/bus/pci/devices/0000:01:00.0")
        );
        assert_eq!(
            dir("/sys/bus/pci/devices/0000:01:00.0"),
            Path::new("/sys/bus/pci/devices/0000:01:00.0")
        );
        assert_eq!(dir("relative"), Path::new("relative"));
    }

    #[test]
    fn host_devices_not_bound_to_vfio_are_refused() {
        // Whatever PCI devices this host has: one bound to another driver (or none)
        // is refused with the binding fix, before any VFIO node is opened.
        let Ok(entries) = std::fs::read_dir("/sys/bus/pci/devices") else {
            return;
        };
        for e in entries.flatten() {
            let driver = link_name(&e.path().join("driver"));
            if driver.as_deref().is_some_and(|d| d.contains("vfio")) {
                continue;
            }
            let name = e.file_name();
            let err = open_group(Path::new(&name)).err().expect("refused");
            assert!(
                matches!(&err, VfioError::NotBoundToVfio { driver: d, .. } if *d == driver),
                "{err}"
            );
        }
    }

    #[test]
    fn sysfs_checks_give_fixes() {
        let e = check_sysfs(Path::new("/nonexistent/0000:99:00.0"))
            .err()
            .expect("missing device");
        assert!(matches!(e, VfioError::NotFound(_)));
        assert!(e.to_string().contains("/sys/bus/pci/devices"));
        let e = VfioError::NotBoundToVfio {
            path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0"),
            driver: Some("e1000e".into()),
        };
        assert!(e.to_string().contains("bound to e1000e, not to vfio-pci"));
        let e = VfioError::GroupNotViable {
            group: 7,
            others: vec!["0000:01:00.1 (e1000e)".into()],
        };
        assert!(e.to_string().contains("still bound: 0000:01:00.1 (e1000e)"));
    }
}
