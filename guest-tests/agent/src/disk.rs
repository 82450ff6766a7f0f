//! Guest-side block device helpers for the disk scenarios: what sysfs says about a
//! disk, aligned buffers and O_DIRECT I/O (the guest kernel copies memory slowly, so
//! bulk I/O bypasses the page cache), BLKDISCARD, dropping caches and CPU pinning.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// `BLKDISCARD` = `_IO(0x12, 119)` (linux/fs.h): discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// Alignment of O_DIRECT buffers (a page; more than any logical block size).
pub const ALIGN: usize = 4096;

/// What the guest's sysfs says about one disk (`/sys/block/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes (`size` is in 512-byte sectors whatever the block size).
    pub size_bytes: u64,
    /// The virtio-blk serial (GET_ID), empty when the device has none.
    pub serial: String,
    /// `ro`: 1 when the kernel treats the disk as read-only.
    pub ro: u64,
    /// Number of blk-mq hardware queues (entries of `mq/`).
    pub mq_queues: usize,
}

impl DiskInfo {
    /// Reads the attributes from `dir` (normally `/sys/block/NAME`).
    pub fn read(dir: &Path) -> Result<DiskInfo, String> {
        let mq = dir.join("mq");
        let mq_queues = std::fs::read_dir(&mq)
            .map_err(|e| format!("{}: {e}", mq.display()))?
            .flatten()
            .count();
        Ok(DiskInfo {
            size_bytes: sys::read_u64(dir.join("size"))? * 512,
            serial: sys::read_trimmed(dir.join("serial"))?,
            ro: sys::read_u64(dir.join("ro"))?,
            mq_queues,
        })
    }
}

/// The sysfs directory of disk `name` (e.g. "vda").
pub fn sysfs_dir(name: &str) -> PathBuf {
    Path::new("/sys/block").join(name)
}

/// The PCI function (`0000:00:02.0`) and virtio device (`virtio1`) under disk `name`:
/// `/sys/block/NAME/device` is the virtio device, whose parent is the PCI function.
pub fn pci_function(name: &str) -> Result<(String, String), String> {
    let link = sysfs_dir(name).join("device");
    let dev = std::fs::canonicalize(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let virtio = file_name(&dev).ok_or_else(|| format!("{}: no name", dev.display()))?;
    let bdf = dev
        .parent()
        .and_then(file_name)
        .ok_or_else(|| format!("{}: no parent", dev.display()))?;
    Ok((bdf, virtio))
}

/// A zeroed buffer whose start is [`ALIGN`]-aligned, as O_DIRECT needs. Over-allocates
/// and slices, so no unsafe allocation code is needed.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Opens a block device (or file) for I/O: `write` adds write access, `direct` O_DIRECT.
pub fn open(path: &str, write: bool, direct: bool) -> Result<File, String> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    File::options()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// Writes all of `buf` at `offset`.
pub fn write_at(file: &File, buf: &[u8], offset: u64) -> Result<(), String> {
    file.write_all_at(buf, offset)
        .map_err(|e| format!("write {} bytes at {offset}: {e}", buf.len()))
}

/// Fills `buf` from `offset`.
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), String> {
    let len = buf.len();
    file.read_exact_at(buf, offset)
        .map_err(|e| format!("read {len} bytes at {offset}: {e}"))
}

/// fsync: for a block device, writes back its page cache and sends a cache flush.
pub fn fsync(file: &File) -> Result<(), String> {
    file.sync_all().map_err(|e| format!("fsync: {e}"))
}

/// Discards `len` bytes at `offset` of a block device (the BLKDISCARD ioctl).
pub fn discard(file: &File, offset: u64, len: u64) -> Result<(), String> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s (start, length) from the pointer, which points
    // to `range`, alive for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "BLKDISCARD {len} bytes at {offset}: {}",
            io::Error::last_os_error()
        ))
    }
}

/// `echo 3 > /proc/sys/vm/drop_caches`: drops clean page cache, dentries and inodes.
pub fn drop_caches() -> Result<(), String> {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").map_err(|e| format!("drop_caches: {e}"))
}

