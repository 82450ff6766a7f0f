//! The guest's view of its virtio-net NIC: finding it in sysfs, its queues, bringing it
//! up with an address, ping, the offloads the driver turned on (ethtool ioctls) and
//! the per-queue MSI-X interrupt counts.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::disk;
use crate::sys;

/// The virtio-net interface: `eth0`, its virtio device (`virtio1`) and PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub virtio: String,
    pub pci: String,
}

impl Nic {
    pub fn sysfs(&self) -> PathBuf {
        Path::new("/sys/class/net").join(&self.name)
    }

    pub fn attr(&self, name: &str) -> Result<String, String> {
        sys::read_trimmed(self.sysfs().join(name))
    }
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The first interface whose device is bound to the `virtio_net` driver.
pub fn find_nic() -> Result<Nic, String> {
    let dir = Path::new("/sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let device = dir.join(name).join("device");
        let driver = std::fs::read_link(device.join("driver"))
            .ok()
            .and_then(|p| file_name(&p));
        if driver.as_deref() != Some("virtio_net") {
            continue;
        }
        let dev = std::fs::canonicalize(&device).map_err(|e| format!("{name}: {e}"))?;
        let virtio = file_name(&dev).unwrap_or_default();
        let pci = dev.parent().and_then(file_name).unwrap_or_default();
        return Ok(Nic {
            name: name.clone(),
            virtio,
            pci,
        });
    }
    Err(format!(
        "no interface bound to virtio_net among {}",
        names.join(",")
    ))
}

/// Numbers of (rx, tx) queues in `/sys/class/net/IF/queues` (`rx-N`, `tx-N`).
pub fn queue_counts(nic: &Nic) -> Result<(usize, usize), String> {
    let dir = nic.sysfs().join("queues");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let count = |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
    Ok((count("rx-"), count("tx-")))
}

/// `ip addr add ADDR/PREFIX dev IF`, `ip link set IF up` (busybox).
pub fn configure(nic: &Nic, addr: [u8; 4], prefix: u8) -> Result<String, String> {
    let cidr = format!("{}/{prefix}", dotted(addr));
    sys::busybox("ip", &["addr", "add", &cidr, "dev", &nic.name])?;
    sys::busybox("ip", &["link", "set", &nic.name, "up"])?;
    Ok(format!("{cidr} on {}", nic.name))
}

pub fn dotted(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// Ping summary: packets transmitted and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u64,
    pub received: u64,
}

/// `busybox ping -c COUNT -A` (the next echo as soon as a reply came), 60 s at most.
pub fn ping(addr: [u8; 4], count: u32) -> Result<(PingStats, String), String> {
    let out = sys::run(
        sys::BUSYBOX,
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-A",
            "-W",
            "5",
            "-w",
            "60",
            &dotted(addr),
        ],
    )?;
    let stats = parse_ping(&out.stdout).ok_or_else(|| {
        format!(
            "no summary in ping's output (exit {:?}): {} {}",
            out.code,
            out.stdout.trim(),
            out.stderr.trim()
        )
    })?;
    let rtt = out
        .stdout
        .lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok((stats, rtt))
}

/// Parses "20 packets transmitted, 20 packets received, 0% packet loss".
pub fn parse_ping(text: &str) -> Option<PingStats> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
    Some(PingStats {
        transmitted: numbers.next()?,
        received: numbers.next()?,
    })
}

/// The (name, count) of the NIC's MSI-X lines in /proc/interrupts, and the chip word
/// (`PCI-MSIX-0000:00:03.0`, or `IR-PCI-MSIX-...` behind interrupt remapping).
pub fn msix_lines(nic: &Nic, interrupts: &str) -> (Vec<(String, u64)>, Option<String>) {
    let suffix = format!("-MSIX-{}", nic.pci);
    let chip = interrupts
        .lines()
        .flat_map(str::split_whitespace)
        .find(|w| w.ends_with(&suffix))
        .map(str::to_owned);
    let lines = chip
        .as_deref()
        .map(|c| disk::irq_lines(interrupts, c))
        .unwrap_or_default();
    (lines, chip)
}

/// The counts of `VIRTIO-KIND.N` lines (`kind` = `input` or `output`), by queue N.
pub fn queue_irqs(nic: &Nic, lines: &[(String, u64)], kind: &str) -> Vec<(u32, u64)> {
    let prefix = format!("{}-{kind}.", nic.virtio);
    let mut found: Vec<(u32, u64)> = lines
        .iter()
        .filter_map(|(name, count)| Some((name.strip_prefix(&prefix)?.parse().ok()?, *count)))
        .collect();
    found.sort_unstable();
    found
}

