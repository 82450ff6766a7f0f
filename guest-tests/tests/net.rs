//! Scenario `net`: the guest's virtio_net driver against ferrio's virtio-net device,
//! 2 queue pairs on a multi-queue TAP in a throw-away network namespace, 2 vCPUs.
//! The guest reports its MAC, the negotiated features, its queues, pings the host end
//! (10.0.2.2) and moves 64 MiB each way over TCP (two flows per direction, pinned to
//! different vCPUs, so both queue pairs carry traffic); the host end (`NetPeer`)
//! hashes what it received and sent. Both sides' sha256 must agree with each other and
//! with the expected stream, and both receive queues must have raised interrupts.
//!
//! Needs root, `ip` and /dev/net/tun: skipped (with a message) otherwise.
//! `FERRIO_NET_TEST_VMM=qemu` runs the same checks against QEMU's virtio-net
//! (vhost off), to validate the test itself. QEMU boots 1 vCPU on PVM hosts (see
//! `qemu_max_cpus`); the driver then uses one of the two queue pairs, and the checks
//! expect that.

use std::time::Duration;

use ferrio_guest_tests::net_wire::{self as wire, Direction};
use ferrio_guest_tests::{
    boot_lock, direction_mbps, ensure_image, ferrio_binary, qemu_command, qemu_max_cpus,
    qemu_net_args, run_command, run_with, Boot, FlowReport, NetNs, NetPeer, Outcome, Result,
};

const QUEUE_PAIRS: u8 = 2;
const CPUS: u8 = 2;
const MEMORY: &str = "512M";
/// Bytes per direction (the agent's default `ferrio.net.mib`), over this many flows.
const BYTES_PER_DIRECTION: u64 = wire::DEFAULT_MIB << 20;
const FLOWS: u8 = wire::DEFAULT_FLOWS;
const TIMEOUT: Duration = Duration::from_secs(900);

/// Features the device must offer and the Linux driver accepts.
const REQUIRED_FEATURES: [&str; 12] = [
    "VERSION_1",
    "MAC",
    "STATUS",
    "CSUM",
    "GUEST_CSUM",
    "HOST_TSO4",
    "HOST_TSO6",
    "GUEST_TSO4",
    "GUEST_TSO6",
    "MRG_RXBUF",
    "CTRL_VQ",
    "MQ",
];

fn boot_ferrio(ns: &NetNs) -> Result<Outcome> {
    let mut boot = Boot::new("net")
        .cpus(CPUS)
        .memory(MEMORY)
        .timeout(TIMEOUT)
        .netns(ns.path());
    boot.extra_args = ns.ferrio_net_args(wire::GUEST_MAC, QUEUE_PAIRS);
    run_with(&ferrio_binary()?, &ensure_image()?, &boot)
}

fn boot_qemu(ns: &NetNs, cpus: u8) -> Result<Outcome> {
    let image = ensure_image()?;
    let mut cmd = qemu_command(&image, "net", cpus, MEMORY);
    cmd.args(qemu_net_args(ns.tap(), wire::GUEST_MAC, QUEUE_PAIRS));
    ns.enter_on_exec(&mut cmd);
    let _lock = boot_lock()?;
    run_command(cmd, "net-qemu", TIMEOUT)
}

/// The `0=N 1=M` queue counts of an `net_*_irqs` check.
fn queue_counts(outcome: &Outcome, check: &str) -> Vec<(u32, u64)> {
    let text = outcome.value_str(check).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|w| {
            let (q, c) = w.split_once('=')?;
            Some((q.parse().ok()?, c.parse().ok()?))
        })
        .collect()
}

