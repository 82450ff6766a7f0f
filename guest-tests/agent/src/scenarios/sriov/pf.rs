//! The PCI side of the `sriov` scenario: finding the PFs (virtio functions whose
//! extended capability list holds SR-IOV), decoding the capability from sysfs
//! `config`, `sriov_numvfs`, the routing-ID arithmetic that places the VFs, and what
//! sysfs says about a function (links, drivers, IDs, resources, MSI vectors).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::spec;
use crate::sys;

pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// `IORESOURCE_MEM` and `IORESOURCE_MEM_64` (linux/ioport.h).
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// Resource index of VF BAR 0 in a PF's `resource` file (PCI_IOV_RESOURCES).
pub const IOV_RESOURCE: usize = 7;

/// Which PF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Net,
    Blk,
}

impl Kind {
    /// `net` / `blk`: the check-name component.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Blk => "blk",
        }
    }

    /// The PF's (and the VFs') PCI device ID.
    pub fn device_id(self) -> u16 {
        match self {
            Kind::Net => spec::NET_DEVICE_ID,
            Kind::Blk => spec::BLK_DEVICE_ID,
        }
    }

    pub fn virtio_driver(self) -> &'static str {
        match self {
            Kind::Net => "virtio_net",
            Kind::Blk => "virtio_blk",
        }
    }

    /// The sysfs class directory below a virtio device that shows the driver is done
    /// (`net/eth1`, `block/vdb`).
    pub fn class_dir(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Blk => "block",
        }
    }
}

/// The SR-IOV capability's registers (PCIe 6.0, 9.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SriovCap {
    /// Where the capability is in config space.
    pub offset: u16,
    pub initial_vfs: u16,
    pub total_vfs: u16,
    pub num_vfs: u16,
    pub first_vf_offset: u16,
    pub vf_stride: u16,
    pub vf_device: u16,
    pub supported_page_sizes: u32,
    pub system_page_size: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Walks the extended capability list from 0x100 and decodes the SR-IOV capability.
pub fn parse_sriov_cap(config: &[u8]) -> Result<SriovCap, String> {
    if config.len() < 0x104 {
        return Err(format!(
            "config space has {} bytes: no extended space",
            config.len()
        ));
    }
    let mut at = 0x100usize;
    let mut seen = Vec::new();
    // Each capability takes at least 4 bytes: more steps than that is a loop.
    for _ in 0..(config.len() - 0x100) / 4 {
        let header = le32(config, at);
        if header == 0 || header == u32::MAX {
            break;
        }
        let id = (header & 0xffff) as u16;
        let next = ((header >> 20) & 0xffc) as usize;
        if id == spec::SRIOV_CAP_ID {
            if at + 0x40 > config.len() {
                return Err(format!("SR-IOV capability at {at:#x} is cut off"));
            }
            let r = &config[at..at + 0x40];
            return Ok(SriovCap {
                offset: at as u16,
                initial_vfs: le16(r, 0x0c),
                total_vfs: le16(r, 0x0e),
                num_vfs: le16(r, 0x10),
                first_vf_offset: le16(r, 0x14),
                vf_stride: le16(r, 0x16),
                vf_device: le16(r, 0x1a),
                supported_page_sizes: le32(r, 0x1c),
                system_page_size: le32(r, 0x20),
            });
        }
        seen.push(format!("{id:#06x}@{at:#x}"));
        if next == 0 {
            break;
        }
        if next < 0x100 || next + 4 > config.len() {
            return Err(format!("bad next pointer {next:#x} at {at:#x}"));
        }
        at = next;
    }
    Err(format!(
        "no SR-IOV capability (extended capabilities: {})",
        if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.join(" ")
        }
    ))
}

