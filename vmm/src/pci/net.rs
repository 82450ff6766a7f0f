//! Opens the TAP of a `--net` NIC and builds its virtio-net device.

use ferrio_devices::virtio::net::tap::{self, Tap, TapError};
use ferrio_devices::virtio::net::{NetConfig as DeviceConfig, VirtioNet};

use crate::config::{NetBackendConfig, NetConfig};
use crate::error::Error;

/// Attaches to the TAP (or takes over the inherited fd) and builds the device.
pub fn create(n: &NetConfig) -> Result<VirtioNet, Error> {
    let backend = match &n.backend {
        NetBackendConfig::Tap(name) => Tap::open(name, n.num_queue_pairs)?,
        NetBackendConfig::Fd(fd) => {
            let dup = tap::dup_fd(*fd).map_err(|e| Error::NetFd { fd: *fd, source: e })?;
            Tap::from_fd(dup).map_err(|e| match e {
                // Name the user's fd, not our duplicate.
                TapError::NotATapFd(_) => TapError::NotATapFd(*fd),
                TapError::FdFlags(_) => TapError::FdFlags(*fd),
                other => other,
            })?
        }
    };
    tracing::info!(tap = %backend.name, offloads = backend.offloads, "TAP ready");
    let config = DeviceConfig {
        mac: n.mac.0,
        queue_size: n.queue_size,
    };
    Ok(VirtioNet::new(backend, config))
}
