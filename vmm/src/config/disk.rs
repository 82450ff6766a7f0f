//! `--disk path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,serial=ID][,slot=N][,io_engine=sync|uring][,iommu=on][,id=NAME][,vf_of=NAME]`
//! (virtio-blk over a raw image). Repeatable; disks get PCI slots in the order given, so
//! a Linux guest names them vda, vdb, ... in that order. `id=NAME` names the disk;
//! `vf_of=NAME` makes it an SR-IOV VF of the disk with that id (see `sriov.rs`): it has
//! no slot of its own and appears when the guest enables the PF's VFs.

use std::path::{Path, PathBuf};

use ferrio_devices::virtio::block::{IoEngine, MAX_QUEUES};

use super::console::MAX_PCI_SLOT;
use super::sriov::parse_id;
use super::ConfigError;

/// Longest serial the guest can read (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_LEN: usize = 20;
/// Largest queue the virtio-pci transport offers.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Option<String>,
    pub slot: Option<u8>,
    /// How requests are executed (`sync`, the default, or `uring`).
    pub io_engine: IoEngine,
    /// Behind the virtio-iommu (needs `--iommu`).
    pub iommu: bool,
    /// The device's name (`id=NAME`), unique across all disks and net devices.
    pub id: Option<String>,
    /// The id of the PF this disk is an SR-IOV VF of (`vf_of=NAME`).
    pub vf_of: Option<String>,
}

pub(super) fn bad(spec: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::BadDevice {
        spec: spec.to_string(),
        reason: why.into(),
    }
}

pub(super) fn on_off(spec: &str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(bad(spec, format!("{key} must be on or off"))),
    }
}

/// Parses one `--disk` spec (no file-system checks: see [`check_disk_file`]).
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let mut d = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        direct: false,
        num_queues: 1,
        queue_size: 256,
        serial: None,
        slot: None,
        io_engine: IoEngine::Sync,
        iommu: false,
        id: None,
        vf_of: None,
    };
    for opt in spec.split(',') {
        let Some((key, v)) = opt.split_once('=') else {
            return Err(bad(spec, format!("expected key=value, got `{opt}`")));
        };
        match key {
            "path" if !v.is_empty() => d.path = v.into(),
            "readonly" => d.read_only = on_off(spec, key, v)?,
            "direct" => d.direct = on_off(spec, key, v)?,
            "num_queues" => {
                d.num_queues = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUES).contains(n))
                    .ok_or_else(|| bad(spec, format!("num_queues must be 1..={MAX_QUEUES}")))?;
            }
            "queue_size" => {
                d.queue_size = v
                    .parse::<u16>()
                    .ok()
                    .filter(|n| n.is_power_of_two() && (4..=MAX_QUEUE_SIZE).contains(n))
                    .ok_or_else(|| {
                        bad(
                            spec,
                            format!("queue_size must be a power of two in 4..={MAX_QUEUE_SIZE}"),
                        )
                    })?;
            }
            "serial" => {
                if v.len() > MAX_SERIAL_LEN || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad(
                        spec,
                        format!(
                            "serial must be at most {MAX_SERIAL_LEN} printable ASCII characters"
                        ),
                    ));
                }
                d.serial = Some(v.to_string());
            }
            "slot" => d.slot = Some(parse_slot(spec, v)?),
            "io_engine" => d.io_engine = v.parse().map_err(|e: String| bad(spec, e))?,
            "iommu" => d.iommu = on_off(spec, key, v)?,
            "id" => d.id = Some(parse_id(spec, key, v)?),
            "vf_of" => d.vf_of = Some(parse_id(spec, key, v)?),
            _ => return Err(bad(spec, format!("unknown option `{opt}`"))),
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err(bad(spec, "path=FILE is required"));
    }
    Ok(d)
}

/// Parses a `slot=N` value: a PCI device number other than the host bridge's.
pub(super) fn parse_slot(spec: &str, v: &str) -> Result<u8, ConfigError> {
    v.parse()
        .ok()
        .filter(|n| (1..=MAX_PCI_SLOT).contains(n))
        .ok_or_else(|| bad(spec, "slot must be 1..=31 (0 is the host bridge)"))
}

