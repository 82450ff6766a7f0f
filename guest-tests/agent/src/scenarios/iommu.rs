//! Scenario `iommu`: the guest's virtio_iommu driver (found through the ACPI VIOT)
//! against the VMM's virtio-iommu, with every virtio device behind it and the host
//! adding `iommu.strict=1` to the command line (every unmap is invalidated at once).
//!
//! Reports the virtio-iommu device and its driver, the IOMMU's sysfs class entry
//! and the endpoints linked to it, every IOMMU group with its devices (PCI IDs, PCI
//! and virtio drivers) and its domain type, the reserved regions, and for each virtio
//! device its group and whether VIRTIO_F_ACCESS_PLATFORM was negotiated. Then DMA
//! through the IOMMU: the `blk` scenario's full-disk write/discard/read-back check on
//! vda (`blk::vda_data`), a text pattern written to /dev/hvc0 (the host compares the
//! console file), a ping of the host through the NIC when there is one (the `net`
//! scenario's addressing and helpers), and last the /proc/interrupts lines of every
//! device behind the IOMMU, which must still be PCI MSI-X.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::blk;
use super::net::{link, wire};
use crate::disk;
use crate::pattern;
use crate::report::Reporter;
use crate::sys;

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const GROUPS: &str = "/sys/kernel/iommu_groups";
/// Feature bit VIRTIO_F_ACCESS_PLATFORM.
const ACCESS_PLATFORM_BIT: usize = 33;
/// Bytes of pattern written to the console, as hex text (twice as many characters):
/// text passes the tty's output processing unchanged, binary would not.
pub const CONSOLE_PATTERN_LEN: usize = 8192;
const PINGS: u32 = 5;

/// A virtio device on a PCI function.
#[derive(Debug, Clone)]
struct Endpoint {
    bdf: String,
    /// `virtio1`, and its driver (`virtio_blk`).
    virtio: String,
    driver: String,
    group: Option<u32>,
    /// The negotiated feature bits as sysfs prints them ('1' at position i = bit i).
    features: String,
}

impl Endpoint {
    /// `blk`, `net`, `console`, `iommu` for the drivers this scenario knows.
    fn kind(&self) -> &str {
        self.driver.strip_prefix("virtio_").unwrap_or(&self.driver)
    }

    fn access_platform(&self) -> bool {
        self.features.as_bytes().get(ACCESS_PLATFORM_BIT) == Some(&b'1')
    }
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn list_dir(dir: impl AsRef<Path>) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.as_ref())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn link_name(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_link(path.as_ref())
        .ok()
        .and_then(|p| file_name(&p))
}

/// `vendor:device` of a PCI function, from sysfs.
fn pci_ids(bdf: &str) -> String {
    let dir = Path::new(PCI_DEVICES).join(bdf);
    let field = |f: &str| sys::read_trimmed(dir.join(f)).unwrap_or_else(|_| "?".into());
    format!("{}:{}", field("vendor"), field("device"))
}

/// Every virtio device whose parent is a PCI function.
fn endpoints() -> Vec<Endpoint> {
    let virtio_dir = Path::new("/sys/bus/virtio/devices");
    list_dir(virtio_dir)
        .into_iter()
        .filter_map(|virtio| {
            let dev = std::fs::canonicalize(virtio_dir.join(&virtio)).ok()?;
            let bdf = dev.parent().and_then(file_name)?;
            let pci = Path::new(PCI_DEVICES).join(&bdf);
            Some(Endpoint {
                group: link_name(pci.join("iommu_group")).and_then(|g| g.parse().ok()),
                driver: link_name(dev.join("driver")).unwrap_or_else(|| "none".into()),
                features: sys::read_trimmed(dev.join("features")).unwrap_or_default(),
                virtio,
                bdf,
            })
        })
        .collect()
}

