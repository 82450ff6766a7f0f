//! The harness's error type.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong before a guest's results are available.
/// (A guest that boots but fails checks is not an error: see [`crate::Outcome`].)
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on the host failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper command (build script, cargo) exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: ExitStatus,
        output: String,
    },
    /// The image manifest written by resources/build-guest.sh lacks a key.
    #[error("{path}: no `{key}=` line (rerun resources/build-guest.sh)")]
    Manifest { path: PathBuf, key: String },
    /// A file named by the manifest does not exist.
    #[error("{0}: missing (rerun resources/build-guest.sh)")]
    MissingFile(PathBuf),
    /// A running guest did not do what a test waited for (see [`crate::LiveGuest`]).
    #[error("{0}")]
    Guest(String),
}

impl Error {
    /// An [`Error::Io`] with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, Error>;