/// Restricts the calling thread to `cpus` (every CPU when empty), so its I/O goes
/// through the blk-mq hardware queue of those CPUs.
pub fn pin(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET only touches the set we own (indices
    // past CPU_SETSIZE are ignored by the macro), and sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpus.is_empty() {
            for cpu in 0..libc::CPU_SETSIZE as usize {
                libc::CPU_SET(cpu, &mut set);
            }
        } else {
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "sched_setaffinity {cpus:?}: {}",
            io::Error::last_os_error()
        ))
    }
}

/// Number of online CPUs.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sum of the per-CPU counts of a /proc/interrupts line.
pub fn irq_count(line: &str) -> u64 {
    line.split_whitespace()
        .skip(1)
        .map_while(|w| w.parse::<u64>().ok())
        .sum()
}

/// The (name, count) of every /proc/interrupts line whose text contains `tag`
/// (e.g. `PCI-MSIX-0000:00:02.0`); the name is the line's last word.
pub fn irq_lines(interrupts: &str, tag: &str) -> Vec<(String, u64)> {
    interrupts
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == tag))
        .map(|l| {
            let name = l.split_whitespace().last().unwrap_or("?").to_owned();
            (name, irq_count(l))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrio-disk-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_disk_info_from_a_sysfs_like_dir() {
        let dir = temp_dir("sysfs");
        std::fs::write(dir.join("size"), "524288\n").unwrap();
        std::fs::write(dir.join("serial"), "ferrio-data\n").unwrap();
        std::fs::write(dir.join("ro"), "0\n").unwrap();
        for q in ["0", "1"] {
            std::fs::create_dir_all(dir.join("mq").join(q)).unwrap();
        }
        let info = DiskInfo::read(&dir).unwrap();
        assert_eq!(
            info,
            DiskInfo {
                size_bytes: 256 << 20,
                serial: "ferrio-data".into(),
                ro: 0,
                mq_queues: 2,
            }
        );
        std::fs::remove_dir_all(dir.join("mq")).unwrap();
        assert!(DiskInfo::read(&dir).unwrap_err().contains("mq"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn aligned_buffers_and_positioned_io() {
        for len in [512, 4096, 1 << 20] {
            let mut buf = AlignedBuf::new(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.as_mut_slice().len(), len);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
        let dir = temp_dir("io");
        let path = dir.join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let path = path.to_str().unwrap();
        let file = open(path, true, false).unwrap();
        write_at(&file, b"abcd", 4096).unwrap();
        fsync(&file).unwrap();
        let mut got = [0u8; 6];
        read_at(&file, &mut got, 4094).unwrap();
        assert_eq!(&got, b"\0\0abcd");
        assert!(read_at(&file, &mut [0u8; 16], 8190).is_err());
        // Not a block device: the ioctl fails with an explanation.
        assert!(discard(&file, 0, 4096).unwrap_err().contains("BLKDISCARD"));
        assert!(open(&format!("{path}.missing"), false, false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_interrupt_lines() {
        let text =
            " 24:        10          5  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config\n\
                     25:       100          0  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n\
                     26:         0         42  PCI-MSIX-0000:00:02.0   2-edge      virtio1-req.1\n\
                     27:         7          0  PCI-MSIX-0000:00:02.00  0-edge      other\n\
                    NMI:         0          0   Non-maskable interrupts\n";
        let lines = irq_lines(text, "PCI-MSIX-0000:00:02.0");
        let expect = [
            ("virtio1-config", 15),
            ("virtio1-req.0", 100),
            ("virtio1-req.1", 42),
        ];
        assert_eq!(lines.len(), 3);
        for ((name, count), (en, ec)) in lines.iter().zip(expect) {
            assert_eq!((name.as_str(), *count), (en, ec));
        }
    }

    #[test]
    fn pinning_to_all_cpus_works() {
        assert!(online_cpus() >= 1);
        pin(&[]).unwrap();
        // SAFETY: no arguments; returns the CPU this thread runs on.
        let cpu = unsafe { libc::sched_getcpu() };
        pin(&[usize::try_from(cpu).unwrap()]).unwrap();
        pin(&[]).unwrap();
    }
}
