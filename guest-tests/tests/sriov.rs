//! Scenario `sriov`: ferrio's emulated SR-IOV under the guest's PCI core, virtio
//! drivers and VFIO. The host declares a virtio-blk PF (serial `ferrio-pf`) with two
//! VF disks and a virtio-net PF (on TAP ftap0) with two VF NICs (ftap1, ftap2), every
//! function behind the virtio-iommu; each image is filled with its own pattern and
//! each TAP has its own subnet, with a peer on each VF's link and a packet sniffer on
//! VF 1's TAP. In one boot the guest decodes both PFs' SR-IOV capabilities, enables
//! the VFs (addresses, links, IDs, BARs, drivers, MSI-X), moves data through each VF
//! (pings and hashed TCP both ways; a chunk written and read back per VF disk), turns
//! the VFs off, is refused more than TotalVFs, turns them on again (same MACs,
//! serials, data) while the PFs keep working, checks that every function has its own
//! IOMMU group, and sends a frame carrying the host's tag from user space through
//! VFIO on net VF 1 (`scenarios/vfio/usernet.rs`). The host asserts the values, the
//! peers' flows, the sniffed tag and the images' content.
//!
//! Only ferrio can run it (QEMU has no emulated SR-IOV for virtio). Needs root, `ip`
//! and /dev/net/tun: skipped (with a message) otherwise.

#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;
#[path = "../agent/src/scenarios/sriov/spec.rs"]
#[allow(dead_code)]
mod spec;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrio_guest_tests::net_wire::{self as wire, Direction};
use ferrio_guest_tests::{
    run, Boot, FlowReport, NetNs, NetPeer, Outcome, ScratchImage, Sniffer, TapSpec,
};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(900);
/// Slots in declaration order: the disks (slot 1), the NICs (slot 2), the IOMMU; a
/// PF is function 0 and its VF i function i + 1.
const BLK_PF: &str = "0000:00:01.0";
const BLK_VFS: [&str; spec::VFS] = ["0000:00:01.1", "0000:00:01.2"];
const NET_PF: &str = "0000:00:02.0";
const NET_VFS: [&str; spec::VFS] = ["0000:00:02.1", "0000:00:02.2"];
/// The start of the payload usernet puts in the frame whose second buffer is at an
/// unmapped IOVA (`usernet/driver.rs`, `BAD_PAYLOAD`): it must never reach the TAP.
const BAD_PAYLOAD: &[u8] = b"ferrio-bad-iova!";

/// `--iommu` and the PFs and VFs, every function behind the IOMMU.
fn ferrio_args(pf_disk: &Path, vf_disks: [&Path; spec::VFS]) -> Vec<String> {
    let mut args = vec![
        "--iommu".to_owned(),
        "--disk".into(),
        format!(
            "id=d0,path={},serial={},iommu=on",
            pf_disk.display(),
            spec::PF_SERIAL
        ),
    ];
    for (i, disk) in vf_disks.iter().enumerate() {
        args.push("--disk".into());
        args.push(format!(
            "path={},serial={},vf_of=d0,iommu=on",
            disk.display(),
            spec::VF_SERIALS[i]
        ));
    }
    args.push("--net".into());
    args.push(format!(
        "id=pf0,tap={},mac={},iommu=on",
        spec::TAPS[0],
        spec::PF_MAC
    ));
    for i in 0..spec::VFS {
        args.push("--net".into());
        args.push(format!(
            "tap={},mac={},vf_of=pf0,iommu=on",
            spec::TAPS[1 + i],
            spec::VF_MACS[i]
        ));
    }
    args
}

/// The TAP of each link with the host end's address.
fn taps() -> Vec<TapSpec> {
    (0..=spec::VFS)
        .map(|link| {
            let [a, b, c, d] = spec::host_ip(link);
            TapSpec::new(
                spec::TAPS[link],
                &format!("{a}.{b}.{c}.{d}/{}", spec::PREFIX_LEN),
            )
        })
        .collect()
}

/// Chunk `chunk` of image `image` as the host writes it.
fn host_chunk(image: usize, chunk: u64) -> Vec<u8> {
    let seed = pattern::chunk_seed(spec::host_seed(image), chunk);
    pattern::bytes(seed, spec::CHUNK as usize)
}

fn chunks() -> u64 {
    spec::DISK_LEN / spec::CHUNK
}

/// A scratch image holding image `image`'s pattern.
fn image(tag: &str, image: usize) -> ScratchImage {
    let img = ScratchImage::create(tag, spec::DISK_LEN).unwrap();
    let data: Vec<u8> = (0..chunks()).flat_map(|c| host_chunk(image, c)).collect();
    std::fs::write(img.path(), data).unwrap();
    img
}

