//! A user-space virtio-net transmit path over VFIO, with a DMA fault check, for the
//! `sriov` scenario: it hands over one virtio-net function (a VF behind ferrio's
//! virtio-iommu, in its own IOMMU group) by PCI address and a 16-byte tag.
//!
//! 1. Records the function's driver, net interface and MAC, moves it from virtio-pci
//!    to vfio-pci (`driver_override`), opens its group in a type1v2 container.
//! 2. Maps a 64 KiB DMA buffer at an IOVA, resets the device, negotiates VERSION_1,
//!    ACCESS_PLATFORM and MAC (nothing else), enables receiveq0 (no buffers: ferrio
//!    activates only with pair 0 complete) and transmitq0 on MSI-X vector 0 (an
//!    eventfd), DRIVER_OK.
//! 3. Sends one broadcast frame (ethertype 0x88b5, payload = the tag repeated to 64
//!    bytes) and waits for its used element and interrupt.
//! 4. Sends a frame whose second buffer is an unmapped IOVA (the mapping + 1 GiB) and
//!    [`BAD_PAYLOAD`] in its first: the device must drop it, the IOMMU must report a
//!    fault the guest kernel logs for the function's endpoint, and the device must not
//!    need a reset; then one more good frame. The host then sees the tag twice and
//!    never `BAD_PAYLOAD`.
//! 5. MSI-X off, device reset, unmap, everything closed, back to virtio-pci, and the
//!    net interface must come back.
//!
//! Every step is one `vfio_net_*` check with the value the guest saw; every wait is
//! bounded, and each level undoes what it set up whatever happened inside it.

mod driver;
mod fault;

use std::time::Duration;

use self::driver::{format_mac, is_unicast, tag_payload, tx_bytes, UserNet};
pub use self::driver::{BAD_LEN, BAD_PAYLOAD};
use self::fault::Kmsg;
use super::bind;
use super::virtio::{
    Transport, F_ACCESS_PLATFORM, F_VERSION_1, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
};
use crate::report::Reporter;
use crate::vfio::pci::{pick_iova, u16_at};
use crate::vfio::uapi::*;
use crate::vfio::{Container, Device, DmaBuffer, EventFd, Group};

const DMA_LEN: usize = 64 << 10;
/// IOVAs to try, in order (as `vfio-in-guest`): above any test guest's RAM first.
const IOVA_CANDIDATES: [u64; 3] = [32 << 30, 1 << 30, 1 << 20];
/// The unmapped buffer of the bad frame is this far above the mapping.
const BAD_IOVA_OFFSET: u64 = 1 << 30;
const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_NET_MODERN: u16 = 0x1041;
/// Waits: a good frame, the bad one, the kernel's fault line, the interface's return.
const TX_TIMEOUT: Duration = Duration::from_secs(10);
const BAD_TX_TIMEOUT: Duration = Duration::from_secs(5);
const FAULT_LOG_TIMEOUT: Duration = Duration::from_secs(10);
const NETDEV_TIMEOUT: Duration = Duration::from_secs(60);

/// The function as the scenario found it.
struct Target<'b> {
    bdf: &'b str,
    group: u32,
    /// IOMMU endpoint id (its BDF as a 16-bit number).
    endpoint: u32,
    /// The MAC its net interface had, if it had one.
    mac: Option<String>,
}

/// Runs the whole sequence on virtio-net function `bdf`; the frames carry `tag`.
#[allow(dead_code)] // the entry point of scenarios/sriov.rs, which calls it
pub fn run(r: &mut Reporter, bdf: &str, tag: &[u8; 16]) {
    let Some(target) = find_target(r, bdf) else {
        return;
    };
    let (ok, value) = bind::allow_unsafe_interrupts();
    r.check("vfio_net_unsafe_interrupts", ok, value);
    match bind::bind_vfio(bdf) {
        Ok(old) => {
            r.check("vfio_net_bind", true, format!("{old} -> vfio-pci"));
            session(r, &target, tag);
        }
        Err(e) => r.check("vfio_net_bind", false, e),
    }
    give_back(r, bdf);
}

