//! ferrio-guest-tests: boots a real Linux guest (kernel + busybox/agent initramfs
//! from `resources/build-guest.sh`) under ferrio and collects what the guest agent
//! reports. See `tests/` for the scenarios and `src/bin/ferrio-guest.rs` for the CLI.
//!
//! The agent (`agent/`) prints `FERRIO-AGENT start`, one `FERRIO-RESULT {json}` per
//! check and `FERRIO-DONE {json}` on the serial console, then powers the VM off.

pub mod bench;
mod boot;
mod error;
mod image;
mod iommu_machine;
mod live;
mod net_peer;
mod netns;
mod outcome;
mod protocol;
mod qemu;
mod scratch;
mod sniffer;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use boot::{boot_lock, run, run_command, run_with, Boot};
pub use error::{Error, Result};
pub use image::{ensure_image, ferrio_binary, read_manifest, GuestImage};
pub use iommu_machine::{IommuDevice, IommuMachine, Vmm, VMM_ENV};
pub use live::LiveGuest;
pub use net_peer::{direction_mbps, wire as net_wire, FlowReport, NetPeer};
pub use netns::{enter_on_exec, NetNs, TapSpec};
pub use outcome::Outcome;
pub use protocol::{parse_line, CheckResult, Done, Event};
pub use qemu::{qemu_command, qemu_max_cpus, qemu_net_args, QEMU_BIOS};
pub use scratch::ScratchImage;
pub use sniffer::{SniffedFrame, Sniffer};

/// The workspace root (the directory holding `resources/` and `guest-tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The harness's own output directory: `<repo>/target/guest-tests`.
pub fn work_dir() -> PathBuf {
    repo_root().join("target").join("guest-tests")
}

/// An exclusive `flock` on a file, released when dropped. Used to run one guest at a
/// time across test threads and test binaries (the hosts have few cores).
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("flock {}", path.display()), err));
            }
        }
    }
}