/// 16 bytes no earlier run sent.
fn fresh_tag() -> [u8; spec::TAG_LEN] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::digest(format!("ferrio-sriov {} {nanos}", std::process::id()));
    let mut tag = [0u8; spec::TAG_LEN];
    tag.copy_from_slice(&digest[..spec::TAG_LEN]);
    tag
}

fn str_of<'a>(outcome: &'a Outcome, check: &str) -> &'a str {
    outcome
        .value_str(check)
        .unwrap_or_else(|| panic!("{check}: no string value ({:?})", outcome.value(check)))
}

fn u64_of(outcome: &Outcome, check: &str) -> u64 {
    outcome
        .value_u64(check)
        .unwrap_or_else(|| panic!("{check}: no number ({:?})", outcome.value(check)))
}

/// The capability and PF checks of one PF.
fn check_pf(outcome: &Outcome, kind: &str, bdf: &str, device_id: &str) {
    let c = |what: &str| spec::pf_check(kind, what);
    assert_eq!(str_of(outcome, &c("pf")), bdf);
    assert_eq!(u64_of(outcome, &c("cap_offset")), 0x100);
    for what in ["total_vfs", "sysfs_totalvfs", "initial_vfs"] {
        assert_eq!(u64_of(outcome, &c(what)), spec::VFS as u64, "{kind} {what}");
    }
    assert_eq!(u64_of(outcome, &c("vf_offset")), 1);
    assert_eq!(u64_of(outcome, &c("vf_stride")), 1);
    assert_eq!(str_of(outcome, &c("vf_device")), device_id);
    assert_eq!(u64_of(outcome, &c("page_sizes")), 1);
    assert_eq!(u64_of(outcome, &c("system_page_size")), 1);
    assert_eq!(u64_of(outcome, &c("numvfs")), 0);
    let bar = format!("{} mem64", spec::VF_BAR0_LEN * spec::VFS as u64);
    assert_eq!(str_of(outcome, &c("vf_bar0_total")), bar);
    let bits = wire::feature_bits(str_of(outcome, &c("pf_features")));
    assert!(
        bits.contains(&(spec::SR_IOV_FEATURE_BIT as u32)),
        "{kind} PF features {bits:?}"
    );
    for what in ["enable", "reenable"] {
        assert_eq!(u64_of(outcome, &c(what)), spec::VFS as u64, "{kind} {what}");
    }
    assert_eq!(u64_of(outcome, &c("disable")), 0);
    assert_eq!(str_of(outcome, &c("vfs_gone")), "none");
    assert_eq!(
        u64_of(outcome, &c("numvfs_over_total")),
        libc::ERANGE as u64,
        "{kind}: the errno of echo 3 > sriov_numvfs"
    );
}

/// What every VF of one PF showed after the first `echo 2`.
fn check_vfs(outcome: &Outcome, kind: &str, pf: &str, vfs: [&str; spec::VFS], device_id: &str) {
    let driver = format!("virtio-pci/virtio_{kind}");
    let min_vectors = if kind == "net" { 3 } else { 2 };
    for (i, bdf) in vfs.iter().enumerate() {
        let c = |what: &str| spec::vf_check(kind, i, what);
        assert_eq!(str_of(outcome, &c("bdf")), *bdf);
        assert_eq!(str_of(outcome, &c("physfn")), pf);
        assert_eq!(str_of(outcome, &c("ids")), format!("0x1af4:{device_id}"));
        assert_eq!(
            str_of(outcome, &c("config")),
            "ids 0xffff:0xffff bars 0x00000000 0x00000000"
        );
        assert_eq!(
            str_of(outcome, &c("bar0")),
            format!("{} mem64", spec::VF_BAR0_LEN)
        );
        assert_eq!(str_of(outcome, &c("driver")), driver);
        let vectors = u64_of(outcome, &c("msi_irqs"));
        assert!(vectors >= min_vectors, "{kind} VF {i}: {vectors} vectors");
        let msix = str_of(outcome, &c("msix"));
        assert!(
            msix.starts_with(&format!("PCI-MSIX-{bdf} ")),
            "{kind} VF {i}: {msix}"
        );
    }
}