/// Driver, net interface, MAC, group and endpoint of `bdf` (check `vfio_net_target`);
/// `None` when the function cannot be handed to VFIO.
fn find_target<'b>(r: &mut Reporter, bdf: &'b str) -> Option<Target<'b>> {
    let driver = bind::driver(bdf).unwrap_or_else(|| "none".into());
    let netdev = bind::net_ifname(bdf);
    let mac = netdev
        .as_ref()
        .and_then(|n| crate::sys::read_trimmed(format!("/sys/class/net/{n}/address")).ok());
    let group = bind::iommu_group(bdf);
    let endpoint = fault::endpoint_id(bdf);
    let value = format!(
        "{bdf} driver {driver} netdev {} mac {} group {} endpoint {}",
        netdev.as_deref().unwrap_or("none"),
        mac.as_deref().unwrap_or("none"),
        group.as_ref().map_or_else(Clone::clone, u32::to_string),
        endpoint.map_or_else(|| "?".into(), |e| e.to_string()),
    );
    let ok = driver == "virtio-pci" && netdev.is_some() && group.is_ok() && endpoint.is_some();
    r.check("vfio_net_target", ok, value);
    Some(Target {
        bdf,
        group: group.ok()?,
        endpoint: endpoint?,
        mac,
    })
}

/// Container and group around [`mapped`]; both are closed when this returns.
fn session(r: &mut Reporter, target: &Target, tag: &[u8; 16]) {
    let container = match Container::open() {
        Ok(c) => c,
        Err(e) => return r.check("vfio_net_container", false, e),
    };
    let version = container.api_version();
    let type1v2 = container.check_extension(VFIO_TYPE1V2_IOMMU);
    r.check(
        "vfio_net_container",
        version == Ok(VFIO_API_VERSION) && type1v2 == Ok(true),
        format!("api {version:?} type1v2 {type1v2:?}"),
    );
    let group = match Group::open(target.group) {
        Ok(g) => g,
        Err(e) => return r.check("vfio_net_group_viable", false, e),
    };
    let status = group.status();
    let viable = status
        .as_ref()
        .is_ok_and(|f| f & VFIO_GROUP_FLAGS_VIABLE != 0);
    r.check(
        "vfio_net_group_viable",
        viable,
        format!("/dev/vfio/{} {status:?}", target.group),
    );
    if !viable {
        return;
    }
    let attached = group
        .set_container(&container)
        .and_then(|()| group.status());
    let set = attached
        .as_ref()
        .is_ok_and(|f| f & VFIO_GROUP_FLAGS_CONTAINER_SET != 0);
    r.check("vfio_net_set_container", set, format!("{attached:?}"));
    if !set {
        return;
    }
    match container.set_iommu(VFIO_TYPE1V2_IOMMU) {
        Ok(()) => {
            r.check("vfio_net_set_iommu", true, "type1v2");
            mapped(r, &container, &group, target, tag);
        }
        Err(e) => r.check("vfio_net_set_iommu", false, e),
    }
    r.check_result(
        "vfio_net_unset_container",
        group.unset_container().map(|()| "ok"),
    );
}

/// The DMA buffer mapped around the device part, and the unmap (check
/// `vfio_net_unmap_dma`: the size the kernel unmapped).
fn mapped(r: &mut Reporter, container: &Container, group: &Group, target: &Target, tag: &[u8; 16]) {
    let iova = container.iommu_info().and_then(|info| {
        pick_iova(
            &info.ranges,
            &IOVA_CANDIDATES,
            DMA_LEN as u64,
            DMA_LEN as u64,
        )
        .ok_or_else(|| format!("no IOVA range fits 64 KiB: {:x?}", info.ranges))
    });
    let iova = match iova {
        Ok(i) => i,
        Err(e) => return r.check("vfio_net_map_dma", false, e),
    };
    let buf = match DmaBuffer::new(DMA_LEN) {
        Ok(b) => b,
        Err(e) => return r.check("vfio_net_map_dma", false, e),
    };
    if let Err(e) = container.map_dma(buf.addr(), iova, DMA_LEN as u64) {
        return r.check("vfio_net_map_dma", false, e);
    }
    r.check(
        "vfio_net_map_dma",
        true,
        format!("{DMA_LEN} bytes at iova {iova:#x}"),
    );
    match group.device(target.bdf) {
        // The device fd is closed when `device` returns: no DMA after that.
        Ok(dev) => device(r, &dev, target, &buf, iova, tag),
        Err(e) => r.check("vfio_net_device", false, e),
    }
    match container.unmap_dma(iova, DMA_LEN as u64) {
        Ok(n) => r.check("vfio_net_unmap_dma", n == DMA_LEN as u64, n),
        Err(e) => r.check("vfio_net_unmap_dma", false, e),
    }
}

