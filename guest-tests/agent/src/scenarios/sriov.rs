//! Scenario `sriov`: the VMM's emulated SR-IOV, seen by the guest's PCI core and
//! virtio drivers. The host declares a virtio-blk PF and a virtio-net PF with two VFs
//! each, all behind the virtio-iommu (`guest-tests/tests/sriov.rs`; what both sides
//! agree on is in `sriov/spec.rs`). In one boot:
//!
//! 1. discovery: both PFs, their SR-IOV capability decoded from sysfs `config`
//!    (walking the extended list from 0x100) and compared with the PCI core's sysfs
//!    attributes, the IOV BAR Linux sized, VIRTIO_F_SR_IOV in the PF's features;
//! 2. `echo 2 > sriov_numvfs` on each PF: the VFs at the addresses the capability
//!    gives (`virtfnN`/`physfn` links, IDs, config header, BAR 0, drivers, MSI
//!    vectors); net VFs: MAC, an address on their own TAP's subnet, pings and a
//!    hashed TCP transfer each way with the host's peer; blk VFs: serial, their own
//!    image's data, a written and read-back chunk; each VF's MSI-X lines fired;
//! 3. life cycle: `echo 0` (VFs gone), `echo TotalVFs+1` refused (the errno), `echo 2`
//!    again (same MACs/serials, pings, the data written before), while the PFs keep
//!    working (a ping over the net PF and a read from the blk PF disk before, between
//!    and after);
//! 4. IOMMU: every VF in its own group, distinct from each other and the PFs';
//! 5. net VF [`spec::USERNET_VF`] handed to vfio-pci, one frame carrying the host's
//!    tag (`ferrio.sriov.tag=`) sent from user space (`scenarios/vfio/usernet.rs`),
//!    then the VF must be a working virtio_net interface again.
//!
//! The VFs stay enabled at the end.

mod blkvf;
mod netvf;
mod pf;
// Shared with the host's test through `#[path]`; some items are host-only.
#[allow(dead_code)]
pub(crate) mod spec;

use std::time::{Duration, Instant};

use pf::{Kind, Pf};
use spec::{pf_check, vf_check};

use crate::parse;
use crate::report::Reporter;
use crate::scenarios::net::wire;
use crate::sys;

/// How long the VFs of one `echo 2` may take to appear with their drivers bound.
const ENABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the VFs of one `echo 0` may take to disappear.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(r: &mut Reporter) {
    // It writes VF disks, toggles `sriov_numvfs`, rebinds drivers and sets sysctls:
    // never outside a guest.
    if !sys::is_init() {
        return r.check(
            "in_guest",
            false,
            "refusing to run: the sriov scenario reconfigures PCI functions and writes \
             disks, which only the guest's init may do",
        );
    }
    let tag = tag(r);
    let net = discover(r, Kind::Net);
    let blk = discover(r, Kind::Blk);
    let (Some(net), Some(blk)) = (net, blk) else {
        return;
    };
    // Large TSO packets, as in the `net` scenario: every packet costs the guest.
    let segs = std::fs::write(
        wire::TSO_SEGS_SYSCTL,
        format!("{}\n", wire::DEFAULT_TSO_SEGS),
    );
    r.note(&format!("tcp_min_tso_segs: {segs:?}"));
    let pf_nic = netvf::pf_up(r, &net);
    blkvf::pf_read(r, &blk.bdf, "before");

    // The VFs, the first time.
    let net_vfs = enable(r, &net, "enable");
    let mut nics = Vec::new();
    if let Some(vfs) = &net_vfs {
        vf_checks(r, &net, vfs);
        nics = netvf::first(r, vfs);
    }
    let blk_vfs = enable(r, &blk, "enable");
    if let Some(vfs) = &blk_vfs {
        vf_checks(r, &blk, vfs);
        blkvf::first(r, vfs);
    }
    match sys::read("/proc/interrupts") {
        Ok(text) => {
            for (i, nic) in nics.iter().enumerate() {
                if let Some(nic) = nic {
                    netvf::msix(r, i, nic, &text);
                }
            }
            for (i, bdf) in blk_vfs.iter().flatten().enumerate() {
                blkvf::msix(r, i, bdf, &text);
            }
        }
        Err(e) => r.check("sriov_interrupts", false, e),
    }

    // Life cycle: off, too many, on again; the PFs keep working.
    disable(r, &net, net_vfs.as_deref());
    disable(r, &blk, blk_vfs.as_deref());
    over_total(r, &net);
    over_total(r, &blk);
    if pf_nic.is_some() {
        netvf::ping(r, "sriov_net_pf_ping_between", 0);
    }
    blkvf::pf_read(r, &blk.bdf, "between");
    let net_vfs = enable(r, &net, "reenable");
    if let Some(vfs) = &net_vfs {
        netvf::again(r, vfs);
    }
    let blk_vfs = enable(r, &blk, "reenable");
    if let Some(vfs) = &blk_vfs {
        blkvf::again(r, vfs);
    }

    iommu_groups(r, [(&net, net_vfs.as_deref()), (&blk, blk_vfs.as_deref())]);
    match (&net_vfs, tag) {
        (Some(vfs), Some(tag)) if vfs.len() > spec::USERNET_VF => {
            vfio_user_tx(r, &vfs[spec::USERNET_VF], &tag);
        }
        _ => r.check(
            "sriov_usernet",
            false,
            "no tag or no net VF to hand to VFIO",
        ),
    }

    if pf_nic.is_some() {
        netvf::ping(r, "sriov_net_pf_ping_after", 0);
    }
    blkvf::pf_read(r, &blk.bdf, "after");
}