/// The net VFs' data: pings, the flows as the guest and its peer saw them.
fn check_net_data(outcome: &Outcome, peers: &[NetPeer]) {
    let pings = u64::from(spec::PINGS);
    for when in ["before", "between", "after"] {
        assert_eq!(u64_of(outcome, &format!("sriov_net_pf_ping_{when}")), pings);
    }
    assert_eq!(str_of(outcome, "sriov_net_pf_mac"), spec::PF_MAC);
    for (i, peer) in peers.iter().enumerate() {
        let c = |what: &str| spec::vf_check("net", i, what);
        assert_eq!(str_of(outcome, &c("mac")), spec::VF_MACS[i]);
        assert_eq!(str_of(outcome, &c("mac_again")), spec::VF_MACS[i]);
        assert_eq!(u64_of(outcome, &c("ping")), pings);
        assert_eq!(u64_of(outcome, &c("ping_again")), pings);
        assert!(peer.errors().is_empty(), "VF {i} peer: {:?}", peer.errors());
        let mut flows: Vec<FlowReport> = peer.flows();
        flows.sort_by_key(|f| f.direction);
        let seen: Vec<(Direction, u8)> = flows.iter().map(|f| (f.direction, f.flow)).collect();
        assert_eq!(
            seen,
            [(Direction::Upload, 0), (Direction::Download, 0)],
            "VF {i}: flows at its peer"
        );
        for f in &flows {
            let expected = wire::stream_sha256(wire::flow_seed(f.direction, 0), spec::TRANSFER_LEN);
            let name = c(&format!("{}_sha256", f.direction.tag()));
            assert_eq!(f.bytes, spec::TRANSFER_LEN, "{name}: bytes at the peer");
            assert_eq!(f.sha256, expected, "{name}: sha256 at the peer");
            assert_eq!(str_of(outcome, &name), expected, "{name} in the guest");
            match f.direction {
                Direction::Upload => assert_eq!(f.matches_stream, Some(true), "{name}"),
                Direction::Download => {
                    assert_eq!(f.guest_sha256.as_deref(), Some(expected.as_str()), "{name}")
                }
            }
        }
    }
    // After the VFIO session, VF 1 is a NIC again.
    let vf = spec::USERNET_VF;
    assert_eq!(
        u64_of(outcome, &spec::vf_check("net", vf, "after_vfio")),
        pings
    );
}

/// The blk functions' data in the guest, then in the image files.
fn check_blk_data(outcome: &Outcome, pf: &ScratchImage, vfs: &[ScratchImage]) {
    let pf_chunk0 = pattern::fnv1a(&host_chunk(0, 0));
    assert_eq!(str_of(outcome, "sriov_blk_pf_serial"), spec::PF_SERIAL);
    for when in ["before", "between", "after"] {
        let check = format!("sriov_blk_pf_read_{when}");
        assert_eq!(str_of(outcome, &check), pf_chunk0, "{check}");
    }
    for (i, img) in vfs.iter().enumerate() {
        let c = |what: &str| spec::vf_check("blk", i, what);
        let guest = pattern::bytes(spec::guest_seed(i), spec::CHUNK as usize);
        let guest_fnv = pattern::fnv1a(&guest);
        assert_eq!(str_of(outcome, &c("serial")), spec::VF_SERIALS[i]);
        assert_eq!(str_of(outcome, &c("serial_again")), spec::VF_SERIALS[i]);
        assert_eq!(
            str_of(outcome, &c("host_fnv")),
            pattern::fnv1a(&host_chunk(1 + i, 0)),
            "VF {i} read its own image"
        );
        assert_eq!(str_of(outcome, &c("write_fnv")), guest_fnv);
        assert_eq!(str_of(outcome, &c("read_again_fnv")), guest_fnv);
        // The image: the guest's chunk where it wrote, the host's everywhere else.
        let data = std::fs::read(img.path()).unwrap();
        assert_eq!(data.len() as u64, spec::DISK_LEN);
        for (chunk, got) in (0u64..).zip(data.chunks(spec::CHUNK as usize)) {
            if chunk == spec::GUEST_CHUNK {
                assert!(got == guest.as_slice(), "VF {i} image chunk {chunk}");
            } else {
                assert!(
                    got == host_chunk(1 + i, chunk),
                    "VF {i} image chunk {chunk}"
                );
            }
        }
    }
    // The PF's image: the guest only read it.
    let data = std::fs::read(pf.path()).unwrap();
    assert_eq!(data.len() as u64, spec::DISK_LEN);
    for (chunk, got) in (0u64..).zip(data.chunks(spec::CHUNK as usize)) {
        assert!(got == host_chunk(0, chunk), "PF image chunk {chunk}");
    }
}

/// Every function in its own IOMMU group.
fn check_groups(outcome: &Outcome) {
    let mut groups = Vec::new();
    for kind in ["net", "blk"] {
        groups.push(u64_of(outcome, &spec::pf_check(kind, "pf_iommu_group")));
        for i in 0..spec::VFS {
            groups.push(u64_of(outcome, &spec::vf_check(kind, i, "iommu_group")));
        }
    }
    let mut distinct = groups.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), groups.len(), "shared groups: {groups:?}");
    assert!(outcome.result("sriov_iommu_groups_distinct").is_some());
}

