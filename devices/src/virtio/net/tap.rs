//! TAP devices (`/dev/net/tun`) as the host end of virtio-net.
//!
//! [`Tap::open`] attaches to an existing TAP interface by name, one queue fd per queue
//! pair (IFF_MULTI_QUEUE when there is more than one); [`Tap::from_fd`] takes a TAP fd
//! that a parent process opened. Every fd carries a 12-byte `virtio_net_hdr_v1`
//! (IFF_VNET_HDR + TUNSETVNETHDRSZ) and is non-blocking. Which offloads the host
//! accepts is probed once with TUNSETOFFLOAD.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::backend::{offload, NetBackend, TapQueue};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Size of `virtio_net_hdr_v1` (virtio 1.x, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Most queue pairs a TAP is opened with (the kernel's limit is 256 queues).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Why a TAP could not be used. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name '{0}' (1 to 15 characters, no '/', ':' or whitespace)")]
    BadName(String),
    #[error(
        "TAP {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap multi_queue`)"
    )]
    NoSuchInterface(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error(
        "no permission to attach to TAP {0} (needs CAP_NET_ADMIN or a TAP owned by this user)"
    )]
    Permission(String),
    #[error("TAP {0} is busy (another process holds it, or all its queues are taken)")]
    Busy(String),
    #[error(
        "{0} is not a TAP interface with these flags (a TUN device, or a multi-queue mismatch)"
    )]
    WrongKind(String),
    #[error("fd {0} is not an open TAP file descriptor")]
    NotATapFd(RawFd),
    #[error("TAP fd {0} was opened without IFF_VNET_HDR (or with packet information): reopen it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    FdFlags(RawFd),
    #[error("num_queue_pairs must be 1..={MAX_QUEUE_PAIRS}, got {0}")]
    QueuePairs(u16),
    #[error("TAP {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as the TUN ioctls use it: the name, then the flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }
}

/// Issues a TUN ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every TUN ioctl used here reads or writes at most `size_of::<T>()` bytes
    // at the pointer (an ifreq or an int), which is valid and exclusively borrowed for
    // the call.
    let ret = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Issues a TUN ioctl whose argument is an integer value.
fn ioctl_val(fd: RawFd, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let ret = unsafe { libc::ioctl(fd, request as _, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One queue fd of a TAP.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl TapQueue for Tap {
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_val(self.as_raw_fd(), TUNSETOFFLOAD, flags.into())
    }

    fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        let flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flags);
        ioctl_ptr(self.as_raw_fd(), TUNSETQUEUE, &mut req)
    }
}

impl Tap {
    /// Attaches `queue_pairs` queues to the existing TAP interface `name`.
    pub fn open(name: &str, queue_pairs: u16) -> Result<NetBackend, TapError> {
        check_name(name)?;
        if !(1..=MAX_QUEUE_PAIRS).contains(&queue_pairs) {
            return Err(TapError::QueuePairs(queue_pairs));
        }
        let cname = CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchInterface(name.into()));
        }
        let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let mut queues: Vec<Arc<dyn TapQueue>> = Vec::new();
        let first = if queue_pairs > 1 {
            attach(name, base | IFF_MULTI_QUEUE)?
        } else {
            // A single queue also fits a TAP created multi-queue.
            match attach(name, base) {
                Err(TapError::WrongKind(_)) => attach(name, base | IFF_MULTI_QUEUE)?,
                other => other?,
            }
        };
        let multi = first.1 & IFF_MULTI_QUEUE != 0;
        queues.push(Arc::new(first.0));
        for _ in 1..queue_pairs {
            queues.push(Arc::new(attach(name, base | IFF_MULTI_QUEUE)?.0));
        }
        let offloads = probe_offloads(&*queues[0]);
        tracing::debug!(name, queue_pairs, multi, offloads, "TAP attached");
        Ok(NetBackend {
            queues,
            offloads,
            name: name.into(),
        })
    }

    /// Uses a TAP fd opened by a parent process (one queue pair). The fd must have been
    /// attached with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; it is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<NetBackend, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::new("", 0);
        ioctl_ptr(raw, TUNGETIFF, &mut req).map_err(|_| TapError::NotATapFd(raw))?;
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::NotATapFd(raw));
        }
        if req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(TapError::FdFlags(raw));
        }
        let name = req.name();
        set_nonblocking(raw).map_err(|source| TapError::Ioctl {
            name: name.clone(),
            what: "setting O_NONBLOCK",
            source,
        })?;
        let tap = Tap {
            file: File::from(fd),
            name: name.clone(),
        };
        set_vnet_hdr_len(&tap)?;
        let offloads = probe_offloads(&tap);
        Ok(NetBackend {
            queues: vec![Arc::new(tap)],
            offloads,
            name: format!("{name} (fd {raw})"),
        })
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.into()))
    }
}

