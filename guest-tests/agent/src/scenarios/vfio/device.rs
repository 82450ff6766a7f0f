//! The device half of the `vfio-in-guest` scenario, once the group sits in a type1
//! container with the DMA buffer mapped: device info, config space through the
//! config region (compared with sysfs), the virtio structures and BARs, MSI-X through
//! VFIO (eventfd, loopback trigger), then real I/O by the user-space virtio-blk
//! driver ([`super::userblk`]): the device reads and writes the mapped IOVAs and
//! interrupts through the eventfd.

use super::bind::Target;
use super::userblk::{self, UserBlk, SLOT_LEN, T_IN, T_OUT};
use super::virtio;
use crate::pattern;
use crate::report::Reporter;
use crate::vfio::pci::{self, u16_at};
use crate::vfio::uapi::*;
use crate::vfio::{Device, DmaBuffer, EventFd};

/// Seed of the 4 KiB the guest writes through VFIO at [`WRITE_SECTOR`] (unlike any
/// seed the host uses: `pattern::fill` ignores bit 0).
const WRITE_SEED: u64 = 0xfe11_0000_6e57_f1f0;
/// Where the user-space driver writes (byte offset 4096), and reads the host's data.
pub const WRITE_SECTOR: u64 = 8;
const READ_SECTOR: u64 = 0;

/// What the I/O part established, for the checks after VFIO let go of the device.
#[derive(Debug, Default, Clone)]
pub struct IoResult {
    /// FNV of the block the guest wrote through VFIO, when the write completed.
    pub written_fnv: Option<String>,
}

/// Config-space fields that vfio-pci passes through unchanged: IDs, revision and
/// class, subsystem IDs.
const PASSTHROUGH_FIELDS: [(usize, usize); 3] = [(0x00, 4), (0x08, 4), (0x2c, 4)];

fn describe_region(info: &RegionInfo) -> String {
    let mut flags = String::new();
    for (bit, c) in [
        (VFIO_REGION_INFO_FLAG_READ, 'r'),
        (VFIO_REGION_INFO_FLAG_WRITE, 'w'),
        (VFIO_REGION_INFO_FLAG_MMAP, 'm'),
    ] {
        if info.flags & bit != 0 {
            flags.push(c);
        }
    }
    format!("size {:#x} flags {flags}", info.size)
}

/// Device info, config space and virtio structures; returns the config bytes.
fn inspect(r: &mut Reporter, dev: &Device, target: &Target) -> Result<Vec<u8>, ()> {
    let info = dev
        .info()
        .map_err(|e| r.check("vfio_device_info", false, e))?;
    let pci_ok = info.flags & VFIO_DEVICE_FLAGS_PCI != 0;
    r.check(
        "vfio_device_info",
        pci_ok && info.num_regions > VFIO_PCI_CONFIG_REGION_INDEX && info.num_irqs > 2,
        format!(
            "flags {:#x} (pci {pci_ok}, reset {}) regions {} irqs {}",
            info.flags,
            info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            info.num_regions,
            info.num_irqs
        ),
    );
    let region = dev
        .region(VFIO_PCI_CONFIG_REGION_INDEX)
        .map_err(|e| r.check("vfio_config_region", false, e))?;
    r.check(
        "vfio_config_region",
        region.size >= 256,
        describe_region(&region),
    );
    let mut cfg = vec![0u8; 256];
    dev.read(&region, 0, &mut cfg)
        .map_err(|e| r.check("vfio_config_ids", false, e))?;
    let (vendor, device) = (u16_at(&cfg, 0).unwrap_or(0), u16_at(&cfg, 2).unwrap_or(0));
    let sysfs_device = u16_at(&target.config, 2).unwrap_or(0);
    r.check(
        "vfio_config_ids",
        vendor == 0x1af4 && device == sysfs_device,
        format!("{vendor:#06x}:{device:#06x}"),
    );
    let same = PASSTHROUGH_FIELDS
        .iter()
        .all(|&(at, len)| cfg.get(at..at + len) == target.config.get(at..at + len));
    let differing: Vec<String> = (0..64)
        .filter(|&i| cfg.get(i) != target.config.get(i))
        .map(|i| format!("{i:#04x}"))
        .collect();
    r.check(
        "vfio_config_vs_sysfs",
        same,
        format!(
            "ids/class/subsystem {}; bytes of the header that differ: [{}]",
            if same { "equal" } else { "DIFFER" },
            differing.join(" ")
        ),
    );
    let caps: Vec<String> = pci::virtio_caps(&cfg)
        .iter()
        .map(|c| {
            format!(
                "type{}=bar{}+{:#x}/{:#x}",
                c.cfg_type, c.bar, c.offset, c.length
            )
        })
        .collect();
    r.check("vfio_virtio_caps", !caps.is_empty(), caps.join(" "));
    // The BARs the function implements (QEMU's modern-only virtio has no BAR 0;
    // ferrio puts everything in BAR 0).
    let bars: Result<Vec<String>, String> = (0..6)
        .map(|i| dev.region(i).map(|b| (i, b)))
        .filter(|b| b.as_ref().map_or(true, |(_, b)| b.size > 0))
        .map(|b| b.map(|(i, b)| format!("bar{i} {}", describe_region(&b))))
        .collect();
    match bars {
        Ok(bars) => r.check("vfio_bars", !bars.is_empty(), bars.join(", ")),
        Err(e) => r.check("vfio_bars", false, e),
    }
    Ok(cfg)
}

