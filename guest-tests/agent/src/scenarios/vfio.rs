//! Scenario `vfio-in-guest`: the guest's own VFIO stack (vfio-pci, type1 IOMMU) on top
//! of the VMM's virtio-iommu, driven from user space with raw ioctls.
//!
//! The host attaches a small virtio-blk disk with serial [`SERIAL`] behind the IOMMU,
//! filled with data only it knows. The agent records what the kernel's driver saw
//! of it (size, queues, config space, block 0 read with O_DIRECT), moves the PCI
//! function to vfio-pci, opens its group, checks it is viable, sets up a type1v2
//! container, maps a 64 KiB anonymous buffer at an IOVA above guest RAM, inspects
//! the device (config region, virtio structures, BARs, MSI-X), enables MSI-X vector
//! 0 on an eventfd and fires it by loopback, then drives the disk with a minimal
//! user-space virtio-blk driver whose queue and buffers live at that IOVA: a 4 KiB
//! write at byte 4096, a read of block 0 and a read-back, each completed with an
//! MSI-X interrupt on the eventfd. Then MSI-X off, device reset, unmap (checking the
//! unmapped size), and the function goes back to virtio-pci, where the kernel's
//! driver must read what the user-space driver wrote.

pub(crate) mod bind;
mod device;
mod userblk;
pub mod usernet;
pub(crate) mod virtio;

use std::time::Duration;

use crate::disk::{self, AlignedBuf};
use crate::pattern;
use crate::report::Reporter;
use crate::vfio::pci::pick_iova;
use crate::vfio::uapi::*;
use crate::vfio::{Container, DmaBuffer, Group};

/// The virtio-blk serial of the disk the host sets aside for VFIO.
pub const SERIAL: &str = "ferrio-vfio";
const DMA_LEN: usize = 64 << 10;
/// IOVAs to try, in order: above any test guest's RAM first (a VMM that ignored the
/// translation would then fault instead of hitting guest RAM by luck).
const IOVA_CANDIDATES: [u64; 3] = [32 << 30, 1 << 30, 1 << 20];
const UNSAFE_INTERRUPTS: &str = "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts";

pub fn run(r: &mut Reporter) {
    let target = match bind::find_target(SERIAL) {
        Ok(t) => t,
        Err(e) => return r.check("vfio_target", false, e),
    };
    r.check(
        "vfio_target",
        true,
        format!(
            "{} {} {} group {} size {} queues {} msi_irqs {}",
            target.disk,
            target.bdf,
            target.virtio,
            target.group,
            target.info.size_bytes,
            target.info.mq_queues,
            target.msi_irqs
        ),
    );
    let kernel_fnv = read_block(&target.disk, 0);
    r.check(
        "vfio_kernel_read_fnv",
        kernel_fnv.is_ok(),
        kernel_fnv.clone().unwrap_or_else(|e| e),
    );
    unsafe_interrupts(r);
    match bind::bind_vfio(&target.bdf) {
        Ok(old) => r.check("vfio_bind", true, format!("{old} -> vfio-pci")),
        Err(e) => return r.check("vfio_bind", false, e),
    }
    let written = session(r, &target, kernel_fnv.ok().as_deref());
    give_back(r, &target, written.as_deref());
}

/// 4 KiB of disk `name` at `offset`, read with O_DIRECT through the kernel's driver.
fn read_block(name: &str, offset: u64) -> Result<String, String> {
    let file = disk::open(&format!("/dev/{name}"), false, true)?;
    let mut buf = AlignedBuf::new(userblk::SLOT_LEN);
    disk::read_at(&file, buf.as_mut_slice(), offset)?;
    Ok(pattern::fnv1a(buf.as_slice()))
}

/// virtio-iommu cannot isolate MSIs (no interrupt remapping), so type1 refuses the
/// group unless unsafe interrupts are allowed. Reports the value before and after.
fn unsafe_interrupts(r: &mut Reporter) {
    let before = crate::sys::read_trimmed(UNSAFE_INTERRUPTS).unwrap_or_else(|e| e);
    if before == "Y" || before == "1" {
        return r.check("vfio_unsafe_interrupts", true, format!("already {before}"));
    }
    let set = std::fs::write(UNSAFE_INTERRUPTS, "1").map_err(|e| e.to_string());
    let after = crate::sys::read_trimmed(UNSAFE_INTERRUPTS).unwrap_or_else(|e| e);
    r.check(
        "vfio_unsafe_interrupts",
        set.is_ok() && (after == "Y" || after == "1"),
        format!("{before} -> {after} {}", set.err().unwrap_or_default()),
    );
}

