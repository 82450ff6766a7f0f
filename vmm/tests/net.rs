//! `--net` as a user meets it, with the tiny hand-assembled guest: clear one-line
//! errors for a missing TAP, a bad name or a bad fd; and (as root, in a throw-away
//! network namespace) a multi-queue TAP attached, the NIC visible at its PCI slot, and
//! the TAP's queues held by the VMM while it runs.

mod common;

use std::process::{Command, Output};

use common::Code;

const ECAM: u32 = 0xe000_0000;

fn tiny_guest(dir: &std::path::Path) -> std::path::PathBuf {
    let k = dir.join("k.elf");
    Code::default()
        .print_mmio32(ECAM | 3 << 15) // 00:03.0: the NIC
        .power_off()
        .write_elf(&k);
    k
}

fn one_error_line(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("ferrio: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn tap_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_guest(dir.path());
    let line = one_error_line(&common::ferrio(&k, &["--net", "tap=ferrio-nx0"]));
    assert!(
        line.contains("ferrio-nx0") && line.contains("does not exist"),
        "{line}"
    );
    let line = one_error_line(&common::ferrio(&k, &["--net", "tap=bad/name"]));
    assert!(line.contains("invalid TAP name"), "{line}");
    let line = one_error_line(&common::ferrio(&k, &["--net", "fd=999"]));
    assert!(line.contains("fd 999"), "{line}");
}

/// A network namespace with a multi-queue TAP `ftap0`, deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a network namespace needs root");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ferrio-vt-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output();
            match o {
                Ok(o) if o.status.success() => true,
                Ok(o) => panic!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => panic!("cannot run ip: {e}"),
            }
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&[
            "-n",
            &ns.0,
            "tuntap",
            "add",
            "dev",
            "ftap0",
            "mode",
            "tap",
            "multi_queue",
        ]);
        Some(ns)
    }

    fn ferrio(&self, kernel: &std::path::Path, net: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "timeout", "60"])
            .arg(env!("CARGO_BIN_EXE_ferrio"))
            .args(["run", "--memory", "64M", "--timeout", "30", "--kernel"])
            .arg(kernel)
            .args(["--net", net])
            .env_remove("FERRIO_LOG")
            .output()
            .expect("run ferrio")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn nic_on_a_multi_queue_tap() {
    let Some(ns) = Netns::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_guest(dir.path());
    for net in [
        "tap=ftap0,num_queue_pairs=2,mac=52:54:00:00:00:01,slot=3",
        // One queue pair on a TAP created multi-queue.
        "tap=ftap0,slot=3",
    ] {
        let o = ns.ferrio(&k, net);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{net}: stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            o.stdout[..4],
            0x1041_1af4u32.to_le_bytes(),
            "{net}: virtio-net 1af4:1041 at 00:03.0"
        );
    }
    // A TUN (not TAP) device of the same name is refused.
    let o = Command::new("ip")
        .args(["-n", &ns.0, "tuntap", "del", "dev", "ftap0", "mode", "tap"])
        .args(["multi_queue"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = Command::new("ip")
        .args(["-n", &ns.0, "tuntap", "add", "dev", "ftap0", "mode", "tun"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let line = one_error_line(&ns.ferrio(&k, "tap=ftap0"));
    assert!(line.contains("not a TAP"), "{line}");
}

/// Opens `ftap0` inside the namespace `ns` (from a thread that joins it) with
/// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE, inheritable.
fn open_tap_in(ns: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let nsfile = std::fs::File::open(&path).expect("netns handle");
        // SAFETY: setns on a namespace fd we own; it affects only this thread.
        assert_eq!(
            unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let tun = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut req = [0u8; 40];
        req[..5].copy_from_slice(b"ftap0");
        let flags: u16 = 0x0002 | 0x1000 | 0x4000 | 0x0100;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq we pass.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: F_DUPFD without CLOEXEC creates a new, inheritable descriptor.
        let fd = unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_DUPFD, 10) };
        assert!(fd >= 10);
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .join()
    .expect("tap thread")
}

#[test]
fn nic_on_an_inherited_tap_fd() {
    use std::os::fd::AsRawFd;
    let Some(ns) = Netns::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_guest(dir.path());
    let tap = open_tap_in(&ns.0);
    // ferrio itself stays in the root namespace: the fd is already attached.
    let spec = format!("fd={},slot=3", tap.as_raw_fd());
    let o = common::ferrio(&k, &["--net", &spec]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout[..4], 0x1041_1af4u32.to_le_bytes());
    // The test binary's stdin is not a TAP (and fds 0-2 are refused outright).
    let line = one_error_line(&common::ferrio(&k, &["--net", "fd=0"]));
    assert!(line.contains("fd must be"), "{line}");
}
