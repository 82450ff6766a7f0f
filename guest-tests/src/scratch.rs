//! Scratch disk images for device tests: sparse files under `target/guest-tests/images`
//! with names unique per process and call, removed when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{work_dir, Error, Result};

/// A scratch image file, deleted on drop.
#[derive(Debug)]
pub struct ScratchImage {
    path: PathBuf,
}

impl ScratchImage {
    /// Creates a sparse file of `len` bytes (all zeros, no blocks allocated) named
    /// `<tag>-<pid>-<n>.img`.
    pub fn create(tag: &str, len: u64) -> Result<ScratchImage> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = work_dir().join("images");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{tag}-{}-{n}.img", std::process::id()));
        let file = std::fs::File::create(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        file.set_len(len)
            .map_err(|e| Error::io(format!("truncate {} to {len}", path.display()), e))?;
        Ok(ScratchImage { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path=FILE` followed by `options` (comma-separated), for ferrio's `--disk`.
    pub fn disk_arg(&self, options: &str) -> String {
        let mut arg = format!("path={}", self.path.display());
        if !options.is_empty() {
            arg.push(',');
            arg.push_str(options);
        }
        arg
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_unique_and_removed() {
        let a = ScratchImage::create("scratch-test", 1 << 20).unwrap();
        let b = ScratchImage::create("scratch-test", 4096).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(std::fs::metadata(a.path()).unwrap().len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(a.path()).unwrap().blocks(), 0);
        let arg = b.disk_arg("readonly=on,serial=x");
        assert!(arg.starts_with("path=/") && arg.ends_with(".img,readonly=on,serial=x"));
        assert_eq!(a.disk_arg(""), format!("path={}", a.path().display()));
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
