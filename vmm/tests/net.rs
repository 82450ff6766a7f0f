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
        let name = format!("ferrio-vt-{}", std::process::id());
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
