//! The two host-side artifacts a guest test needs: the guest image (kernel, initramfs,
//! base command line — built by `resources/build-guest.sh`) and the `ferrio` binary
//! (built into `target/guest-tests` so it does not wait on the outer cargo's lock).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use crate::{repo_root, work_dir, Error, Result};

/// The guest's boot assets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// vmlinux (PVM hosts) or bzImage (stock Debian kernel).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The command line this kernel needs on this host, without a scenario.
    pub base_cmdline: String,
}

/// Runs `cmd`, returning its output when it exits 0 and an [`Error::Command`] with
/// its stdout and stderr otherwise.
fn checked_output(mut cmd: Command) -> Result<Output> {
    let text = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("spawn {text}"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Command {
            command: text,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Reads the image description from a `manifest` written by build-guest.sh.
pub fn read_manifest(path: &Path) -> Result<GuestImage> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(PathBuf::from)
            .ok_or_else(|| Error::Manifest {
                path: path.to_path_buf(),
                key: key.to_owned(),
            })
    };
    let (kernel, initramfs, cmdline_file) =
        (get("kernel")?, get("initramfs")?, get("cmdline_file")?);
    for file in [&kernel, &initramfs, &cmdline_file] {
        if !file.is_file() {
            return Err(Error::MissingFile(file.clone()));
        }
    }
    let base_cmdline = std::fs::read_to_string(&cmdline_file)
        .map_err(|e| Error::io(format!("read {}", cmdline_file.display()), e))?
        .trim()
        .to_owned();
    Ok(GuestImage {
        kernel,
        initramfs,
        base_cmdline,
    })
}

/// Builds the guest image if any input changed (a no-op costs well under a second)
/// and returns it.
pub fn ensure_image() -> Result<GuestImage> {
    let root = repo_root();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("resources").join("build-guest.sh"));
    checked_output(cmd)?;
    let out_dir = std::env::var_os("FERRIO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("guest"));
    read_manifest(&out_dir.join("manifest"))
}

/// The ferrio binary: `$FERRIO_BIN` if set, else built (release) into
/// `<repo>/target/guest-tests`, once per process.
pub fn ferrio_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FERRIO_BIN") {
        return Ok(PathBuf::from(bin));
    }
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    let target_dir = work_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "-p", "ferrio-vmm", "--bin", "ferrio"])
        .arg("--manifest-path")
        .arg(repo_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    checked_output(cmd)?;
    let path = target_dir.join("release").join("ferrio");
    if !path.is_file() {
        return Err(Error::MissingFile(path));
    }
    *built = Some(path.clone());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parsing_finds_files_and_reports_missing_keys() {
        let dir = std::env::temp_dir().join(format!("ferrio-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "initramfs.cpio.gz"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        std::fs::write(dir.join("cmdline"), "console=ttyS0 panic=-1\n").unwrap();
        let manifest = dir.join("manifest");
        let d = dir.display();
        std::fs::write(
            &manifest,
            format!(
                "inputs=abc\nkernel={d}/vmlinux\ninitramfs={d}/initramfs.cpio.gz\n\
                 cmdline_file={d}/cmdline\n# input: cmdline kernel=nope\n"
            ),
        )
        .unwrap();
        let image = read_manifest(&manifest).unwrap();
        assert_eq!(image.kernel, dir.join("vmlinux"));
        assert_eq!(image.base_cmdline, "console=ttyS0 panic=-1");

        std::fs::write(&manifest, format!("kernel={d}/vmlinux\n")).unwrap();
        let err = read_manifest(&manifest).unwrap_err();
        assert!(matches!(err, Error::Manifest { ref key, .. } if key == "initramfs"));

        std::fs::write(
            &manifest,
            format!("kernel={d}/gone\ninitramfs={d}/vmlinux\ncmdline_file={d}/cmdline\n"),
        )
        .unwrap();
        assert!(matches!(
            read_manifest(&manifest),
            Err(Error::MissingFile(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