/// Opens /dev/net/tun and attaches it to `name` with `flags`; returns the queue and the
/// flags the kernel reports.
fn attach(name: &str, flags: libc::c_short) -> Result<(Tap, libc::c_short), TapError> {
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags_nonblocking()
        .open("/dev/net/tun")
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => TapError::Permission(name.into()),
            _ => TapError::OpenTun(e),
        })?;
    let mut req = IfReq::new(name, flags);
    ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
        Some(libc::EBUSY) => TapError::Busy(name.into()),
        Some(libc::EINVAL) => TapError::WrongKind(name.into()),
        _ => TapError::Ioctl {
            name: name.into(),
            what: "TUNSETIFF",
            source: e,
        },
    })?;
    let tap = Tap {
        file,
        name: name.into(),
    };
    set_vnet_hdr_len(&tap)?;
    Ok((tap, req.flags))
}

fn set_vnet_hdr_len(tap: &Tap) -> Result<(), TapError> {
    let mut len = VNET_HDR_LEN as libc::c_int;
    ioctl_ptr(tap.as_raw_fd(), TUNSETVNETHDRSZ, &mut len).map_err(|source| TapError::Ioctl {
        name: tap.name.clone(),
        what: "TUNSETVNETHDRSZ",
        source,
    })
}

/// The `TUN_F_*` flags this host's TAP accepts; leaves the offloads off.
fn probe_offloads(q: &dyn TapQueue) -> u32 {
    use offload::*;
    let mut accepted = 0;
    for flags in [
        TUN_F_CSUM,
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
        TUN_F_CSUM | TUN_F_UFO,
    ] {
        if q.set_offload(flags).is_ok() {
            accepted |= flags;
        }
    }
    if let Err(e) = q.set_offload(0) {
        tracing::warn!("TAP: cannot clear the offloads: {e}");
    }
    accepted
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `OpenOptions` with O_NONBLOCK | O_CLOEXEC.
trait NonBlocking {
    fn custom_flags_nonblocking(&mut self) -> &mut Self;
}

impl NonBlocking for std::fs::OpenOptions {
    fn custom_flags_nonblocking(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

/// A private duplicate (close-on-exec) of an fd number given on the command line
/// (`--net fd=N`). The original descriptor is left alone, so a wrong number can never
/// close a descriptor that something else in the process owns.
pub fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor; no memory is passed. An
    // invalid `fd` makes it fail with EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a descriptor this call just created and nothing else knows.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "with space", "0123456789abcdef", "x:y"] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad}"
            );
        }
        check_name("tap0").unwrap();
        check_name("0123456789abcde").unwrap();
    }

    #[test]
    fn missing_interface_is_a_clear_error() {
        let e = Tap::open("ferrio-nx-tap", 1).unwrap_err();
        assert!(matches!(e, TapError::NoSuchInterface(_)), "{e}");
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn queue_pairs_are_bounded() {
        assert!(matches!(Tap::open("lo", 0), Err(TapError::QueuePairs(0))));
        assert!(matches!(Tap::open("lo", 17), Err(TapError::QueuePairs(17))));
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let raw = file.as_raw_fd();
        let e = Tap::from_fd(file.into()).unwrap_err();
        assert!(matches!(e, TapError::NotATapFd(fd) if fd == raw), "{e}");
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IfReq::new("tap0", 0).name(), "tap0");
    }
}