/// Config space through VFIO: vendor and device id (check `vfio_net_device`).
fn config(r: &mut Reporter, dev: &Device) -> Option<Vec<u8>> {
    let mut cfg = vec![0u8; 256];
    let read = dev
        .region(VFIO_PCI_CONFIG_REGION_INDEX)
        .and_then(|region| dev.read(&region, 0, &mut cfg));
    if let Err(e) = read {
        r.check("vfio_net_device", false, e);
        return None;
    }
    let (vendor, device) = (u16_at(&cfg, 0).unwrap_or(0), u16_at(&cfg, 2).unwrap_or(0));
    let ok = vendor == VIRTIO_VENDOR && device == VIRTIO_NET_MODERN;
    r.check(
        "vfio_net_device",
        ok,
        format!("{vendor:#06x}:{device:#06x}"),
    );
    ok.then_some(cfg)
}

/// MSI-X vector 0 of the function on `irq` (check `vfio_net_msix`).
fn enable_msix(r: &mut Reporter, dev: &Device, irq: &EventFd) -> bool {
    let enabled = dev.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).and_then(|info| {
        if info.count == 0 || info.flags & VFIO_IRQ_INFO_EVENTFD == 0 {
            return Err(format!(
                "MSI-X: count {} flags {:#x}",
                info.count, info.flags
            ));
        }
        let vector = u32::from(driver::TX_VECTOR);
        dev.set_irq_eventfd(VFIO_PCI_MSIX_IRQ_INDEX, vector, irq.raw())
            .map(|()| format!("vector {vector} -> eventfd ({} vectors)", info.count))
    });
    let ok = enabled.is_ok();
    r.check_result("vfio_net_msix", enabled);
    ok
}

/// Everything done with the device fd: bus mastering, MSI-X, the driver, and the
/// teardown (checks `vfio_net_msix_disable`, `vfio_net_reset`).
fn device(
    r: &mut Reporter,
    dev: &Device,
    target: &Target,
    buf: &DmaBuffer,
    iova: u64,
    tag: &[u8; 16],
) {
    let Some(cfg) = config(r, dev) else {
        return;
    };
    match dev.enable_bus_master() {
        Ok(cmd) => {
            let ok = cmd & crate::vfio::pci::COMMAND_MASTER != 0;
            r.check("vfio_net_bus_master", ok, format!("command {cmd:#06x}"));
            if !ok {
                return;
            }
        }
        Err(e) => return r.check("vfio_net_bus_master", false, e),
    }
    let irq = match EventFd::new() {
        Ok(e) => e,
        Err(e) => return r.check("vfio_net_msix", false, e),
    };
    let msix = enable_msix(r, dev, &irq);
    let mut net = Transport::new(dev, &cfg).and_then(|t| UserNet::new(t, buf, iova, &irq));
    match &mut net {
        Ok(net) if msix => drive(r, net, &cfg, target, tag),
        Ok(_) => {}
        Err(e) => r.check("vfio_net_transport", false, e.as_str()),
    }
    if msix {
        let off = dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX);
        r.check_result("vfio_net_msix_disable", off.map(|()| "disabled"));
    }
    if let Ok(net) = &net {
        let reset = net.transport.reset().and_then(|()| net.transport.status());
        r.check_result("vfio_net_reset", reset.map(u32::from));
    }
}