pub fn run(r: &mut Reporter) {
    iommu_device(r);
    let eps = endpoints();
    groups(r, &eps);
    for ep in eps.iter().filter(|e| e.kind() != "iommu") {
        let group = ep.group.map_or_else(|| "none".into(), |g| g.to_string());
        r.check(
            &format!("endpoint {}", ep.virtio),
            ep.group.is_some() && ep.access_platform(),
            format!(
                "{} {} {} group {group} access_platform {}",
                ep.kind(),
                ep.bdf,
                pci_ids(&ep.bdf),
                ep.access_platform()
            ),
        );
    }
    // The first device of each kind, by name, for the host's assertions.
    for kind in ["blk", "net", "console"] {
        if let Some(ep) = eps.iter().find(|e| e.kind() == kind) {
            match ep.group {
                Some(g) => r.check(&format!("iommu_{kind}_group"), true, u64::from(g)),
                None => r.check(&format!("iommu_{kind}_group"), false, "not in a group"),
            }
        }
    }

    if Path::new("/sys/block/vda").exists() {
        blk::vda_data(r, disk::online_cpus());
        let _ = disk::pin(&[]);
    } else {
        r.check("vda_write", false, "no /dev/vda");
    }
    if eps.iter().any(|e| e.kind() == "console") {
        console(r);
    }
    if eps.iter().any(|e| e.kind() == "net") {
        ping(r);
    }
    interrupts(r, &eps);
}

/// The virtio-iommu device, its driver binding and its sysfs class entry.
fn iommu_device(r: &mut Reporter) {
    let drv = Path::new("/sys/bus/virtio/drivers/virtio_iommu");
    let bound: Vec<String> = list_dir(drv)
        .into_iter()
        .filter(|n| n.starts_with("virtio"))
        .map(|n| {
            let pci = std::fs::canonicalize(drv.join(&n))
                .ok()
                .and_then(|p| p.parent().and_then(file_name))
                .unwrap_or_default();
            format!("{n} on {pci} ({})", pci_ids(&pci))
        })
        .collect();
    r.check("iommu_driver", !bound.is_empty(), bound.join(", "));
    let class: Vec<String> = list_dir("/sys/class/iommu")
        .into_iter()
        .map(|name| {
            let devices = list_dir(Path::new("/sys/class/iommu").join(&name).join("devices"));
            format!("{name}: {}", devices.join(" "))
        })
        .collect();
    r.check("iommu_class", !class.is_empty(), class.join("; "));
}

/// One check per IOMMU group (its devices and domain type), the types together, and
/// the reserved regions of the first group.
fn groups(r: &mut Reporter, eps: &[Endpoint]) {
    let mut numbers: Vec<u32> = list_dir(GROUPS)
        .iter()
        .filter_map(|g| g.parse().ok())
        .collect();
    numbers.sort_unstable();
    let mut types = Vec::new();
    for n in &numbers {
        let dir = PathBuf::from(GROUPS).join(n.to_string());
        let kind = sys::read_trimmed(dir.join("type")).unwrap_or_else(|e| e);
        let devices: Vec<String> = list_dir(dir.join("devices"))
            .into_iter()
            .map(|bdf| {
                let pci_driver = link_name(Path::new(PCI_DEVICES).join(&bdf).join("driver"))
                    .unwrap_or_else(|| "none".into());
                let virtio = eps
                    .iter()
                    .find(|e| e.bdf == bdf)
                    .map(|e| format!("/{}", e.driver))
                    .unwrap_or_default();
                format!("{bdf} {} {pci_driver}{virtio}", pci_ids(&bdf))
            })
            .collect();
        r.check(
            &format!("iommu_group {n}"),
            !devices.is_empty(),
            format!("type {kind}: {}", devices.join(", ")),
        );
        types.push(kind);
    }
    r.check("iommu_groups", !numbers.is_empty(), numbers.len());
    // Translated (DMA or DMA-FQ) domains; with iommu.strict=1 they are "DMA".
    let translated = !types.is_empty() && types.iter().all(|t| t.starts_with("DMA"));
    let mut distinct = types.clone();
    distinct.dedup();
    r.check("iommu_group_types", translated, distinct.join(" "));
    if let Some(n) = numbers.first() {
        let path = PathBuf::from(GROUPS)
            .join(n.to_string())
            .join("reserved_regions");
        let regions = sys::read(path).map(|t| t.trim().replace('\n', "; "));
        r.check(
            "iommu_reserved_regions",
            regions.is_ok(),
            regions.unwrap_or_else(|e| e),
        );
    }
}

