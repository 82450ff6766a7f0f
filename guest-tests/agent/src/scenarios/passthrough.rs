//! Scenario `vfio-passthrough`: ferrio's passthrough function model (`ferrio_pci::vfio`,
//! the code behind `ferrio run --device`) embedded in a program that is not ferrio,
//! against real kernel VFIO. The host declares a virtio-net PF with one VF, both
//! behind the virtio-iommu, each on its own TAP (`guest-tests/tests/vfio_passthrough.rs`,
//! shared constants in `passthrough/spec.rs`). In one boot:
//!
//! 1. the nested case: with /dev/kvm a nested guest could get the VF through
//!    `ferrio run --device` (not automated); without it the skip and its reason are
//!    reported (`pt_nested_skipped`);
//! 2. `echo 1 > sriov_numvfs` on the PF, the VF's virtio_net interface (its MAC), the
//!    VF moved to vfio-pci (`driver_override`), unsafe interrupts allowed (no
//!    interrupt remapping behind virtio-iommu), the cdev nodes looked for;
//! 3. per back end (`open_group`, then `open_cdev`): the model built with vectors of
//!    our own (`passthrough/model.rs`: one eventfd each) and 2 MiB of
//!    `GuestMemoryMmap` mapped for DMA; the program plays the guest's PCI core (IDs,
//!    BAR 0 sized and placed, decoding and bus mastering on, capabilities, MSI-X
//!    programmed and unmasked) and a virtio-net driver over BAR accesses through the
//!    model (`passthrough/net.rs`); sends [`spec::TX_FRAMES`] tagged frames (the
//!    host's sniffer hashes them), receives the [`spec::RX_FRAMES`] the host sends
//!    back once it saw them, both waited for on the MSI-X eventfds; then the model is
//!    dropped (interrupts off, device reset, DMA unmapped) and that is checked;
//! 4. the VF goes back to virtio-pci and its interface pings its TAP's host end.

mod model;
mod net;
#[allow(dead_code)] // shared with the host's test through `#[path]`
pub(crate) mod spec;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrio_pci::PciDevice;
use sha2::{Digest, Sha256};

use self::model::{Session, BAR0_GPA, MSI_ADDRESS};
use self::net::{Net, RX_VECTOR, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, TX_VECTOR, WANTED};
use super::net::link;
use super::vfio::bind;
use crate::parse;
use crate::report::Reporter;
use crate::sys;

const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_NET: u32 = 0x1041;
const VF_TIMEOUT: Duration = Duration::from_secs(60);
const NETDEV_TIMEOUT: Duration = Duration::from_secs(60);
const TX_TIMEOUT: Duration = Duration::from_secs(10);
const RX_TIMEOUT: Duration = Duration::from_secs(30);
const IOMMUFD_UNSAFE: &str = "/sys/module/iommufd/parameters/allow_unsafe_interrupts";

pub fn run(r: &mut Reporter) {
    if !sys::is_init() {
        return r.check(
            "in_guest",
            false,
            "refusing to run: vfio-passthrough rebinds PCI functions, only the guest's init may",
        );
    }
    // The model logs through `tracing`: its warnings go to the console.
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .try_init();
    nested(r);
    let Some(tag) = tag(r) else { return };
    let Some(pf) = find_pf(r) else { return };
    let Some(vf) = enable_vf(r, &pf) else { return };
    let (ok, value) = bind::allow_unsafe_interrupts();
    let iommufd = std::fs::write(IOMMUFD_UNSAFE, "1")
        .map_err(|e| e.to_string())
        .and_then(|()| sys::read_trimmed(IOMMUFD_UNSAFE));
    r.check(
        "pt_unsafe_interrupts",
        ok && iommufd.as_deref().is_ok_and(|v| v == "Y" || v == "1"),
        format!("type1: {value}; iommufd: {iommufd:?}"),
    );
    match bind::bind_vfio(&vf) {
        Ok(old) => r.check("pt_bind", true, format!("{old} -> vfio-pci")),
        Err(e) => {
            r.check("pt_bind", false, e);
            return give_back(r, &vf);
        }
    }
    let cdev = cdev_nodes(r, &vf);
    for (b, name) in (0u8..).zip(spec::BACKENDS) {
        if name == "cdev" && !cdev {
            r.note("pt_cdev: skipped, the guest has no VFIO device cdev (see pt_cdev_nodes)");
            continue;
        }
        backend(r, &vf, b, name, &tag);
    }
    give_back(r, &vf);
}