/// The tag from the kernel command line (`sriov_tag`).
fn tag(r: &mut Reporter) -> Option<[u8; spec::TAG_LEN]> {
    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    let tag = parse::cmdline_param(&cmdline, spec::TAG_PARAM).and_then(spec::parse_tag);
    match tag {
        Some(t) => r.check("sriov_tag", true, spec::tag_hex(&t)),
        None => r.check(
            "sriov_tag",
            false,
            format!("no valid {}= on the command line", spec::TAG_PARAM),
        ),
    }
    tag
}

/// The PF of `kind`: its SR-IOV capability against sysfs, its IOV BAR and its
/// virtio features. `None` (a failed `sriov_KIND_pf`) when there is no such PF.
fn discover(r: &mut Reporter, kind: Kind) -> Option<Pf> {
    let k = kind.name();
    let pf = match pf::find_pf(kind) {
        Ok(pf) => pf,
        Err(e) => {
            r.check(&pf_check(k, "pf"), false, e);
            return None;
        }
    };
    r.check(&pf_check(k, "pf"), true, pf.bdf.as_str());
    let c = pf.cap;
    let num = |name: &str| pf.attr(name).ok().and_then(|v| v.parse::<u64>().ok());
    let (total, offset, stride, numvfs) = (
        num("sriov_totalvfs"),
        num("sriov_offset"),
        num("sriov_stride"),
        num("sriov_numvfs"),
    );
    let vf_device = pf.attr("sriov_vf_device");
    r.note(&format!(
        "{k} PF {}: {c:?}; sysfs totalvfs {total:?} offset {offset:?} stride {stride:?} \
         numvfs {numvfs:?} vf_device {vf_device:?}",
        pf.bdf
    ));
    let wide = u64::from;
    r.check(
        &pf_check(k, "cap_offset"),
        c.offset >= 0x100,
        wide(c.offset),
    );
    r.check(
        &pf_check(k, "total_vfs"),
        usize::from(c.total_vfs) == spec::VFS,
        wide(c.total_vfs),
    );
    match total {
        Some(t) => r.check(&pf_check(k, "sysfs_totalvfs"), t == wide(c.total_vfs), t),
        None => r.check(&pf_check(k, "sysfs_totalvfs"), false, "unreadable"),
    }
    // Without VF Migration, InitialVFs must equal TotalVFs (PCIe 9.3.3.7).
    r.check(
        &pf_check(k, "initial_vfs"),
        c.initial_vfs == c.total_vfs,
        wide(c.initial_vfs),
    );
    r.check(
        &pf_check(k, "vf_offset"),
        c.first_vf_offset >= 1 && offset == Some(wide(c.first_vf_offset)),
        wide(c.first_vf_offset),
    );
    r.check(
        &pf_check(k, "vf_stride"),
        c.vf_stride >= 1 && stride == Some(wide(c.vf_stride)),
        wide(c.vf_stride),
    );
    let sysfs_device = vf_device
        .ok()
        .and_then(|v| u16::from_str_radix(&v, 16).ok());
    r.check(
        &pf_check(k, "vf_device"),
        c.vf_device == kind.device_id() && sysfs_device == Some(c.vf_device),
        format!("{:#06x}", c.vf_device),
    );
    r.check(
        &pf_check(k, "page_sizes"),
        c.supported_page_sizes & 1 != 0,
        u64::from(c.supported_page_sizes),
    );
    // Linux programs the system page size: 4 KiB pages -> bit 0.
    r.check(
        &pf_check(k, "system_page_size"),
        c.system_page_size == 1,
        u64::from(c.system_page_size),
    );
    r.check(
        &pf_check(k, "numvfs"),
        c.num_vfs == 0 && numvfs == Some(0),
        wide(c.num_vfs),
    );
    match pf::resource(&pf.bdf, pf::IOV_RESOURCE) {
        Ok(res) => {
            let ok = res.mem64() && res.len() == spec::VF_BAR0_LEN * wide(c.total_vfs);
            r.check(&pf_check(k, "vf_bar0_total"), ok, res.describe());
        }
        Err(e) => r.check(&pf_check(k, "vf_bar0_total"), false, e),
    }
    let features = sys::read_trimmed(
        std::path::Path::new("/sys/bus/virtio/devices")
            .join(&pf.virtio)
            .join("features"),
    );
    match features {
        Ok(bits) => {
            let sr_iov = bits.as_bytes().get(spec::SR_IOV_FEATURE_BIT) == Some(&b'1');
            r.check(&pf_check(k, "pf_features"), sr_iov, bits);
        }
        Err(e) => r.check(&pf_check(k, "pf_features"), false, e),
    }
    Some(pf)
}