/// The console pattern as the hex text the guest writes.
pub fn console_text() -> String {
    let bytes = pattern::bytes(pattern::GUEST_TO_HOST_SEED, CONSOLE_PATTERN_LEN);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the pattern text to /dev/hvc0 and waits until the port sent it.
fn console(r: &mut Reporter) {
    let text = console_text();
    let written = File::options()
        .write(true)
        .open("/dev/hvc0")
        .and_then(|mut port| {
            port.write_all(text.as_bytes())?;
            // SAFETY: tcdrain on a descriptor we own; waits for the output queue.
            unsafe { libc::tcdrain(port.as_raw_fd()) };
            Ok(())
        });
    match written {
        Ok(()) => r.check("hvc0_text_fnv", true, pattern::fnv1a(text.as_bytes())),
        Err(e) => r.check("hvc0_text_fnv", false, format!("/dev/hvc0: {e}")),
    }
}

/// The `net` scenario's address and a few pings of the host end.
fn ping(r: &mut Reporter) {
    let nic = match link::find_nic() {
        Ok(n) => n,
        Err(e) => return r.check("net_configured", false, e),
    };
    match link::configure(&nic, wire::GUEST_IP, wire::PREFIX_LEN) {
        Ok(v) => r.check("net_configured", true, v),
        Err(e) => return r.check("net_configured", false, e),
    }
    match link::ping(wire::PEER_IP, PINGS) {
        Ok((stats, rtt)) => {
            r.note(&format!("ping: {stats:?} {rtt}"));
            let all = u64::from(PINGS);
            r.check("ping_received", stats.received == all, stats.received);
        }
        Err(e) => r.check("ping_received", false, e),
    }
}

/// The MSI-X lines of every virtio function, after the I/O: each must be PCI-MSIX
/// (no remapping) and the devices that did I/O must have interrupted.
fn interrupts(r: &mut Reporter, eps: &[Endpoint]) {
    let text = match sys::read("/proc/interrupts") {
        Ok(t) => t,
        Err(e) => return r.check("msix_lines", false, e),
    };
    let mut seen: Vec<&str> = Vec::new();
    for ep in eps {
        // `blk_msix` for the first disk, `blk_msix virtio3` for another one.
        let check = if seen.contains(&ep.kind()) {
            format!("{}_msix {}", ep.kind(), ep.virtio)
        } else {
            format!("{}_msix", ep.kind())
        };
        seen.push(ep.kind());
        let suffix = format!("MSIX-{}", ep.bdf);
        let chip = text
            .lines()
            .flat_map(str::split_whitespace)
            .find(|w| w.ends_with(&suffix))
            .map(str::to_owned);
        // The IOMMU itself is not behind itself: its lines are information only
        // (QEMU's virtio-iommu-pci has none; the driver polls the request queue).
        let behind = ep.kind() != "iommu";
        let Some(chip) = chip else {
            r.check(&check, !behind, format!("no MSI-X line of {}", ep.bdf));
            continue;
        };
        let lines = disk::irq_lines(&text, &chip);
        let total: u64 = lines.iter().map(|(_, c)| c).sum();
        let list: Vec<String> = lines.iter().map(|(n, c)| format!("{n}={c}")).collect();
        let fired = total > 0 || !behind;
        r.check(
            &check,
            chip == format!("PCI-{suffix}") && fired,
            format!("{chip} {}", list.join(" ")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_kind_and_access_platform_from_sysfs_text() {
        let mut features = "0".repeat(64);
        let mut ep = Endpoint {
            bdf: "0000:00:02.0".into(),
            virtio: "virtio1".into(),
            driver: "virtio_blk".into(),
            group: Some(1),
            features: features.clone(),
        };
        assert_eq!(ep.kind(), "blk");
        assert!(!ep.access_platform());
        features.replace_range(32..34, "11");
        ep.features = features;
        assert!(ep.access_platform());
        ep.features.truncate(33);
        assert!(!ep.access_platform());
        ep.driver = "none".into();
        assert_eq!(ep.kind(), "none");
    }

    #[test]
    fn console_text_is_hex_without_newlines() {
        let text = console_text();
        assert_eq!(text.len(), 2 * CONSOLE_PATTERN_LEN);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
