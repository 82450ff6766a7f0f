//! Scenario `net`: the guest's virtio_net driver against the VMM's virtio-net device,
//! whose backend is a multi-queue TAP in the host test's network namespace, where a
//! peer (`guest-tests/src/net_peer.rs`) listens on 10.0.2.2.
//!
//! Reports the NIC (name, virtio device, PCI function), its MAC, the negotiated feature
//! bits (sysfs `features`: '1' at position i = bit i) and their names, the numbers of
//! rx/tx queues; configures 10.0.2.15/24, reports carrier, pings the peer; then moves
//! `ferrio.net.mib` MiB (64) each way over TCP, split over `ferrio.net.flows` (2)
//! concurrent flows pinned to different CPUs, with the sha256 of every flow on both
//! ends; then the NIC's per-queue MSI-X interrupt counts and its offloads.
//! `ferrio.net.pings=N` (20), `ferrio.net.verify=0` (no hashing, for benchmarks) and
//! `ferrio.net.tso_segs=N` (44, see [`wire::TSO_SEGS_PARAM`]) are the other knobs. Flow checks are named `g2h_flowN_*` / `h2g_flowN_*`.

pub(crate) mod flows;
pub(crate) mod link;
// Shared with the host's peer through `#[path]`; some items are host-only.
#[allow(dead_code)]
pub(crate) mod wire;

use std::time::Duration;

use crate::disk;
use crate::parse;
use crate::report::Reporter;
use crate::sys;

use link::Nic;
use wire::Direction;

/// The scenario's knobs, from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Knobs {
    /// MiB per direction (split over the flows).
    mib: u64,
    flows: u8,
    pings: u32,
    verify: bool,
    tso_segs: u32,
}