/// The virtio common configuration and the virtio-blk capacity, read through the
/// BAR regions, against what the kernel's driver saw.
fn virtio_registers(r: &mut Reporter, dev: &Device, cfg: &[u8], target: &Target) {
    let (region, base) = match virtio::common_block(dev, cfg) {
        Ok(b) => (b.region, b.base),
        Err(e) => return r.check("vfio_common_cfg", false, e),
    };
    r.check(
        "vfio_common_cfg",
        true,
        format!(
            "BAR {} +{base:#x} ({})",
            region.index,
            describe_region(&region)
        ),
    );
    // The driver uses at most one queue per CPU: the device may have more.
    let queues = dev.read_u16(&region, base + virtio::NUM_QUEUES);
    let used = target.info.mq_queues as u64;
    match queues {
        Ok(q) => r.check("vfio_num_queues", u64::from(q) >= used.max(1), u64::from(q)),
        Err(e) => r.check("vfio_num_queues", false, e),
    }
    // Reset (0), or ACKNOWLEDGE alone (1): what virtio's remove path leaves when
    // vfio-pci has no way to reset the function.
    match dev.read_u8(&region, base + virtio::DEVICE_STATUS) {
        Ok(s) => r.check("vfio_device_status", s <= 1, u64::from(s)),
        Err(e) => r.check("vfio_device_status", false, e),
    }
    let features = (|| {
        let mut words = [0u32; 2];
        for (select, word) in words.iter_mut().enumerate() {
            dev.write_u32(&region, base, select as u32)?;
            *word = dev.read_u32(&region, base + 4)?;
        }
        Ok::<u64, String>(u64::from(words[1]) << 32 | u64::from(words[0]))
    })();
    match features {
        Ok(f) => {
            let v1 = f & virtio::F_VERSION_1 != 0;
            r.check("vfio_device_features", v1, format!("{f:#018x}"));
            let ap = f & virtio::F_ACCESS_PLATFORM != 0;
            r.check("vfio_access_platform", ap, ap);
        }
        Err(e) => r.check("vfio_device_features", false, e),
    }
    let capacity = pci::virtio_cap(cfg, pci::VIRTIO_PCI_CAP_DEVICE_CFG)
        .ok_or_else(|| "no device-configuration capability".to_owned())
        .and_then(|cap| {
            let region = dev.region(u32::from(cap.bar))?;
            let at = u64::from(cap.offset);
            let lo = dev.read_u32(&region, at)?;
            let hi = dev.read_u32(&region, at + 4)?;
            Ok(u64::from(hi) << 32 | u64::from(lo))
        });
    match capacity {
        Ok(c) => r.check("vfio_blk_capacity", c * 512 == target.info.size_bytes, c),
        Err(e) => r.check("vfio_blk_capacity", false, e),
    }
}

/// MSI-X through VFIO: IRQ info against the capability, vector 0 on `irq`, and a
/// loopback trigger. Returns whether vector 0 is enabled.
fn msix(r: &mut Reporter, dev: &Device, cfg: &[u8], irq: &EventFd) -> bool {
    let cap = pci::msix(cfg);
    match cap {
        Some(m) => r.check(
            "vfio_msix_cap",
            m.table_size > 0,
            format!(
                "{} entries, table BAR {} +{:#x}, enabled {}",
                m.table_size, m.table_bar, m.table_offset, m.enabled
            ),
        ),
        None => r.check("vfio_msix_cap", false, "no MSI-X capability"),
    }
    let info = match dev.irq_info(VFIO_PCI_MSIX_IRQ_INDEX) {
        Ok(i) => i,
        Err(e) => {
            r.check("vfio_msix_irq_info", false, e);
            return false;
        }
    };
    let table = cap.map_or(0, |m| u32::from(m.table_size));
    r.check(
        "vfio_msix_irq_info",
        info.count > 0 && info.count == table && info.flags & VFIO_IRQ_INFO_EVENTFD != 0,
        format!(
            "count {} flags {:#x} (noresize {})",
            info.count,
            info.flags,
            info.flags & VFIO_IRQ_INFO_NORESIZE != 0
        ),
    );
    if let Err(e) = dev.set_irq_eventfd(VFIO_PCI_MSIX_IRQ_INDEX, 0, irq.raw()) {
        r.check("vfio_msix_enable", false, e);
        return false;
    }
    r.check("vfio_msix_enable", true, "vector 0 -> eventfd");
    let fired = dev
        .trigger_irq(VFIO_PCI_MSIX_IRQ_INDEX, 0)
        .and_then(|()| irq.wait(5000));
    match fired {
        Ok(n) => r.check("vfio_msix_loopback", n == 1, n),
        Err(e) => r.check("vfio_msix_loopback", false, e),
    }
    true
}

