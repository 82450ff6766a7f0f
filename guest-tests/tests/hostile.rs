//! Scenario `hostile`: the guest attacks ferrio's devices from user space through its
//! own vfio-pci (no-IOMMU mode, so descriptors carry guest-physical addresses that
//! reach the VMM untranslated) and ferrio must survive every attack: each attacked
//! device reacts (error status, chain returned unanswered, DEVICE_NEEDS_RESET, a
//! refused write), can be reset and serves a good request again, and the bystanders
//! keep working with no data lost: the console (every line below arrived through it)
//! and a virtio-blk the guest keeps using through its kernel driver.
//!
//! The machine: the bystander disk (filled by the host), the victim disk (4 queues),
//! a victim NIC on a TAP in a throw-away network namespace (a sniffer watches it), a
//! virtio-iommu with a small disk behind it (filled by the host). The attacks and their
//! order are in `agent/src/scenarios/hostile/spec.rs` (shared with the agent).
//!
//! The host asserts: every attack's check, their count, exit code 0, no panic in the
//! VMM's log, the bystander image block by block (the host's data, the guest's first
//! and last writes), the victim's last good block, and on the TAP: every good frame
//! and none of the frames ferrio must drop.
//!
//! Needs root, `ip` and /dev/net/tun: skipped (with a message) otherwise.

#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;
#[path = "../agent/src/scenarios/hostile/spec.rs"]
#[allow(dead_code)]
mod spec;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use ferrio_guest_tests::{run, Boot, NetNs, ScratchImage, Sniffer};

const TIMEOUT: Duration = Duration::from_secs(900);
/// Good frames the guest sends: one after each net attack and one after the ECAM sweep.
const GOOD_FRAMES: usize = 9;

/// Block `i` of a region with `seed` (as the agent's `bystander::expected_block`).
fn block(seed: u64, i: u64) -> Vec<u8> {
    pattern::bytes(pattern::chunk_seed(seed, i), spec::BLOCK)
}

/// An image of `len` bytes whose every block has `seed`.
fn image(seed: u64, len: u64) -> Vec<u8> {
    (0..len / spec::BLOCK as u64)
        .flat_map(|i| block(seed, i))
        .collect()
}

/// The seed block `i` of the bystander must hold at the end.
fn bystander_seed(i: u64) -> u64 {
    if spec::BEFORE_BLOCKS.contains(&i) {
        spec::BEFORE_SEED
    } else if spec::AFTER_BLOCKS.contains(&i) {
        spec::AFTER_SEED
    } else {
        spec::HOST_SEED
    }
}

#[test]
fn hostile_guest_attacks_every_device_and_ferrio_survives() {
    if let Some(why) = NetNs::unavailable() {
        eprintln!("skipping the hostile test: {why}");
        return;
    }
    let ns = NetNs::create().expect("network namespace");
    let bystander = ScratchImage::create("hostile-bystander", spec::BYSTANDER_LEN).unwrap();
    std::fs::write(
        bystander.path(),
        image(spec::HOST_SEED, spec::BYSTANDER_LEN),
    )
    .unwrap();
    let victim = ScratchImage::create("hostile-victim", spec::VICTIM_LEN).unwrap();
    let endpoint = ScratchImage::create("hostile-endpoint", spec::ENDPOINT_LEN).unwrap();
    std::fs::write(
        endpoint.path(),
        image(spec::ENDPOINT_SEED, spec::ENDPOINT_LEN),
    )
    .unwrap();
    let tags: [&[u8]; 3] = [spec::NET_GOOD_TAG, spec::NET_DROP_TAG, spec::NET_HOST_TAG];
    let sniffer = Sniffer::start(&ns, ns.tap(), &tags).expect("sniffer on the TAP");

    let mut boot = Boot::new("hostile")
        .memory("512M")
        .timeout(TIMEOUT)
        .netns(ns.path());
    boot.extra_args = vec![
        "--disk".into(),
        bystander.disk_arg(&format!("serial={}", spec::BYSTANDER_SERIAL)),
        "--disk".into(),
        victim.disk_arg(&format!("serial={},num_queues=4", spec::VICTIM_SERIAL)),
        "--net".into(),
        format!(
            "tap={},mac={},num_queue_pairs=1",
            ns.tap(),
            spec::VICTIM_MAC
        ),
        "--iommu".into(),
        "--disk".into(),
        endpoint.disk_arg(&format!("serial={},iommu=on", spec::ENDPOINT_SERIAL)),
    ];
    let outcome = run(&boot).expect("could not boot the guest");
    eprintln!("{}", outcome.table());
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);

    // Every attack ran, in order, and was survived.
    for name in spec::ATTACKS {
        let r = outcome
            .result(name)
            .unwrap_or_else(|| panic!("attack {name} did not report"));
        assert!(r.ok, "attack {name}: {}", r.value);
    }
    let n = spec::ATTACKS.len();
    assert_eq!(
        outcome.value_str("hostile_attacks"),
        Some(format!("{n} attacks, {n} survived").as_str())
    );
    assert!(
        !outcome.vmm_stderr.contains("panicked"),
        "a VMM thread panicked:\n{}",
        outcome.vmm_stderr
    );

    // The bystander: the host's data, the guest's first and last writes, nothing else.
    let got = std::fs::read(bystander.path()).unwrap();
    assert_eq!(got.len() as u64, spec::BYSTANDER_LEN);
    for (i, chunk) in (0u64..).zip(got.chunks_exact(spec::BLOCK)) {
        assert!(
            chunk == block(bystander_seed(i), i).as_slice(),
            "bystander block {i} is not what seed {:#x} makes",
            bystander_seed(i)
        );
    }

    // The victim's last good block, as the guest's kernel driver read it back.
    let last = outcome
        .value_str("hostile_victim_blk_back")
        .expect("no last good block");
    let mut good = vec![0u8; spec::BLOCK];
    std::fs::File::open(victim.path())
        .unwrap()
        .read_exact_at(&mut good, spec::GOOD_SECTOR * 512)
        .unwrap();
    assert_eq!(
        pattern::fnv1a(&good),
        last,
        "victim image at the good sector"
    );

    // On the TAP: every good frame, none that ferrio must drop.
    std::thread::sleep(Duration::from_millis(200));
    let frames = sniffer.matches();
    let count = |needle: usize| frames.iter().filter(|f| f.needle == needle).count();
    eprintln!(
        "TAP: {} frames, {} good, {} that must be dropped, {} left to the host kernel; errors {:?}",
        sniffer.frames(),
        count(0),
        count(1),
        count(2),
        sniffer.errors()
    );
    assert!(
        count(0) >= GOOD_FRAMES,
        "good frames on the TAP: {frames:?}"
    );
    assert_eq!(
        count(1),
        0,
        "frames ferrio must drop reached the TAP: {frames:?}"
    );
}