/// `echo VFS > sriov_numvfs` and the wait for the VFs and their drivers:
/// `sriov_KIND_<what>` with `sriov_numvfs` read back. Returns the VFs' addresses
/// (whatever `virtfn` links exist, even when they did not all come up).
fn enable(r: &mut Reporter, pf: &Pf, what: &str) -> Option<Vec<String>> {
    let name = pf_check(pf.kind.name(), what);
    let started = Instant::now();
    if let Err((_, e)) = pf.set_num_vfs(spec::VFS) {
        r.check(&name, false, e);
        return None;
    }
    match pf::wait_vfs(pf, spec::VFS, ENABLE_TIMEOUT) {
        Ok(vfs) => {
            r.note(&format!(
                "{name}: {vfs:?} bound after {} ms",
                started.elapsed().as_millis()
            ));
            match pf.num_vfs() {
                Ok(n) => r.check(&name, n == spec::VFS as u64, n),
                Err(e) => r.check(&name, false, e),
            }
            Some(vfs)
        }
        Err(e) => {
            r.check(&name, false, e);
            let links: Vec<String> = pf::virtfns(&pf.bdf).into_iter().map(|(_, b)| b).collect();
            (!links.is_empty()).then_some(links)
        }
    }
}

/// Per VF (first enable): address from the capability, `physfn`, IDs in sysfs and
/// in its own config header, BAR 0, drivers, MSI vectors.
fn vf_checks(r: &mut Reporter, pf: &Pf, vfs: &[String]) {
    let k = pf.kind.name();
    // Queues + 1 vectors: net has receive, transmit (and control) queues.
    let min_vectors = match pf.kind {
        Kind::Net => 3,
        Kind::Blk => 2,
    };
    for (i, bdf) in vfs.iter().enumerate() {
        match pf.vf_bdf(i) {
            Ok(want) => r.check(&vf_check(k, i, "bdf"), *bdf == want, bdf.as_str()),
            Err(e) => r.check(&vf_check(k, i, "bdf"), false, e),
        }
        let physfn = pf::link_name(&pf::dir(bdf).join("physfn")).unwrap_or_else(|| "none".into());
        r.check(&vf_check(k, i, "physfn"), physfn == pf.bdf, physfn);
        let ids = pf::ids(bdf);
        let want = format!("{:#06x}:{:#06x}", spec::VIRTIO_VENDOR, pf.kind.device_id());
        r.check(&vf_check(k, i, "ids"), ids == want, ids);
        match pf::config_head(bdf) {
            Ok((vendor, device, bar0, bar1)) => r.check(
                &vf_check(k, i, "config"),
                vendor == 0xffff && device == 0xffff && bar0 == 0 && bar1 == 0,
                format!("ids {vendor:#06x}:{device:#06x} bars {bar0:#010x} {bar1:#010x}"),
            ),
            Err(e) => r.check(&vf_check(k, i, "config"), false, e),
        }
        match pf::resource(bdf, 0) {
            Ok(res) => r.check(
                &vf_check(k, i, "bar0"),
                res.mem64() && res.len() == spec::VF_BAR0_LEN,
                res.describe(),
            ),
            Err(e) => r.check(&vf_check(k, i, "bar0"), false, e),
        }
        let drivers = pf::drivers(bdf);
        let want = format!("virtio-pci/{}", pf.kind.virtio_driver());
        r.check(&vf_check(k, i, "driver"), drivers == want, drivers);
        let vectors = pf::msi_irqs(bdf);
        r.check(&vf_check(k, i, "msi_irqs"), vectors >= min_vectors, vectors);
    }
}

