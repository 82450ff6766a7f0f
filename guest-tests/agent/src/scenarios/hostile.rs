//! Scenario `hostile`: the guest attacks ferrio's devices from user space, through its
//! own vfio-pci in no-IOMMU mode (bus addresses are guest-physical, so descriptors can
//! name any address and reach the VMM untranslated), and checks after every attack that
//! ferrio is alive, the device reacted (an error status, the chain returned unanswered,
//! DEVICE_NEEDS_RESET, a write refused), can be reset and used again, and that the
//! bystander disk (used through the kernel's driver all along) lost nothing. The
//! console is the other bystander: every result line arriving proves it.
//!
//! The machine (`guest-tests/tests/hostile.rs`): a bystander virtio-blk, a victim
//! virtio-blk (4 queues, so MSI-X entries exist that nobody programs), a victim
//! virtio-net on a TAP, a virtio-iommu with a small disk behind it. Phases, one check
//! per attack (names and order in [`spec::ATTACKS`]):
//!
//! 1. rings, buffer addresses, the transport, requests and MSI-X of the victim disk
//!    (`rings`, `addresses`, `transport`, `blk`, `msix`);
//! 2. the victim NIC (`net_attacks`);
//! 3. configuration space through the raw ECAM window, both victims still ours (`ecam`);
//! 4. the virtio-iommu itself, taken from the kernel once its endpoint left the guest's
//!    PCI bus (`iommu_attacks`);
//! 5. everything given back to the kernel's drivers, which must work again (the
//!    endpoint rescanned, behind the IOMMU again); the bystander's last write; the
//!    tally (`hostile_attacks`).
//!
//! Plumbing: `session` (vfio-pci no-IOMMU session, mapped BAR 0, MSI-X eventfds, a huge
//! page for DMA), `driver` (raw virtio-pci driver on the shared transport of
//! `scenarios/vfio/virtio.rs`), `blk`/`net`/`iommu` (the victims' drivers and their good
//! request), `attack` (one check per attack, recovery, bystander check), `bystander`,
//! `machine` (what the host built), `spec` (shared with the host test).

mod addresses;
mod attack;
mod blk;
mod bystander;
mod driver;
mod ecam;
mod iommu;
mod iommu_attacks;
mod machine;
mod msix;
mod net;
mod net_attacks;
mod rings;
mod session;
pub mod spec;
mod transport;

use std::time::Duration;

use self::attack::{Arena, Seen, Tally};
use self::blk::{Aim, Blk};
use self::bystander::{expected_block, Bystander};
use self::iommu::Iommu;
use self::machine::Machine;
use self::net::Net;
use self::session::Session;
use crate::disk::{self, AlignedBuf};
use crate::pattern;
use crate::report::Reporter;
use crate::scenarios::vfio::bind;

type BlkAttack = fn(&mut Blk) -> Result<Seen, String>;
type NetAttack = fn(&mut Net) -> Result<Seen, String>;
type IommuAttack = fn(&mut Iommu) -> Result<Seen, String>;

const BLK_ATTACKS: [(&str, BlkAttack); 24] = [
    ("blk_loop_direct", rings::loop_direct),
    ("blk_loop_indirect", rings::loop_indirect),
    ("blk_indirect_in_indirect", rings::indirect_in_indirect),
    (
        "blk_chain_longer_than_queue",
        rings::chain_longer_than_queue,
    ),
    ("blk_len_4gib", addresses::len_4gib),
    ("blk_addr_beyond_ram", addresses::addr_beyond_ram),
    ("blk_addr_mmio_hole", addresses::addr_mmio_hole),
    ("blk_ring_in_mmio_hole", rings::ring_in_mmio_hole),
    ("blk_avail_idx_jump", rings::avail_idx_jump),
    ("blk_used_over_desc", rings::used_over_desc),
    ("blk_queue_size_not_pow2", transport::queue_size_not_pow2),
    ("blk_queue_enable_twice", transport::queue_enable_twice),
    ("blk_notify_storm", transport::notify_storm),
    (
        "blk_config_write_driver_ok",
        transport::config_write_driver_ok,
    ),
    ("blk_reset_in_flight", transport::reset_in_flight),
    ("blk_sector_overflow", blk::sector_overflow),
    ("blk_discard_past_end", blk::discard_past_end),
    ("blk_write_zeroes_past_end", blk::write_zeroes_past_end),
    ("blk_flush_storm", blk::flush_storm),
    ("blk_bad_request_types", blk::bad_request_types),
    ("msix_unprogrammed_unmask", msix::unprogrammed_unmask),
    ("msix_garbage_entries", msix::garbage_entries),
    ("msix_pba_writes", msix::pba_writes),
    ("msix_odd_accesses", msix::odd_accesses),
];