/// Checks the image: a regular file (or block device) whose size is a non-zero
/// multiple of 512 bytes.
pub fn check_disk_file(path: &Path) -> Result<u64, String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let size = if meta.is_file() {
        meta.len()
    } else if meta.file_type().is_block_device() {
        use std::io::Seek;
        std::fs::File::open(path)
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
            .map_err(|e| e.to_string())?
    } else {
        return Err("not a regular file or block device".into());
    };
    if size == 0 || size % 512 != 0 {
        return Err(format!(
            "size {size} bytes is not a non-zero multiple of 512"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_minimal_specs() {
        let d = parse_disk(
            "path=/img,readonly=on,direct=on,num_queues=4,queue_size=128,serial=abc-1,slot=7,io_engine=uring,iommu=on",
        )
        .unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                direct: true,
                num_queues: 4,
                queue_size: 128,
                serial: Some("abc-1".into()),
                slot: Some(7),
                io_engine: IoEngine::Uring,
                iommu: true,
                id: None,
                vf_of: None,
            }
        );
        let d = parse_disk("path=/img").unwrap();
        assert_eq!(
            (d.read_only, d.num_queues, d.queue_size, d.slot),
            (false, 1, 256, None)
        );
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d = parse_disk("path=/img,io_engine=sync").unwrap();
        assert_eq!(d.io_engine, IoEngine::Sync);
        assert_eq!((d.id, d.vf_of), (None, None));
    }

    #[test]
    fn id_and_vf_of() {
        let d = parse_disk("id=pf-0_A,path=/pf.img,slot=3").unwrap();
        assert_eq!(
            (d.id.as_deref(), d.vf_of.as_deref()),
            (Some("pf-0_A"), None)
        );
        assert!(!d.is_vf());
        let d = parse_disk(
            "path=/vf.img,vf_of=pf-0_A,readonly=on,direct=on,num_queues=2,queue_size=64,\
             serial=vf0,io_engine=uring,iommu=on,id=vf0",
        )
        .unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/vf.img".into(),
                read_only: true,
                direct: true,
                num_queues: 2,
                queue_size: 64,
                serial: Some("vf0".into()),
                slot: None,
                io_engine: IoEngine::Uring,
                iommu: true,
                id: Some("vf0".into()),
                vf_of: Some("pf-0_A".into()),
            }
        );
        assert!(d.is_vf());
        let max = format!("path=/i,id={}", "x".repeat(32));
        assert_eq!(parse_disk(&max).unwrap().id.map(|s| s.len()), Some(32));
        for (spec, key) in [
            ("path=/i,id=", "id"),
            ("path=/i,id=a:b", "id"),
            ("path=/i,id=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "id"),
            ("path=/i,vf_of=", "vf_of"),
            ("path=/i,vf_of=a=b", "vf_of"),
        ] {
            let err = parse_disk(spec).expect_err(spec).to_string();
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
            "/img",
            "path=",
            "readonly=on",
            "path=/i,readonly=yes",
            "path=/i,num_queues=0",
            "path=/i,num_queues=65",
            "path=/i,queue_size=100",
            "path=/i,queue_size=2",
            "path=/i,queue_size=65536",
            "path=/i,serial=this-serial-is-far-too-long",
            "path=/i,serial=has space",
            "path=/i,slot=0",
            "path=/i,bogus=1",
            "path=/i,io_engine=aio",
            "path=/i,io_engine=",
        ] {
            assert!(parse_disk(spec).is_err(), "{spec:?} accepted");
        }
    }

    #[test]
    fn image_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(check_disk_file(&p), Ok(1 << 20));
        std::fs::File::create(&p).unwrap().set_len(1000).unwrap();
        assert!(check_disk_file(&p).unwrap_err().contains("multiple of 512"));
        std::fs::File::create(&p).unwrap().set_len(0).unwrap();
        assert!(check_disk_file(&p).is_err());
        assert!(check_disk_file(dir.path())
            .unwrap_err()
            .contains("not a regular file"));
        assert!(check_disk_file(&dir.path().join("missing")).is_err());
    }
}
