//! Opens a disk image for virtio-blk: read-only or read-write, optionally O_DIRECT,
//! and locked (flock) so that two VMMs never share a writable image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use ferrio_devices::virtio::block::{BlockConfig, FileBackend, VirtioBlock};

use crate::config::DiskConfig;
use crate::error::Error;

/// Opens and locks the image and builds the device.
pub fn create(d: &DiskConfig) -> Result<VirtioBlock, Error> {
    let err = |reason: String| Error::Disk {
        path: d.path.clone(),
        reason,
    };
    let mut opts = File::options();
    opts.read(true).write(!d.read_only);
    if d.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts.open(&d.path).map_err(|e| err(e.to_string()))?;
    // A writer takes the image exclusively; readers share it with other readers only.
    let mode = if d.read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            "in use by another process (locked)".into()
        } else {
            format!("cannot lock: {e}")
        }));
    }
    let backend = FileBackend::new(file).map_err(|e| err(e.to_string()))?;
    let config = BlockConfig {
        read_only: d.read_only,
        serial: d.serial.clone(),
        num_queues: d.num_queues,
        queue_size: d.queue_size,
        io_engine: d.io_engine,
        ..BlockConfig::default()
    };
    // With io_engine=uring this fails here, at VMM start, if io_uring is unusable.
    VirtioBlock::new(Box::new(backend), config).map_err(|e| err(e.to_string()))
}