/// The nested path needs /dev/kvm in this guest.
fn nested(r: &mut Reporter) {
    if Path::new("/dev/kvm").exists() {
        r.check(
            "pt_nested",
            true,
            "/dev/kvm exists: a nested `ferrio run --device` could take the VF; not automated yet",
        );
    } else {
        r.note(&format!(
            "nested passthrough skipped: {}",
            spec::NESTED_SKIP
        ));
        r.check("pt_nested_skipped", true, spec::NESTED_SKIP);
    }
}

fn tag(r: &mut Reporter) -> Option<[u8; spec::TAG_LEN]> {
    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    let tag = parse::cmdline_param(&cmdline, spec::TAG_PARAM).and_then(spec::parse_tag);
    match tag {
        Some(t) => r.check("pt_tag", true, spec::tag_hex(&t)),
        None => r.check(
            "pt_tag",
            false,
            format!("no {}= on the command line", spec::TAG_PARAM),
        ),
    }
    tag
}

fn hex_attr(dir: &Path, name: &str) -> Option<u32> {
    let v = sys::read_trimmed(dir.join(name)).ok()?;
    u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// The virtio-net function with an SR-IOV capability (check `pt_pf`).
fn find_pf(r: &mut Reporter) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for bdf in names {
        let dir = bind::pci_dir(&bdf);
        let is_net = hex_attr(&dir, "vendor") == Some(VIRTIO_VENDOR)
            && hex_attr(&dir, "device") == Some(VIRTIO_NET);
        if let (true, Ok(total)) = (is_net, sys::read_trimmed(dir.join("sriov_totalvfs"))) {
            r.check("pt_pf", true, format!("{bdf} totalvfs {total}"));
            return Some(bdf);
        }
    }
    r.check("pt_pf", false, "no virtio-net function with SR-IOV");
    None
}

