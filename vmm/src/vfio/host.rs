//! What the host must offer before a PCI function can be passed through, checked in
//! the order a user fixes it, each failure one line that says how: the path is a PCI
//! function, it is bound to vfio-pci, it has an IOMMU group (the host has an IOMMU),
//! every other function of that group is bound to vfio-pci (or pci-stub, or nothing,
//! or is a bridge), and the group node (or the device cdev) is there and accessible.
//!
//! The sysfs and /dev roots are parameters ([`HostPaths`]) so the checks run against a
//! fake tree in tests.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::VfioBackendChoice;

/// Where sysfs and /dev are (`/sys` and `/dev` on a real host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

/// The VFIO interface chosen for a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Container + group: the group node.
    Group(PathBuf),
    /// iommufd + the device cdev.
    Cdev(PathBuf),
}

/// A host function that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFunction {
    /// `DDDD:BB:DD.F`.
    pub bdf: String,
    /// Its sysfs directory (the path given, as given).
    pub sysfs: PathBuf,
    /// IOMMU group number (`noiommu-N` groups: the number).
    pub group: u32,
    pub backend: Backend,
}

/// Why a function cannot be passed through (each a one-line message with the fix).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("{0}: not a PCI function (expected /sys/bus/pci/devices/DDDD:BB:DD.F)")]
    NotPci(PathBuf),
    #[error("{bdf} is bound to {driver}, not vfio-pci; hand it over with: echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe")]
    WrongDriver { bdf: String, driver: String },
    #[error("{bdf} is bound to no driver; bind it to vfio-pci with: echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe")]
    NoDriver { bdf: String },
    #[error("{bdf} has no IOMMU group: the host has no IOMMU enabled (boot it with intel_iommu=on or amd_iommu=on), or use vfio's enable_unsafe_noiommu_mode=1 (no DMA isolation)")]
    NoIommu { bdf: String },
    #[error("IOMMU group {group} of {bdf} is not viable: {others} must be bound to vfio-pci too (or have no driver)")]
    NotViable {
        bdf: String,
        group: u32,
        others: String,
    },
    #[error("{0} does not exist (is vfio-pci loaded and the function bound to it?)")]
    NoNode(PathBuf),
    #[error(
        "no permission to open {0} read-write: run ferrio as root or give this user access to it"
    )]
    Permission(PathBuf),
    #[error("backend=cdev: {bdf} has no VFIO device cdev (needs /dev/iommu and /dev/vfio/devices/, a kernel with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV)")]
    NoCdev { bdf: String },
}

/// Whether `s` is a PCI address `DDDD:BB:DD.F`.
fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// The last component of the symlink at `link`, if it is one.
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Drivers that leave an IOMMU group viable for VFIO (besides none at all).
const VIABLE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// Whether the calling process may open `path` read-write.
fn accessible(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// Checks that the function at `path` can be passed through with `choice`.
pub fn check(
    path: &Path,
    choice: VfioBackendChoice,
    host: &HostPaths,
) -> Result<HostFunction, HostError> {
    let bdf = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| is_bdf(n) && path.join("config").is_file())
        .ok_or_else(|| HostError::NotPci(path.to_path_buf()))?;
    match link_name(&path.join("driver")) {
        Some(d) if d == "vfio-pci" => {}
        Some(driver) => return Err(HostError::WrongDriver { bdf, driver }),
        None => return Err(HostError::NoDriver { bdf }),
    }
    let group_name =
        link_name(&path.join("iommu_group")).ok_or(HostError::NoIommu { bdf: bdf.clone() })?;
    let group: u32 = group_name
        .parse()
        .map_err(|_| HostError::NoIommu { bdf: bdf.clone() })?;
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path.join("iommu_group").join("devices")) {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| *n != bdf)
            .collect();
        names.sort();
        for other in names {
            let dir = path.join("iommu_group").join("devices").join(&other);
            if let Some(d) = link_name(&dir.join("driver")) {
                if !VIABLE_DRIVERS.contains(&d.as_str()) {
                    others.push(format!("{other} (bound to {d})"));
                }
            }
        }
    }
    if !others.is_empty() {
        return Err(HostError::NotViable {
            bdf,
            group,
            others: others.join(", "),
        });
    }
    let cdev = std::fs::read_dir(path.join("vfio-dev")).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio"))
    });
    let cdev_node = cdev
        .map(|n| host.dev.join("vfio/devices").join(n))
        .filter(|p| p.exists() && host.dev.join("iommu").exists());
    let node = match (choice, cdev_node) {
        (VfioBackendChoice::Cdev, None) => return Err(HostError::NoCdev { bdf }),
        (VfioBackendChoice::Cdev | VfioBackendChoice::Auto, Some(p)) => Backend::Cdev(p),
        (VfioBackendChoice::Group | VfioBackendChoice::Auto, _) => {
            let plain = host.dev.join("vfio").join(group.to_string());
            let noiommu = host.dev.join("vfio").join(format!("noiommu-{group}"));
            Backend::Group(if noiommu.exists() { noiommu } else { plain })
        }
    };
    let (Backend::Group(p) | Backend::Cdev(p)) = &node;
    if !p.exists() {
        return Err(HostError::NoNode(p.clone()));
    }
    if !accessible(p) {
        return Err(HostError::Permission(p.clone()));
    }
    Ok(HostFunction {
        bdf,
        sysfs: path.to_path_buf(),
        group,
        backend: node,
    })
}

#[cfg(test)]
mod tests;