impl Knobs {
    fn parse(cmdline: &str) -> Knobs {
        fn get<T: std::str::FromStr>(c: &str, key: &str, default: T) -> T {
            parse::cmdline_param(c, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        }
        Knobs {
            mib: get(cmdline, wire::MIB_PARAM, wire::DEFAULT_MIB),
            flows: get(cmdline, wire::FLOWS_PARAM, wire::DEFAULT_FLOWS).max(1),
            pings: get(cmdline, wire::PINGS_PARAM, wire::DEFAULT_PINGS),
            verify: parse::cmdline_param(cmdline, wire::VERIFY_PARAM) != Some("0"),
            tso_segs: get(cmdline, wire::TSO_SEGS_PARAM, wire::DEFAULT_TSO_SEGS),
        }
    }
}

pub fn run(r: &mut Reporter) {
    let knobs = Knobs::parse(&sys::read("/proc/cmdline").unwrap_or_default());
    r.note(&format!("net: {knobs:?}"));
    let nic = match link::find_nic() {
        Ok(nic) => nic,
        Err(e) => return r.check("net_if", false, e),
    };
    r.check(
        "net_if",
        true,
        format!("{} {} {}", nic.name, nic.virtio, nic.pci),
    );
    describe(r, &nic);
    // The driver uses min(device pairs, online CPUs) queue pairs; sysfs lists those.
    let active = match link::queue_counts(&nic) {
        Ok((rx, tx)) => {
            r.check("net_rx_queues", rx > 0, rx);
            r.check("net_tx_queues", tx > 0, tx);
            rx
        }
        Err(e) => {
            r.check("net_rx_queues", false, e);
            0
        }
    };

    match link::configure(&nic, wire::GUEST_IP, wire::PREFIX_LEN) {
        Ok(v) => r.check("net_configured", true, v),
        Err(e) => return r.check("net_configured", false, e),
    }
    let carrier = nic.attr("carrier");
    r.check(
        "net_carrier",
        carrier.as_deref() == Ok("1"),
        fmt_attr(carrier),
    );
    if knobs.pings > 0 {
        ping(r, knobs.pings);
    }
    if knobs.tso_segs > 0 {
        let set = std::fs::write(wire::TSO_SEGS_SYSCTL, format!("{}\n", knobs.tso_segs));
        let value = set.map(|()| knobs.tso_segs.to_string());
        r.check_result("tcp_min_tso_segs", value.map_err(|e| e.to_string()));
    }
    let cpus = disk::online_cpus();
    for direction in Direction::BOTH {
        transfer(r, direction, knobs, cpus);
    }
    r.check_result("tcp_counters", link::tcp_counters());
    interrupts(r, &nic, active);
    match link::offloads(&nic) {
        Ok(list) => {
            let text: Vec<String> = list
                .iter()
                .map(|(n, on)| format!("{n}={}", if *on { "on" } else { "off" }))
                .collect();
            r.check("net_offloads", true, text.join(" "));
        }
        Err(e) => r.check("net_offloads", false, e),
    }
}

fn fmt_attr(v: Result<String, String>) -> String {
    v.unwrap_or_else(|e| e)
}

/// MAC, features, MTU: what the driver negotiated.
fn describe(r: &mut Reporter, nic: &Nic) {
    r.check_result("net_mac", nic.attr("address"));
    let dev = std::path::Path::new("/sys/bus/virtio/devices").join(&nic.virtio);
    match sys::read_trimmed(dev.join("features")) {
        Ok(bits) => {
            let names: Vec<String> = wire::feature_bits(&bits)
                .into_iter()
                .map(wire::feature_name)
                .collect();
            r.check("net_features", bits.contains('1'), bits);
            r.check("net_feature_names", true, names.join(" "));
        }
        Err(e) => r.check("net_features", false, e),
    }
    match nic.attr("mtu").map(|m| m.parse::<u64>()) {
        Ok(Ok(mtu)) => r.check("net_mtu", mtu > 0, mtu),
        Ok(Err(e)) => r.check("net_mtu", false, e.to_string()),
        Err(e) => r.check("net_mtu", false, e),
    }
}

fn ping(r: &mut Reporter, count: u32) {
    match link::ping(wire::PEER_IP, count) {
        Ok((stats, rtt)) => {
            r.note(&format!("ping: {stats:?} {rtt}"));
            let all = u64::from(count);
            r.check(
                "ping_transmitted",
                stats.transmitted == all,
                stats.transmitted,
            );
            r.check("ping_received", stats.received == all, stats.received);
        }
        Err(e) => r.check("ping_received", false, e),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One direction: the flows, then one check per flow and the totals.
fn transfer(r: &mut Reporter, direction: Direction, knobs: Knobs, cpus: usize) {
    let tag = direction.tag();
    let total = knobs.mib << 20;
    let per_flow = total / u64::from(knobs.flows);
    let results = flows::run(direction, knobs.flows, per_flow, knobs.verify, cpus);
    let (mut bytes, mut slowest) = (0u64, Duration::ZERO);
    for (i, result) in results.into_iter().enumerate() {
        let name = format!("{tag}_flow{i}");
        let flow = match result {
            Ok(f) => f,
            Err(e) => {
                r.check(&format!("{name}_sha256"), false, e);
                continue;
            }
        };
        r.note(&format!(
            "{name}: {} bytes in {} ms (connected at {} ms, data done at {} ms), pinned to \
             CPU {}, ended on {:?}",
            flow.bytes,
            millis(flow.elapsed),
            millis(flow.connect),
            millis(flow.data_done),
            flow.pinned,
            flow.ended_on
        ));
        bytes += flow.bytes;
        // From connected on: the first connection of a boot waits seconds for the
        // guest kernel's one-time set-up (text patching of static keys, emulated).
        slowest = slowest.max(flow.elapsed.saturating_sub(flow.connect));
        r.check(&format!("{name}_bytes"), flow.bytes == per_flow, flow.bytes);
        if knobs.verify {
            let ok = flow.sha256 == flow.reference;
            let value = if ok {
                flow.sha256
            } else {
                format!("{} but expected {}", flow.sha256, flow.reference)
            };
            r.check(&format!("{name}_sha256"), ok, value);
        } else {
            r.check(&format!("{name}_sha256"), true, "unverified");
        }
    }
    r.check(
        &format!("{tag}_bytes"),
        bytes == per_flow * u64::from(knobs.flows),
        bytes,
    );
    let secs = slowest.as_secs_f64();
    let mbps = if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    };
    r.check(
        &format!("{tag}_guest_mbps"),
        true,
        (mbps * 10.0).round() / 10.0,
    );
}

/// Per-queue MSI-X interrupt counts after the transfers: every one of the `active`
/// receive queues must have interrupted (vectors exist for all the device's queues).
fn interrupts(r: &mut Reporter, nic: &Nic, active: usize) {
    let text = match sys::read("/proc/interrupts") {
        Ok(t) => t,
        Err(e) => return r.check("net_msix_vectors", false, e),
    };
    let (lines, chip) = link::msix_lines(nic, &text);
    let summary: Vec<String> = lines.iter().map(|(n, c)| format!("{n}={c}")).collect();
    r.check("net_msix_vectors", !lines.is_empty(), summary.join(" "));
    match chip {
        Some(chip) => r.check("net_irq_chip", chip.contains("MSIX"), chip),
        None => r.check(
            "net_irq_chip",
            false,
            format!("no MSI-X line of {}", nic.pci),
        ),
    }
    for kind in ["input", "output"] {
        let counts = link::queue_irqs(nic, &lines, kind);
        let text: Vec<String> = counts.iter().map(|(q, c)| format!("{q}={c}")).collect();
        // Receive interrupts prove that every active queue pair carried traffic; the
        // driver may take transmit completions without interrupts.
        let used = counts.iter().take(active).filter(|(_, c)| *c > 0).count();
        let ok = !counts.is_empty() && (kind == "output" || (active > 0 && used == active));
        r.check(&format!("net_{kind}_irqs"), ok, text.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_from_the_command_line() {
        let k = Knobs::parse("console=ttyS0 ferrio.scenario=net");
        assert_eq!(
            k,
            Knobs {
                mib: 64,
                flows: 2,
                pings: 20,
                verify: true,
                tso_segs: 44
            }
        );
        let k = Knobs::parse(
            "ferrio.net.mib=256 ferrio.net.flows=0 ferrio.net.pings=3 ferrio.net.verify=0 \
             ferrio.net.tso_segs=0",
        );
        assert_eq!((k.mib, k.flows, k.pings, k.verify), (256, 1, 3, false));
        assert_eq!(k.tso_segs, 0);
    }
}
