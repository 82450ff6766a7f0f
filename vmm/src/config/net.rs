//! `--net tap=NAME[,mac=MAC][,num_queue_pairs=N][,queue_size=N][,slot=N][,iommu=on][,id=NAME][,vf_of=NAME]`
//! or `--net fd=N[,mac=MAC][,queue_size=N][,slot=N][,iommu=on][,id=NAME][,vf_of=NAME]`
//! (virtio-net over a TAP). Repeatable; NICs get PCI slots in the order given. Without `mac`, NIC `i` (counting every
//! `--net`, VFs included) gets 52:54:00:12:34:(0x56 + i), QEMU's default scheme.
//! `id=NAME` names the NIC; `vf_of=NAME` makes it an SR-IOV VF of the NIC with that id
//! (see `sriov.rs`): it has no slot of its own and appears when the guest enables the
//! PF's VFs.

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;

use ferrio_devices::virtio::net::tap::MAX_QUEUE_PAIRS;

use super::disk::{bad, on_off, parse_slot, MAX_QUEUE_SIZE};
use super::sriov::parse_id;
use super::ConfigError;

/// Where a NIC's frames go on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// An existing TAP interface, by name.
    Tap(String),
    /// A TAP file descriptor inherited from the parent process.
    Fd(RawFd),
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = &'static str;

    /// Six hexadecimal octets separated by `:`; unicast, not all zero.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHY: &str = "mac must be six hex octets like 52:54:00:12:34:56";
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(WHY)?;
            if part.len() != 2 {
                return Err(WHY);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| WHY)?;
        }
        if parts.next().is_some() {
            return Err(WHY);
        }
        if mac[0] & 1 != 0 {
            return Err("mac must be a unicast address (the first octet is even)");
        }
        if mac == [0; 6] {
            return Err("mac must not be all zero");
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackendConfig,
    pub mac: MacAddr,
    pub num_queue_pairs: u16,
    pub queue_size: u16,
    pub slot: Option<u8>,
    /// Behind the virtio-iommu (needs `--iommu`).
    pub iommu: bool,
    /// The device's name (`id=NAME`), unique across all disks and net devices.
    pub id: Option<String>,
    /// The id of the PF this NIC is an SR-IOV VF of (`vf_of=NAME`).
    pub vf_of: Option<String>,
}