/// Sets memory decoding and bus mastering in the command register (vfio-pci leaves
/// bus mastering to the user).
fn enable_bus_master(r: &mut Reporter, dev: &Device) -> Result<(), ()> {
    match dev.enable_bus_master() {
        Ok(cmd) => {
            let ok = cmd & pci::COMMAND_MASTER != 0;
            r.check("vfio_bus_master", ok, format!("command {cmd:#06x}"));
            if ok {
                Ok(())
            } else {
                Err(())
            }
        }
        Err(e) => {
            r.check("vfio_bus_master", false, e);
            Err(())
        }
    }
}

/// Reports one completed request; true when it succeeded with an interrupt.
fn completion(r: &mut Reporter, check: &str, done: Result<userblk::Completion, String>) -> bool {
    match done {
        Ok(c) => {
            let ok = c.status == 0 && c.interrupts > 0;
            r.check(
                check,
                ok,
                format!(
                    "status {} used_len {} interrupts {}",
                    c.status, c.used_len, c.interrupts
                ),
            );
            ok
        }
        Err(e) => {
            r.check(check, false, e);
            false
        }
    }
}

/// The user-space driver: write a block, read the host's block 0 and the written
/// block back, all through the IOVA mapping; `kernel_fnv` is what the kernel's
/// driver read at block 0 before VFIO took the device.
fn user_io(
    r: &mut Reporter,
    dev: &Device,
    cfg: &[u8],
    buf: &DmaBuffer,
    iova: u64,
    irq: &EventFd,
    kernel_fnv: Option<&str>,
) -> IoResult {
    let mut result = IoResult::default();
    let mut blk = match UserBlk::start(dev, cfg, buf, iova, irq) {
        Ok(b) => b,
        Err(e) => {
            r.check("vfio_userblk_start", false, e);
            return result;
        }
    };
    r.check(
        "vfio_userblk_start",
        true,
        format!(
            "features {:#x}, queue 0 size {} at iova {iova:#x}",
            blk.features,
            blk.queue_size()
        ),
    );
    let block = pattern::bytes(WRITE_SEED, SLOT_LEN);
    let written = buf
        .write(UserBlk::slot_offset(0), &block)
        .and_then(|()| blk.request(0, T_OUT, WRITE_SECTOR));
    if completion(r, "vfio_dma_write", written) {
        result.written_fnv = Some(pattern::fnv1a(&block));
        r.check("vfio_dma_write_fnv", true, pattern::fnv1a(&block));
    }
    let mut data = vec![0u8; SLOT_LEN];
    let read = blk.request(1, T_IN, READ_SECTOR);
    if completion(r, "vfio_dma_read", read) {
        let fnv = buf
            .read(UserBlk::slot_offset(1), &mut data)
            .map(|()| pattern::fnv1a(&data));
        let ok = fnv.as_deref().ok() == kernel_fnv && kernel_fnv.is_some();
        r.check(
            "vfio_dma_read_fnv",
            ok,
            fnv.unwrap_or_else(|e| e.to_string()),
        );
    }
    let back = blk.request(2, T_IN, WRITE_SECTOR);
    if completion(r, "vfio_dma_readback", back) {
        let same = buf
            .read(UserBlk::slot_offset(2), &mut data)
            .is_ok_and(|()| data == block);
        r.check("vfio_dma_readback_matches", same, pattern::fnv1a(&data));
    }
    r.check_result("vfio_device_reset", blk.reset().map(|()| "status 0"));
    result
}

/// Everything done with the device fd; returns what the I/O established.
pub fn run(
    r: &mut Reporter,
    dev: &Device,
    target: &Target,
    buf: &DmaBuffer,
    iova: u64,
    kernel_fnv: Option<&str>,
) -> IoResult {
    let Ok(cfg) = inspect(r, dev, target) else {
        return IoResult::default();
    };
    virtio_registers(r, dev, &cfg, target);
    let irq = match EventFd::new() {
        Ok(e) => e,
        Err(e) => {
            r.check("vfio_msix_enable", false, e);
            return IoResult::default();
        }
    };
    if !msix(r, dev, &cfg, &irq) {
        return IoResult::default();
    }
    let result = if enable_bus_master(r, dev).is_ok() {
        user_io(r, dev, &cfg, buf, iova, &irq, kernel_fnv)
    } else {
        IoResult::default()
    };
    r.check_result(
        "vfio_msix_disable",
        dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
            .map(|()| "disabled"),
    );
    result
}
