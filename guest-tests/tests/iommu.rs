//! Scenario `iommu`: a virtio-iommu with a disk, a console and a NIC behind it,
//! `iommu.strict=1`. The guest must find the IOMMU through the ACPI VIOT, put each
//! device in an IOMMU group with a translated (DMA) domain and negotiate
//! VIRTIO_F_ACCESS_PLATFORM; then all DMA goes through the IOMMU: the `blk` pattern
//! over all of vda (write, discard, read back; the host checks the image file), a
//! text pattern on the console (the host checks the file it went to) and pings of the
//! host through the NIC. The devices' interrupts must still be plain PCI MSI-X, and
//! the guest must report no IOMMU fault.
//!
//! The NIC needs root, `ip` and /dev/net/tun; without them the test runs without it.
//! `FERRIO_IOMMU_TEST_VMM=qemu` boots the same machine under QEMU (q35,
//! virtio-iommu-pci), to validate the test itself.

mod common;
#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

use common::{expected_vda_fnv, file_fnv};

use std::time::Duration;

use ferrio_guest_tests::{
    net_wire, work_dir, Boot, IommuDevice, IommuMachine, NetNs, Outcome, ScratchImage, Vmm,
};

const MIB: u64 = 1 << 20;
/// vda: large enough for the blk pattern's discarded range (64 MiB + 8 MiB).
const VDA_LEN: u64 = 80 * MIB;
/// Bytes of pattern the guest writes to its console, as hex text (`iommu.rs`).
const CONSOLE_PATTERN_LEN: usize = 8192;
const PINGS: u64 = 5;
const TIMEOUT: Duration = Duration::from_secs(900);

/// The console text the guest writes.
fn console_text() -> String {
    pattern::bytes(pattern::GUEST_TO_HOST_SEED, CONSOLE_PATTERN_LEN)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The group number of check `iommu_KIND_group`.
fn group(outcome: &Outcome, kind: &str) -> u64 {
    outcome
        .value_u64(&format!("iommu_{kind}_group"))
        .unwrap_or_else(|| panic!("{kind}: no IOMMU group reported"))
}

#[test]
fn iommu_groups_dma_through_disk_console_and_nic_and_msix() {
    let vmm = Vmm::from_env();
    let vda = ScratchImage::create("iommu-vda", VDA_LEN).unwrap();
    std::fs::create_dir_all(work_dir()).unwrap();
    let console = work_dir().join(format!("iommu-console-{}.out", std::process::id()));
    let _ = std::fs::remove_file(&console);
    let ns = match NetNs::unavailable() {
        None => Some(NetNs::create().expect("could not create the network namespace")),
        Some(why) => {
            eprintln!("iommu test without a NIC: {why}");
            None
        }
    };

    let mut boot = Boot::new("iommu").memory("512M").timeout(TIMEOUT);
    boot.extra_cmdline = "iommu.strict=1".into();
    if let Some(ns) = &ns {
        boot = boot.netns(ns.path());
    }
    let mut machine = IommuMachine::new(boot)
        .device(IommuDevice::Disk {
            path: vda.path().to_path_buf(),
            serial: "ferrio-data".into(),
            num_queues: 1,
        })
        .device(IommuDevice::Console {
            path: console.clone(),
        });
    if let Some(ns) = &ns {
        machine = machine.device(IommuDevice::Net {
            tap: ns.tap().into(),
            mac: net_wire::GUEST_MAC.into(),
            // The namespace's TAP is multi-queue: QEMU opens it so only with 2+ pairs.
            queue_pairs: 2,
        });
    }
    let outcome = machine.run(vmm).expect("could not boot the guest");
    eprintln!("{} under {}", outcome.table(), vmm.name());
    let console_out = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);

    // The IOMMU and the groups: one per device, each with a strict DMA domain.
    assert!(outcome
        .value_str("iommu_driver")
        .is_some_and(|v| v.starts_with("virtio")));
    let mut groups = vec![group(&outcome, "blk"), group(&outcome, "console")];
    if ns.is_some() {
        groups.push(group(&outcome, "net"));
    }
    let mut distinct = groups.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        groups.len(),
        "devices share groups: {groups:?}"
    );
    assert_eq!(outcome.value_str("iommu_group_types"), Some("DMA"));
    let endpoints: Vec<_> = outcome
        .results
        .iter()
        .filter(|r| r.check.starts_with("endpoint "))
        .collect();
    assert_eq!(endpoints.len(), groups.len(), "{endpoints:?}");
    for e in &endpoints {
        let v = e.value.as_str().unwrap_or_default();
        assert!(v.contains("access_platform true"), "{}: {v}", e.check);
    }

    // DMA through the IOMMU: the disk's data in the guest and in the image file.
    assert_eq!(outcome.value_u64("vda_mismatched_chunks"), Some(0));
    let expected = expected_vda_fnv(VDA_LEN);
    assert_eq!(outcome.value_str("vda_fnv"), Some(expected.as_str()));
    assert_eq!(file_fnv(vda.path()), expected, "the image file");
    // The console's output reached the file unchanged.
    let text = console_text();
    assert_eq!(
        outcome.value_str("hvc0_text_fnv"),
        Some(pattern::fnv1a(text.as_bytes()).as_str())
    );
    assert_eq!(console_out.len(), text.len(), "console bytes");
    assert!(console_out == text, "console text differs");
    if ns.is_some() {
        assert_eq!(outcome.value_u64("ping_received"), Some(PINGS));
    }

    // Interrupts: plain PCI MSI-X (no remapping), and they fired.
    let mut kinds = vec!["blk", "console"];
    if ns.is_some() {
        kinds.push("net");
    }
    for kind in kinds {
        let v = outcome
            .value_str(&format!("{kind}_msix"))
            .unwrap_or_default();
        assert!(v.starts_with("PCI-MSIX-"), "{kind}: {v}");
    }
    let faults: Vec<&str> = outcome
        .console
        .lines()
        .filter(|l| l.contains("virtio_iommu") && l.contains("fault"))
        .collect();
    assert!(faults.is_empty(), "IOMMU faults: {faults:?}");
}
