//! Passes a `--device` host function through: opens it with VFIO (container/group or
//! iommufd + cdev), sizes its KVM MSI vectors (a GSI + irqfd each, which VFIO signals
//! directly), builds the function model (`ferrio_pci::vfio::VfioPciDevice`) and sets up
//! its DMA: without `iommu=on` all guest RAM once (IOVA = GPA) before the guest runs;
//! with it, a hardware endpoint of the virtio-iommu whose domain mappings are mirrored
//! into the VFIO IOMMU context (MAP/UNMAP answered after VFIO did the same).

use std::sync::{Arc, Mutex};

use ferrio_iommu::DmaMirror;
use ferrio_pci::vfio::{self, DmaMappings, VfioOptions, VfioPciDevice};
use ferrio_pci::{MsiVectors, SharedPciDevice};
use kvm_bindings::{kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::{DeviceFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::host::{Backend, HostFunction};
use crate::error::Error;
use crate::interrupts::{GsiRouting, KvmMsiVectors};

/// A function opened and modelled, not yet on the bus.
pub struct Opened {
    pub device: SharedPciDevice,
    /// Its IOMMU context's mappings (what a mirror or the all-RAM map fills).
    pub dma: Arc<Mutex<DmaMappings>>,
}

fn vfio_err(bdf: &str) -> impl FnOnce(vfio::VfioError) -> Error + '_ {
    move |e| Error::Pci(format!("--device {bdf}: {e}"))
}

/// Opens `host` with its back end and builds its model with fresh MSI vectors.
pub fn open(
    host: &HostFunction,
    routing: &Arc<GsiRouting>,
    kvm_vfio: &KvmVfio,
) -> Result<Opened, Error> {
    let bdf = host.bdf.as_str();
    let (ops, mapper) = match &host.backend {
        Backend::Group(_) => vfio::open_group(&host.sysfs).map_err(vfio_err(bdf))?,
        Backend::Cdev(_) => vfio::open_cdev(&host.sysfs).map_err(vfio_err(bdf))?,
    };
    if let Some(fd) = ops.kvm_vfio_fd() {
        kvm_vfio.add(fd, bdf);
    }
    let vectors = vfio::vectors_needed(ops.as_ref()).map_err(vfio_err(bdf))?;
    let msi: Arc<dyn MsiVectors> = Arc::new(
        KvmMsiVectors::new(routing.clone(), vectors.max(1))
            .map_err(|e| Error::Pci(format!("--device {bdf}: MSI vectors: {e}")))?,
    );
    let dma = Arc::new(Mutex::new(DmaMappings::new(mapper)));
    let device = VfioPciDevice::new(ops, msi, VfioOptions::default())
        .map_err(vfio_err(bdf))?
        .with_dma(dma.clone());
    tracing::info!(bdf, vectors, "VFIO function ready");
    Ok(Opened {
        device: Arc::new(Mutex::new(device)),
        dma,
    })
}

/// Maps all of guest RAM for the device's DMA at IOVA = GPA.
pub fn map_guest_ram(
    dma: &Mutex<DmaMappings>,
    mem: &GuestMemoryMmap,
    bdf: &str,
) -> Result<(), Error> {
    let regions: Vec<(u64, u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect();
    dma.lock()
        .unwrap_or_else(|e| e.into_inner())
        .map_all(&regions)
        .map_err(|e| Error::Pci(format!("--device {bdf}: mapping guest RAM for DMA: {e}")))
}

/// The virtio-iommu's view of a passed-through function: its domain's mappings, with
/// guest-physical addresses turned into this process's addresses, go to VFIO.
pub struct VfioMirror {
    pub dma: Arc<Mutex<DmaMappings>>,
    pub mem: GuestMemoryMmap,
}

impl DmaMirror for VfioMirror {
    fn map(&self, iova: u64, size: u64, gpa: u64, _write: bool) -> Result<(), String> {
        // The range must lie in one RAM region (the guest cannot map MMIO for DMA).
        let last = gpa
            .checked_add(size.saturating_sub(1))
            .ok_or("range wraps")?;
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .filter(|r| last < r.start_addr().0.saturating_add(r.len()))
            .ok_or_else(|| format!("{gpa:#x}+{size:#x} is not guest RAM"))?;
        let offset = gpa - region.start_addr().0;
        let host = region.as_ptr() as u64 + offset;
        self.dma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(iova, size, host)
            .map_err(|e| e.to_string())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        self.dma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unmap(iova, size)
            .map_err(|e| e.to_string())
    }
}

/// KVM's VFIO pseudo-device: tells KVM about passed-through devices (so it honours
/// their non-coherent DMA). Created on first use; a failure is logged, not fatal.
pub struct KvmVfio {
    vm: Arc<VmFd>,
    fd: Mutex<Option<DeviceFd>>,
}

impl KvmVfio {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            fd: Mutex::new(None),
        }
    }

    fn add(&self, file: std::os::fd::RawFd, bdf: &str) {
        let mut slot = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let mut dev = kvm_create_device {
                type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
                fd: 0,
                flags: 0,
            };
            match self.vm.create_device(&mut dev) {
                Ok(fd) => *slot = Some(fd),
                Err(e) => {
                    tracing::warn!(bdf, "KVM VFIO device: {e}");
                    return;
                }
            }
        }
        let Some(dev) = slot.as_ref() else { return };
        let fd: i32 = file;
        let attr = kvm_device_attr {
            group: kvm_bindings::KVM_DEV_VFIO_FILE,
            attr: u64::from(kvm_bindings::KVM_DEV_VFIO_FILE_ADD),
            addr: &fd as *const i32 as u64,
            flags: 0,
        };
        if let Err(e) = dev.set_device_attr(&attr) {
            tracing::warn!(bdf, "KVM_DEV_VFIO_FILE_ADD: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrio_pci::vfio::DmaMapper;

    /// A host IOMMU context that records (iova, size, host address).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64, u64)>>);

    impl DmaMapper for Recorder {
        fn map(&self, iova: u64, size: u64, host_addr: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().push((iova, size, host_addr));
            Ok(())
        }
        fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
            let mut v = self.0.lock().unwrap();
            let before = v.len();
            v.retain(|&(i, s, _)| (i, s) != (iova, size));
            if v.len() == before {
                return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(())
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn all_ram_at_iova_equal_gpa() {
        let rec = Arc::new(Recorder::default());
        let dma = Mutex::new(DmaMappings::new(rec.clone()));
        let m = mem();
        map_guest_ram(&dma, &m, "0000:01:00.0").unwrap();
        let got = rec.0.lock().unwrap().clone();
        let want: Vec<(u64, u64, u64)> = m
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[1].0, 0x1_0000_0000);
    }

    #[test]
    fn the_mirror_translates_gpa_and_refuses_what_is_not_ram() {
        let rec = Arc::new(Recorder::default());
        let m = mem();
        let mirror = VfioMirror {
            dma: Arc::new(Mutex::new(DmaMappings::new(rec.clone()))),
            mem: m.clone(),
        };
        mirror
            .map(0x8000_0000, 0x2000, 0x1_0000_1000, true)
            .unwrap();
        let host = m.get_host_address(GuestAddress(0x1_0000_1000)).unwrap() as u64;
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            [(0x8000_0000, 0x2000, host)]
        );
        // Past the end of a region, across the hole, in the hole, wrapping: refused.
        for (gpa, size) in [
            (0xff000, 0x2000),
            (0x20_0000, 0x1000),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert!(
                mirror.map(0x9000_0000, size, gpa, true).is_err(),
                "{gpa:#x}+{size:#x}"
            );
        }
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        mirror.unmap(0x8000_0000, 0x2000).unwrap();
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(
            mirror.unmap(0x8000_0000, 0x2000).is_err(),
            "nothing mapped there"
        );
    }
}
