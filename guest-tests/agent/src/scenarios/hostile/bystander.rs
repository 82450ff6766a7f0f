//! The bystander disk: a virtio-blk the guest keeps using through its kernel driver
//! (O_DIRECT) while the agent attacks the other devices. Its data is known block by
//! block (see [`spec`]): read in full before and after the attacks, one block after
//! every attack, and written before and after, so any lost or misplaced write shows.

use std::fs::File;
use std::ops::Range;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::spec::{self, BLOCK};
use crate::disk::{self, AlignedBuf};
use crate::pattern;

/// Block `index` of a region with `seed`.
pub fn expected_block(seed: u64, index: u64) -> Vec<u8> {
    pattern::bytes(pattern::chunk_seed(seed, index), BLOCK)
}

/// How far the guest's writes got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// None yet: every block holds the host's data.
    Host,
    /// The first write (before the attacks) is in.
    Before,
    /// The last write (after the attacks) is in too.
    After,
}

/// The seed block `index` holds at `stage`.
fn seed_of(index: u64, stage: Stage) -> u64 {
    if stage != Stage::Host && spec::BEFORE_BLOCKS.contains(&index) {
        spec::BEFORE_SEED
    } else if stage == Stage::After && spec::AFTER_BLOCKS.contains(&index) {
        spec::AFTER_SEED
    } else {
        spec::HOST_SEED
    }
}

/// How long one bystander operation may take before the disk counts as hung.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `f` on a thread and waits for it at most [`IO_TIMEOUT`]: a disk whose
/// device stopped answering blocks its reader in the kernel for good, and the agent
/// must go on (and report it).
fn bounded<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("bystander-io".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("{what}: spawn: {e}"))?;
    rx.recv_timeout(IO_TIMEOUT)
        .map_err(|_| format!("{what}: no answer within {IO_TIMEOUT:?}: the disk hangs"))?
}

/// Compares blocks `blocks` of `file` with what they hold at `stage`; returns how
/// many were compared.
fn verify(file: &File, blocks: Range<u64>, stage: Stage) -> Result<u64, String> {
    let mut buf = AlignedBuf::new(blocks.clone().count() * BLOCK);
    disk::read_at(file, buf.as_mut_slice(), blocks.start * BLOCK as u64)?;
    for (i, got) in blocks.clone().zip(buf.as_slice().chunks_exact(BLOCK)) {
        if got != expected_block(seed_of(i, stage), i).as_slice() {
            return Err(format!(
                "block {i} holds {} (expected seed {:#x})",
                pattern::fnv1a(got),
                seed_of(i, stage)
            ));
        }
    }
    Ok(blocks.count() as u64)
}

/// Writes blocks `blocks` of `file` with `seed` and syncs.
fn write(file: &File, blocks: Range<u64>, seed: u64) -> Result<(), String> {
    let mut buf = AlignedBuf::new(blocks.clone().count() * BLOCK);
    for (i, out) in blocks
        .clone()
        .zip(buf.as_mut_slice().chunks_exact_mut(BLOCK))
    {
        out.copy_from_slice(&expected_block(seed, i));
    }
    disk::write_at(file, buf.as_slice(), blocks.start * BLOCK as u64)?;
    disk::fsync(file)
}

/// The open disk, how many spot checks it passed, and the first hang, after which
/// nothing more is tried.
pub struct Bystander {
    file: Arc<File>,
    pub name: String,
    checks: u64,
    hung: Option<String>,
}

impl Bystander {
    pub fn open(name: &str) -> Result<Bystander, String> {
        Ok(Bystander {
            file: Arc::new(disk::open(&format!("/dev/{name}"), true, true)?),
            name: name.to_owned(),
            checks: 0,
            hung: None,
        })
    }

    /// Runs `f` on the file, bounded; a hang is remembered.
    fn run<T: Send + 'static>(
        &mut self,
        what: &str,
        f: impl FnOnce(&File) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        if let Some(e) = &self.hung {
            return Err(format!("{what}: skipped, the disk hung before ({e})"));
        }
        let file = self.file.clone();
        let result = bounded(what, move || f(&file));
        if let Err(e) = &result {
            if e.contains("the disk hangs") {
                self.hung = Some(e.clone());
            }
        }
        result.map_err(|e| format!("{}: {e}", self.name))
    }

    /// Before the attacks: the host's data is all there; then the guest's first write.
    pub fn before(&mut self) -> Result<String, String> {
        let (host, n) = self.run("first write", |f| {
            let host = verify(f, 0..spec::BYSTANDER_BLOCKS, Stage::Host)?;
            write(f, spec::BEFORE_BLOCKS, spec::BEFORE_SEED)?;
            Ok((host, verify(f, spec::BEFORE_BLOCKS, Stage::Before)?))
        })?;
        Ok(format!(
            "{}: {host} host blocks read, {n} blocks written and read back",
            self.name
        ))
    }

    /// After an attack: one block (a different one each time, from the guest's and
    /// the host's data in turn) must still hold what it held.
    pub fn spot_check(&mut self) -> Result<(), String> {
        let n = self.checks;
        let guest = spec::BEFORE_BLOCKS;
        let host = spec::BEFORE_BLOCKS.end..spec::AFTER_BLOCKS.start;
        let index = if n % 2 == 0 {
            guest.start + (n / 2) % (guest.end - guest.start)
        } else {
            host.start + (n / 2) % (host.end - host.start)
        };
        self.run("spot check", move |f| {
            verify(f, index..index + 1, Stage::Before)
        })?;
        self.checks += 1;
        Ok(())
    }

    /// After the attacks: everything as before, then the guest's last write.
    pub fn after(&mut self) -> Result<String, String> {
        let checks = self.checks;
        let (n, m) = self.run("last write", |f| {
            let n = verify(f, 0..spec::BYSTANDER_BLOCKS, Stage::Before)?;
            write(f, spec::AFTER_BLOCKS, spec::AFTER_SEED)?;
            Ok((n, verify(f, 0..spec::BYSTANDER_BLOCKS, Stage::After)?))
        })?;
        Ok(format!(
            "{}: {n} blocks intact after {checks} spot checks; after the last write all \
             {m} blocks as expected",
            self.name
        ))
    }
}