const NET_ATTACKS: [(&str, NetAttack); 8] = [
    ("net_tx_bogus_gso", net_attacks::tx_bogus_gso),
    ("net_tx_bogus_csum", net_attacks::tx_bogus_csum),
    ("net_tx_frame_0", net_attacks::tx_frame_0),
    ("net_tx_frame_64k", net_attacks::tx_frame_64k),
    ("net_ctrl_wrong_lengths", net_attacks::ctrl_wrong_lengths),
    ("net_loop_chain", net_attacks::loop_chain),
    ("net_avail_idx_jump", net_attacks::avail_idx_jump),
    ("net_reset_in_flight", net_attacks::reset_in_flight),
];

const IOMMU_ATTACKS: [(&str, IommuAttack); 6] = [
    ("iommu_attach_unknown", iommu_attacks::attach_unknown),
    ("iommu_map_overlap", iommu_attacks::map_overlap),
    ("iommu_map_wrap", iommu_attacks::map_wrap),
    ("iommu_request_lengths", iommu_attacks::request_lengths),
    ("iommu_loop_chain", iommu_attacks::loop_chain),
    ("iommu_avail_idx_jump", iommu_attacks::avail_idx_jump),
];

/// Huge pages: one DMA page per open session (at most two at once) and a spare.
const HUGE_PAGES: u32 = 3;
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);
/// The number in the NIC's good frame after the ECAM sweep (attacks use their index).
const NET_AFTER_SWEEP: u64 = 9999;

pub fn run(r: &mut Reporter) {
    let machine = match Machine::find() {
        Ok(m) => m,
        Err(e) => return r.check("hostile_machine", false, e),
    };
    r.check("hostile_machine", true, machine.describe());
    let bystander = match Bystander::open(&machine.bystander.name) {
        Ok(b) => b,
        Err(e) => return r.check("hostile_bystander_before", false, e),
    };
    let mut arena = Arena {
        r,
        tally: Tally::default(),
        bystander,
    };
    let before = arena.bystander.before();
    arena.check("hostile_bystander_before", before);
    if arena.check("hostile_noiommu", session::prepare(HUGE_PAGES)) {
        let last_good = victims(&mut arena, &machine);
        let iommu_taken = iommu_phase(&mut arena, &machine);
        give_back(&mut arena, &machine, last_good, iommu_taken);
    }
    let after = arena.bystander.after();
    arena.check("hostile_bystander_after", after);
    tally(&mut arena);
}

