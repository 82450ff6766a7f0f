//! A throw-away network namespace holding persistent multi-queue TAPs, the backends
//! of the guest's virtio-net NICs in the net tests (one TAP, [`NetNs::create`]; one
//! per NIC, each in its own subnet, [`NetNs::with_taps`]). The VMM process is moved
//! into the namespace before it executes ([`enter_on_exec`]), so it finds the TAPs by
//! name, and the host end of the checks opens its sockets from a thread inside it
//! ([`NetNs::run`]). Nothing touches the host's own namespace.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::net_wire as wire;
use crate::{Error, Result};

/// The TAP's name inside the namespace (the first TAP of [`NetNs::with_taps`]).
pub const TAP_NAME: &str = "ftap0";
/// The address of the host end on the TAP.
pub const HOST_CIDR: &str = "10.0.2.2/24";

/// One TAP of a namespace: its name and the host end's address on it (`A.B.C.D/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub name: String,
    pub host_cidr: String,
}

impl TapSpec {
    pub fn new(name: &str, host_cidr: &str) -> TapSpec {
        TapSpec {
            name: name.to_owned(),
            host_cidr: host_cidr.to_owned(),
        }
    }
}
/// Where `ip netns add` puts the namespace handles.
const NETNS_DIR: &str = "/run/netns";
const PREFIX: &str = "ferrio-";

/// A network namespace `ferrio-<pid>-<n>` with its TAPs (multi-queue, up, each with
/// its host address; by default the one TAP [`TAP_NAME`] at [`HOST_CIDR`]), `lo` up
/// and TCP's minimum TSO packet raised to 64 KiB (`tcp_min_tso_segs`, see
/// `wire::TSO_SEGS_PARAM`). Deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    taps: Vec<TapSpec>,
}

/// Runs `ip ARGS`, returning its stdout, or an error with its output.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        Error::io(
            format!("run `ip {}` (is iproute2 installed?)", args.join(" ")),
            e,
        )
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(Error::Command {
        command: format!("ip {}", args.join(" ")),
        status: out.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// Deletes namespaces this harness left behind in processes that no longer exist
/// (a test killed before its `Drop` ran).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl NetNs {
    /// Why network namespaces cannot be used here (`None` when they can): they need
    /// root, iproute2's `ip` and /dev/net/tun.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root (network namespaces and TAP devices need root)".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Some("no `ip` command (install iproute2)".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some("no /dev/net/tun (TUN/TAP support)".into());
        }
        None
    }

    /// Creates the namespace and its TAP [`TAP_NAME`] at [`HOST_CIDR`]. Fails with the
    /// reason of [`NetNs::unavailable`] when namespaces cannot be used.
    pub fn create() -> Result<NetNs> {
        NetNs::with_taps(&[TapSpec::new(TAP_NAME, HOST_CIDR)])
    }

    /// Creates the namespace with these TAPs (at least one; names and subnets
    /// distinct, so each NIC's traffic leaves through its own TAP). Fails with the
    /// reason of [`NetNs::unavailable`] when namespaces cannot be used.
    pub fn with_taps(taps: &[TapSpec]) -> Result<NetNs> {
        if taps.is_empty() {
            return Err(Error::io(
                "create a network namespace",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no TAP given"),
            ));
        }
        if let Some(why) = NetNs::unavailable() {
            return Err(Error::io(
                "create a network namespace",
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
            ));
        }
        remove_stale();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        // From here on, dropping `ns` deletes the namespace (and its TAPs) on errors.
        let ns = NetNs {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            taps: taps.to_vec(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        for tap in taps {
            let dev = tap.name.as_str();
            ns.ip(&["tuntap", "add", "dev", dev, "mode", "tap", "multi_queue"])?;
            ns.ip(&["addr", "add", &tap.host_cidr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // The host end's TSO packets as large as the guest's (see the constant).
        let segs = format!("{}\n", wire::DEFAULT_TSO_SEGS);
        ns.run(|| std::fs::write(wire::TSO_SEGS_SYSCTL, segs))?
            .map_err(|e| Error::io(format!("write {} in {}", wire::TSO_SEGS_SYSCTL, ns.name), e))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle (`/run/netns/NAME`), for `setns`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first TAP's name ([`TAP_NAME`] for [`NetNs::create`]).
    pub fn tap(&self) -> &str {
        &self.taps[0].name
    }

    /// Every TAP, in the order given.
    pub fn taps(&self) -> &[TapSpec] {
        &self.taps
    }

    /// `ip -n NAME ARGS`: stdout, or an error with the command's output.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a thread that first joins the namespace: sockets it creates live in
    /// the namespace for good, whichever thread uses them afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&self.path)
                    .map_err(|e| Error::io(format!("open {}", self.path.display()), e))?;
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a namespace fd we own; it changes only the network
                // namespace of this (short-lived) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let err = std::io::Error::last_os_error();
                    return Err(Error::io(format!("setns {}", self.path.display()), err));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::io(
                    "thread in the network namespace",
                    std::io::Error::other("panicked"),
                ))
            })
        })
    }

    /// ferrio's arguments for a virtio-net NIC on this namespace's (first) TAP.
    pub fn ferrio_net_args(&self, mac: &str, queue_pairs: u8) -> Vec<String> {
        vec![
            "--net".into(),
            format!("tap={},mac={mac},num_queue_pairs={queue_pairs}", self.tap()),
        ]
    }

    /// Makes `cmd` run inside this namespace (see [`enter_on_exec`]).
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        enter_on_exec(cmd, &self.path);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("[guest-tests] could not delete network namespace: {e}");
        }
    }
}