/// Parses the `index`-th `--net` spec (the index picks the default MAC).
pub fn parse_net(spec: &str, index: usize) -> Result<NetConfig, ConfigError> {
    let mut backend = None;
    let mut mac = None;
    let mut pairs = None;
    let mut queue_size = 256;
    let mut slot = None;
    let mut iommu = false;
    let (mut id, mut vf_of) = (None, None);
    for opt in spec.split(',') {
        let Some((key, v)) = opt.split_once('=') else {
            return Err(bad(spec, format!("expected key=value, got `{opt}`")));
        };
        match key {
            "tap" | "fd" if backend.is_some() => {
                return Err(bad(spec, "give exactly one of tap=NAME and fd=N"))
            }
            "tap" if !v.is_empty() => backend = Some(NetBackendConfig::Tap(v.into())),
            "fd" => {
                let fd = v
                    .parse::<RawFd>()
                    .ok()
                    .filter(|&fd| fd > 2)
                    .ok_or_else(|| bad(spec, "fd must be an open descriptor number above 2"))?;
                backend = Some(NetBackendConfig::Fd(fd));
            }
            "mac" => mac = Some(v.parse::<MacAddr>().map_err(|why| bad(spec, why))?),
            "num_queue_pairs" => {
                pairs = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                        .ok_or_else(|| {
                            bad(
                                spec,
                                format!("num_queue_pairs must be 1..={MAX_QUEUE_PAIRS}"),
                            )
                        })?,
                )
            }
            "queue_size" => {
                queue_size = v
                    .parse::<u16>()
                    .ok()
                    .filter(|n| n.is_power_of_two() && (64..=MAX_QUEUE_SIZE).contains(n))
                    .ok_or_else(|| {
                        bad(
                            spec,
                            format!("queue_size must be a power of two in 64..={MAX_QUEUE_SIZE}"),
                        )
                    })?
            }
            "slot" => slot = Some(parse_slot(spec, v)?),
            "iommu" => iommu = on_off(spec, key, v)?,
            "id" => id = Some(parse_id(spec, key, v)?),
            "vf_of" => vf_of = Some(parse_id(spec, key, v)?),
            _ => return Err(bad(spec, format!("unknown option `{opt}`"))),
        }
    }
    let backend = backend.ok_or_else(|| bad(spec, "tap=NAME or fd=N is required"))?;
    if matches!(backend, NetBackendConfig::Fd(_)) && pairs.is_some_and(|n| n > 1) {
        return Err(bad(
            spec,
            "fd=N carries one queue pair; use tap=NAME for more",
        ));
    }
    let default_mac = || {
        let last = 0x56u8.wrapping_add(index as u8);
        MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, last])
    };
    Ok(NetConfig {
        backend,
        mac: mac.unwrap_or_else(default_mac),
        num_queue_pairs: pairs.unwrap_or(1),
        queue_size,
        slot,
        iommu,
        id,
        vf_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_minimal_specs() {
        let n = parse_net(
            "tap=tap0,mac=02:00:00:aa:bb:cc,num_queue_pairs=4,queue_size=1024,slot=5,iommu=on",
            0,
        )
        .unwrap();
        assert_eq!(
            n,
            NetConfig {
                backend: NetBackendConfig::Tap("tap0".into()),
                mac: MacAddr([2, 0, 0, 0xaa, 0xbb, 0xcc]),
                num_queue_pairs: 4,
                queue_size: 1024,
                slot: Some(5),
                iommu: true,
                id: None,
                vf_of: None,
            }
        );
        let n = parse_net("fd=7", 2).unwrap();
        assert_eq!(n.backend, NetBackendConfig::Fd(7));
        assert_eq!(n.mac.to_string(), "52:54:00:12:34:58");
        assert_eq!((n.num_queue_pairs, n.queue_size, n.slot), (1, 256, None));
        assert_eq!((n.id, n.vf_of), (None, None));
    }

    #[test]
    fn id_and_vf_of() {
        let n = parse_net("id=pf0,tap=tpf0,slot=2", 0).unwrap();
        assert_eq!((n.id.as_deref(), n.vf_of.as_deref()), (Some("pf0"), None));
        assert!(!n.is_vf());
        let n = parse_net(
            "tap=tvf0,vf_of=pf0,mac=02:00:00:00:00:02,num_queue_pairs=2,queue_size=128,iommu=on",
            1,
        )
        .unwrap();
        assert_eq!(
            n,
            NetConfig {
                backend: NetBackendConfig::Tap("tvf0".into()),
                mac: MacAddr([2, 0, 0, 0, 0, 2]),
                num_queue_pairs: 2,
                queue_size: 128,
                slot: None,
                iommu: true,
                id: None,
                vf_of: Some("pf0".into()),
            }
        );
        assert!(n.is_vf());
        // A VF without mac= gets the index-based default like any NIC.
        let n = parse_net("fd=5,vf_of=pf0,id=vf-1", 3).unwrap();
        assert_eq!(n.mac.to_string(), "52:54:00:12:34:59");
        assert_eq!(n.id.as_deref(), Some("vf-1"));
        for (spec, key) in [
            ("tap=a,id=", "id"),
            ("tap=a,id=a.b", "id"),
            ("tap=a,id=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "id"),
            ("tap=a,vf_of=", "vf_of"),
            ("tap=a,vf_of=p f", "vf_of"),
        ] {
            let err = parse_net(spec, 0).expect_err(spec).to_string();
            assert_eq!(
                err,
                format!(
                    "invalid device spec '{spec}': {key} must be 1..=32 characters of \
                     A-Z, a-z, 0-9, _ and -"
                )
            );
        }
    }

    #[test]
    fn bad_specs() {
        for spec in [
            "",
            "tap0",
            "tap=",
            "mac=52:54:00:12:34:56",
            "tap=a,fd=4",
            "fd=1",
            "fd=x",
            "fd=4,num_queue_pairs=2",
            "tap=a,mac=01:00:00:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
            "tap=a,mac=52:54:00:12:34",
            "tap=a,mac=52:54:00:12:34:56:78",
            "tap=a,mac=52-54-00-12-34-56",
            "tap=a,mac=5:54:00:12:34:567",
            "tap=a,mac=zz:54:00:12:34:56",
            "tap=a,num_queue_pairs=0",
            "tap=a,num_queue_pairs=17",
            "tap=a,queue_size=100",
            "tap=a,queue_size=32",
            "tap=a,slot=0",
            "tap=a,vhost=on",
            "tap=a,iommu=1",
        ] {
            assert!(parse_net(spec, 0).is_err(), "{spec:?} accepted");
        }
    }
}
