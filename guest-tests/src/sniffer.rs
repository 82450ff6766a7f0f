//! A packet sniffer on one interface of a [`NetNs`]: an `AF_PACKET` socket (all
//! protocols) bound to the interface from a thread inside the namespace, and a reader
//! thread that looks for byte strings (a test's tag, a payload that must never
//! arrive) in every frame. Used to see a frame the guest sent from user space (the
//! `sriov` scenario's VFIO transmit) arrive on the TAP behind the device. Stops when
//! dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::{Error, NetNs, Result};

/// Largest frame read whole (a GSO frame from a TAP can be 64 KiB plus headers).
const FRAME_MAX: usize = 128 << 10;
/// How long one receive waits, i.e. how fast the reader notices a stop.
const POLL: Duration = Duration::from_millis(100);
/// Receive buffer asked for, so a burst of bulk traffic drops as little as possible.
const RCVBUF: libc::c_int = 8 << 20;

/// A frame that held one of the searched byte strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniffedFrame {
    /// Which of the searched strings (index into the `needles` given to
    /// [`Sniffer::start`]).
    pub needle: usize,
    /// Length on the wire (before any truncation to [`FRAME_MAX`]).
    pub len: usize,
    pub dst_mac: String,
    pub src_mac: String,
    pub ethertype: u16,
    /// Offset of the needle in the frame.
    pub offset: usize,
    /// Sent by this side (`PACKET_OUTGOING`) rather than received from the link.
    pub outgoing: bool,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    frames: AtomicU64,
    matches: Mutex<Vec<SniffedFrame>>,
    errors: Mutex<Vec<String>>,
}

/// The running sniffer.
pub struct Sniffer {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn os_error(what: String) -> Error {
    Error::io(what, std::io::Error::last_os_error())
}

/// `ETH_P_ALL` in network byte order, as `socket`/`sockaddr_ll` want it.
fn eth_p_all() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// Opens the packet socket bound to `ifname`; runs inside the namespace.
fn open_socket(ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| Error::io("interface name", std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(os_error(format!("if_nametoindex({ifname})")));
    }
    // Protocol 0 until bound: the socket receives nothing from other interfaces.
    // SAFETY: creates a socket; the result is checked before being owned.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_error("socket(AF_PACKET)".into()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = eth_p_all();
    addr.sll_ifindex = i32::try_from(index).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_ll of the length passed, alive for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_error(format!("bind the packet socket to {ifname}")));
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    set_option(&fd, libc::SO_RCVTIMEO, &timeout)?;
    // Best effort: the default buffer still works, it only drops sooner under load.
    let _ = set_option(&fd, libc::SO_RCVBUF, &RCVBUF);
    Ok(fd)
}

fn set_option<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> Result<()> {
    // SAFETY: `value` points to a live T of the size passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(os_error(format!("setsockopt {option}")))
    }
}

fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where `needle` starts in `frame`, if it does.
pub fn find(frame: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || frame.len() < needle.len() {
        return None;
    }
    frame.windows(needle.len()).position(|w| w == needle)
}

/// Describes `frame` (`len` bytes on the wire) once per needle it holds.
pub fn matching_frames(
    frame: &[u8],
    len: usize,
    needles: &[Vec<u8>],
    outgoing: bool,
) -> Vec<SniffedFrame> {
    needles
        .iter()
        .enumerate()
        .filter_map(|(i, needle)| Some(describe(frame, len, i, find(frame, needle)?, outgoing)))
        .collect()
}

fn describe(
    frame: &[u8],
    len: usize,
    needle: usize,
    offset: usize,
    outgoing: bool,
) -> SniffedFrame {
    let header = frame.get(..14);
    SniffedFrame {
        needle,
        len,
        dst_mac: header.map_or_else(String::new, |h| mac(&h[0..6])),
        src_mac: header.map_or_else(String::new, |h| mac(&h[6..12])),
        ethertype: header.map_or(0, |h| u16::from_be_bytes([h[12], h[13]])),
        offset,
        outgoing,
    }
}

