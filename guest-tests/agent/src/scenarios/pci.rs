//! Scenario `pci`: the guest's own PCI and virtio drivers against ferrio's PCIe bus.
//! Lists every function (vendor, device, class from sysfs), checks that the
//! virtio-console function (1af4:1043) is bound to virtio-pci with MSI-X vectors that
//! appear in /proc/interrupts, writes 64 KiB to /dev/hvc0 and reads what the host sends.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::pattern;
use crate::report::Reporter;
use crate::sys;

const VIRTIO_CONSOLE: (&str, &str) = ("0x1af4", "0x1043");
/// Bytes the guest writes, and the host sends back after receiving them all.
pub const OUT_LEN: usize = 64 * 1024;
pub const IN_LEN: usize = 4096;

pub fn run(r: &mut Reporter) {
    let mut console = None;
    let mut count = 0usize;
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for bdf in &names {
        let dir = Path::new("/sys/bus/pci/devices").join(bdf);
        let field = |f: &str| sys::read_trimmed(dir.join(f)).unwrap_or_else(|e| format!("?{e}"));
        let (vendor, device, class) = (field("vendor"), field("device"), field("class"));
        r.check(
            &format!("pci {bdf}"),
            true,
            format!("{vendor}:{device} class {class}"),
        );
        if (vendor.as_str(), device.as_str()) == VIRTIO_CONSOLE {
            console = Some(bdf.clone());
        }
        count += 1;
    }
    r.check("pci_functions", count > 0, count);
    let Some(bdf) = console else {
        r.check("virtio_console_found", false, "no 1af4:1043 function");
        return;
    };
    r.check("virtio_console_found", true, bdf.as_str());
    let dir = Path::new("/sys/bus/pci/devices").join(&bdf);
    let driver = std::fs::read_link(dir.join("driver"))
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_else(|e| format!("unbound ({e})"));
    r.check("virtio_console_driver", driver == "virtio-pci", driver);
    let msi = std::fs::read_dir(dir.join("msi_irqs"))
        .map(|d| d.count())
        .unwrap_or(0);
    r.check("virtio_console_msi_irqs", msi > 0, msi);

    hvc_io(r);

    // After the I/O, so the counts show the device's interrupts were delivered.
    match sys::read("/proc/interrupts") {
        Ok(text) => {
            let tag = format!("PCI-MSIX-{bdf}");
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(&tag)).collect();
            let total: u64 = lines.iter().map(|l| irq_count(l)).sum();
            let summary: Vec<String> = lines
                .iter()
                .map(|l| {
                    let name = l.split_whitespace().last().unwrap_or("?");
                    format!("{name}={}", irq_count(l))
                })
                .collect();
            r.check(
                "virtio_console_msix_lines",
                !lines.is_empty(),
                summary.join(" "),
            );
            r.check("virtio_console_msix_interrupts", total > 0, total);
        }
        Err(e) => r.check("virtio_console_msix_lines", false, e),
    }
}

/// Sum of the per-CPU counts of a /proc/interrupts line.
fn irq_count(line: &str) -> u64 {
    line.split_whitespace()
        .skip(1)
        .map_while(|w| w.parse::<u64>().ok())
        .sum()
}

/// Writes the guest-to-host pattern to /dev/hvc0 in raw mode, then reads the host's
/// reply (the host sends only after it received everything, so no byte meets the tty
/// in cooked mode).
fn hvc_io(r: &mut Reporter) {
    let mut port = match File::options().read(true).write(true).open("/dev/hvc0") {
        Ok(f) => f,
        Err(e) => return r.check("hvc0_open", false, e.to_string()),
    };
    if let Err(e) = make_raw(&port) {
        return r.check("hvc0_raw", false, e);
    }
    let out = pattern::bytes(pattern::GUEST_TO_HOST_SEED, OUT_LEN);
    let started = Instant::now();
    let written = port.write_all(&out).and_then(|()| port.flush());
    // SAFETY: tcdrain on a descriptor we own; waits until the port sent everything.
    unsafe { libc::tcdrain(port.as_raw_fd()) };
    match written {
        Ok(()) => r.check("hvc0_out_fnv", true, pattern::fnv1a(&out)),
        Err(e) => return r.check("hvc0_out_fnv", false, e.to_string()),
    }
    r.check("hvc0_out_ms", true, started.elapsed().as_millis() as u64);

    let mut got = Vec::with_capacity(IN_LEN);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while got.len() < IN_LEN && Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
            continue;
        }
        match port.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return r.check("hvc0_in_fnv", false, e.to_string()),
        }
    }
    let expected = pattern::bytes(pattern::HOST_TO_GUEST_SEED, IN_LEN);
    r.check("hvc0_in_len", got.len() == IN_LEN, got.len());
    r.check("hvc0_in_fnv", got == expected, pattern::fnv1a(&got));
}

/// Raw mode: no echo, no line editing, no output processing.
fn make_raw(port: &File) -> Result<(), String> {
    // SAFETY: termios is plain data; tcgetattr fills it, results are checked.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(port.as_raw_fd(), &mut t) != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(port.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}