/// Phases 1 to 3; returns the FNV of the last good block written to the victim disk.
fn victims(arena: &mut Arena, m: &Machine) -> Option<String> {
    let (blk_s, text) = match Session::open(&m.victim_blk.bdf) {
        Ok(s) => s,
        Err(e) => {
            arena.check("hostile_victim_blk", Err(e));
            return None;
        }
    };
    arena.check("hostile_victim_blk", Ok(text));
    let aim = (|| {
        Ok::<_, String>(Aim {
            ram_end: m.ram_end,
            ecam: m.ecam0()?.base,
            bystander_bar: machine::bar_address(&m.bystander.bdf, 0)?,
            own_bar: machine::bar_address(&m.victim_blk.bdf, 0)?,
        })
    })();
    let mut blk = match aim.and_then(|aim| Blk::new(&blk_s, aim)) {
        Ok(b) => b,
        Err(e) => {
            arena.check("hostile_victim_blk_driver", Err(e));
            return None;
        }
    };
    for (name, f) in BLK_ATTACKS {
        arena.attack(name, &mut blk, f);
    }
    match Session::open(&m.victim_net) {
        Ok((net_s, text)) => {
            arena.check("hostile_victim_net", Ok(text));
            match Net::new(&net_s).and_then(|net| {
                let mac = net::format_mac(net.mac);
                if mac == spec::VICTIM_MAC {
                    Ok(net)
                } else {
                    Err(format!("MAC {mac}, not {}", spec::VICTIM_MAC))
                }
            }) {
                Ok(mut net) => {
                    for (name, f) in NET_ATTACKS {
                        arena.attack(name, &mut net, f);
                    }
                    config_space(arena, m, &mut blk, &mut net, &net_s);
                    let _ = net.d.reset();
                }
                Err(e) => {
                    arena.check("hostile_victim_net_driver", Err(e));
                }
            }
        }
        Err(e) => {
            arena.check("hostile_victim_net", Err(e));
        }
    }
    let _ = blk.d.reset();
    blk.last_good.clone()
}

/// Phase 3: the ECAM sweep and the BAR placements, both victims ours.
fn config_space(arena: &mut Arena, m: &Machine, blk: &mut Blk, net: &mut Net, net_s: &Session) {
    let window = m.ecam0().and_then(ecam::Window::open);
    let window = match window {
        Ok(w) => w,
        Err(e) => {
            for name in ["ecam_sweep", "bar_over_other_ranges"] {
                arena.attack(name, blk, |_| Err(e.clone()));
            }
            return;
        }
    };
    arena.attack("ecam_sweep", blk, |b| {
        let mut seen = ecam::sweep_attack(b, &window, &[net_s])?;
        match attack::Victim::recover(net, NET_AFTER_SWEEP) {
            Ok(t) => seen.text.push_str(&format!(" | net after: {t}")),
            Err(e) => {
                seen.ok = false;
                seen.text.push_str(&format!(" | net after: FAILED: {e}"));
            }
        }
        Ok(seen)
    });
    let targets = (|| {
        Ok::<_, String>(vec![
            ("the ECAM window", window.ecam.base, false),
            (
                "the bystander's BAR 0",
                machine::bar_address(&m.bystander.bdf, 0)?,
                true,
            ),
            (
                "the victim NIC's BAR 0",
                machine::bar_address(&m.victim_net, 0)?,
                true,
            ),
            (
                "the IOMMU's BAR 0",
                machine::bar_address(&m.iommu, 0)?,
                true,
            ),
        ])
    })();
    arena.attack("bar_over_other_ranges", blk, |b| {
        ecam::bar_over_others(b, &window, &targets.clone()?)
    });
}

/// Phase 4: the IOMMU, once its endpoint is gone from the guest's PCI bus (unbinding
/// virtio_iommu while a device is still in one of its groups crashes this guest
/// kernel: viommu_remove() removes the IOMMU's sysfs device before
/// iommu_device_unregister() unlinks the grouped devices from it) and its own driver
/// let go. The endpoint stays in ferrio's IOMMU: its id is the one ATTACH works for.
/// Returns whether the IOMMU was taken from the kernel (and must be given back).
fn iommu_phase(arena: &mut Arena, m: &Machine) -> bool {
    let removed = std::fs::write(bind::pci_dir(&m.endpoint.bdf).join("remove"), "1")
        .map_err(|e| format!("remove {}: {e}", m.endpoint.bdf))
        .map(|()| format!("{} removed from the guest's PCI bus", m.endpoint.bdf));
    if !arena.check("hostile_endpoint_removed", removed) {
        return false;
    }
    let Some(endpoint) = iommu::endpoint_id(&m.endpoint.bdf) else {
        arena.check(
            "hostile_victim_iommu",
            Err(format!("bad address {}", m.endpoint.bdf)),
        );
        return false;
    };
    let (s, text) = match Session::open(&m.iommu) {
        Ok(s) => s,
        Err(e) => {
            arena.check("hostile_victim_iommu", Err(e));
            return bind::driver(&m.iommu).as_deref() == Some("vfio-pci");
        }
    };
    let mut io = match Iommu::new(&s, endpoint) {
        Ok(io) => io,
        Err(e) => {
            arena.check("hostile_victim_iommu", Err(e));
            return true;
        }
    };
    arena.check(
        "hostile_victim_iommu",
        Ok(format!(
            "{text}; endpoint {endpoint}, probe_size {}, domains {}-{}",
            io.probe_size, io.domains.0, io.domains.1
        )),
    );
    for (name, f) in IOMMU_ATTACKS {
        arena.attack(name, &mut io, f);
    }
    let _ = io.d.reset();
    true
}

