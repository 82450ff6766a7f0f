//! What the guest kernel logs about an IOMMU fault. Linux's virtio-iommu driver
//! (drivers/iommu/virtio-iommu.c, `viommu_fault_handler`, unchanged in 6.12) prints
//! each fault event from the device as
//!
//! ```text
//! dev_err_ratelimited(viommu->dev, "%s fault from EP %u at %#llx [%s%s%s]\n",
//!                     reason ("domain", "page", "unknown"), endpoint, address,
//!                     "R"?, "W"?, "X"?)
//! ```
//!
//! (`"%s fault from EP %u\n"` without VIRTIO_IOMMU_FAULT_F_ADDRESS), e.g.
//! `virtio_iommu virtio0: page fault from EP 40 at 0x840000000 [R]`; the endpoint is
//! the VIOT endpoint id, which for ferrio is the function's BDF as
//! `bus << 8 | device << 3 | function`. The records are read from /dev/kmsg,
//! non-blocking, starting at the end of the log when the reader is opened.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// The VIOT endpoint id of PCI function `bdf` (`[segment:]bus:device.function`, hex).
pub fn endpoint_id(bdf: &str) -> Option<u32> {
    let mut parts: Vec<&str> = bdf.split(':').collect();
    let dev_fn = parts.pop()?;
    let bus = parts.pop()?;
    if parts.len() > 1 {
        return None;
    }
    let (dev, func) = dev_fn.split_once('.')?;
    let hex = |s: &str, max: u32| u32::from_str_radix(s, 16).ok().filter(|&v| v <= max);
    Some(hex(bus, 0xff)? << 8 | hex(dev, 0x1f)? << 3 | hex(func, 7)?)
}

/// One fault line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultLine {
    /// `page`, `domain` or `unknown`.
    pub reason: String,
    pub endpoint: u32,
    /// Absent when the event had no valid address.
    pub address: Option<u64>,
    /// `R`, `W`, `X` as flagged.
    pub access: String,
}

/// The fault described by a kernel log message, if it is a virtio-iommu fault line.
pub fn parse_fault(msg: &str) -> Option<FaultLine> {
    const MARK: &str = " fault from EP ";
    let at = msg.find(MARK)?;
    let reason = msg[..at].rsplit(' ').next()?.to_owned();
    let rest = &msg[at + MARK.len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let endpoint = rest[..digits].parse().ok()?;
    let rest = rest[digits..].trim_end();
    let (address, access) = match rest.strip_prefix(" at ") {
        None if rest.is_empty() => (None, String::new()),
        None => return None,
        Some(tail) => {
            let (addr, flags) = tail.split_once(' ')?;
            let hex = addr.strip_prefix("0x").unwrap_or(addr);
            let address = u64::from_str_radix(hex, 16).ok()?;
            let access = flags.strip_prefix('[')?.strip_suffix(']')?;
            (Some(address), access.to_owned())
        }
    };
    Some(FaultLine {
        reason,
        endpoint,
        address,
        access,
    })
}

/// The message of one /dev/kmsg record (`prio,seq,usec,flags[,...];message\n`
/// followed by ` KEY=value` continuation lines).
pub fn kmsg_message(record: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(record);
    let (_, msg) = text.split_once(';')?;
    Some(msg.lines().next().unwrap_or("").to_owned())
}

/// What a search of the kernel log found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Search {
    /// The first fault line naming the endpoint and the address.
    pub exact: Option<String>,
    /// The first fault line naming the endpoint at another (or no) address.
    pub endpoint: Option<String>,
    /// Fault lines about other endpoints.
    pub others: usize,
    /// Records read.
    pub records: usize,
    pub error: Option<String>,
}

impl Search {
    /// Takes one message into account.
    pub fn add(&mut self, msg: &str, endpoint: u32, address: u64) {
        self.records += 1;
        let Some(f) = parse_fault(msg) else {
            return;
        };
        if f.endpoint != endpoint {
            self.others += 1;
        } else if f.address == Some(address) {
            self.exact.get_or_insert_with(|| msg.to_owned());
        } else {
            self.endpoint.get_or_insert_with(|| msg.to_owned());
        }
    }
}

