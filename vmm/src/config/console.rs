//! `--console` (virtio-console): `BACKEND[,slot=N][,iommu=on]` where BACKEND is `stdio`,
//! `file=PATH` (output only), `socket=PATH` (ferrio listens on a Unix socket and waits
//! for one client before booting; both directions) or `none`.

use std::path::PathBuf;

use super::ConfigError;

/// Where the virtio-console's port is connected on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// stdout, and stdin as input.
    Stdio,
    /// Guest output appended to a file; no input.
    File(PathBuf),
    /// A Unix stream socket ferrio creates and listens on.
    Socket(PathBuf),
}

/// A virtio-console device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub backend: ConsoleBackend,
    /// PCI slot (device number on bus 0), or the first free one.
    pub slot: Option<u8>,
    /// Behind the virtio-iommu (needs `--iommu`).
    pub iommu: bool,
}

/// Highest device number on a PCI bus.
pub const MAX_PCI_SLOT: u8 = 31;

fn bad(spec: &str, why: &str) -> ConfigError {
    ConfigError::BadDevice {
        spec: spec.to_string(),
        reason: why.to_string(),
    }
}

/// Parses a `--console` spec; `none` gives `None`.
pub fn parse_console(spec: &str) -> Result<Option<ConsoleConfig>, ConfigError> {
    let mut parts = spec.split(',');
    let backend = match parts.next().unwrap_or("") {
        "none" => {
            return if spec == "none" {
                Ok(None)
            } else {
                Err(bad(spec, "`none` takes no options"))
            }
        }
        "stdio" => ConsoleBackend::Stdio,
        b => match b.split_once('=') {
            Some(("file", p)) if !p.is_empty() => ConsoleBackend::File(p.into()),
            Some(("socket", p)) if !p.is_empty() => ConsoleBackend::Socket(p.into()),
            _ => return Err(bad(spec, "expected stdio, file=PATH, socket=PATH or none")),
        },
    };
    let (mut slot, mut iommu) = (None, false);
    for opt in parts {
        match opt.split_once('=') {
            Some(("slot", n)) => slot = Some(super::disk::parse_slot(spec, n)?),
            Some(("iommu", v)) => iommu = super::disk::on_off(spec, "iommu", v)?,
            _ => return Err(bad(spec, &format!("unknown option `{opt}`"))),
        }
    }
    Ok(Some(ConsoleConfig {
        backend,
        slot,
        iommu,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_console("none").unwrap(), None);
        assert_eq!(
            parse_console("stdio").unwrap(),
            Some(ConsoleConfig {
                backend: ConsoleBackend::Stdio,
                slot: None,
                iommu: false,
            })
        );
        assert_eq!(
            parse_console("socket=/tmp/c.sock,slot=5,iommu=on").unwrap(),
            Some(ConsoleConfig {
                backend: ConsoleBackend::Socket("/tmp/c.sock".into()),
                slot: Some(5),
                iommu: true,
            })
        );
        assert_eq!(
            parse_console("file=/tmp/out").unwrap().unwrap().backend,
            ConsoleBackend::File("/tmp/out".into())
        );
        for bad in [
            "",
            "tty",
            "file=",
            "socket=",
            "stdio,slot=0",
            "stdio,slot=32",
            "stdio,slot=x",
            "stdio,foo=1",
            "stdio,iommu=yes",
            "none,slot=3",
        ] {
            assert!(parse_console(bad).is_err(), "{bad:?} accepted");
        }
    }
}