/// Phase 5: the victims and the IOMMU back to the kernel's drivers, which must work.
fn give_back(arena: &mut Arena, m: &Machine, last_good: Option<String>, iommu_taken: bool) {
    let blk = session::give_back(&m.victim_blk.bdf)
        .and_then(|_| bind::wait_for_disk(&m.victim_blk.bdf, spec::VICTIM_SERIAL, DRIVER_TIMEOUT))
        .and_then(|name| {
            let got = read_block(&name, spec::GOOD_SECTOR * 512)?;
            let want = last_good.clone().ok_or("no good block was written")?;
            if pattern::fnv1a(&got) != want {
                return Err(format!(
                    "{name}: good block reads {}, not {want}",
                    pattern::fnv1a(&got)
                ));
            }
            Ok(want)
        });
    arena.check("hostile_victim_blk_back", blk);
    let net = session::give_back(&m.victim_net).and_then(|driver| {
        Ok(format!(
            "{driver}, {}",
            bind::wait_for_netdev(&m.victim_net, DRIVER_TIMEOUT)?
        ))
    });
    arena.check("hostile_victim_net_back", net);
    if !iommu_taken {
        return arena
            .r
            .check("hostile_iommu_back", false, "the IOMMU was never taken");
    }
    let iommu = session::give_back(&m.iommu).and_then(|driver| {
        std::fs::write("/sys/bus/pci/rescan", "1")
            .map_err(|e| format!("rescan the PCI bus: {e}"))?;
        let name = bind::wait_for_disk(&m.endpoint.bdf, spec::ENDPOINT_SERIAL, DRIVER_TIMEOUT)?;
        let got = read_block(&name, 0)?;
        if got != expected_block(spec::ENDPOINT_SEED, 0) {
            return Err(format!("{name}: block 0 reads {}", pattern::fnv1a(&got)));
        }
        Ok(format!(
            "IOMMU on {driver}; endpoint rescanned, its disk {name} reads the host's data \
             through the IOMMU"
        ))
    });
    arena.check("hostile_iommu_back", iommu);
}

/// 4 KiB of disk `name` at byte `offset`, through the kernel's driver (O_DIRECT).
fn read_block(name: &str, offset: u64) -> Result<Vec<u8>, String> {
    let file = disk::open(&format!("/dev/{name}"), false, true)?;
    let mut buf = AlignedBuf::new(spec::BLOCK);
    disk::read_at(&file, buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

/// The count: every attack of [`spec::ATTACKS`] ran, in order, and was survived.
fn tally(arena: &mut Arena) {
    let ran: Vec<&str> = arena
        .tally
        .attacks
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let survived = arena.tally.survived();
    let missing: Vec<&&str> = spec::ATTACKS.iter().filter(|a| !ran.contains(a)).collect();
    let ok = ran == spec::ATTACKS && survived == ran.len();
    let value = format!(
        "{} attacks, {survived} survived{}",
        ran.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; not run: {missing:?}")
        }
    );
    arena.r.check("hostile_attacks", ok, value);
}
