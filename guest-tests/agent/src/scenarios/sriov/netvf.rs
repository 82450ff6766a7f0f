//! The net PF and its VFs in the `sriov` scenario: each NIC's netdev (found below
//! its PCI function), its MAC, an address in its link's subnet (see [`spec::host_ip`])
//! and pings of the host end of its TAP; per VF a hashed TCP transfer each way with
//! the host's peer on that link (the `net` scenario's wire format and flows), and the
//! VF's MSI-X lines in /proc/interrupts.

use std::time::{Duration, Instant};

use super::pf::{self, Pf};
use super::spec;
use crate::report::Reporter;
use crate::scenarios::net::flows;
use crate::scenarios::net::link::{self, Nic};
use crate::scenarios::net::wire::Direction;

const KIND: &str = "net";

/// The netdev of PCI function `bdf` (`virtioN/net/ethX` below it).
pub fn nic_of(bdf: &str) -> Result<Nic, String> {
    let (virtio, driver) =
        pf::virtio_child(bdf).ok_or_else(|| format!("{bdf}: no virtio device"))?;
    let dir = pf::dir(bdf).join(&virtio).join("net");
    let name = pf::list(&dir).into_iter().next().ok_or_else(|| {
        format!(
            "{bdf}: no netdev below {virtio} (driver {})",
            driver.as_deref().unwrap_or("none")
        )
    })?;
    Ok(Nic {
        name,
        virtio,
        pci: bdf.to_owned(),
    })
}