fn read_loop(fd: &OwnedFd, needles: &[Vec<u8>], shared: &Shared) {
    let mut buf = vec![0u8; FRAME_MAX];
    while !shared.stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are live, writable and as long as the lengths
        // passed; MSG_TRUNC makes the result the frame's full length.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                std::ptr::addr_of_mut!(from).cast(),
                &mut from_len,
            )
        };
        let Ok(len) = usize::try_from(n) else {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => {
                    lock(&shared.errors).push(format!("recvfrom: {err}"));
                    return;
                }
            }
        };
        shared.frames.fetch_add(1, Ordering::Relaxed);
        let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        let found = matching_frames(&buf[..len.min(buf.len())], len, needles, outgoing);
        if !found.is_empty() {
            lock(&shared.matches).extend(found);
        }
    }
}

impl Sniffer {
    /// Starts sniffing interface `ifname` of `ns` for frames holding any of
    /// `needles`; frames are seen from the moment this returns.
    pub fn start(ns: &NetNs, ifname: &str, needles: &[&[u8]]) -> Result<Sniffer> {
        let name = ifname.to_owned();
        let fd = ns.run(move || open_socket(&name))??;
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let needles: Vec<Vec<u8>> = needles.iter().map(|n| n.to_vec()).collect();
        let reader = thread::spawn(move || read_loop(&fd, &needles, &state));
        Ok(Sniffer {
            shared,
            reader: Some(reader),
        })
    }

    /// Frames seen so far (in both directions).
    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// The frames that held a needle (one entry per needle found), in arrival order.
    pub fn matches(&self) -> Vec<SniffedFrame> {
        lock(&self.shared.matches).clone()
    }

    /// Why the reader stopped early, if it did.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn finds_the_needles_and_describes_the_frame() {
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 1, 2]);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        frame[20..24].copy_from_slice(b"TAG!");
        frame[40..44].copy_from_slice(b"BAD!");
        let needles = [b"TAG!".to_vec(), b"NOPE".to_vec(), b"BAD!".to_vec()];
        let found = matching_frames(&frame, 60, &needles, false);
        assert_eq!(found.len(), 2, "{found:?}");
        let m = &found[0];
        assert_eq!(m.dst_mac, "ff:ff:ff:ff:ff:ff");
        assert_eq!(m.src_mac, "52:54:00:00:01:02");
        assert_eq!(
            (m.needle, m.ethertype, m.offset, m.len),
            (0, 0x88b5, 20, 60)
        );
        assert_eq!((found[1].needle, found[1].offset), (2, 40));
        assert!(matching_frames(&frame, 60, &needles[1..2], false).is_empty());
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"abc", b""), None);
        // A needle in a runt frame still counts; the header fields stay empty.
        let m = &matching_frames(b"xTAG!", 5, &needles, true)[0];
        assert_eq!((m.offset, m.ethertype, m.src_mac.as_str()), (1, 0, ""));
        assert!(m.outgoing);
    }

    #[test]
    fn sees_frames_on_an_interface_of_the_namespace() {
        if let Some(why) = NetNs::unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let ns = NetNs::create().unwrap();
        let needle = *b"ferrio-sniff-tag";
        let never = *b"ferrio-never-sent";
        let sniffer = Sniffer::start(&ns, "lo", &[&needle, &never]).unwrap();
        assert!(Sniffer::start(&ns, "nope0", &[&needle]).is_err());
        ns.run(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.send_to(b"nothing to see", "127.0.0.1:9").unwrap();
            let mut payload = b"prefix-".to_vec();
            payload.extend_from_slice(&needle);
            sock.send_to(&payload, "127.0.0.1:9").unwrap();
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sniffer.matches().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let matches = sniffer.matches();
        assert!(!matches.is_empty(), "frames seen: {}", sniffer.frames());
        assert!(sniffer.frames() >= 2);
        assert!(matches.iter().all(|m| m.needle == 0), "{matches:?}");
        // Ethernet (all-zero MACs on lo) + IPv4 + UDP + "prefix-".
        assert_eq!(matches[0].ethertype, 0x0800);
        assert_eq!(matches[0].offset, 14 + 20 + 8 + 7);
        assert!(sniffer.errors().is_empty(), "{:?}", sniffer.errors());
    }
}