/// Makes `cmd`'s process join the network namespace at `ns` (a `/run/netns/NAME`
/// handle) between fork and exec; the spawn fails if it cannot.
pub fn enter_on_exec(cmd: &mut Command, ns: &Path) {
    // A path with a NUL byte cannot be opened: an empty one fails the same way.
    let path = CString::new(ns.as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (open, setns, close) on memory allocated before
    // the fork; it reports failure through errno.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc == 0 {
                Ok(())
            } else {
                Err(err)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interfaces of the namespace a process sees, from `ip -o link` inside it.
    fn links_seen_by(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn namespace_with_a_multi_queue_tap_and_sockets_inside() {
        if let Some(why) = NetNs::unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let ns = NetNs::create().unwrap();
        let path = ns.path().to_path_buf();
        assert!(path.exists());
        let details = ns.ip(&["-d", "link", "show", TAP_NAME]).unwrap();
        assert!(details.contains("multi_queue"), "{details}");
        let addrs = ns.ip(&["-o", "-4", "addr", "show", TAP_NAME]).unwrap();
        assert!(addrs.contains(HOST_CIDR), "{addrs}");
        let segs = ns
            .run(|| std::fs::read_to_string(wire::TSO_SEGS_SYSCTL))
            .unwrap();
        assert_eq!(segs.unwrap().trim(), wire::DEFAULT_TSO_SEGS.to_string());
        let host = std::fs::read_to_string(wire::TSO_SEGS_SYSCTL).unwrap();
        eprintln!(
            "tcp_min_tso_segs: {} in the namespace, {} outside",
            wire::DEFAULT_TSO_SEGS,
            host.trim()
        );

        // A child process moved into the namespace sees the TAP; the host does not.
        let mut inside = Command::new("ip");
        inside.args(["-o", "link"]);
        ns.enter_on_exec(&mut inside);
        assert!(links_seen_by(&mut inside).contains(TAP_NAME));
        let host = links_seen_by(Command::new("ip").args(["-o", "link"]));
        assert!(!host.contains(&format!(": {TAP_NAME}:")), "{host}");

        // A listener bound to the TAP's address exists only inside the namespace.
        let listener = ns
            .run(|| std::net::TcpListener::bind(("10.0.2.2", 0)))
            .unwrap()
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let connected = ns
            .run(move || std::net::TcpStream::connect(("10.0.2.2", port)).is_ok())
            .unwrap();
        assert!(connected);
        let mut bad = Command::new("true");
        enter_on_exec(&mut bad, Path::new("/nonexistent/netns"));
        assert!(bad.status().is_err());

        assert_eq!(
            ns.ferrio_net_args("52:54:00:00:00:01", 2),
            ["--net", "tap=ftap0,mac=52:54:00:00:00:01,num_queue_pairs=2"]
        );
        drop(ns);
        assert!(!path.exists());
    }

    #[test]
    fn namespace_with_several_taps_one_subnet_each() {
        assert!(NetNs::with_taps(&[]).is_err());
        if let Some(why) = NetNs::unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let taps = [
            TapSpec::new("ftap0", "10.0.2.2/24"),
            TapSpec::new("ftap1", "10.0.3.2/24"),
            TapSpec::new("ftap2", "10.0.4.2/24"),
        ];
        let ns = NetNs::with_taps(&taps).unwrap();
        assert_eq!(ns.tap(), "ftap0");
        assert_eq!(ns.taps(), &taps);
        for tap in &taps {
            let details = ns.ip(&["-d", "link", "show", &tap.name]).unwrap();
            assert!(details.contains("multi_queue"), "{details}");
            assert!(details.contains(",UP"), "{details}");
            let addrs = ns.ip(&["-o", "-4", "addr", "show", &tap.name]).unwrap();
            assert!(addrs.contains(&tap.host_cidr), "{addrs}");
        }
        // Each subnet is reached through its own TAP.
        let route = ns.ip(&["-o", "route", "get", "10.0.4.15"]).unwrap();
        assert!(route.contains("dev ftap2"), "{route}");
        // A name that cannot be an interface's (over 15 bytes) fails the creation.
        let bad = [
            TapSpec::new("ftap0", "10.0.2.2/24"),
            TapSpec::new("ftap-name-too-long", "10.0.3.2/24"),
        ];
        assert!(NetNs::with_taps(&bad).is_err());
    }
}