/// A non-blocking reader of the kernel log from the point it was opened.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens /dev/kmsg and skips the records already there.
    pub fn open_at_end() -> Result<Kmsg, String> {
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("open /dev/kmsg: {e}"))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| format!("seek /dev/kmsg to the end: {e}"))?;
        Ok(Kmsg { file })
    }

    /// The next record's message; `None` when there is none yet.
    fn next(&mut self) -> Result<Option<String>, String> {
        // One read returns one record; 8 KiB holds any (the kernel limits them to 1 KiB
        // of text plus the dictionary).
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(kmsg_message(&buf[..n]).unwrap_or_default())),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read /dev/kmsg: {e}")),
            }
        }
    }

    /// Reads new records for up to `timeout`, until a fault line naming `endpoint`
    /// at `address` shows up.
    pub fn find_fault(&mut self, endpoint: u32, address: u64, timeout: Duration) -> Search {
        let deadline = Instant::now() + timeout;
        let mut search = Search::default();
        loop {
            loop {
                match self.next() {
                    Ok(Some(msg)) => search.add(&msg, endpoint, address),
                    Ok(None) => break,
                    Err(e) => {
                        search.error = Some(e);
                        return search;
                    }
                }
                if search.exact.is_some() {
                    return search;
                }
            }
            if Instant::now() >= deadline {
                return search;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_are_bus_devfn() {
        assert_eq!(endpoint_id("0000:00:05.1"), Some(0x29));
        assert_eq!(endpoint_id("0000:01:00.3"), Some(0x103));
        assert_eq!(endpoint_id("00:1f.7"), Some(0xff));
        assert_eq!(endpoint_id("0000:00:20.0"), None);
        assert_eq!(endpoint_id("0000:00:05.8"), None);
        assert_eq!(endpoint_id("0000:00:05"), None);
        assert_eq!(endpoint_id("x:0000:00:05.0"), None);
        assert_eq!(endpoint_id(""), None);
    }

    #[test]
    fn parses_the_kernel_fault_lines() {
        let line = "virtio_iommu virtio0: page fault from EP 41 at 0x840000000 [R]";
        assert_eq!(
            parse_fault(line),
            Some(FaultLine {
                reason: "page".into(),
                endpoint: 41,
                address: Some(0x8_4000_0000),
                access: "R".into()
            })
        );
        let rw = parse_fault("virtio_iommu virtio1: domain fault from EP 8 at 0 [RW]").unwrap();
        assert_eq!((rw.reason.as_str(), rw.address), ("domain", Some(0)));
        assert_eq!(rw.access, "RW");
        let bare = parse_fault("virtio_iommu virtio0: unknown fault from EP 3").unwrap();
        assert_eq!((bare.endpoint, bare.address), (3, None));
        assert_eq!(parse_fault("virtio_net virtio2 eth1: link up"), None);
        assert_eq!(parse_fault("page fault from EP x at 0x1 [R]"), None);
        assert_eq!(parse_fault("page fault from EP 4 at 0xzz [R]"), None);
        assert_eq!(parse_fault("page fault from EP 4 whatever"), None);
    }

    #[test]
    fn kmsg_records_and_searches() {
        let rec = b"3,812,77123456,-;virtio_iommu virtio0: page fault from EP 41 at 0x840000000 [R]\n SUBSYSTEM=virtio\n DEVICE=+virtio:virtio0\n";
        let msg = kmsg_message(rec).unwrap();
        assert_eq!(
            msg,
            "virtio_iommu virtio0: page fault from EP 41 at 0x840000000 [R]"
        );
        assert_eq!(kmsg_message(b"no separator"), None);
        let mut s = Search::default();
        s.add("FERRIO-RESULT {\"check\":\"x\"}", 41, 0x8_4000_0000);
        s.add(&msg.replace("EP 41", "EP 40"), 41, 0x8_4000_0000);
        s.add(
            &msg.replace("0x840000000", "0x840001000"),
            41,
            0x8_4000_0000,
        );
        assert_eq!((s.records, s.others, s.exact.is_some()), (3, 1, false));
        assert!(s
            .endpoint
            .as_deref()
            .is_some_and(|l| l.contains("0x840001000")));
        s.add(&msg, 41, 0x8_4000_0000);
        assert_eq!(s.exact.as_deref(), Some(msg.as_str()));
    }
}