#[test]
fn ferrio_args_declare_pfs_then_their_vfs() {
    let args = ferrio_args(
        Path::new("/i/pf.img"),
        [Path::new("/i/vf0.img"), Path::new("/i/vf1.img")],
    );
    assert_eq!(
        args,
        [
            "--iommu",
            "--disk",
            "id=d0,path=/i/pf.img,serial=ferrio-pf,iommu=on",
            "--disk",
            "path=/i/vf0.img,serial=ferrio-vf0,vf_of=d0,iommu=on",
            "--disk",
            "path=/i/vf1.img,serial=ferrio-vf1,vf_of=d0,iommu=on",
            "--net",
            "id=pf0,tap=ftap0,mac=52:54:00:12:34:56,iommu=on",
            "--net",
            "tap=ftap1,mac=52:54:00:00:01:01,vf_of=pf0,iommu=on",
            "--net",
            "tap=ftap2,mac=52:54:00:00:01:02,vf_of=pf0,iommu=on",
        ]
    );
    let taps = taps();
    assert_eq!(taps.len(), 3);
    assert_eq!(taps[2], TapSpec::new("ftap2", "10.0.4.2/24"));
    assert_eq!(spec::PF_MAC, wire::GUEST_MAC);
}

#[test]
fn sriov_pfs_vfs_life_cycle_iommu_groups_and_vfio_user_space_tx() {
    if let Some(why) = NetNs::unavailable() {
        eprintln!("skipping the sriov test: {why}");
        return;
    }
    let pf_disk = image("sriov-pf", 0);
    let vf_disks: Vec<ScratchImage> = (0..spec::VFS)
        .map(|i| image(&format!("sriov-vf{i}"), 1 + i))
        .collect();
    let ns = NetNs::with_taps(&taps()).expect("could not create the network namespace");
    let peers: Vec<NetPeer> = (0..spec::VFS)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(spec::host_ip(1 + i));
            NetPeer::start_on(&ns, ip, true).expect("could not start a host peer")
        })
        .collect();
    let tag = fresh_tag();
    let usernet_tap = spec::TAPS[1 + spec::USERNET_VF];
    let sniffer = Sniffer::start(&ns, usernet_tap, &[&tag, BAD_PAYLOAD])
        .expect("could not sniff the VF's TAP");

    let mut boot = Boot::new("sriov")
        .memory("512M")
        .timeout(TIMEOUT)
        .netns(ns.path());
    boot.extra_cmdline = format!("{}={}", spec::TAG_PARAM, spec::tag_hex(&tag));
    boot.extra_args = ferrio_args(pf_disk.path(), [vf_disks[0].path(), vf_disks[1].path()]);
    let outcome = run(&boot).expect("could not boot the guest");
    eprintln!("{}", outcome.table());
    let matches = sniffer.matches();
    eprintln!(
        "sniffer on {usernet_tap}: {} frames, matches {matches:?}, errors {:?}",
        sniffer.frames(),
        sniffer.errors()
    );
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);
    assert_eq!(str_of(&outcome, "sriov_tag"), spec::tag_hex(&tag));

    check_pf(&outcome, "net", NET_PF, "0x1041");
    check_pf(&outcome, "blk", BLK_PF, "0x1042");
    check_vfs(&outcome, "net", NET_PF, NET_VFS, "0x1041");
    check_vfs(&outcome, "blk", BLK_PF, BLK_VFS, "0x1042");
    check_net_data(&outcome, &peers);
    check_blk_data(&outcome, &pf_disk, &vf_disks);
    check_groups(&outcome);

    // The frame sent from user space through VFIO reached VF 1's TAP, from VF 1's
    // MAC; the frame whose buffer was outside the DMA mapping never did.
    let tagged: Vec<_> = matches.iter().filter(|m| m.needle == 0).collect();
    assert!(
        !tagged.is_empty(),
        "no frame with the tag on {usernet_tap} ({} frames seen)",
        sniffer.frames()
    );
    for m in &tagged {
        assert!(!m.outgoing, "{m:?}");
        assert_eq!(m.src_mac, spec::VF_MACS[spec::USERNET_VF], "{m:?}");
    }
    let bad: Vec<_> = matches.iter().filter(|m| m.needle == 1).collect();
    assert!(
        bad.is_empty(),
        "the faulting frame reached the TAP: {bad:?}"
    );
    assert!(sniffer.errors().is_empty(), "{:?}", sniffer.errors());
}