/// Waits (up to `timeout`) for a netdev on `bdf` bound through virtio-pci and
/// virtio_net.
pub fn wait_nic(bdf: &str, timeout: Duration) -> Result<Nic, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = nic_of(bdf).and_then(|nic| match pf::drivers(bdf) {
            d if d == "virtio-pci/virtio_net" => Ok(nic),
            d => Err(format!("{} on {bdf} is bound to {d}", nic.name)),
        });
        match found {
            Ok(nic) => return Ok(nic),
            Err(e) if Instant::now() >= deadline => return Err(format!("{e} after {timeout:?}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The interface index (changes when the netdev is recreated).
pub fn ifindex(nic: &Nic) -> Option<u64> {
    nic.attr("ifindex").ok().and_then(|v| v.parse().ok())
}

/// `GUEST/24` of link `link` on `nic`, up.
fn configure(nic: &Nic, link: usize) -> Result<String, String> {
    link::configure(nic, spec::guest_ip(link), spec::PREFIX_LEN)
}

/// [`spec::PINGS`] pings of the host end of link `link`: a check with the number of
/// replies.
pub fn ping(r: &mut Reporter, check: &str, link: usize) {
    match link::ping(spec::host_ip(link), spec::PINGS) {
        Ok((stats, rtt)) => {
            r.note(&format!("{check}: {stats:?} {rtt}"));
            let ok =
                stats.transmitted == u64::from(spec::PINGS) && stats.received == stats.transmitted;
            r.check(check, ok, stats.received);
        }
        Err(e) => r.check(check, false, e),
    }
}

/// The PF's netdev: MAC, address, and the first ping. `None` when it is missing.
pub fn pf_up(r: &mut Reporter, pf: &Pf) -> Option<Nic> {
    let nic = match nic_of(&pf.bdf) {
        Ok(n) => n,
        Err(e) => {
            r.check("sriov_net_pf_mac", false, e);
            return None;
        }
    };
    let mac = nic.attr("address").unwrap_or_else(|e| e);
    r.check("sriov_net_pf_mac", mac == spec::PF_MAC, mac);
    match configure(&nic, 0) {
        Ok(v) => r.check("sriov_net_pf_configured", true, v),
        Err(e) => {
            r.check("sriov_net_pf_configured", false, e);
            return None;
        }
    }
    ping(r, "sriov_net_pf_ping_before", 0);
    Some(nic)
}

/// VF `i`'s netdev: a check `sriov_net_vfI_<mac_check>` of its MAC, then its address
/// and pings (`sriov_net_vfI_<ping_check>`, which fails with the reason when the
/// address could not be set). Returns the netdev.
fn vf_up(r: &mut Reporter, i: usize, bdf: &str, mac_check: &str, ping_check: &str) -> Option<Nic> {
    let mac_name = spec::vf_check(KIND, i, mac_check);
    let ping_name = spec::vf_check(KIND, i, ping_check);
    let nic = match nic_of(bdf) {
        Ok(n) => n,
        Err(e) => {
            r.check(&mac_name, false, e);
            return None;
        }
    };
    let mac = nic.attr("address").unwrap_or_else(|e| e);
    r.check(&mac_name, mac == spec::VF_MACS[i], mac);
    match configure(&nic, 1 + i) {
        Ok(v) => {
            r.note(&format!("{ping_name}: {v}"));
            ping(r, &ping_name, 1 + i);
        }
        Err(e) => r.check(&ping_name, false, e),
    }
    Some(nic)
}

/// After the first `echo 2`: each VF's MAC, address, pings, and a hashed transfer
/// each way. Returns the NICs (for the interrupt check), by VF index.
pub fn first(r: &mut Reporter, vfs: &[String]) -> Vec<Option<Nic>> {
    let nics: Vec<Option<Nic>> = vfs
        .iter()
        .enumerate()
        .map(|(i, bdf)| vf_up(r, i, bdf, "mac", "ping"))
        .collect();
    let cpus = crate::disk::online_cpus();
    for (i, nic) in nics.iter().enumerate() {
        if nic.is_some() {
            for direction in Direction::BOTH {
                transfer(r, i, direction, cpus);
            }
        }
    }
    nics
}

/// One flow of [`spec::TRANSFER_LEN`] bytes with the peer of VF `i`'s link:
/// `sriov_net_vfI_g2h_sha256` / `..._h2g_sha256`.
fn transfer(r: &mut Reporter, i: usize, direction: Direction, cpus: usize) {
    let name = spec::vf_check(KIND, i, &format!("{}_sha256", direction.tag()));
    let len = spec::TRANSFER_LEN;
    let results = flows::run_to(spec::host_ip(1 + i), direction, 1, len, true, cpus);
    match results.into_iter().next() {
        Some(Ok(flow)) => {
            r.note(&format!(
                "{name}: {} bytes in {} ms",
                flow.bytes,
                flow.elapsed.as_millis()
            ));
            let ok = flow.bytes == len && flow.sha256 == flow.reference;
            let value = if ok {
                flow.sha256
            } else {
                format!(
                    "{} bytes, sha256 {} but expected {}",
                    flow.bytes, flow.sha256, flow.reference
                )
            };
            r.check(&name, ok, value);
        }
        Some(Err(e)) => r.check(&name, false, e),
        None => r.check(&name, false, "no flow ran"),
    }
}

/// VF `i`'s MSI-X lines after its traffic: `sriov_net_vfI_msix`, which must show
/// the VF's own function and a receive interrupt.
pub fn msix(r: &mut Reporter, i: usize, nic: &Nic, interrupts: &str) {
    let name = spec::vf_check(KIND, i, "msix");
    let (lines, chip) = link::msix_lines(nic, interrupts);
    let input: u64 = link::queue_irqs(nic, &lines, "input")
        .iter()
        .map(|(_, c)| c)
        .sum();
    let list: Vec<String> = lines.iter().map(|(n, c)| format!("{n}={c}")).collect();
    let ok = chip.as_deref().is_some_and(|c| c.contains("MSIX")) && input > 0;
    r.check(
        &name,
        ok,
        format!(
            "{} {}",
            chip.unwrap_or_else(|| "no MSI-X line".into()),
            list.join(" ")
        ),
    );
}

/// After the second `echo 2`: each VF's MAC again and one more ping round.
pub fn again(r: &mut Reporter, vfs: &[String]) {
    for (i, bdf) in vfs.iter().enumerate() {
        vf_up(r, i, bdf, "mac_again", "ping_again");
    }
}

/// After the user-space VFIO session on VF `i` (`bdf`): the VF must be a virtio_net
/// interface again that reaches its TAP. `old_ifindex` is the netdev's index before
/// the session (a rebound VF gets a new netdev, which needs its address again).
pub fn after_vfio(r: &mut Reporter, i: usize, bdf: &str, old_ifindex: Option<u64>) {
    let name = spec::vf_check(KIND, i, "after_vfio");
    let nic = match wait_nic(bdf, Duration::from_secs(60)) {
        Ok(n) => n,
        Err(e) => return r.check(&name, false, e),
    };
    let new_ifindex = ifindex(&nic);
    let recreated = new_ifindex != old_ifindex;
    r.note(&format!(
        "{name}: {} ifindex {old_ifindex:?} -> {new_ifindex:?}",
        nic.name
    ));
    if recreated {
        if let Err(e) = configure(&nic, 1 + i) {
            return r.check(&name, false, e);
        }
    }
    ping(r, &name, 1 + i);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The netdev lookup against this machine's virtio-net function, when it has one.
    #[test]
    fn finds_the_netdev_below_a_virtio_net_function() {
        let Some(bdf) = pf::list(Path::new(pf::PCI_DEVICES))
            .into_iter()
            .find(|b| pf::drivers(b) == "virtio-pci/virtio_net")
        else {
            eprintln!("skipping: no virtio-net function here");
            return;
        };
        let nic = nic_of(&bdf).unwrap();
        assert_eq!(nic.pci, bdf);
        assert!(nic.virtio.starts_with("virtio"));
        assert_eq!(nic.attr("address").unwrap().len(), 17);
        assert!(ifindex(&nic).is_some());
        assert_eq!(wait_nic(&bdf, Duration::ZERO).unwrap(), nic);
        assert!(nic_of("0000:ff:1f.9").is_err());
        assert!(wait_nic("0000:ff:1f.9", Duration::ZERO).is_err());
    }
}
