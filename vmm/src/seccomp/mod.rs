//! seccomp-bpf filters on every ferrio thread (`--seccomp on|log|off`, default `on`).
//!
//! Each thread kind has an allow-list ([`lists`], data reviewed like code): the main
//! thread, the vCPU threads, the I/O thread and each kind of device worker
//! ([`WorkerKind`]). Each thread installs its own filter on itself before it touches
//! guest data: a vCPU before its first KVM_RUN, the I/O thread before its event loop,
//! a device worker first thing in its thread (the [`ThreadHook`] the VMM gives every
//! device), the main thread once the VM runs (after it spawned the others and set up
//! signals and the terminal).
//!
//! A filter can only narrow what a thread may do, and a new thread inherits its
//! creator's filter. Device workers are started on a vCPU thread (at DRIVER_OK, an
//! MMIO write, and when the guest enables SR-IOV VFs), so the vCPU filter also allows
//! what starting a worker takes ([`lists::SPAWN`]), what the device's activation does
//! there and what its workers do, for the device kinds this VM has; each worker then
//! narrows that to its own list.
//!
//! Modes:
//! - `on`: a call outside the list gets SECCOMP_RET_TRAP: the kernel does not run it
//!   and sends SIGSYS, whose handler (`sigsys.rs`) prints one line naming the thread,
//!   its kind and the call, and exits with [`EXIT_CODE`] (159 = 128 + SIGSYS). TRAP
//!   rather than SECCOMP_RET_KILL_PROCESS because a killed process cannot say why; no
//!   filter allows `rt_sigaction`, so filtered code cannot take the handler over.
//! - `log`: SECCOMP_RET_LOG: nothing is refused, the kernel logs each call outside the
//!   lists (dmesg / audit: `type=1326 ... comm="vcpu0" ... syscall=N`). For finding a
//!   missing entry.
//! - `off`: no filter.
//!
//! Test hook: `FERRIO_SECCOMP_SELFTEST=KIND` (a [`ThreadKind`] name: `main`, `vcpu`,
//! `io`, `console`, `blk`, `blk-uring`, `net`, `iommu`) makes threads of that kind
//! issue a forbidden system call (`socket`) right after installing their filter, so
//! tests can see the report. Nothing else reads it.

pub mod lists;
mod names;
mod sigsys;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use ferrio_devices::virtio::worker_util::{ThreadHook, WorkerKind};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use self::lists::{Allowed, Args};
pub use self::sigsys::EXIT_CODE;

/// The environment variable of the test hook (see the module documentation).
pub const SELFTEST_ENV: &str = "FERRIO_SECCOMP_SELFTEST";

/// `--seccomp`: what a thread's filter does with a system call outside its list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Refuse it and stop the VMM with a report.
    #[default]
    On,
    /// Allow it; the kernel logs it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("unknown seccomp mode `{s}` (on, log or off)")),
        }
    }
}

/// A kind of ferrio thread; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread (after start-up).
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The I/O thread (stdin -> serial port).
    Io,
    /// A device worker thread.
    Worker(WorkerKind),
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Io,
        ThreadKind::Worker(WorkerKind::Console),
        ThreadKind::Worker(WorkerKind::Blk),
        ThreadKind::Worker(WorkerKind::BlkUring),
        ThreadKind::Worker(WorkerKind::Net),
        ThreadKind::Worker(WorkerKind::Iommu),
    ];

    /// `main`, `vcpu`, `io`, or the worker kind's name.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Io => "io",
            ThreadKind::Worker(w) => w.name(),
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ThreadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown thread kind `{s}`"))
    }
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: building the {kind} filter: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("seccomp: installing the {kind} filter: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
    #[error("seccomp: no filter was built for {0} threads")]
    NoFilter(ThreadKind),
    #[error("seccomp: installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("{SELFTEST_ENV}: {0}")]
    Selftest(String),
}

/// What a VM's threads do beyond the basics, which their filters must allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmProfile {
    /// The kinds of worker threads its devices start.
    pub workers: BTreeSet<WorkerKind>,
    /// Host PCI functions are passed through (`--device`).
    pub passthrough: bool,
}

impl VmProfile {
    /// Every kind of device (for the tests and the README's counts).
    pub fn everything() -> Self {
        Self {
            workers: WorkerKind::ALL.into_iter().collect(),
            passthrough: true,
        }
    }
}

/// The lists a thread of `kind` gets in a VM of `profile`.
pub fn lists_for(kind: ThreadKind, profile: &VmProfile) -> Vec<&'static [Allowed]> {
    let mut all = vec![lists::COMMON];
    match kind {
        ThreadKind::Main => all.push(lists::MAIN),
        ThreadKind::Io => all.push(lists::IO),
        ThreadKind::Vcpu => {
            all.push(lists::VCPU);
            if profile.passthrough {
                all.push(lists::VFIO_VCPU);
            }
            if !profile.workers.is_empty() {
                all.push(lists::SPAWN);
            }
            for &w in &profile.workers {
                all.extend(worker_lists(w, profile));
                all.extend(activation_lists(w));
            }
        }
        ThreadKind::Worker(w) => all.extend(worker_lists(w, profile)),
    }
    all
}

fn worker_lists(kind: WorkerKind, profile: &VmProfile) -> Vec<&'static [Allowed]> {
    let own: &[&'static [Allowed]] = match kind {
        WorkerKind::Console => &[lists::CONSOLE],
        WorkerKind::Blk => &[lists::BLK],
        WorkerKind::BlkUring => &[lists::BLK, lists::BLK_URING],
        WorkerKind::Net => &[lists::NET],
        WorkerKind::Iommu if profile.passthrough => &[lists::IOMMU, lists::VFIO_IOMMU],
        WorkerKind::Iommu => &[lists::IOMMU],
    };
    std::iter::once(lists::WORKER)
        .chain(own.iter().copied())
        .collect()
}

