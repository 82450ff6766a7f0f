//! Scenario `blk`: the guest's virtio_blk driver against ferrio's virtio-blk device,
//! with two disks: vda (256 MiB, read-write, 2 queues, 2 vCPUs) and vdb (16 MiB,
//! read-only, filled by the host). The guest writes a pattern over all of vda with
//! O_DIRECT, discards 8 MiB of it and reads it back; the host then checks the image
//! file (hash, and a hole where the guest discarded) and that vdb was not modified.

mod common;
#[path = "../agent/src/pattern.rs"]
#[allow(dead_code)]
mod pattern;

use common::{expected_vda_fnv, file_fnv};

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use ferrio_guest_tests::{run, Boot, ScratchImage};

const MIB: u64 = 1 << 20;
const VDA_LEN: u64 = 256 * MIB;
const VDB_LEN: u64 = 16 * MIB;
/// Seed of what the host writes to vdb (the guest only hashes it).
const VDB_SEED: u64 = 0xfe11_0000_0000_0b1d;

/// `lseek(fd, offset, whence)` on the image file.
fn seek(file: &File, offset: u64, whence: i32) -> Result<u64, std::io::Error> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    u64::try_from(pos).map_err(|_| std::io::Error::last_os_error())
}

#[test]
fn blk_two_disks_pattern_discard_read_only_and_msix() {
    let vda = ScratchImage::create("blk-vda", VDA_LEN).unwrap();
    let vdb = ScratchImage::create("blk-vdb", VDB_LEN).unwrap();
    {
        let mut f = File::options().write(true).open(vdb.path()).unwrap();
        for i in 0..VDB_LEN / MIB {
            let chunk = pattern::bytes(pattern::chunk_seed(VDB_SEED, i), pattern::CHUNK);
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let vdb_before = file_fnv(vdb.path());

    let mut boot = Boot::new("blk").cpus(2).memory("512M");
    boot.extra_args = vec![
        "--disk".into(),
        vda.disk_arg("num_queues=2,serial=ferrio-data"),
        "--disk".into(),
        vdb.disk_arg("readonly=on,serial=ferrio-ro"),
    ];
    let outcome = run(&boot).expect("could not boot the guest");
    eprintln!("{}", outcome.table());
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);

    // What the guest's sysfs says about each disk.
    for (disk, size, serial, ro, queues) in [
        ("vda", VDA_LEN, "ferrio-data", 0, 2),
        ("vdb", VDB_LEN, "ferrio-ro", 1, 1),
    ] {
        assert_eq!(outcome.value_u64(&format!("{disk}_size_bytes")), Some(size));
        assert_eq!(outcome.value_str(&format!("{disk}_serial")), Some(serial));
        assert_eq!(outcome.value_u64(&format!("{disk}_ro")), Some(ro));
        assert_eq!(
            outcome.value_u64(&format!("{disk}_mq_queues")),
            Some(queues),
            "{disk} hardware queues"
        );
    }

    // Data: every chunk as expected in the guest, and the same bytes in the file.
    assert_eq!(outcome.value_u64("vda_mismatched_chunks"), Some(0));
    let expected = expected_vda_fnv(VDA_LEN);
    let guest_fnv = outcome.value_str("vda_fnv").expect("no vda_fnv");
    let host_fnv = file_fnv(vda.path());
    eprintln!("vda fnv: guest {guest_fnv}, image file {host_fnv}, expected {expected}");
    assert_eq!(guest_fnv, expected, "what the guest read back");
    assert_eq!(host_fnv, expected, "the image file");

    // The discard punched a hole in the image, and only there.
    let file = File::open(vda.path()).unwrap();
    let (start, end) = (
        pattern::BLK_DISCARD_OFFSET,
        pattern::BLK_DISCARD_OFFSET + pattern::BLK_DISCARD_LEN,
    );
    let first_hole = seek(&file, 0, libc::SEEK_HOLE).unwrap();
    let hole_at_start = seek(&file, start, libc::SEEK_HOLE).unwrap();
    let data_after = seek(&file, start, libc::SEEK_DATA).unwrap();
    eprintln!(
        "vda image: first hole at {first_hole}, SEEK_HOLE({start}) = {hole_at_start}, \
         SEEK_DATA({start}) = {data_after}"
    );
    assert_eq!(hole_at_start, start, "no hole at the discarded offset");
    assert!(
        data_after >= end,
        "data inside the discarded range at {data_after}"
    );
    assert_eq!(first_hole, start, "a hole before the discarded range");
    assert_eq!(seek(&file, 0, libc::SEEK_DATA).unwrap(), 0);

    // vdb: the guest read the host's data, and could not change it.
    assert_eq!(outcome.value_str("vdb_fnv"), Some(vdb_before.as_str()));
    let rejected = outcome.value_str("vdb_write_rejected").unwrap_or("");
    assert!(!rejected.is_empty(), "no error text for the vdb write");
    assert_eq!(
        file_fnv(vdb.path()),
        vdb_before,
        "the read-only image changed"
    );

    // MSI-X: a config vector and one vector per request queue.
    let vectors = outcome.value_str("vda_msix_vectors").unwrap_or("");
    let reqs = vectors.split(' ').filter(|v| v.contains("-req.")).count();
    assert!(reqs >= 2, "request-queue vectors: {vectors}");
    assert!(vectors.contains("-config="), "config vector: {vectors}");
}