/// `echo 0 > sriov_numvfs` (`sriov_KIND_disable`), then no `virtfn` link and no VF
/// device may be left (`sriov_KIND_vfs_gone`).
fn disable(r: &mut Reporter, pf: &Pf, vfs: Option<&[String]>) {
    let k = pf.kind.name();
    match pf.set_num_vfs(0) {
        Ok(()) => match pf.num_vfs() {
            Ok(n) => r.check(&pf_check(k, "disable"), n == 0, n),
            Err(e) => r.check(&pf_check(k, "disable"), false, e),
        },
        Err((_, e)) => r.check(&pf_check(k, "disable"), false, e),
    }
    // The VFs seen, and where VFs must not be in any case.
    let mut bdfs: Vec<String> = (0..spec::VFS).filter_map(|i| pf.vf_bdf(i).ok()).collect();
    bdfs.extend(vfs.unwrap_or_default().iter().cloned());
    bdfs.sort();
    bdfs.dedup();
    let deadline = Instant::now() + GONE_TIMEOUT;
    let left = loop {
        let left = pf::leftovers(pf, &bdfs);
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let value = if left.is_empty() {
        "none".to_owned()
    } else {
        left.join(" ")
    };
    r.check(&pf_check(k, "vfs_gone"), left.is_empty(), value);
}

/// `echo TotalVFs+1 > sriov_numvfs` must be refused: `sriov_KIND_numvfs_over_total`
/// with the errno (ERANGE from the PCI core; EINVAL accepted), and no VF enabled.
fn over_total(r: &mut Reporter, pf: &Pf) {
    let name = pf_check(pf.kind.name(), "numvfs_over_total");
    let n = usize::from(pf.cap.total_vfs) + 1;
    match pf.set_num_vfs(n) {
        Ok(()) => {
            let now = pf.num_vfs();
            r.check(
                &name,
                false,
                format!("echo {n} accepted: sriov_numvfs {now:?}"),
            );
            let _ = pf.set_num_vfs(0);
        }
        Err((errno, text)) => {
            r.note(&text);
            let still = pf.num_vfs();
            let refused = errno == libc::ERANGE || errno == libc::EINVAL;
            if still != Ok(0) {
                r.note(&format!(
                    "{name}: sriov_numvfs after the refusal: {still:?}"
                ));
            }
            r.check(
                &name,
                refused && still == Ok(0),
                u64::try_from(errno).unwrap_or(0),
            );
        }
    }
}

/// Every VF's and PF's IOMMU group: one check each, and `sriov_iommu_groups_distinct`.
fn iommu_groups(r: &mut Reporter, pfs: [(&Pf, Option<&[String]>); 2]) {
    // (check, label, function) for every function that must have its own group.
    let mut functions: Vec<(String, String, &str)> = Vec::new();
    let mut missing = 0;
    for (pf, vfs) in pfs {
        let k = pf.kind.name();
        functions.push((pf_check(k, "pf_iommu_group"), format!("{k}_pf"), &pf.bdf));
        let vfs = vfs.unwrap_or_default();
        for (i, bdf) in vfs.iter().enumerate() {
            functions.push((vf_check(k, i, "iommu_group"), format!("{k}_vf{i}"), bdf));
        }
        missing += spec::VFS.saturating_sub(vfs.len());
    }
    let mut found: Vec<(String, u32)> = Vec::new();
    for (check, label, bdf) in functions {
        match pf::iommu_group(bdf) {
            Ok(g) => {
                r.check(&check, true, u64::from(g));
                found.push((label, g));
            }
            Err(e) => {
                r.check(&check, false, e);
                missing += 1;
            }
        }
    }
    let mut groups: Vec<u32> = found.iter().map(|(_, g)| *g).collect();
    groups.sort_unstable();
    groups.dedup();
    let list: Vec<String> = found.iter().map(|(l, g)| format!("{l}={g}")).collect();
    r.check(
        "sriov_iommu_groups_distinct",
        missing == 0 && groups.len() == found.len(),
        list.join(" "),
    );
}

/// The user-space transmit of the tag through VFIO on net VF `bdf`
/// (`scenarios/vfio/usernet.rs`, whose checks are `vfio_net_*`), then the VF must be
/// a virtio_net interface again that reaches its TAP.
fn vfio_user_tx(r: &mut Reporter, bdf: &str, tag: &[u8; spec::TAG_LEN]) {
    let old_ifindex = netvf::nic_of(bdf).ok().and_then(|n| netvf::ifindex(&n));
    crate::scenarios::vfio::usernet::run(r, bdf, tag);
    netvf::after_vfio(r, spec::USERNET_VF, bdf, old_ifindex);
}