fn activation_lists(kind: WorkerKind) -> Vec<&'static [Allowed]> {
    match kind {
        WorkerKind::BlkUring => vec![lists::BLK_URING_ACTIVATE],
        WorkerKind::Net => vec![lists::NET_ACTIVATE],
        WorkerKind::Console | WorkerKind::Blk | WorkerKind::Iommu => Vec::new(),
    }
}

/// The allowed system calls of `lists` merged: number -> `None` (any arguments) or the
/// argument conditions (any one of them).
fn merge(lists: &[&'static [Allowed]]) -> BTreeMap<i64, Option<Vec<Args>>> {
    let mut merged: BTreeMap<i64, Option<Vec<Args>>> = BTreeMap::new();
    for a in lists.iter().flat_map(|l| l.iter()) {
        let entry = merged.entry(a.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), a.args) {
            (_, Args::Any) => *entry = None,
            (Some(conds), args) => conds.push(args),
            (None, _) => {}
        }
    }
    merged
}

/// How many distinct system calls a thread of `kind` may make (some only with given
/// arguments).
pub fn syscall_count(kind: ThreadKind, profile: &VmProfile) -> usize {
    merge(&lists_for(kind, profile)).len()
}

fn rules(args: &[Args]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cond = |index: u8, op, value| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    let mut rules = Vec::new();
    for a in args {
        match *a {
            Args::Any => {}
            Args::OneOf { index, values } => {
                for &v in values {
                    rules.push(cond(index, SeccompCmpOp::Eq, v)?);
                }
            }
            Args::Clear { index, mask } => {
                rules.push(cond(index, SeccompCmpOp::MaskedEq(mask), 0)?);
            }
        }
    }
    Ok(rules)
}

/// Compiles the filter of `kind`.
fn compile(
    kind: ThreadKind,
    profile: &VmProfile,
    mode: SeccompMode,
) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut map = BTreeMap::new();
    for (nr, args) in merge(&lists_for(kind, profile)) {
        let rules = match args {
            None => Vec::new(),
            Some(args) => rules(&args).map_err(build)?,
        };
        map.insert(nr, rules);
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On | SeccompMode::Off => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    filter.try_into().map_err(build)
}

/// The compiled filters of one VM and the mode; shared by the threads that install
/// them.
pub struct Seccomp {
    mode: SeccompMode,
    filters: BTreeMap<ThreadKind, BpfProgram>,
    selftest: Option<ThreadKind>,
}

impl Seccomp {
    /// Compiles the filters of the main, vCPU and I/O threads and of the worker kinds
    /// of `profile`; with `on`, installs the SIGSYS handler.
    pub fn new(mode: SeccompMode, profile: &VmProfile) -> Result<Self, SeccompError> {
        let selftest = match std::env::var(SELFTEST_ENV) {
            Ok(name) => Some(name.parse().map_err(SeccompError::Selftest)?),
            Err(_) => None,
        };
        let mut filters = BTreeMap::new();
        if mode != SeccompMode::Off {
            fix_malloc_arena_limit();
            let kinds = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Io]
                .into_iter()
                .chain(profile.workers.iter().map(|&w| ThreadKind::Worker(w)));
            for kind in kinds {
                filters.insert(kind, compile(kind, profile, mode)?);
            }
            for (kind, prog) in &filters {
                tracing::debug!(
                    "seccomp ({mode:?}): {kind} filter: {} system calls, {} BPF instructions",
                    syscall_count(*kind, profile),
                    prog.len()
                );
            }
        }
        if mode == SeccompMode::On {
            sigsys::install_handler().map_err(SeccompError::Handler)?;
        }
        Ok(Self {
            mode,
            filters,
            selftest,
        })
    }

    /// The mode.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs the filter of `kind` on the calling thread (nothing with `off`).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        if self.mode == SeccompMode::Off {
            return Ok(());
        }
        let prog = self
            .filters
            .get(&kind)
            .ok_or(SeccompError::NoFilter(kind))?;
        sigsys::label_thread(kind.name());
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install { kind, source })?;
        if self.selftest == Some(kind) {
            selftest(kind);
        }
        Ok(())
    }

    /// The hook the devices run first in each worker thread: installs its filter.
    pub fn thread_hook(self: &Arc<Self>) -> ThreadHook {
        let seccomp = self.clone();
        ThreadHook::new(move |kind| {
            seccomp
                .install(ThreadKind::Worker(kind))
                .map_err(std::io::Error::other)
        })
    }
}

/// glibc computes its malloc arena limit (8 per online CPU) the first time a thread
/// needs a ninth arena, by opening `/sys/devices/system/cpu/online`: on whatever thread
/// that is, maybe a filtered one (a worker starting under its vCPU's filter). Setting
/// the same limit up front, before any other thread exists, keeps that open out of the
/// filters.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: sysconf only reads a system value.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
        let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable; no other thread exists yet.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
            tracing::warn!("seccomp: cannot set the malloc arena limit");
        }
    }
}

/// The test hook: a system call no filter allows.
fn selftest(kind: ThreadKind) {
    tracing::warn!("{SELFTEST_ENV}: a {kind} thread makes a forbidden system call");
    // SAFETY: socket(2) with invalid arguments only returns an error (if it runs at
    // all: the filter refuses it).
    let r = unsafe { libc::socket(-1, -1, -1) };
    tracing::warn!("{SELFTEST_ENV}: socket() returned {r}: the filter let it through");
}

#[cfg(test)]
mod tests;
