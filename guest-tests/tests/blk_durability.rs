//! Scenario `blk-durable`: a write the guest fsynced is in the image file even when
//! the VMM dies right after (SIGKILL, no clean shutdown). The guest writes one 4 KiB
//! block through its page cache, fsyncs (write-back plus a virtio-blk FLUSH), reports
//! `durable_written` and hangs; the host kills ferrio as soon as it sees that line.

#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use ferrio_guest_tests::{Boot, LiveGuest, ScratchImage};

const IMAGE_LEN: u64 = 64 << 20;

#[test]
fn fsynced_block_survives_sigkill_of_the_vmm() {
    let image = ScratchImage::create("blk-durable", IMAGE_LEN).unwrap();
    let mut boot = Boot::new("blk-durable").cpus(1).memory("512M");
    boot.extra_args = vec!["--disk".into(), image.disk_arg("serial=ferrio-durable")];
    let mut guest = LiveGuest::spawn(&boot).expect("could not spawn the guest");

    let result = guest
        .wait_for_result("durable_written", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"));
    let (seen, at) = (Instant::now(), guest.elapsed());
    let status = guest.kill().expect("kill ferrio");
    eprintln!(
        "durable_written {:.1} s after spawn; ferrio killed {} ms later: {status}",
        at.as_secs_f64(),
        seen.elapsed().as_millis()
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "ferrio ended on its own before the kill: {status}"
    );

    let block = pattern::bytes(pattern::DURABLE_SEED, pattern::DURABLE_LEN);
    assert!(result.ok, "the guest's write failed: {}", result.value);
    assert_eq!(
        result.value.as_str(),
        Some(pattern::fnv1a(&block).as_str()),
        "fnv of the block the guest wrote"
    );

    let data = std::fs::read(image.path()).unwrap();
    assert_eq!(data.len() as u64, IMAGE_LEN, "the image changed size");
    let at = pattern::DURABLE_OFFSET as usize;
    let found = &data[at..at + pattern::DURABLE_LEN];
    assert!(
        found == block.as_slice(),
        "the block is not in the image (fnv {} instead of {})",
        pattern::fnv1a(found),
        pattern::fnv1a(&block)
    );
    let stray = data[..at]
        .iter()
        .chain(&data[at + pattern::DURABLE_LEN..])
        .filter(|&&b| b != 0)
        .count();
    assert_eq!(stray, 0, "non-zero bytes outside the written block");
}
