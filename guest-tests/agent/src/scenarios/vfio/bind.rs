//! sysfs side of the VFIO scenarios: finding the disk the host set aside (by its
//! virtio-blk serial), what the kernel's driver saw of it, the net interface of a
//! virtio-net function, the type1 `allow_unsafe_interrupts` switch, and moving a PCI
//! function between drivers (`driver/unbind`, `driver_override`, `drivers/X/bind`,
//! `drivers_probe`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::disk::{self, DiskInfo};
use crate::sys;

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const UNSAFE_INTERRUPTS: &str = "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts";

/// The disk handed to VFIO, as the kernel's virtio_blk driver saw it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Block device name (`vdb`).
    pub disk: String,
    /// PCI function (`0000:00:04.0`) and virtio device (`virtio2`).
    pub bdf: String,
    pub virtio: String,
    pub info: DiskInfo,
    pub group: u32,
    /// The first 256 bytes of sysfs `config`.
    pub config: Vec<u8>,
    /// MSI vectors the virtio driver had allocated (`msi_irqs` entries).
    pub msi_irqs: usize,
}

pub fn pci_dir(bdf: &str) -> PathBuf {
    Path::new(PCI_DEVICES).join(bdf)
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The driver bound to PCI function `bdf`, if any.
pub fn driver(bdf: &str) -> Option<String> {
    std::fs::read_link(pci_dir(bdf).join("driver"))
        .ok()
        .and_then(|p| file_name(&p))
}

/// The IOMMU group number of PCI function `bdf`.
pub fn iommu_group(bdf: &str) -> Result<u32, String> {
    let link = pci_dir(bdf).join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    file_name(&target)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: bad target {}", link.display(), target.display()))
}

/// The virtio-blk disks (`vd*`) in name order.
fn disks() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The disk whose serial is `serial`, with everything the checks compare later.
pub fn find_target(serial: &str) -> Result<Target, String> {
    let mut seen = Vec::new();
    for name in disks() {
        let info = DiskInfo::read(&disk::sysfs_dir(&name))?;
        if info.serial != serial {
            seen.push(format!("{name}={:?}", info.serial));
            continue;
        }
        let (bdf, virtio) = disk::pci_function(&name)?;
        let config_path = pci_dir(&bdf).join("config");
        let mut config =
            std::fs::read(&config_path).map_err(|e| format!("{}: {e}", config_path.display()))?;
        config.truncate(256);
        let msi_irqs = std::fs::read_dir(pci_dir(&bdf).join("msi_irqs")).map_or(0, |d| d.count());
        return Ok(Target {
            group: iommu_group(&bdf)?,
            disk: name,
            bdf,
            virtio,
            info,
            config,
            msi_irqs,
        });
    }
    Err(format!(
        "no disk with serial {serial:?} (disks: {})",
        seen.join(" ")
    ))
}

fn write_attr(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// Unbinds `bdf` from its driver (if any) and binds it to `vfio-pci` through
/// `driver_override`. Returns the driver it had.
pub fn bind_vfio(bdf: &str) -> Result<String, String> {
    let dir = pci_dir(bdf);
    let old = driver(bdf).unwrap_or_else(|| "none".into());
    if old != "none" {
        write_attr(&dir.join("driver/unbind"), bdf)?;
    }
    write_attr(&dir.join("driver_override"), "vfio-pci")?;
    write_attr(Path::new("/sys/bus/pci/drivers/vfio-pci/bind"), bdf)?;
    match driver(bdf) {
        Some(d) if d == "vfio-pci" => Ok(old),
        other => Err(format!("after bind the driver is {other:?}")),
    }
}

/// Gives `bdf` back to its normal driver: clears `driver_override`, unbinds it from
/// vfio-pci and asks the PCI core to probe it. Returns the driver it got.
pub fn unbind_vfio(bdf: &str) -> Result<String, String> {
    let dir = pci_dir(bdf);
    write_attr(&dir.join("driver_override"), "\n")?;
    if driver(bdf).is_some() {
        write_attr(&dir.join("driver/unbind"), bdf)?;
    }
    write_attr(Path::new("/sys/bus/pci/drivers_probe"), bdf)?;
    driver(bdf).ok_or_else(|| "no driver after drivers_probe".into())
}

/// Waits (up to `timeout`) for a disk with serial `serial` to appear on PCI function
/// `bdf`; returns its name.
pub fn wait_for_disk(bdf: &str, serial: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        for name in disks() {
            let on_bdf = disk::pci_function(&name).is_ok_and(|(b, _)| b == bdf);
            let serial_ok =
                sys::read_trimmed(disk::sysfs_dir(&name).join("serial")).is_ok_and(|s| s == serial);
            if on_bdf && serial_ok {
                return Ok(name);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no disk with serial {serial:?} on {bdf} after {timeout:?} (driver {:?})",
                driver(bdf)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The net interface under a PCI function's sysfs directory `dir`
/// (`virtioN/net/<name>`), if the virtio_net driver created one.
fn net_ifname_in(dir: &Path) -> Option<String> {
    let mut virtio: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .map(|e| e.path().join("net"))
        .collect();
    virtio.sort();
    virtio.iter().find_map(|net| {
        let mut names: Vec<String> = std::fs::read_dir(net)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.into_iter().next()
    })
}

/// The net interface of virtio-net PCI function `bdf`, if it has one.
pub fn net_ifname(bdf: &str) -> Option<String> {
    net_ifname_in(&pci_dir(bdf))
}

/// Waits (up to `timeout`) for virtio-net function `bdf` to get a net interface;
/// returns its name.
pub fn wait_for_netdev(bdf: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(name) = net_ifname(bdf) {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no net interface on {bdf} after {timeout:?} (driver {:?})",
                driver(bdf)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// virtio-iommu cannot isolate MSIs (no interrupt remapping), so type1 refuses a
/// group unless unsafe interrupts are allowed: allows them. Returns whether they are
/// allowed now and what the parameter said before and after.
pub fn allow_unsafe_interrupts() -> (bool, String) {
    let on = |v: &str| v == "Y" || v == "1";
    let before = sys::read_trimmed(UNSAFE_INTERRUPTS).unwrap_or_else(|e| e);
    if on(&before) {
        return (true, format!("already {before}"));
    }
    let set = std::fs::write(UNSAFE_INTERRUPTS, "1").map_err(|e| e.to_string());
    let after = sys::read_trimmed(UNSAFE_INTERRUPTS).unwrap_or_else(|e| e);
    (
        set.is_ok() && on(&after),
        format!("{before} -> {after} {}", set.err().unwrap_or_default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_net_interface_of_a_virtio_function() {
        let dir = std::env::temp_dir().join(format!("ferrio-bind-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("msi_irqs")).unwrap();
        assert_eq!(net_ifname_in(&dir), None);
        std::fs::create_dir_all(dir.join("virtio3/net")).unwrap();
        assert_eq!(net_ifname_in(&dir), None, "net/ without an interface");
        std::fs::create_dir_all(dir.join("virtio3/net/eth1/queues")).unwrap();
        assert_eq!(net_ifname_in(&dir).as_deref(), Some("eth1"));
        assert_eq!(net_ifname_in(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