/// Container, group and DMA mapping around [`device::run`]. Returns the FNV of the
/// block written through VFIO, if the write completed.
fn session(r: &mut Reporter, target: &bind::Target, kernel_fnv: Option<&str>) -> Option<String> {
    let container = match Container::open() {
        Ok(c) => c,
        Err(e) => {
            r.check("vfio_api_version", false, e);
            return None;
        }
    };
    match container.api_version() {
        Ok(v) => r.check("vfio_api_version", v == VFIO_API_VERSION, i64::from(v)),
        Err(e) => r.check("vfio_api_version", false, e),
    }
    let type1v2 = container.check_extension(VFIO_TYPE1V2_IOMMU);
    r.check("vfio_type1v2", type1v2 == Ok(true), format!("{type1v2:?}"));
    let group = match Group::open(target.group) {
        Ok(g) => g,
        Err(e) => {
            r.check("vfio_group_viable", false, e);
            return None;
        }
    };
    let status = group.status();
    let viable = status
        .as_ref()
        .is_ok_and(|f| f & VFIO_GROUP_FLAGS_VIABLE != 0);
    r.check(
        "vfio_group_viable",
        viable,
        format!("/dev/vfio/{} {status:?}", target.group),
    );
    if !viable {
        return None;
    }
    let attached = group
        .set_container(&container)
        .and_then(|()| group.status());
    let set = attached
        .as_ref()
        .is_ok_and(|f| f & VFIO_GROUP_FLAGS_CONTAINER_SET != 0);
    r.check("vfio_set_container", set, format!("{attached:?}"));
    if !set {
        return None;
    }
    if let Err(e) = container.set_iommu(VFIO_TYPE1V2_IOMMU) {
        r.check("vfio_set_iommu", false, e);
        return None;
    }
    r.check("vfio_set_iommu", true, "type1v2");
    let written = mapped(r, &container, &group, target, kernel_fnv);
    r.check_result(
        "vfio_unset_container",
        group.unset_container().map(|()| "ok"),
    );
    written
}

/// IOMMU info, the DMA buffer mapped around the device part, and the unmap.
fn mapped(
    r: &mut Reporter,
    container: &Container,
    group: &Group,
    target: &bind::Target,
    kernel_fnv: Option<&str>,
) -> Option<String> {
    let info = match container.iommu_info() {
        Ok(i) => i,
        Err(e) => {
            r.check("vfio_iommu_info", false, e);
            return None;
        }
    };
    r.check(
        "vfio_iommu_pgsizes",
        info.flags & VFIO_IOMMU_INFO_PGSIZES != 0 && info.pgsizes & 0x1000 != 0,
        format!("{:#x}", info.pgsizes),
    );
    let ranges: Vec<String> = info
        .ranges
        .iter()
        .map(|(s, e)| format!("{s:#x}-{e:#x}"))
        .collect();
    r.check("vfio_iova_ranges", !ranges.is_empty(), ranges.join(" "));
    let Some(iova) = pick_iova(
        &info.ranges,
        &IOVA_CANDIDATES,
        DMA_LEN as u64,
        DMA_LEN as u64,
    ) else {
        r.check("vfio_map_dma", false, "no IOVA range fits 64 KiB");
        return None;
    };
    let buf = match DmaBuffer::new(DMA_LEN) {
        Ok(b) => b,
        Err(e) => {
            r.check("vfio_map_dma", false, e);
            return None;
        }
    };
    if let Err(e) = container.map_dma(buf.addr(), iova, DMA_LEN as u64) {
        r.check("vfio_map_dma", false, e);
        return None;
    }
    r.check(
        "vfio_map_dma",
        true,
        format!(
            "{DMA_LEN} bytes at iova {iova:#x} (vaddr {:#x}, first page at gpa {})",
            buf.addr(),
            physical(buf.addr()).map_or_else(|e| e, |p| format!("{p:#x}"))
        ),
    );
    let result = match group.device(&target.bdf) {
        Ok(dev) => device::run(r, &dev, target, &buf, iova, kernel_fnv),
        Err(e) => {
            r.check("vfio_device_fd", false, e);
            device::IoResult::default()
        }
    };
    // The device fd is closed: nothing can DMA into the buffer any more.
    match container.unmap_dma(iova, DMA_LEN as u64) {
        Ok(n) => r.check("vfio_unmap_dma", n == DMA_LEN as u64, n),
        Err(e) => r.check("vfio_unmap_dma", false, e),
    }
    result.written_fnv
}

/// The guest-physical address of the page at user address `vaddr` (root may read
/// PFNs from /proc/self/pagemap): shows that the IOVA is not the physical address.
fn physical(vaddr: u64) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, vaddr / 4096 * 8)
        .map_err(|e| e.to_string())?;
    let entry = u64::from_le_bytes(entry);
    if entry & (1 << 63) == 0 {
        return Err("not present".into());
    }
    Ok((entry & ((1 << 55) - 1)) * 4096)
}

/// Gives the function back to virtio-pci and reads, through the kernel's driver,
/// the block the user-space driver wrote.
fn give_back(r: &mut Reporter, target: &bind::Target, written: Option<&str>) {
    match bind::unbind_vfio(&target.bdf) {
        Ok(d) => r.check("vfio_rebind", d == "virtio-pci", d),
        Err(e) => return r.check("vfio_rebind", false, e),
    }
    let name = match bind::wait_for_disk(&target.bdf, SERIAL, Duration::from_secs(60)) {
        Ok(n) => n,
        Err(e) => return r.check("vfio_rebind_disk", false, e),
    };
    r.check("vfio_rebind_disk", true, name.as_str());
    let offset = device::WRITE_SECTOR * userblk::SECTOR;
    let got = read_block(&name, offset);
    let ok = written.is_some() && got.as_deref().ok() == written;
    r.check("vfio_rebind_read_fnv", ok, got.unwrap_or_else(|e| e));
}