/// The guest's and the peer's view of one direction agree with the expected stream.
fn check_direction(outcome: &Outcome, flows: &[FlowReport], direction: Direction) {
    let tag = direction.tag();
    let mut mine: Vec<&FlowReport> = flows.iter().filter(|f| f.direction == direction).collect();
    mine.sort_by_key(|f| f.flow);
    let numbers: Vec<u8> = mine.iter().map(|f| f.flow).collect();
    assert_eq!(
        numbers,
        (0..FLOWS).collect::<Vec<_>>(),
        "{tag}: flows the peer served"
    );
    let per_flow = BYTES_PER_DIRECTION / u64::from(FLOWS);
    let total: u64 = mine.iter().map(|f| f.bytes).sum();
    assert_eq!(total, BYTES_PER_DIRECTION, "{tag}: bytes the peer moved");
    assert_eq!(
        outcome.value_u64(&format!("{tag}_bytes")),
        Some(BYTES_PER_DIRECTION)
    );
    for f in mine {
        let name = format!("{tag}_flow{}", f.flow);
        let expected = wire::stream_sha256(wire::flow_seed(direction, f.flow), per_flow);
        assert_eq!(f.bytes, per_flow, "{name}: bytes at the peer");
        assert_eq!(f.sha256, expected, "{name}: sha256 at the peer");
        let guest = outcome.value_str(&format!("{name}_sha256"));
        assert_eq!(
            guest,
            Some(expected.as_str()),
            "{name}: sha256 in the guest"
        );
        match direction {
            Direction::Upload => assert_eq!(f.matches_stream, Some(true), "{name}"),
            Direction::Download => {
                assert_eq!(f.guest_sha256.as_deref(), Some(expected.as_str()), "{name}")
            }
        }
    }
}

#[test]
fn net_two_queue_pairs_ping_tcp_both_ways_and_msix() {
    if let Some(why) = NetNs::unavailable() {
        eprintln!("skipping the net test: {why}");
        return;
    }
    let ns = NetNs::create().expect("could not create the network namespace");
    let peer = NetPeer::start(&ns, true).expect("could not start the host peer");
    let qemu = std::env::var("FERRIO_NET_TEST_VMM").is_ok_and(|v| v == "qemu");
    let cpus = if qemu {
        CPUS.min(qemu_max_cpus())
    } else {
        CPUS
    };
    let outcome = if qemu {
        boot_qemu(&ns, cpus)
    } else {
        boot_ferrio(&ns)
    }
    .expect("could not boot the guest");
    // The driver uses min(queue pairs, online CPUs) pairs.
    let active = QUEUE_PAIRS.min(cpus);
    eprintln!("{}", outcome.table());
    let flows = peer.flows();
    for d in Direction::BOTH {
        let mbps = direction_mbps(&flows, d).unwrap_or(0.0);
        eprintln!("{}: {mbps:.1} MB/s measured by the peer", d.tag());
    }
    assert!(peer.errors().is_empty(), "peer errors: {:?}", peer.errors());
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);

    assert_eq!(outcome.value_str("net_mac"), Some(wire::GUEST_MAC));
    let bits = wire::feature_bits(outcome.value_str("net_features").unwrap_or_default());
    for name in REQUIRED_FEATURES {
        let bit = wire::feature_bit(name).unwrap();
        assert!(
            bits.contains(&bit),
            "feature {name} (bit {bit}) not negotiated; negotiated: {:?}",
            outcome.value_str("net_feature_names")
        );
    }
    let pairs = u64::from(active);
    assert_eq!(outcome.value_u64("net_rx_queues"), Some(pairs));
    assert_eq!(outcome.value_u64("net_tx_queues"), Some(pairs));
    assert_eq!(outcome.value_str("net_carrier"), Some("1"));
    assert_eq!(
        outcome.value_u64("ping_transmitted"),
        Some(u64::from(wire::DEFAULT_PINGS))
    );
    assert_eq!(
        outcome.value_u64("ping_received"),
        Some(u64::from(wire::DEFAULT_PINGS))
    );

    for d in Direction::BOTH {
        check_direction(&outcome, &flows, d);
    }

    // Every active receive queue interrupted the guest, through MSI-X (there is a
    // vector for each of the device's queues).
    let chip = outcome.value_str("net_irq_chip").unwrap_or_default();
    assert!(chip.contains("MSIX"), "interrupt chip {chip:?}");
    let input = queue_counts(&outcome, "net_input_irqs");
    assert_eq!(
        input.len(),
        usize::from(QUEUE_PAIRS),
        "input vectors: {input:?}"
    );
    let busy = input
        .iter()
        .take(usize::from(active))
        .filter(|(_, c)| *c > 0);
    assert_eq!(
        busy.count(),
        usize::from(active),
        "input interrupts: {input:?}"
    );
    assert_eq!(queue_counts(&outcome, "net_output_irqs").len(), input.len());

    let offloads = outcome.value_str("net_offloads").unwrap_or_default();
    for on in [
        "rx-checksumming=on",
        "tx-checksumming=on",
        "tcp-segmentation-offload=on",
    ] {
        assert!(offloads.contains(on), "{on} not in {offloads:?}");
    }
}
