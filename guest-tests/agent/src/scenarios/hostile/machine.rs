//! The machine the host built for the `hostile` scenario, as the guest finds it: the
//! PCI functions by role (disks by their virtio-blk serial, the NIC and the IOMMU by
//! device id), where RAM ends (/proc/iomem) and where the ECAM windows are (the ACPI
//! MCFG table), so the attacks can aim just past RAM and into the MMIO hole.

use std::path::Path;

use super::spec;
use crate::sys;
use crate::vfio::pci::{u16_at, u64_at};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_NET: u16 = 0x1041;
const VIRTIO_IOMMU: u16 = 0x1057;
/// Where the MCFG entries start (ACPI header 36 bytes + 8 reserved) and their size.
const MCFG_ENTRIES: usize = 44;
const MCFG_ENTRY_LEN: usize = 16;

/// One ECAM window (an MCFG allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecam {
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// A virtio-blk function and the disk the kernel made of it.
#[derive(Debug, Clone)]
pub struct Disk {
    pub bdf: String,
    pub name: String,
}

/// Everything the attacks aim at.
#[derive(Debug, Clone)]
pub struct Machine {
    pub bystander: Disk,
    pub victim_blk: Disk,
    pub endpoint: Disk,
    pub victim_net: String,
    pub iommu: String,
    /// One past the highest guest-physical RAM address.
    pub ram_end: u64,
    pub ecam: Vec<Ecam>,
}

impl Machine {
    /// Finds every part, or says what is missing.
    pub fn find() -> Result<Machine, String> {
        let machine = Machine {
            bystander: disk(spec::BYSTANDER_SERIAL, spec::BYSTANDER_LEN)?,
            victim_blk: disk(spec::VICTIM_SERIAL, spec::VICTIM_LEN)?,
            endpoint: disk(spec::ENDPOINT_SERIAL, spec::ENDPOINT_LEN)?,
            victim_net: function(VIRTIO_NET)?,
            iommu: function(VIRTIO_IOMMU)?,
            ram_end: ram_end(&sys::read("/proc/iomem")?)?,
            ecam: parse_mcfg(
                &std::fs::read("/sys/firmware/acpi/tables/MCFG")
                    .map_err(|e| format!("read the MCFG table: {e}"))?,
            )?,
        };
        Ok(machine)
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        let ecam: Vec<String> = self
            .ecam
            .iter()
            .map(|e| {
                format!(
                    "seg {} buses {}-{} at {:#x}",
                    e.segment, e.start_bus, e.end_bus, e.base
                )
            })
            .collect();
        format!(
            "bystander {} ({}), victim blk {} ({}), endpoint {} ({}), victim net {}, \
             iommu {}; RAM ends at {:#x}; ECAM {}",
            self.bystander.bdf,
            self.bystander.name,
            self.victim_blk.bdf,
            self.victim_blk.name,
            self.endpoint.bdf,
            self.endpoint.name,
            self.victim_net,
            self.iommu,
            self.ram_end,
            ecam.join(", ")
        )
    }

    /// The ECAM window of segment 0.
    pub fn ecam0(&self) -> Result<Ecam, String> {
        self.ecam
            .iter()
            .find(|e| e.segment == 0)
            .copied()
            .ok_or_else(|| "no ECAM window for segment 0".into())
    }
}

/// The virtio-blk disk with this serial (and `len` bytes) and its PCI function.
pub fn disk(serial: &str, len: u64) -> Result<Disk, String> {
    let mut seen = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("read /sys/block: {e}"))?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    for name in names {
        let got = sys::read_trimmed(crate::disk::sysfs_dir(&name).join("serial"))?;
        if got == serial {
            let size = sys::read_u64(crate::disk::sysfs_dir(&name).join("size"))? * 512;
            if size != len {
                return Err(format!("{name} ({serial}) has {size} bytes, not {len}"));
            }
            let (bdf, _) = crate::disk::pci_function(&name)?;
            return Ok(Disk { bdf, name });
        }
        seen.push(format!("{name}={got:?}"));
    }
    Err(format!(
        "no disk with serial {serial:?} ({})",
        seen.join(" ")
    ))
}