/// The address of VF `index` of the PF at `pf` (`DDDD:BB:SS.F`): routing ID of the
/// PF + First VF Offset + index * VF Stride (PCIe 9.3.3.10/11).
pub fn vf_bdf(pf: &str, first_offset: u16, stride: u16, index: usize) -> Result<String, String> {
    let bad = || format!("bad PCI address {pf:?}");
    let (domain, rest) = pf.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (slot, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
    let (domain, bus, slot, func) = (hex(domain)?, hex(bus)?, hex(slot)?, hex(func)?);
    if bus > 0xff || slot > 0x1f || func > 7 {
        return Err(bad());
    }
    let index = u32::try_from(index).map_err(|_| bad())?;
    let rid = (bus << 8) | (slot << 3) | func;
    let vf = rid + u32::from(first_offset) + u32::from(stride) * index;
    if vf > 0xffff {
        return Err(format!("VF {index} of {pf} is past bus 255"));
    }
    Ok(format!(
        "{domain:04x}:{:02x}:{:02x}.{}",
        vf >> 8,
        (vf >> 3) & 0x1f,
        vf & 7
    ))
}

/// One line of a sysfs `resource` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

impl Resource {
    pub fn len(&self) -> u64 {
        if self.end > self.start {
            self.end - self.start + 1
        } else {
            0
        }
    }

    pub fn mem64(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0 && self.flags & IORESOURCE_MEM_64 != 0
    }

    /// `65536 mem64` / `0 io`: what the host asserts on.
    pub fn describe(&self) -> String {
        let kind = if self.mem64() {
            "mem64"
        } else if self.flags & IORESOURCE_MEM != 0 {
            "mem32"
        } else {
            "other"
        };
        format!("{} {kind}", self.len())
    }
}

/// Line `index` of a sysfs `resource` text (`0xSTART 0xEND 0xFLAGS`).
pub fn parse_resource(text: &str, index: usize) -> Result<Resource, String> {
    let line = text
        .lines()
        .nth(index)
        .ok_or_else(|| format!("no resource line {index}"))?;
    let mut words = line.split_whitespace().map(|w| {
        u64::from_str_radix(w.trim_start_matches("0x"), 16)
            .map_err(|_| format!("bad resource line {line:?}"))
    });
    let mut next = || {
        words
            .next()
            .unwrap_or_else(|| Err(format!("short resource line {line:?}")))
    };
    Ok(Resource {
        start: next()?,
        end: next()?,
        flags: next()?,
    })
}

pub fn dir(bdf: &str) -> PathBuf {
    Path::new(PCI_DEVICES).join(bdf)
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The last component of the target of link `path`.
pub fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok().and_then(|p| file_name(&p))
}

/// Sorted names in a directory (empty when it does not exist).
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The PCI driver bound to `bdf`.
pub fn driver(bdf: &str) -> Option<String> {
    link_name(&dir(bdf).join("driver"))
}

/// `vendor:device` as sysfs shows them (`0x1af4:0x1041`).
pub fn ids(bdf: &str) -> String {
    let d = dir(bdf);
    let f = |n: &str| sys::read_trimmed(d.join(n)).unwrap_or_else(|_| "?".into());
    format!("{}:{}", f("vendor"), f("device"))
}

/// Resource `index` of `bdf` (0-5 BARs, 7.. VF BARs of a PF).
pub fn resource(bdf: &str, index: usize) -> Result<Resource, String> {
    parse_resource(&sys::read(dir(bdf).join("resource"))?, index)
}

/// The whole config space as sysfs gives it (4 KiB for PCIe functions, as root).
pub fn config(bdf: &str) -> Result<Vec<u8>, String> {
    let path = dir(bdf).join("config");
    std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A VF's config header as the function itself answers it: (vendor, device, BAR 0,
/// BAR 1). A VF reads 0xffff for both IDs and 0 for its BARs (PCIe 9.3.4.1).
pub fn config_head(bdf: &str) -> Result<(u16, u16, u32, u32), String> {
    use std::os::unix::fs::FileExt;
    // Only these bytes: every config dword read is a trip through the VMM.
    let path = dir(bdf).join("config");
    let mut c = [0u8; 0x18];
    std::fs::File::open(&path)
        .and_then(|f| f.read_exact_at(&mut c, 0))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((le16(&c, 0), le16(&c, 2), le32(&c, 0x10), le32(&c, 0x14)))
}

/// MSI/MSI-X vectors the driver allocated (`msi_irqs` entries).
pub fn msi_irqs(bdf: &str) -> usize {
    list(&dir(bdf).join("msi_irqs")).len()
}

/// The IOMMU group of `bdf`.
pub fn iommu_group(bdf: &str) -> Result<u32, String> {
    let link = dir(bdf).join("iommu_group");
    link_name(&link)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: no group link", link.display()))
}

/// The virtio device below `bdf` (`virtio3`) and its driver.
pub fn virtio_child(bdf: &str) -> Option<(String, Option<String>)> {
    let virtio = list(&dir(bdf)).into_iter().find(|n| {
        n.strip_prefix("virtio")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    })?;
    let driver = link_name(&dir(bdf).join(&virtio).join("driver"));
    Some((virtio, driver))
}

/// `virtfnN` links of a PF, as (N, target BDF), by N.
pub fn virtfns(pf: &str) -> Vec<(usize, String)> {
    let d = dir(pf);
    let mut found: Vec<(usize, String)> = list(&d)
        .into_iter()
        .filter_map(|n| {
            let index = n.strip_prefix("virtfn")?.parse().ok()?;
            Some((index, link_name(&d.join(&n))?))
        })
        .collect();
    found.sort();
    found
}

/// A PF found at discovery.
#[derive(Debug, Clone)]
pub struct Pf {
    pub kind: Kind,
    pub bdf: String,
    pub cap: SriovCap,
    /// Its virtio device (`virtio0`).
    pub virtio: String,
}

impl Pf {
    /// Where VF `index` must be.
    pub fn vf_bdf(&self, index: usize) -> Result<String, String> {
        vf_bdf(
            &self.bdf,
            self.cap.first_vf_offset,
            self.cap.vf_stride,
            index,
        )
    }

    pub fn attr(&self, name: &str) -> Result<String, String> {
        sys::read_trimmed(dir(&self.bdf).join(name))
    }

    /// `sriov_numvfs` as it reads now.
    pub fn num_vfs(&self) -> Result<u64, String> {
        sys::read_u64(dir(&self.bdf).join("sriov_numvfs"))
    }

    /// Writes `n` to `sriov_numvfs`: the errno and message of a refused write.
    pub fn set_num_vfs(&self, n: usize) -> Result<(), (i32, String)> {
        let path = dir(&self.bdf).join("sriov_numvfs");
        std::fs::write(&path, format!("{n}\n")).map_err(|e| {
            let text = format!("echo {n} > {}: {e}", path.display());
            (e.raw_os_error().unwrap_or(0), text)
        })
    }
}

/// The (first) virtio function of type `kind` with an SR-IOV capability; the error
/// lists the functions of that type without one.
pub fn find_pf(kind: Kind) -> Result<Pf, String> {
    let mut others = Vec::new();
    let want = format!("{:#06x}", kind.device_id());
    let vendor = format!("{:#06x}", spec::VIRTIO_VENDOR);
    for bdf in list(Path::new(PCI_DEVICES)) {
        let d = dir(&bdf);
        if sys::read_trimmed(d.join("vendor")).ok().as_deref() != Some(vendor.as_str())
            || sys::read_trimmed(d.join("device")).ok().as_deref() != Some(want.as_str())
        {
            continue;
        }
        let cap = match config(&bdf).and_then(|c| parse_sriov_cap(&c)) {
            Ok(cap) => cap,
            Err(e) => {
                others.push(format!("{bdf}: {e}"));
                continue;
            }
        };
        let virtio = virtio_child(&bdf)
            .map(|(v, _)| v)
            .ok_or_else(|| format!("{bdf}: no virtio device below it"))?;
        return Ok(Pf {
            kind,
            bdf,
            cap,
            virtio,
        });
    }
    Err(format!(
        "no {want} function with SR-IOV ({})",
        if others.is_empty() {
            "no such function".to_owned()
        } else {
            others.join("; ")
        }
    ))
}

/// Waits until `pf` has exactly `count` `virtfn` links and each VF's virtio device
/// has its driver bound with its class entry (`net/...`, `block/...`) present;
/// returns the VFs' addresses by index.
pub fn wait_vfs(pf: &Pf, count: usize, timeout: Duration) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let links = virtfns(&pf.bdf);
        let ready = links.len() == count
            && links.iter().all(|(_, bdf)| {
                virtio_child(bdf).is_some_and(|(virtio, driver)| {
                    driver.as_deref() == Some(pf.kind.virtio_driver())
                        && !list(&dir(bdf).join(&virtio).join(pf.kind.class_dir())).is_empty()
                })
            });
        if ready && links.iter().enumerate().all(|(i, (n, _))| *n == i) {
            return Ok(links.into_iter().map(|(_, b)| b).collect());
        }
        if Instant::now() >= deadline {
            let state: Vec<String> = links
                .iter()
                .map(|(n, b)| format!("virtfn{n}={b} {}", drivers(b)))
                .collect();
            return Err(format!(
                "{} of {count} VFs ready after {timeout:?}: [{}]",
                links.len(),
                state.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `virtio-pci/virtio_net`: the PCI driver and the virtio driver of `bdf`.
pub fn drivers(bdf: &str) -> String {
    let pci = driver(bdf).unwrap_or_else(|| "none".into());
    let virtio = virtio_child(bdf)
        .and_then(|(_, d)| d)
        .unwrap_or_else(|| "none".into());
    format!("{pci}/{virtio}")
}

/// What is left of the VFs once disabled: `virtfn` links and device directories.
pub fn leftovers(pf: &Pf, vf_bdfs: &[String]) -> Vec<String> {
    let mut left: Vec<String> = virtfns(&pf.bdf)
        .into_iter()
        .map(|(n, b)| format!("virtfn{n}->{b}"))
        .collect();
    left.extend(
        vf_bdfs
            .iter()
            .filter(|b| dir(b).exists())
            .map(|b| format!("{PCI_DEVICES}/{b}")),
    );
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 KiB config space with extended capabilities AER (0x0001) at 0x100 and
    /// SR-IOV at 0x148.
    fn config_with_sriov() -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        let put16 =
            |c: &mut Vec<u8>, at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut c, 0x100, 0x0001 | (1 << 16) | (0x148 << 20));
        let s = 0x148;
        put32(&mut c, s, 0x0010 | (1 << 16));
        put16(&mut c, s + 0x0c, 2);
        put16(&mut c, s + 0x0e, 2);
        put16(&mut c, s + 0x10, 0);
        put16(&mut c, s + 0x14, 1);
        put16(&mut c, s + 0x16, 1);
        put16(&mut c, s + 0x1a, 0x1041);
        put32(&mut c, s + 0x1c, 0x553);
        put32(&mut c, s + 0x20, 1);
        c
    }

    #[test]
    fn finds_the_sriov_capability_along_the_list() {
        let cap = parse_sriov_cap(&config_with_sriov()).unwrap();
        assert_eq!(
            cap,
            SriovCap {
                offset: 0x148,
                initial_vfs: 2,
                total_vfs: 2,
                num_vfs: 0,
                first_vf_offset: 1,
                vf_stride: 1,
                vf_device: 0x1041,
                supported_page_sizes: 0x553,
                system_page_size: 1,
            }
        );
    }

    #[test]
    fn reports_missing_cut_off_and_looping_capabilities() {
        assert!(parse_sriov_cap(&[0u8; 256])
            .unwrap_err()
            .contains("256 bytes"));
        let mut c = config_with_sriov();
        c[0x148..0x14c].copy_from_slice(&0x0002_0001u32.to_le_bytes());
        let e = parse_sriov_cap(&c).unwrap_err();
        assert!(
            e.contains("0x0001@0x100") && e.contains("0x0001@0x148"),
            "{e}"
        );
        // A list that points back to itself ends, with an error.
        let mut c = vec![0u8; 4096];
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | (0x100 << 20)).to_le_bytes());
        assert!(parse_sriov_cap(&c).unwrap_err().contains("no SR-IOV"));
        // A pointer into the standard header is refused.
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | (0x40 << 20)).to_le_bytes());
        assert!(parse_sriov_cap(&c).unwrap_err().contains("bad next"));
        // The capability right at the end of the space is cut off.
        let mut c = vec![0u8; 4096];
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | (0xfe0 << 20)).to_le_bytes());
        c[0xfe0..0xfe4].copy_from_slice(&0x0001_0010u32.to_le_bytes());
        assert!(parse_sriov_cap(&c).unwrap_err().contains("cut off"));
        // All ones: no extended space behind the header.
        let mut c = vec![0u8; 4096];
        c[0x100..0x104].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_sriov_cap(&c).unwrap_err().contains("none"));
    }

    #[test]
    fn places_vfs_by_routing_id() {
        assert_eq!(vf_bdf("0000:00:02.0", 1, 1, 0).unwrap(), "0000:00:02.1");
        assert_eq!(vf_bdf("0000:00:02.0", 1, 1, 1).unwrap(), "0000:00:02.2");
        assert_eq!(vf_bdf("0000:00:1f.0", 8, 2, 3).unwrap(), "0000:01:00.6");
        assert_eq!(vf_bdf("0001:3a:02.0", 0x80, 1, 0).unwrap(), "0001:3a:12.0");
        assert!(vf_bdf("0000:ff:1f.7", 1, 1, 0)
            .unwrap_err()
            .contains("bus 255"));
        assert!(vf_bdf("0000:00:02", 1, 1, 0).is_err());
        assert!(vf_bdf("0000:00:20.0", 1, 1, 0).is_err());
        assert!(vf_bdf("zz:00:02.0", 1, 1, 0).is_err());
    }

    #[test]
    fn parses_resource_lines() {
        let text = "0x00000000fe000000 0x00000000fe00ffff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x000000000000c000 0x000000000000c01f 0x0000000000040101\n";
        let bar0 = parse_resource(text, 0).unwrap();
        assert_eq!(bar0.len(), 65536);
        assert!(bar0.mem64());
        assert_eq!(bar0.describe(), "65536 mem64");
        assert_eq!(parse_resource(text, 1).unwrap().describe(), "0 other");
        assert_eq!(parse_resource(text, 2).unwrap().len(), 32);
        assert!(parse_resource(text, 3).is_err());
        assert!(parse_resource("0x1 0x2\n", 0)
            .unwrap_err()
            .contains("short"));
        assert!(parse_resource("0x1 zz 0x3\n", 0)
            .unwrap_err()
            .contains("bad"));
        let mem32 = Resource {
            start: 0x1000,
            end: 0x1fff,
            flags: IORESOURCE_MEM,
        };
        assert_eq!(mem32.describe(), "4096 mem32");
    }

    /// The sysfs readers against this machine's first PCI function, when it has one.
    #[test]
    fn reads_a_real_functions_sysfs_entries() {
        let Some(bdf) = list(Path::new(PCI_DEVICES)).into_iter().next() else {
            eprintln!("skipping: no PCI functions in {PCI_DEVICES}");
            return;
        };
        let (vendor, device, _, _) = config_head(&bdf).unwrap();
        assert_eq!(ids(&bdf), format!("{vendor:#06x}:{device:#06x}"));
        assert!(config(&bdf).unwrap().len() >= 64);
        assert!(resource(&bdf, 0).is_ok());
        assert!(virtfns(&bdf).iter().all(|(_, b)| b.contains(':')));
        assert!(config_head("0000:ff:1f.9").is_err());
        assert!(iommu_group("0000:ff:1f.9").is_err());
        assert_eq!(drivers("0000:ff:1f.9"), "none/none");
    }

    #[test]
    fn kinds() {
        assert_eq!(Kind::Net.device_id(), 0x1041);
        assert_eq!(Kind::Blk.virtio_driver(), "virtio_blk");
        assert_eq!(Kind::Blk.class_dir(), "block");
        assert_eq!([Kind::Net, Kind::Blk].map(Kind::name), ["net", "blk"]);
    }
}
