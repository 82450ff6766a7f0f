//! Scenario `pci`: the guest's PCI core and virtio_pci/virtio_console drivers against
//! ferrio's PCIe bus, MSI-X and virtio-pci transport. The console port is a Unix
//! socket: the host receives 64 KiB the guest writes to /dev/hvc0 and checks every
//! byte, then sends 4 KiB that the guest checks.

#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use ferrio_guest_tests::{run, work_dir, Boot};

const OUT_LEN: usize = 64 * 1024;
const IN_LEN: usize = 4096;

/// The host end of the console: waits for ferrio's socket, reads the guest's
/// 64 KiB, answers with the host pattern, then keeps reading until ferrio exits.
fn console_peer(path: PathBuf) -> thread::JoinHandle<Result<Vec<u8>, String>> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut s = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("connect {}: {e}", path.display())),
            }
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        let mut answered = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read: {e} after {} bytes", got.len())),
            }
            if !answered && got.len() >= OUT_LEN {
                answered = true;
                let reply = pattern::bytes(pattern::HOST_TO_GUEST_SEED, IN_LEN);
                s.write_all(&reply).map_err(|e| format!("write: {e}"))?;
            }
        }
    })
}

#[test]
fn pci_enumeration_msix_and_virtio_console_data_both_ways() {
    std::fs::create_dir_all(work_dir()).unwrap();
    let sock = work_dir().join(format!("pci-console-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let peer = console_peer(sock.clone());
    let mut boot = Boot::new("pci").cpus(1).memory("512M");
    boot.extra_args = vec!["--console".into(), format!("socket={}", sock.display())];
    let outcome = run(&boot).expect("could not boot the guest");
    eprintln!("{}", outcome.table());
    let received = peer.join().expect("console peer panicked");
    let _ = std::fs::remove_file(&sock);

    outcome.assert_all_ok();
    outcome.assert_exit_code(0);
    // The host bridge and the console, as the guest's sysfs lists them.
    assert_eq!(
        outcome
            .value_str("pci 0000:00:00.0")
            .map(|v| v.ends_with("class 0x060000")),
        Some(true)
    );
    let bdf = outcome
        .value_str("virtio_console_found")
        .expect("no virtio-console in the guest");
    assert_eq!(
        outcome.value_str(&format!("pci {bdf}")),
        Some("0x1af4:0x1043 class 0x078000"),
        "vendor:device class of the console function"
    );
    assert_eq!(
        outcome.value_str("virtio_console_driver"),
        Some("virtio-pci")
    );
    assert!(
        outcome.value_u64("virtio_console_msi_irqs").unwrap_or(0) >= 2,
        "MSI-X vectors allocated"
    );
    assert!(
        outcome
            .value_u64("virtio_console_msix_interrupts")
            .unwrap_or(0)
            > 0
    );

    // Every byte the guest wrote arrived, in order, and the guest got ours.
    let expected = pattern::bytes(pattern::GUEST_TO_HOST_SEED, OUT_LEN);
    let received = received.expect("console peer failed");
    assert_eq!(received.len(), OUT_LEN, "bytes from the guest");
    assert!(
        received == expected,
        "guest->host data differs (fnv {} vs {})",
        pattern::fnv1a(&received),
        pattern::fnv1a(&expected)
    );
    assert_eq!(
        outcome.value_str("hvc0_out_fnv"),
        Some(pattern::fnv1a(&expected).as_str())
    );
    let reply = pattern::bytes(pattern::HOST_TO_GUEST_SEED, IN_LEN);
    assert_eq!(
        outcome.value_str("hvc0_in_fnv"),
        Some(pattern::fnv1a(&reply).as_str())
    );
}
