//! Scenarios `blk` and `blk-durable`: the guest's virtio_blk driver against ferrio's
//! virtio-blk device. The host attaches (in this order, so they are vda, vdb):
//! vda, read-write, serial `ferrio-data`, 2 queues; vdb, read-only, serial `ferrio-ro`,
//! filled by the host with a pattern only it knows.
//!
//! `blk` reports what sysfs says about both disks, writes the chunked pattern
//! ([`pattern::blk_expected_chunk`]) over all of vda with O_DIRECT (alternating CPUs,
//! so both hardware queues carry requests), fsyncs, drops the caches, discards
//! [`pattern::BLK_DISCARD_LEN`] bytes and reads vda back, counting 1 MiB chunks that
//! differ and hashing what it read (the host hashes the image file); then hashes vdb,
//! tries to write to it, lists vda's MSI-X vectors in /proc/interrupts and times
//! O_DIRECT reads of 4 KiB, 64 KiB and 1 MiB.
//!
//! `blk-durable` writes one 4 KiB block through the page cache, fsyncs, reports
//! `durable_written` and then hangs: the host kills the VMM and checks the image.

use std::time::{Duration, Instant};

use crate::disk::{self, AlignedBuf, DiskInfo};
use crate::pattern::{self, Fnv1a, CHUNK};
use crate::report::Reporter;
use crate::sys;

/// The disks and whether each is read-only.
const DISKS: [(&str, bool); 2] = [("vda", false), ("vdb", true)];

pub fn run(r: &mut Reporter) {
    for (name, read_only) in DISKS {
        disk_info(r, name, read_only);
    }
    let cpus = disk::online_cpus();
    r.note(&format!("{cpus} online CPUs"));
    vda_data(r, cpus);
    if let Err(e) = disk::pin(&[]) {
        r.check("unpin", false, e);
    }
    vdb_read_only(r);
    msix(r, "vda");
    latency(r);
}

/// Mean time of one O_DIRECT read of vda per request size (informational: where the
/// time of bulk I/O goes, per request versus per page).
fn latency(r: &mut Reporter) {
    let file = match disk::open("/dev/vda", false, true) {
        Ok(f) => f,
        Err(e) => return r.check("vda_read_latency_us", false, e),
    };
    let mut buf = AlignedBuf::new(CHUNK);
    let mut parts = Vec::new();
    for (size, count) in [(4096usize, 32u32), (64 << 10, 16), (CHUNK, 4)] {
        let started = Instant::now();
        for i in 0..count {
            let offset = u64::from(i) * size as u64;
            if let Err(e) = disk::read_at(&file, &mut buf.as_mut_slice()[..size], offset) {
                return r.check("vda_read_latency_us", false, e);
            }
        }
        let per = started.elapsed().as_micros() / u128::from(count);
        parts.push(format!("{}K={per}", size >> 10));
    }
    r.check("vda_read_latency_us", true, parts.join(" "));
}

/// Size, serial, read-only flag and hardware queues of one disk.
fn disk_info(r: &mut Reporter, name: &str, read_only: bool) {
    let info = match DiskInfo::read(&disk::sysfs_dir(name)) {
        Ok(info) => info,
        Err(e) => return r.check(&format!("{name}_info"), false, e),
    };
    r.check(
        &format!("{name}_size_bytes"),
        info.size_bytes > 0,
        info.size_bytes,
    );
    r.check(&format!("{name}_serial"), true, info.serial);
    r.check(
        &format!("{name}_ro"),
        info.ro == u64::from(read_only),
        info.ro,
    );
    r.check(
        &format!("{name}_mq_queues"),
        info.mq_queues >= 1,
        info.mq_queues,
    );
    r.check_result(
        &format!("{name}_pci"),
        disk::pci_function(name).map(|(bdf, virtio)| format!("{bdf} {virtio}")),
    );
    if !read_only {
        let discard = disk::sysfs_dir(name).join("queue/discard_max_bytes");
        let max = sys::read_u64(discard);
        let ok = max.as_ref().is_ok_and(|&m| m > 0);
        r.check(&format!("{name}_discard_max_bytes"), ok, max.unwrap_or(0));
    }
}

