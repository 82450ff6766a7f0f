//! `--device path=/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=on][,slot=N][,backend=group|cdev]`
//! (a host PCI function passed through with VFIO). Repeatable; the spelling Cloud
//! Hypervisor users know. The host-side checks (bound to vfio-pci, IOMMU group viable,
//! permissions) happen when the VM is built, in `crate::vfio::host`.

use std::path::PathBuf;

use super::disk::{bad, on_off, parse_slot};
use super::ConfigError;

/// Which VFIO interface opens the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VfioBackendChoice {
    /// The device cdev + iommufd when the host has them (/dev/iommu and
    /// /dev/vfio/devices/vfioN), else the legacy container/group.
    #[default]
    Auto,
    /// The legacy container + group (type1v2 IOMMU).
    Group,
    /// iommufd + the VFIO device cdev.
    Cdev,
}

/// One passed-through host PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Its sysfs directory.
    pub path: PathBuf,
    /// Behind the virtio-iommu (needs `--iommu`): the guest's MAP/UNMAP requests for it
    /// become VFIO DMA maps; without it all guest RAM is mapped at start.
    pub iommu: bool,
    pub slot: Option<u8>,
    pub backend: VfioBackendChoice,
}

/// Parses one `--device` spec (no host checks).
pub fn parse_device(spec: &str) -> Result<DeviceConfig, ConfigError> {
    let mut d = DeviceConfig {
        path: PathBuf::new(),
        iommu: false,
        slot: None,
        backend: VfioBackendChoice::Auto,
    };
    for opt in spec.split(',') {
        let Some((key, v)) = opt.split_once('=') else {
            return Err(bad(spec, format!("expected key=value, got `{opt}`")));
        };
        match key {
            "path" => d.path = v.into(),
            "iommu" => d.iommu = on_off(spec, key, v)?,
            "slot" => d.slot = Some(parse_slot(spec, v)?),
            "backend" => {
                d.backend = match v {
                    "group" => VfioBackendChoice::Group,
                    "cdev" => VfioBackendChoice::Cdev,
                    "auto" => VfioBackendChoice::Auto,
                    _ => return Err(bad(spec, "backend must be group, cdev or auto")),
                }
            }
            _ => return Err(bad(spec, format!("unknown option `{opt}`"))),
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err(bad(
            spec,
            "path=/sys/bus/pci/devices/DDDD:BB:DD.F is required",
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let d = parse_device("path=/sys/bus/pci/devices/0000:01:00.1").unwrap();
        assert_eq!(d.path, PathBuf::from("/sys/bus/pci/devices/0000:01:00.1"));
        assert_eq!(
            (d.iommu, d.slot, d.backend),
            (false, None, VfioBackendChoice::Auto)
        );
        let d = parse_device("path=/x,iommu=on,slot=7,backend=cdev").unwrap();
        assert_eq!(
            (d.iommu, d.slot, d.backend),
            (true, Some(7), VfioBackendChoice::Cdev)
        );
        assert_eq!(
            parse_device("backend=group,path=/x").unwrap().backend,
            VfioBackendChoice::Group
        );
    }

    #[test]
    fn bad_specs() {
        for (spec, why) in [
            (
                "iommu=on",
                "path=/sys/bus/pci/devices/DDDD:BB:DD.F is required",
            ),
            (
                "path=",
                "path=/sys/bus/pci/devices/DDDD:BB:DD.F is required",
            ),
            (
                "path=/x,backend=vfio",
                "backend must be group, cdev or auto",
            ),
            (
                "path=/x,slot=0",
                "slot must be 1..=31 (0 is the host bridge)",
            ),
            ("path=/x,iommu=yes", "iommu must be on or off"),
            ("path=/x,mac=1", "unknown option `mac=1`"),
            ("path=/x,nokey", "expected key=value, got `nokey`"),
        ] {
            let e = parse_device(spec).unwrap_err().to_string();
            assert!(e.ends_with(why), "{spec}: {e}");
        }
    }
}
