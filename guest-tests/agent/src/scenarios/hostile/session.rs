//! One attacked function in the guest's VFIO no-IOMMU mode: bound to vfio-pci, its
//! `/dev/vfio/noiommu-N` group in a no-IOMMU container, the device fd with bus
//! mastering on, BAR 0 mapped (ferrio puts every virtio structure, the MSI-X table
//! and the PBA there), MSI-X vectors 0 (queues) and 1 (configuration changes) on
//! eventfds, and a 2 MiB huge page whose physical address the device is given: with
//! no IOMMU, bus addresses are guest-physical, so a descriptor can name any address
//! (past RAM, in the MMIO hole) and reach the VMM untranslated.

use std::time::Duration;

use crate::scenarios::vfio::bind;
use crate::sys;
use crate::vfio::uapi::*;
use crate::vfio::{Container, Device, DmaBuffer, EventFd, Group, Mmio};

pub const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// The DMA memory of one session: one huge page.
pub const DMA_LEN: usize = 2 << 20;

/// Turns on VFIO's no-IOMMU mode (before any function is bound to vfio-pci, so that
/// functions without an IOMMU get a no-IOMMU group) and reserves `pages` huge pages.
pub fn prepare(pages: u32) -> Result<String, String> {
    let on = |v: &str| v == "Y" || v == "1";
    let before = sys::read_trimmed(NOIOMMU_PARAM)?;
    if !on(&before) {
        std::fs::write(NOIOMMU_PARAM, "1").map_err(|e| format!("write {NOIOMMU_PARAM}: {e}"))?;
    }
    let after = sys::read_trimmed(NOIOMMU_PARAM)?;
    if !on(&after) {
        return Err(format!("{NOIOMMU_PARAM}: {before} -> {after}"));
    }
    std::fs::write(NR_HUGEPAGES, format!("{pages}\n"))
        .map_err(|e| format!("write {NR_HUGEPAGES}: {e}"))?;
    let got = sys::read_u64(NR_HUGEPAGES)?;
    if got < u64::from(pages) {
        return Err(format!("{NR_HUGEPAGES}: {got} of {pages} huge pages"));
    }
    Ok(format!("noiommu {before} -> {after}, {got} huge pages"))
}

/// The two MSI-X eventfds.
pub struct Irqs {
    pub queue: EventFd,
    pub config: EventFd,
}

impl Irqs {
    fn new() -> Result<Irqs, String> {
        Ok(Irqs {
            queue: EventFd::new()?,
            config: EventFd::new()?,
        })
    }

    /// Waits up to `ms` for either eventfd; returns and resets both counters.
    pub fn poll(&self, ms: i32) -> Result<(u64, u64), String> {
        let mut fds = [self.queue.raw(), self.config.raw()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        let take = |i: usize, fd: &EventFd| {
            if fds[i].revents != 0 {
                fd.wait(0)
            } else {
                Ok(0)
            }
        };
        Ok((take(0, &self.queue)?, take(1, &self.config)?))
    }

    /// Reads and resets both counters without waiting.
    pub fn drain(&self) -> Result<(u64, u64), String> {
        self.poll(0)
    }
}

/// An open function. Fields drop in order: the mapping, then the device fd (MSI-X
/// off by then), the group, the container.
pub struct Session {
    pub bar0: Mmio,
    pub dev: Device,
    pub cfg: Vec<u8>,
    pub irqs: Irqs,
    pub mem: DmaBuffer,
    /// Physical address of `mem`.
    pub phys: u64,
    pub bdf: String,
    _group: Group,
    _container: Container,
}

impl Session {
    /// Binds `bdf` to vfio-pci and opens everything; returns the session and a line
    /// describing it.
    pub fn open(bdf: &str) -> Result<(Session, String), String> {
        let old = bind::bind_vfio(bdf)?;
        let group_id = bind::iommu_group(bdf)?;
        let path = format!("/dev/vfio/noiommu-{group_id}");
        let container = Container::open()?;
        if !container.check_extension(VFIO_NOIOMMU_IOMMU)? {
            return Err("the container has no no-IOMMU extension".into());
        }
        let group = Group::open_path(&path)?;
        let status = group.status()?;
        if status & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!("{path} not viable ({status:#x})"));
        }
        group.set_container(&container)?;
        container.set_iommu(VFIO_NOIOMMU_IOMMU)?;
        let dev = group.device(bdf)?;
        let cfg_region = dev.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cfg = vec![0u8; 256];
        dev.read(&cfg_region, 0, &mut cfg)?;
        let command = dev.enable_bus_master()?;
        let bar0 = dev.map_region(&dev.region(0)?)?;
        let irqs = Irqs::new()?;
        dev.set_irq_eventfds(
            VFIO_PCI_MSIX_IRQ_INDEX,
            0,
            &[irqs.queue.raw(), irqs.config.raw()],
        )?;
        let mem = DmaBuffer::hugetlb(DMA_LEN)?;
        let phys = mem.physical_address()?;
        let text = format!(
            "{bdf}: {old} -> vfio-pci, {path}, command {command:#06x}, BAR 0 mapped \
             ({:#x} bytes), MSI-X 0+1 on eventfds, DMA page at {phys:#x}",
            bar0.len()
        );
        Ok((
            Session {
                bar0,
                dev,
                cfg,
                irqs,
                mem,
                phys,
                bdf: bdf.to_owned(),
                _group: group,
                _container: container,
            },
            text,
        ))
    }

    /// MSI-X off and on again: the guest kernel rewrites vectors 0 and 1 of the table
    /// (and masks the others), whatever an attack left there.
    pub fn rearm_msix(&self) -> Result<(), String> {
        self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)?;
        self.dev.set_irq_eventfds(
            VFIO_PCI_MSIX_IRQ_INDEX,
            0,
            &[self.irqs.queue.raw(), self.irqs.config.raw()],
        )?;
        self.irqs.drain().map(drop)
    }

    /// Memory decoding and bus mastering on again (after raw config-space writes).
    pub fn reenable(&self) -> Result<u16, String> {
        self.dev.enable_bus_master()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX);
    }
}

/// Gives `bdf` back to its kernel driver; returns the driver it got.
pub fn give_back(bdf: &str) -> Result<String, String> {
    let driver = bind::unbind_vfio(bdf)?;
    // The virtio driver probes asynchronously on slow guests: let it settle.
    std::thread::sleep(Duration::from_millis(200));
    Ok(driver)
}