/// `echo 1 > sriov_numvfs`, the VF's address and its netdev's MAC (checks `pt_vf`,
/// `pt_vf_mac`).
fn enable_vf(r: &mut Reporter, pf: &str) -> Option<String> {
    let dir = bind::pci_dir(pf);
    if let Err(e) = std::fs::write(dir.join("sriov_numvfs"), "1") {
        r.check("pt_vf", false, format!("echo 1 > sriov_numvfs: {e}"));
        return None;
    }
    let deadline = Instant::now() + VF_TIMEOUT;
    let vf = loop {
        let link = std::fs::read_link(dir.join("virtfn0")).ok();
        if let Some(name) = link.as_deref().and_then(Path::file_name) {
            break name.to_string_lossy().into_owned();
        }
        if Instant::now() >= deadline {
            r.check("pt_vf", false, format!("no virtfn0 after {VF_TIMEOUT:?}"));
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let group = bind::iommu_group(&vf);
    r.check(
        "pt_vf",
        group.is_ok(),
        format!(
            "{vf} iommu group {}",
            group.map_or_else(|e| e, |g| g.to_string())
        ),
    );
    match bind::wait_for_netdev(&vf, NETDEV_TIMEOUT) {
        Ok(name) => {
            let mac =
                sys::read_trimmed(format!("/sys/class/net/{name}/address")).unwrap_or_else(|e| e);
            r.check("pt_vf_mac", mac == spec::VF_MAC, mac);
        }
        Err(e) => r.check("pt_vf_mac", false, e),
    }
    Some(vf)
}

/// /dev/iommu, /dev/vfio/devices/vfioN and the VF's `vfio-dev/` (check
/// `pt_cdev_nodes`); whether the cdev back end can run.
fn cdev_nodes(r: &mut Reporter, vf: &str) -> bool {
    let iommu = Path::new("/dev/iommu").exists();
    let dev = std::fs::read_dir(bind::pci_dir(vf).join("vfio-dev"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let node = dev
        .as_ref()
        .map(|d| PathBuf::from("/dev/vfio/devices").join(d));
    let node_ok = node.as_ref().is_some_and(|n| n.exists());
    // Reported, not required: a kernel without the cdev skips that back end (the
    // host prints the skip).
    r.check(
        "pt_cdev_nodes",
        true,
        format!(
            "/dev/iommu {}; {vf}/vfio-dev {}; node {}",
            if iommu { "present" } else { "missing" },
            dev.as_deref().unwrap_or("missing"),
            node.map_or("none".into(), |n| format!(
                "{} {}",
                n.display(),
                if node_ok { "present" } else { "missing" }
            )),
        ),
    );
    iommu && node_ok
}

fn open(name: &str, vf: &str) -> Result<ferrio_pci::vfio::OpenedDevice, String> {
    let path = bind::pci_dir(vf);
    match name {
        "group" => ferrio_pci::vfio::open_group(&path),
        _ => ferrio_pci::vfio::open_cdev(&path),
    }
    .map_err(|e| e.to_string())
}

/// One back end, open to teardown (checks `pt_<backend>_*`).
fn backend(r: &mut Reporter, vf: &str, b: u8, name: &str, tag: &[u8; spec::TAG_LEN]) {
    let c = |what: &str| spec::backend_check(name, what);
    let opened = match open(name, vf) {
        Ok(o) => o,
        Err(e) => return r.check(&c("open"), false, e),
    };
    let kvm_fd = opened.0.kvm_vfio_fd().is_some();
    r.check(&c("open"), true, format!("kvm_vfio_fd {kvm_fd}"));
    let (mut s, text) = match model::build(opened) {
        Ok(v) => v,
        Err(e) => return r.check(&c("model"), false, e),
    };
    r.check(&c("model"), true, text);
    let ready = pci_core(r, &mut s, name, vf);
    if let Some(caps) = ready {
        match Net::new(&mut s, &caps) {
            Ok(mut n) => drive(r, &mut n, b, name, tag),
            Err(e) => r.check(&c("features"), false, e),
        }
    }
    teardown(r, s, name, vf);
}

/// The guest's PCI core through the model; the virtio structures when the function
/// is ready for its driver.
fn pci_core(
    r: &mut Reporter,
    s: &mut Session,
    name: &str,
    vf: &str,
) -> Option<Vec<model::VirtioCap>> {
    let c = |what: &str| spec::backend_check(name, what);
    let dev: &mut dyn PciDevice = &mut s.dev;
    let ids = model::cfg_read(dev, 0, 4);
    let (vendor, device) = (ids & 0xffff, ids >> 16);
    r.check(
        &c("ids"),
        vendor == VIRTIO_VENDOR && device == VIRTIO_NET,
        format!("{vendor:#06x}:{device:#06x}"),
    );
    let bars: Vec<String> = dev
        .bars()
        .iter()
        .map(|b| format!("{} {:?} {:#x}", b.index, b.kind, b.size))
        .collect();
    r.note(&format!("{name}: model BARs {}", bars.join(", ")));
    let (size, wide, prefetch) = match model::size_and_place_bar0(dev) {
        Ok(v) => v,
        Err(e) => {
            r.check(&c("bar0"), false, e);
            return None;
        }
    };
    r.check(
        &c("bar0"),
        true,
        format!(
            "{size:#x} {} prefetchable {prefetch} at {BAR0_GPA:#x}",
            if wide { "mem64" } else { "mem32" }
        ),
    );
    let before = dev.bar_mapping(0);
    let (cmd, changes) = model::enable_decoding(dev);
    let mapped = changes
        .iter()
        .any(|m| m.index == 0 && m.new == Some(BAR0_GPA));
    r.check(
        &c("decode"),
        before.is_none() && cmd & 0x6 == 0x6 && mapped && dev.bar_mapping(0) == Some(BAR0_GPA),
        format!(
            "command {cmd:#06x}; BAR 0 {before:x?} -> {:x?}; changes {changes:x?}",
            dev.bar_mapping(0)
        ),
    );
    let direct: Vec<String> = dev
        .direct_areas(0)
        .iter()
        .map(|a| format!("{:#x}+{:#x}", a.offset, a.size))
        .collect();
    r.note(&format!(
        "{name}: BAR 0 direct (mmap-ed) areas: {}",
        direct.join(" ")
    ));
    let caps = model::capabilities(dev);
    let virtio = model::virtio_caps(dev, &caps);
    let Some(msix) = model::msix_info(dev, &caps) else {
        r.check(&c("caps"), false, format!("no MSI-X among {caps:x?}"));
        return None;
    };
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("{:#04x}@{:#x}", c.id, c.offset))
        .collect();
    let vlist: Vec<String> = virtio
        .iter()
        .map(|v| {
            format!(
                "type{} bar{}+{:#x}/{:#x}",
                v.cfg_type, v.bar, v.offset, v.length
            )
        })
        .collect();
    let all = [1u8, 2, 3, 4]
        .iter()
        .all(|t| virtio.iter().any(|v| v.cfg_type == *t && v.bar == 0));
    r.check(
        &c("caps"),
        all,
        format!(
            "{}; virtio {}; msix {msix:x?}",
            list.join(" "),
            vlist.join(" ")
        ),
    );
    let ctrl = model::enable_msix(dev, &msix, &[TX_VECTOR, RX_VECTOR]);
    let unmasked = [TX_VECTOR, RX_VECTOR].map(|v| model::msix_vector_ctrl(dev, &msix, v));
    let msgs = [TX_VECTOR, RX_VECTOR].map(|v| s.vectors.message(v));
    let lines = model::vfio_irq_lines(vf);
    let msgs_ok = msgs
        .iter()
        .all(|m| m.is_some_and(|m| m.address == MSI_ADDRESS));
    let lines_ok = lines.as_ref().is_ok_and(|l| {
        [TX_VECTOR, RX_VECTOR]
            .iter()
            .all(|v| l.iter().any(|x| x.starts_with(&format!("vfio-msix[{v}]"))))
    });
    r.check(
        &c("msix"),
        ctrl & 0xc000 == 0x8000 && unmasked == [0, 0] && msgs_ok && lines_ok,
        format!(
            "{} vectors, control {ctrl:#06x}, vector ctrl {unmasked:?}, messages {msgs:x?}, \
             commits {}, guest kernel irqs {lines:?}",
            msix.size,
            s.vectors.commits()
        ),
    );
    lines_ok.then_some(virtio)
}

/// The virtio-net driver: features, queues, MAC, DRIVER_OK, frames out, frames in.
fn drive(r: &mut Reporter, n: &mut Net, b: u8, name: &str, tag: &[u8; spec::TAG_LEN]) {
    let c = |what: &str| spec::backend_check(name, what);
    match n.negotiate() {
        Ok((offered, accepted)) => r.check(
            &c("features"),
            accepted == WANTED,
            format!("offered {offered:#x} accepted {accepted:#x}"),
        ),
        Err(e) => return r.check(&c("features"), false, e),
    }
    let queues = n
        .setup_queue(net::RX_QUEUE, RX_VECTOR)
        .and_then(|rx| Ok((rx, n.setup_queue(net::TX_QUEUE, TX_VECTOR)?)));
    match queues {
        Ok((rx, tx)) => r.check(
            &c("queues"),
            true,
            format!("rx {rx} (vector {RX_VECTOR}), tx {tx} (vector {TX_VECTOR})"),
        ),
        Err(e) => return r.check(&c("queues"), false, e),
    }
    let mac = n.mac();
    let text = mac.map(|b| format!("{b:02x}")).join(":");
    r.check(&c("mac"), text == spec::VF_MAC, text);
    let st = n.driver_ok();
    r.check(
        &c("driver_ok"),
        st & STATUS_DRIVER_OK != 0 && st & STATUS_NEEDS_RESET == 0,
        u32::from(st),
    );
    if st & STATUS_DRIVER_OK == 0 {
        return;
    }
    // Receive buffers first: the host answers the first frame it sees.
    if let Err(e) = n.post_rx() {
        return r.check(&c("rx_count"), false, e);
    }
    let payloads: Vec<Vec<u8>> = (0..spec::TX_FRAMES)
        .map(|q| spec::payload(tag, spec::OUT, b, q))
        .collect();
    let frames: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| spec::frame([0xff; 6], mac, p))
        .collect();
    let started = Instant::now();
    match n.send(&frames, TX_TIMEOUT) {
        Ok(done) => {
            let sha = sha256_of(&payloads);
            r.note(&format!(
                "{name}: {done} frames sent in {} ms",
                started.elapsed().as_millis()
            ));
            let ok = done == frames.len();
            r.check(
                &c("tx_sha256"),
                ok,
                if ok {
                    sha
                } else {
                    format!("{done} frames completed")
                },
            );
        }
        Err(e) => r.check(&c("tx_sha256"), false, e),
    }
    r.check(&c("tx_irqs"), n.tx_interrupts > 0, n.tx_interrupts);
    r.note(&format!(
        "{name}: vectors fired by the model itself: {}",
        n.session().vectors.fired()
    ));
    let accept = |f: &[u8]| -> Result<Option<(u32, Vec<u8>)>, String> {
        if f.len() < 14 || f[12..14] != spec::ETHERTYPE.to_be_bytes() {
            return Ok(None);
        }
        let p = &f[14..];
        match spec::parse_payload(tag, p) {
            Some((spec::IN, back, seq)) if back == b => {
                let want = spec::payload(tag, spec::IN, b, seq);
                if p.get(..want.len()) == Some(&want[..]) {
                    Ok(Some((seq, want)))
                } else {
                    Err(format!("frame {seq}: payload differs"))
                }
            }
            _ => Ok(None),
        }
    };
    match n.receive(spec::RX_FRAMES as usize, RX_TIMEOUT, accept) {
        Ok(got) => {
            let count = got.frames.len() as u64;
            let all = got.frames.keys().copied().eq(0..spec::RX_FRAMES);
            r.note(&format!(
                "{name}: rx others {} bad {:?}",
                got.others, got.bad
            ));
            r.check(&c("rx_count"), all && got.bad.is_empty(), count);
            let payloads: Vec<Vec<u8>> = got.frames.into_values().collect();
            r.check(&c("rx_sha256"), all, sha256_of(&payloads));
        }
        Err(e) => r.check(&c("rx_count"), false, e),
    }
    r.check(&c("rx_irqs"), n.rx_interrupts > 0, n.rx_interrupts);
    let st = n.status();
    r.check(
        &c("status_after"),
        st & STATUS_NEEDS_RESET == 0 && st & STATUS_DRIVER_OK != 0,
        u32::from(st),
    );
}

fn sha256_of(parts: &[Vec<u8>]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Drops the model and checks what its drop did: no VFIO interrupt lines left, no
/// DMA mapping left, the device reset (`pt_<backend>_teardown`).
fn teardown(r: &mut Reporter, s: Session, name: &str, vf: &str) {
    let dma = s.dma.clone();
    let maps = lock_len(&dma);
    let lines = model::vfio_irq_lines(vf)
        .map(|l| l.len())
        .unwrap_or(usize::MAX);
    drop(s);
    let maps_after = lock_len(&dma);
    drop(dma);
    let lines_after = model::vfio_irq_lines(vf).map(|l| l.len());
    r.check(
        &spec::backend_check(name, "teardown"),
        maps_after == 0 && lines_after == Ok(0),
        format!("DMA mappings {maps} -> {maps_after}; vfio irq lines {lines} -> {lines_after:?}"),
    );
}

fn lock_len(dma: &std::sync::Mutex<ferrio_pci::vfio::DmaMappings>) -> usize {
    dma.lock()
        .unwrap_or_else(|e| e.into_inner())
        .mappings()
        .len()
}

/// Back to virtio-pci; the interface comes back and pings its TAP's host end.
fn give_back(r: &mut Reporter, vf: &str) {
    match bind::unbind_vfio(vf) {
        Ok(d) => r.check("pt_rebind", d == "virtio-pci", d),
        Err(e) => return r.check("pt_rebind", false, e),
    }
    let name = match bind::wait_for_netdev(vf, NETDEV_TIMEOUT) {
        Ok(n) => n,
        Err(e) => return r.check("pt_rebind_ping", false, e),
    };
    let nic = link::Nic {
        name,
        virtio: String::new(),
        pci: vf.to_owned(),
    };
    if let Err(e) = link::configure(&nic, spec::guest_ip(1), spec::PREFIX_LEN) {
        return r.check("pt_rebind_ping", false, e);
    }
    match link::ping(spec::host_ip(1), spec::PINGS) {
        Ok((stats, rtt)) => {
            r.note(&format!("pt_rebind_ping: {stats:?} {rtt}"));
            let ok =
                stats.transmitted == u64::from(spec::PINGS) && stats.received == stats.transmitted;
            r.check("pt_rebind_ping", ok, stats.received);
        }
        Err(e) => r.check("pt_rebind_ping", false, e),
    }
}