/// `SIOCETHTOOL` and the legacy get-offload commands (linux/ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const OFFLOADS: [(u32, &str); 6] = [
    (0x14, "rx-checksumming"),
    (0x16, "tx-checksumming"),
    (0x18, "scatter-gather"),
    (0x1e, "tcp-segmentation-offload"),
    (0x23, "generic-segmentation-offload"),
    (0x2b, "generic-receive-offload"),
];

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member (padded to the kernel's 40 bytes).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// The driver's offload state as `ethtool -k` names it, e.g. `tcp-segmentation-offload=on`.
pub fn offloads(nic: &Nic) -> Result<Vec<(&'static str, bool)>, String> {
    if nic.name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {:?} too long", nic.name));
    }
    // SAFETY: creates a socket; the result is checked before being owned.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut out = Vec::new();
    for (cmd, name) in OFFLOADS {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfreqData {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..nic.name.len()].copy_from_slice(nic.name.as_bytes());
        // SAFETY: SIOCETHTOOL reads `req` (a NUL-terminated name and a pointer to
        // `value`, both alive for the call) and writes only `value.data`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(format!("SIOCETHTOOL {cmd:#x} ({name}): {err}"));
        }
        out.push((name, value.data != 0));
    }
    Ok(out)
}

/// Field `field` of section `section` (`Tcp`, `TcpExt`) in /proc/net/snmp or
/// /proc/net/netstat, where each section is a line of names then a line of values.
pub fn snmp_value(text: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
}

/// The guest's TCP counters that show packet loss: segments in and out,
/// retransmissions, retransmitted SYNs, retransmission timeouts.
pub fn tcp_counters() -> Result<String, String> {
    let snmp = sys::read("/proc/net/snmp")?;
    let netstat = sys::read("/proc/net/netstat")?;
    let mut out = Vec::new();
    for (text, section, field) in [
        (&snmp, "Tcp", "InSegs"),
        (&snmp, "Tcp", "OutSegs"),
        (&snmp, "Tcp", "RetransSegs"),
        (&netstat, "TcpExt", "TCPSynRetrans"),
        (&netstat, "TcpExt", "TCPTimeouts"),
    ] {
        let v = snmp_value(text, section, field).map_or("?".to_owned(), |v| v.to_string());
        out.push(format!("{field}={v}"));
    }
    Ok(out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> Nic {
        Nic {
            name: "eth0".into(),
            virtio: "virtio1".into(),
            pci: "0000:00:03.0".into(),
        }
    }

    #[test]
    fn parses_ping_summaries() {
        let text = "PING 10.0.2.2 (10.0.2.2): 56 data bytes\n64 bytes from 10.0.2.2: seq=0\n\n\
            --- 10.0.2.2 ping statistics ---\n20 packets transmitted, 19 packets received, 5% packet loss\n\
            round-trip min/avg/max = 0.3/0.5/1.2 ms\n";
        assert_eq!(
            parse_ping(text),
            Some(PingStats {
                transmitted: 20,
                received: 19
            })
        );
        assert_eq!(parse_ping("ping: sendto: Network unreachable\n"), None);
    }

    #[test]
    fn reads_snmp_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 2 64\n\
            Tcp: RtoAlgorithm InSegs OutSegs RetransSegs\nTcp: 1 100 200 3\n";
        assert_eq!(snmp_value(text, "Tcp", "RetransSegs"), Some(3));
        assert_eq!(snmp_value(text, "Tcp", "InSegs"), Some(100));
        assert_eq!(snmp_value(text, "Ip", "DefaultTTL"), Some(64));
        assert_eq!(snmp_value(text, "Tcp", "Nope"), None);
        assert_eq!(snmp_value(text, "Udp", "InSegs"), None);
    }

    #[test]
    fn finds_the_nic_interrupts() {
        let text = "           CPU0       CPU1\n\
            24:          0          0  PCI-MSIX-0000:00:02.0   0-edge      virtio0-config\n\
            25:         10          0  PCI-MSIX-0000:00:03.0   0-edge      virtio1-config\n\
            26:        500          7  PCI-MSIX-0000:00:03.0   1-edge      virtio1-input.0\n\
            27:          3          1  PCI-MSIX-0000:00:03.0   2-edge      virtio1-output.0\n\
            28:          0        300  PCI-MSIX-0000:00:03.0   3-edge      virtio1-input.1\n\
            29:          0          0  PCI-MSIX-0000:00:03.0   4-edge      virtio1-output.1\n\
            30:          2          0  PCI-MSIX-0000:00:03.0   5-edge      virtio1-control\n";
        let (lines, chip) = msix_lines(&nic(), text);
        assert_eq!(chip.as_deref(), Some("PCI-MSIX-0000:00:03.0"));
        assert_eq!(lines.len(), 6);
        assert_eq!(
            queue_irqs(&nic(), &lines, "input"),
            vec![(0, 507), (1, 300)]
        );
        assert_eq!(queue_irqs(&nic(), &lines, "output"), vec![(0, 4), (1, 0)]);
        let remapped = text.replace("PCI-MSIX", "IR-PCI-MSIX");
        let (lines, chip) = msix_lines(&nic(), &remapped);
        assert_eq!(chip.as_deref(), Some("IR-PCI-MSIX-0000:00:03.0"));
        assert_eq!(lines.len(), 6);
        let (lines, chip) = msix_lines(&nic(), "25: 1 2 IO-APIC 4-edge ttyS0\n");
        assert!(lines.is_empty() && chip.is_none());
    }
}