/// Pins the thread for chunk `index` to alternate CPUs (blk-mq picks the hardware
/// queue of the submitting CPU). Failures only matter for the MSI-X check.
fn pin_for_chunk(index: u64, cpus: usize) {
    if cpus > 1 {
        let _ = disk::pin(&[(index % cpus as u64) as usize]);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Write the pattern over vda, fsync, drop caches, discard, read back and compare.
pub(crate) fn vda_data(r: &mut Reporter, cpus: usize) {
    let size = match sys::read_u64("/sys/block/vda/size") {
        Ok(sectors) => sectors * 512,
        Err(e) => return r.check("vda_write", false, e),
    };
    let discard_end = pattern::BLK_DISCARD_OFFSET + pattern::BLK_DISCARD_LEN;
    if size % CHUNK as u64 != 0 || size < discard_end {
        let why = format!("size {size} is not a multiple of 1 MiB of at least {discard_end}");
        return r.check("vda_write", false, why);
    }
    let chunks = size / CHUNK as u64;
    let file = match disk::open("/dev/vda", true, true) {
        Ok(f) => f,
        Err(e) => return r.check("vda_write", false, e),
    };
    let mut buf = AlignedBuf::new(CHUNK);

    let started = Instant::now();
    for i in 0..chunks {
        pin_for_chunk(i, cpus);
        pattern::fill(
            pattern::chunk_seed(pattern::BLK_SEED, i),
            buf.as_mut_slice(),
        );
        if let Err(e) = disk::write_at(&file, buf.as_slice(), i * CHUNK as u64) {
            return r.check("vda_write", false, format!("chunk {i}: {e}"));
        }
    }
    r.check("vda_write_ms", true, millis(started.elapsed()));
    if let Err(e) = disk::fsync(&file) {
        return r.check("vda_fsync", false, e);
    }
    r.check("vda_fsync", true, "ok");
    r.check_result("drop_caches", disk::drop_caches().map(|()| "ok"));
    let discarded = disk::discard(&file, pattern::BLK_DISCARD_OFFSET, pattern::BLK_DISCARD_LEN);
    r.check_result(
        "vda_discard",
        discarded.map(|()| {
            format!(
                "{} bytes at {}",
                pattern::BLK_DISCARD_LEN,
                pattern::BLK_DISCARD_OFFSET
            )
        }),
    );

    let started = Instant::now();
    let mut expected = vec![0u8; CHUNK];
    let (mut seen, mut want) = (Fnv1a::new(), Fnv1a::new());
    let mut bad = Vec::new();
    for i in 0..chunks {
        pin_for_chunk(i, cpus);
        if let Err(e) = disk::read_at(&file, buf.as_mut_slice(), i * CHUNK as u64) {
            return r.check("vda_read", false, format!("chunk {i}: {e}"));
        }
        pattern::blk_expected_chunk(i, &mut expected);
        seen.update(buf.as_slice());
        want.update(&expected);
        if buf.as_slice() != expected.as_slice() {
            bad.push(i);
        }
    }
    r.check("vda_read_ms", true, millis(started.elapsed()));
    if !bad.is_empty() {
        let list: Vec<String> = bad.iter().take(16).map(u64::to_string).collect();
        r.note(&format!("vda: chunks that differ: {}", list.join(",")));
    }
    r.check("vda_mismatched_chunks", bad.is_empty(), bad.len());
    r.check("vda_fnv", seen == want, seen.hex());
}

/// vdb: hash its content (the host's pattern), then try to write to it.
fn vdb_read_only(r: &mut Reporter) {
    match disk::open("/dev/vdb", false, true) {
        Err(e) => r.check("vdb_fnv", false, e),
        Ok(file) => {
            let size = sys::read_u64("/sys/block/vdb/size").map(|s| s * 512);
            let mut buf = AlignedBuf::new(CHUNK);
            let mut hash = Fnv1a::new();
            let hashed = size.and_then(|size| {
                let mut offset = 0;
                while offset < size {
                    let len = (size - offset).min(CHUNK as u64) as usize;
                    disk::read_at(&file, &mut buf.as_mut_slice()[..len], offset)?;
                    hash.update(&buf.as_slice()[..len]);
                    offset += len as u64;
                }
                Ok(hash.hex())
            });
            r.check_result("vdb_fnv", hashed);
        }
    }
    // A buffered write: the kernel refuses it before it reaches the device.
    let result = match std::fs::File::options().write(true).open("/dev/vdb") {
        Err(e) => Err(format!("open: {e}")),
        Ok(file) => disk::write_at(&file, &[0x5a; 512], 0).and_then(|()| disk::fsync(&file)),
    };
    match result {
        Ok(()) => r.check("vdb_write_rejected", false, "512 bytes written and synced"),
        Err(e) => r.check("vdb_write_rejected", true, e),
    }
}

/// The MSI-X vectors of disk `name` and their interrupt counts: a config vector and
/// one per request queue, each of which should have fired during the I/O.
fn msix(r: &mut Reporter, name: &str) {
    let (bdf, virtio) = match disk::pci_function(name) {
        Ok(f) => f,
        Err(e) => return r.check(&format!("{name}_msix_vectors"), false, e),
    };
    let text = match sys::read("/proc/interrupts") {
        Ok(t) => t,
        Err(e) => return r.check(&format!("{name}_msix_vectors"), false, e),
    };
    let lines = disk::irq_lines(&text, &format!("PCI-MSIX-{bdf}"));
    let is_req = |n: &str| n.starts_with(&format!("{virtio}-req."));
    let reqs: Vec<&(String, u64)> = lines.iter().filter(|(n, _)| is_req(n)).collect();
    let config = lines.iter().any(|(n, _)| *n == format!("{virtio}-config"));
    let summary: Vec<String> = lines.iter().map(|(n, c)| format!("{n}={c}")).collect();
    r.check(
        &format!("{name}_msix_vectors"),
        reqs.len() >= 2 && config,
        summary.join(" "),
    );
    let idle: Vec<&str> = reqs
        .iter()
        .filter(|(_, c)| *c == 0)
        .map(|(n, _)| n.as_str())
        .collect();
    let used = if idle.is_empty() {
        Ok(reqs.len())
    } else {
        Err(format!("no interrupts on {}", idle.join(",")))
    };
    r.check_result(&format!("{name}_msix_queues_used"), used);
}

/// `blk-durable`: one 4 KiB pattern block at [`pattern::DURABLE_OFFSET`] of vda through
/// the page cache, fsync (write-back plus a cache flush), report, then hang until the
/// host kills the VMM. Returns (and so powers off) only when the write failed.
pub fn run_durable(r: &mut Reporter) {
    let block = pattern::bytes(pattern::DURABLE_SEED, pattern::DURABLE_LEN);
    let written = disk::open("/dev/vda", true, false).and_then(|file| {
        disk::write_at(&file, &block, pattern::DURABLE_OFFSET)?;
        disk::fsync(&file)
    });
    if let Err(e) = written {
        return r.check("durable_written", false, e);
    }
    r.check("durable_written", true, pattern::fnv1a(&block));
    r.note("durable block written; waiting to be killed");
    // SAFETY: tcdrain on stdout (the console): waits until the tty sent the lines.
    unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