/// The only PCI function with this virtio device id.
fn function(device: u16) -> Result<String, String> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(PCI_DEVICES).map_err(|e| format!("read {PCI_DEVICES}: {e}"))?;
    for entry in entries.flatten() {
        let dir = entry.path();
        let id = |f: &str| sys::read_u64(dir.join(f)).ok();
        if id("vendor") == Some(u64::from(VIRTIO_VENDOR)) && id("device") == Some(device.into()) {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "{} functions {VIRTIO_VENDOR:04x}:{device:04x}: {found:?}",
            found.len()
        )),
    }
}

/// One past the end of the highest "System RAM" range of /proc/iomem.
pub fn ram_end(iomem: &str) -> Result<u64, String> {
    iomem
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(": System RAM"))
        .filter_map(|l| {
            let (range, _) = l.split_once(" : ")?;
            let (_, end) = range.split_once('-')?;
            u64::from_str_radix(end.trim(), 16).ok()
        })
        .max()
        .map(|end| end + 1)
        .ok_or_else(|| "no System RAM in /proc/iomem (not root?)".into())
}

/// The allocations of an ACPI MCFG table.
pub fn parse_mcfg(table: &[u8]) -> Result<Vec<Ecam>, String> {
    if table.get(0..4) != Some(b"MCFG") {
        return Err("not an MCFG table".into());
    }
    let len = u32::from_le_bytes(
        table
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("short MCFG")?,
    ) as usize;
    let body = table.get(MCFG_ENTRIES..len.min(table.len())).unwrap_or(&[]);
    let ecam: Vec<Ecam> = body
        .chunks_exact(MCFG_ENTRY_LEN)
        .filter_map(|e| {
            Some(Ecam {
                base: u64_at(e, 0)?,
                segment: u16_at(e, 8)?,
                start_bus: e[10],
                end_bus: e[11],
            })
        })
        .collect();
    if ecam.is_empty() {
        return Err("MCFG has no allocation".into());
    }
    Ok(ecam)
}

/// The guest-physical address of BAR `index` of function `bdf` (sysfs `resource`).
pub fn bar_address(bdf: &str, index: usize) -> Result<u64, String> {
    let path = Path::new(PCI_DEVICES).join(bdf).join("resource");
    let text = sys::read(&path)?;
    let line = text
        .lines()
        .nth(index)
        .ok_or_else(|| format!("{}: no line {index}", path.display()))?;
    let start = line.split_whitespace().next().unwrap_or("");
    u64::from_str_radix(start.trim_start_matches("0x"), 16)
        .map_err(|e| format!("{}: {line:?}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_end_is_the_top_of_the_highest_system_ram_range() {
        let iomem = "00000000-00000fff : Reserved\n\
                     00001000-0009ffff : System RAM\n\
                     00100000-1fffffff : System RAM\n\
                     \x20 01000000-01ffffff : Kernel code\n\
                     e0000000-efffffff : PCI MMCONFIG 0000 [bus 00-ff]\n";
        assert_eq!(ram_end(iomem), Ok(0x2000_0000));
        assert!(ram_end("00000000-00000fff : Reserved\n").is_err());
    }

    #[test]
    fn mcfg_allocations() {
        let mut t = vec![0u8; 44 + 16];
        t[0..4].copy_from_slice(b"MCFG");
        t[4..8].copy_from_slice(&60u32.to_le_bytes());
        t[44..52].copy_from_slice(&0xe000_0000u64.to_le_bytes());
        t[52..54].copy_from_slice(&0u16.to_le_bytes());
        t[54] = 0;
        t[55] = 0xff;
        let e = parse_mcfg(&t).unwrap();
        assert_eq!(
            e,
            [Ecam {
                base: 0xe000_0000,
                segment: 0,
                start_bus: 0,
                end_bus: 0xff
            }]
        );
        assert!(parse_mcfg(&t[..44]).is_err());
        assert!(parse_mcfg(b"APIC").is_err());
    }
}
