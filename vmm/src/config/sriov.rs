//! Emulated SR-IOV in the configuration. `id=NAME` names a `--disk` or `--net`
//! device; `vf_of=NAME` makes a device a virtual function (VF) of the device with that
//! id, its physical function (PF). The guest creates the VFs with
//! `echo N > sriov_numvfs` on the PF. VF `i` (the order of declaration among the VFs of
//! that PF) sits at the PF's devfn + 1 + `i`: functions 1.. of the PF's slot, spilling
//! into the following slots.
//!
//! [`check`] enforces the rules that need no host access: id syntax and uniqueness
//! (across disks and net devices together), `vf_of` naming an existing PF of the same
//! device type that is not itself a VF, no `slot=` on a VF, `iommu=on` on a VF only
//! when its PF has it, at most [`MAX_VFS_PER_PF`] VFs, and with an explicit PF slot,
//! the last VF at devfn 0xFF or below. Without a PF slot the VMM checks the fit when it
//! places the device.

use std::collections::HashMap;

use super::disk::bad;
use super::{ConfigError, DiskConfig, NetConfig, VmConfig};

/// Longest device id (`id=NAME`).
pub const MAX_ID_LEN: usize = 32;
/// Most VFs one PF may have (the VMM refuses more than fit on bus 0).
pub const MAX_VFS_PER_PF: u16 = 248;
/// Highest devfn (device << 3 | function) on a bus.
const MAX_DEVFN: u16 = 0xFF;

/// Parses the value of `id=` or `vf_of=` (`key`): 1..=[`MAX_ID_LEN`] characters of
/// A-Z, a-z, 0-9, `_` and `-`.
pub(super) fn parse_id(spec: &str, key: &str, v: &str) -> Result<String, ConfigError> {
    let valid = (1..=MAX_ID_LEN).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(v.to_string())
    } else {
        Err(bad(
            spec,
            format!("{key} must be 1..={MAX_ID_LEN} characters of A-Z, a-z, 0-9, _ and -"),
        ))
    }
}

/// The device type, which a VF shares with its PF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Disk,
    Net,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Disk => "disk",
            Kind::Net => "net device",
        }
    }
}

/// What the SR-IOV rules look at in one declared device.
struct Dev<'a> {
    kind: Kind,
    spec: &'a str,
    id: Option<&'a str>,
    vf_of: Option<&'a str>,
    slot: Option<u8>,
    iommu: bool,
}

/// Checks the SR-IOV rules over all declared devices; `disk_specs[i]` is the spec
/// `disks[i]` was parsed from (likewise for nets), so errors quote the spec at fault.
pub(super) fn check(
    disk_specs: &[String],
    disks: &[DiskConfig],
    net_specs: &[String],
    nets: &[NetConfig],
) -> Result<(), ConfigError> {
    let disk_devs = disk_specs.iter().zip(disks).map(|(spec, d)| Dev {
        kind: Kind::Disk,
        spec,
        id: d.id.as_deref(),
        vf_of: d.vf_of.as_deref(),
        slot: d.slot,
        iommu: d.iommu,
    });
    let net_devs = net_specs.iter().zip(nets).map(|(spec, n)| Dev {
        kind: Kind::Net,
        spec,
        id: n.id.as_deref(),
        vf_of: n.vf_of.as_deref(),
        slot: n.slot,
        iommu: n.iommu,
    });
    let devs: Vec<Dev> = disk_devs.chain(net_devs).collect();

    let mut by_id: HashMap<&str, &Dev> = HashMap::new();
    for d in &devs {
        if let Some(id) = d.id {
            if by_id.insert(id, d).is_some() {
                return Err(bad(
                    d.spec,
                    format!(
                        "duplicate id `{id}` (ids must be unique across all disks and net devices)"
                    ),
                ));
            }
        }
    }

    for d in &devs {
        let Some(pf_id) = d.vf_of else { continue };
        if d.slot.is_some() {
            return Err(bad(
                d.spec,
                "a VF takes no slot=: it sits at its PF's devfn + 1 + VF index",
            ));
        }
        if d.id == Some(pf_id) {
            return Err(bad(d.spec, "a device cannot be a VF of itself"));
        }
        let pf = by_id
            .get(pf_id)
            .ok_or_else(|| bad(d.spec, format!("unknown PF id `{pf_id}`")))?;
        if pf.kind != d.kind {
            return Err(bad(
                d.spec,
                format!(
                    "PF `{pf_id}` is a {}, but this VF is a {} (a VF has its PF's device type)",
                    pf.kind.name(),
                    d.kind.name()
                ),
            ));
        }
        if let Some(grand) = pf.vf_of {
            return Err(bad(
                d.spec,
                format!("PF `{pf_id}` is itself a VF (of `{grand}`); a VF cannot have VFs"),
            ));
        }
        if d.iommu && !pf.iommu {
            return Err(bad(
                d.spec,
                format!("iommu=on on a VF needs iommu=on on its PF `{pf_id}`"),
            ));
        }
    }

    for pf in &devs {
        let Some(id) = pf.id else { continue };
        let vfs = devs.iter().filter(|d| d.vf_of == Some(id)).count();
        if vfs > usize::from(MAX_VFS_PER_PF) {
            return Err(bad(
                pf.spec,
                format!("PF `{id}` has {vfs} VFs, more than the maximum of {MAX_VFS_PER_PF}"),
            ));
        }
        if let Some(slot) = pf.slot {
            let max = MAX_DEVFN - u16::from(slot) * 8;
            if vfs > usize::from(max) {
                return Err(bad(
                    pf.spec,
                    format!(
                        "PF `{id}` at slot {slot} has {vfs} VFs, but at most {max} fit there \
                         (the last VF's devfn, slot * 8 + VFs, must be <= 0xFF)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The devices of `all` whose `vf_of` is `pf_id`, in declaration order.
fn vfs_of<'a, T>(
    all: &'a [T],
    pf_id: Option<&str>,
    vf_of: impl Fn(&T) -> Option<&str>,
) -> Vec<&'a T> {
    match pf_id {
        Some(id) => all.iter().filter(|d| vf_of(d) == Some(id)).collect(),
        None => Vec::new(),
    }
}

impl VmConfig {
    /// The VFs of the disk `pf`, in declaration order (VF 0 first); empty when `pf`
    /// has no id or no VFs.
    pub fn disk_vfs<'a>(&'a self, pf: &DiskConfig) -> Vec<&'a DiskConfig> {
        vfs_of(&self.disks, pf.id.as_deref(), |d| d.vf_of.as_deref())
    }

    /// The VFs of the net device `pf`, in declaration order (VF 0 first); empty when
    /// `pf` has no id or no VFs.
    pub fn net_vfs<'a>(&'a self, pf: &NetConfig) -> Vec<&'a NetConfig> {
        vfs_of(&self.nets, pf.id.as_deref(), |n| n.vf_of.as_deref())
    }
}

impl DiskConfig {
    /// Whether this disk is a VF (built through its PF, not on its own).
    pub fn is_vf(&self) -> bool {
        self.vf_of.is_some()
    }
}

impl NetConfig {
    /// Whether this net device is a VF (built through its PF, not on its own).
    pub fn is_vf(&self) -> bool {
        self.vf_of.is_some()
    }
}
