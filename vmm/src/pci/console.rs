//! Host ends of the virtio-console port: stdout/stdin, an output file, or a Unix
//! socket ferrio listens on (it waits for one client before the guest boots, so no
//! guest output is lost).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;

use ferrio_devices::virtio::console::{InputSource, VirtioConsole};

use crate::config::ConsoleBackend;
use crate::error::Error;

/// Builds the console device with its host ends connected.
pub fn create(backend: &ConsoleBackend) -> Result<VirtioConsole, Error> {
    let io = |what: &'static str| move |source| Error::Io { what, source };
    let (output, input): (Box<dyn Write + Send>, Option<InputSource>) = match backend {
        ConsoleBackend::Stdio => {
            let out = std::io::stdout()
                .lock()
                .try_clone_owned_fd()
                .map_err(io("duplicating stdout"))?;
            (
                Box::new(File::from(out)),
                Some(InputSource::stdin().map_err(io("duplicating stdin"))?),
            )
        }
        ConsoleBackend::File(path) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::ConsoleBackend {
                    path: path.clone(),
                    source,
                })?;
            (Box::new(f), None)
        }
        ConsoleBackend::Socket(path) => {
            let listener = UnixListener::bind(path).map_err(|source| Error::ConsoleBackend {
                path: path.clone(),
                source,
            })?;
            tracing::warn!("waiting for a console client on {}", path.display());
            let (stream, _) = listener.accept().map_err(|source| Error::ConsoleBackend {
                path: path.clone(),
                source,
            })?;
            let out = stream
                .try_clone()
                .map_err(io("cloning the console socket"))?;
            (Box::new(out), Some(InputSource::from(stream)))
        }
    };
    Ok(VirtioConsole::new(output, input))
}

/// `try_clone` of the locked stdout's descriptor.
trait CloneFd {
    fn try_clone_owned_fd(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl CloneFd for std::io::StdoutLock<'_> {
    fn try_clone_owned_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}