/// Steps 2 to 4 on a started transport: features, queues, MAC, DRIVER_OK, the good
/// frame, the bad one and its fault, the status, the second good frame.
fn drive(r: &mut Reporter, net: &mut UserNet, cfg: &[u8], target: &Target, tag: &[u8; 16]) {
    match net.negotiate() {
        Ok((offered, accepted)) => {
            let needed = F_VERSION_1 | F_ACCESS_PLATFORM;
            r.check(
                "vfio_net_features",
                accepted & needed == needed,
                format!("offered {offered:#x} accepted {accepted:#x}"),
            );
        }
        Err(e) => return r.check("vfio_net_features", false, e),
    }
    match net.setup_queues() {
        Ok(text) => r.check("vfio_net_queues", true, text),
        Err(e) => return r.check("vfio_net_queues", false, e),
    }
    let mac = match net.mac(cfg) {
        Ok(mac) => {
            let text = format_mac(mac);
            let had = target.mac.as_deref().unwrap_or("none");
            let value = format!("{text} (netdev had {had})");
            r.check("vfio_net_mac", is_unicast(mac), value);
            mac
        }
        Err(e) => return r.check("vfio_net_mac", false, e),
    };
    match net.transport.driver_ok() {
        Ok(s) => {
            let ok = s & STATUS_DRIVER_OK != 0 && s & STATUS_DEVICE_NEEDS_RESET == 0;
            r.check("vfio_net_driver_ok", ok, u32::from(s));
            if !ok {
                return;
            }
        }
        Err(e) => return r.check("vfio_net_driver_ok", false, e),
    }
    let good = tx_bytes(mac, &tag_payload(tag));
    send_good(r, net, "vfio_net_tx", 0, &good);
    bad_frame(r, net, mac, target);
    send_good(r, net, "vfio_net_tx_after_fault", 2, &good);
}

/// Sends a good frame from slot `slot` and reports it as `check`.
fn send_good(r: &mut Reporter, net: &mut UserNet, check: &str, slot: usize, frame: &[u8]) {
    match net.send(slot, frame, None, TX_TIMEOUT) {
        Ok(sent) => r.check(check, sent.ok(), sent.describe()),
        Err(e) => r.check(check, false, e),
    }
}

/// The frame with an unmapped buffer (checks `vfio_net_bad_tx`,
/// `vfio_net_fault_logged`, `vfio_net_status_after_fault`).
fn bad_frame(r: &mut Reporter, net: &mut UserNet, mac: [u8; 6], target: &Target) {
    let bad_iova = net.iova() + BAD_IOVA_OFFSET;
    // Only records logged from now on count.
    let mut kmsg = Kmsg::open_at_end();
    let sent = net.send(
        1,
        &tx_bytes(mac, &BAD_PAYLOAD),
        Some((bad_iova, BAD_LEN)),
        BAD_TX_TIMEOUT,
    );
    match sent {
        // Completed (dropped, ferrio's behaviour) or not within the wait: both are
        // what a device may do with it; a broken ring or eventfd is not.
        Ok(sent) => {
            let how = if sent.waited.elem.is_some() {
                "completed"
            } else {
                "not completed"
            };
            r.check(
                "vfio_net_bad_tx",
                sent.waited.error.is_none(),
                format!(
                    "{how}: {}; buffer 2 at unmapped iova {bad_iova:#x}",
                    sent.describe()
                ),
            );
        }
        Err(e) => r.check("vfio_net_bad_tx", false, e),
    }
    let found = kmsg
        .as_mut()
        .map(|k| k.find_fault(target.endpoint, bad_iova, FAULT_LOG_TIMEOUT));
    match found {
        Ok(s) => {
            let (ok, value) = match (s.exact, s.endpoint) {
                (Some(line), _) => (true, line),
                (None, Some(line)) => (true, format!("{line} (not at {bad_iova:#x})")),
                (None, None) => (
                    false,
                    format!(
                        "no fault line for EP {} within {FAULT_LOG_TIMEOUT:?} ({} other fault \
                         lines in {} records{})",
                        target.endpoint,
                        s.others,
                        s.records,
                        s.error.map(|e| format!("; {e}")).unwrap_or_default()
                    ),
                ),
            };
            r.check("vfio_net_fault_logged", ok, value);
        }
        Err(e) => r.check("vfio_net_fault_logged", false, e.clone()),
    }
    match net.transport.status() {
        Ok(s) => {
            let ok = s & STATUS_DEVICE_NEEDS_RESET == 0 && s & STATUS_DRIVER_OK != 0;
            r.check("vfio_net_status_after_fault", ok, u32::from(s));
        }
        Err(e) => r.check("vfio_net_status_after_fault", false, e),
    }
}

/// Back to virtio-pci (checks `vfio_net_rebind`: the driver it got, and
/// `vfio_net_netdev`: the net interface that came back).
fn give_back(r: &mut Reporter, bdf: &str) {
    match bind::unbind_vfio(bdf) {
        Ok(d) => r.check("vfio_net_rebind", d == "virtio-pci", d),
        Err(e) => return r.check("vfio_net_rebind", false, e),
    }
    r.check_result(
        "vfio_net_netdev",
        bind::wait_for_netdev(bdf, NETDEV_TIMEOUT),
    );
}
