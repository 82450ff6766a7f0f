//! The seccomp allow-lists, one per thread kind: review a change here like code.
//!
//! Each entry allows one system call, with any arguments or only with some values of
//! one argument (ioctl request numbers, `prctl` options, `mmap`/`mprotect` without
//! PROT_EXEC). A thread's filter is [`COMMON`] plus its own list; see
//! [`super::lists_for`] for how the lists combine (the vCPU thread also starts and stops
//! device workers).
//!
//! The lists were taken from `strace -f` of every guest scenario and are checked by
//! running those scenarios with the filters on: a missing entry kills the VMM with a
//! report naming the thread and the call (or, with `--seccomp log`, is logged by the
//! kernel).

use libc::{
    SYS_brk, SYS_clock_gettime, SYS_clone, SYS_clone3, SYS_close, SYS_epoll_ctl, SYS_epoll_pwait,
    SYS_epoll_wait, SYS_eventfd2, SYS_exit, SYS_exit_group, SYS_fallocate, SYS_fcntl,
    SYS_fdatasync, SYS_fsync, SYS_futex, SYS_getpid, SYS_getrandom, SYS_gettid, SYS_io_uring_enter,
    SYS_io_uring_register, SYS_io_uring_setup, SYS_ioctl, SYS_madvise, SYS_mmap, SYS_mprotect,
    SYS_mremap, SYS_munmap, SYS_poll, SYS_ppoll, SYS_prctl, SYS_pread64, SYS_preadv, SYS_pwrite64,
    SYS_pwritev, SYS_read, SYS_readv, SYS_restart_syscall, SYS_rseq, SYS_rt_sigprocmask,
    SYS_rt_sigreturn, SYS_sched_getaffinity, SYS_sched_yield, SYS_seccomp, SYS_sendto,
    SYS_set_robust_list, SYS_sigaltstack, SYS_tgkill, SYS_write, SYS_writev,
};

/// One allowed system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// The system call number (`libc::SYS_*`).
    pub nr: i64,
    /// Which arguments it may have.
    pub args: Args,
}

/// The argument condition of an [`Allowed`] entry (compared as 32-bit values: ioctl
/// requests, `prctl` options, protection flags and signal numbers are `int`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `index` is one of `values`.
    OneOf { index: u8, values: &'static [u64] },
    /// Argument `index` has none of the bits of `mask` set.
    Clear { index: u8, mask: u64 },
}

const fn any(nr: i64) -> Allowed {
    Allowed {
        nr,
        args: Args::Any,
    }
}

const fn one_of(nr: i64, index: u8, values: &'static [u64]) -> Allowed {
    Allowed {
        nr,
        args: Args::OneOf { index, values },
    }
}

/// `mmap`/`mprotect` never make memory executable.
const fn no_exec(nr: i64) -> Allowed {
    Allowed {
        nr,
        args: Args::Clear {
            index: 2,
            mask: libc::PROT_EXEC as u64,
        },
    }
}

/// `ioctl` with one of `requests`.
const fn ioctl(requests: &'static [u64]) -> Allowed {
    one_of(SYS_ioctl, 1, requests)
}

/// ioctl request numbers (checked against their definitions by a unit test).
pub mod req {
    pub const KVM_RUN: u64 = 0xae80;
    pub const KVM_GET_REGS: u64 = 0x8090_ae81;
    pub const KVM_SET_REGS: u64 = 0x4090_ae82;
    pub const KVM_TRANSLATE: u64 = 0xc018_ae85;
    pub const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
    pub const KVM_SET_VCPU_EVENTS: u64 = 0x4040_aea0;
    pub const KVM_IRQFD: u64 = 0x4020_ae76;
    pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    pub const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
    pub const VFIO_DEVICE_SET_IRQS: u64 = 0x3b6e;
    pub const VFIO_DEVICE_RESET: u64 = 0x3b6f;
    pub const VFIO_IOMMU_MAP_DMA: u64 = 0x3b71;
    pub const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3b72;
    pub const IOMMU_IOAS_MAP: u64 = 0x3b85;
    pub const IOMMU_IOAS_UNMAP: u64 = 0x3b86;
    pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
    pub const TUNSETQUEUE: u64 = 0x4004_54d9;
    pub const TCSETS: u64 = 0x5402;
}

/// Every thread: memory, locks, signal return and `abort()`, exit, logs and
/// eventfd writes, fd close, the clock (when the vDSO falls back), HashMap seeds.
pub const COMMON: &[Allowed] = &[
    any(SYS_brk),
    no_exec(SYS_mmap),
    no_exec(SYS_mprotect),
    any(SYS_munmap),
    any(SYS_mremap),
    any(SYS_madvise),
    any(SYS_futex),
    any(SYS_sched_yield),
    any(SYS_rt_sigreturn),
    any(SYS_restart_syscall),
    any(SYS_rt_sigprocmask),
    // abort(): raise(SIGABRT) is getpid + gettid + tgkill.
    any(SYS_getpid),
    any(SYS_gettid),
    one_of(SYS_tgkill, 2, &[libc::SIGABRT as u64]),
    any(SYS_exit),
    any(SYS_exit_group),
    // Logs on stderr, eventfd/irqfd signals.
    any(SYS_write),
    any(SYS_close),
    // Debug builds check that an fd is open before closing it.
    one_of(SYS_fcntl, 1, &[libc::F_GETFD as u64]),
    any(SYS_clock_gettime),
    any(SYS_getrandom),
    // Thread exit takes down the signal stack.
    any(SYS_sigaltstack),
];

/// The main thread after start-up: waits for the stop eventfd (or the timeout),
/// restores the terminal, flushes the console and exits.
pub const MAIN: &[Allowed] = &[any(SYS_poll), any(SYS_ppoll), ioctl(&[req::TCSETS])];

/// A vCPU thread: KVM_RUN and its exits (the PVM int3/int n completion), MMIO and
/// config writes that map BARs (KVM_IOEVENTFD), program MSI-X (KVM_SET_GSI_ROUTING)
/// and create or destroy SR-IOV VFs (eventfds, KVM_IRQFD); serial output.
pub const VCPU: &[Allowed] = &[
    ioctl(&[
        req::KVM_RUN,
        req::KVM_GET_REGS,
        req::KVM_SET_REGS,
        req::KVM_TRANSLATE,
        req::KVM_GET_VCPU_EVENTS,
        req::KVM_SET_VCPU_EVENTS,
        req::KVM_IRQFD,
        req::KVM_IOEVENTFD,
        req::KVM_SET_GSI_ROUTING,
    ]),
    // Eventfds drained at activation and reset.
    any(SYS_read),
];

/// What a thread needs to start device workers (at DRIVER_OK) and stop them (reset,
/// VF disable): the clone, and what the new thread runs before its own filter (glibc
/// and Rust thread start-up, the worker's name, installing the filter).
pub const SPAWN: &[Allowed] = &[
    any(SYS_clone3),
    any(SYS_clone),
    any(SYS_set_robust_list),
    any(SYS_rseq),
    any(SYS_sched_getaffinity),
    one_of(
        SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    ),
    one_of(SYS_seccomp, 0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
    // The workers' eventfds and their duplicates (EventFd::try_clone).
    any(SYS_eventfd2),
    one_of(SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
];

/// The I/O thread: the event loop and stdin -> UART.
pub const IO: &[Allowed] = &[
    any(SYS_epoll_wait),
    any(SYS_epoll_pwait),
    any(SYS_epoll_ctl),
    any(SYS_read),
];

/// Every device worker: poll on eventfds and read them.
pub const WORKER: &[Allowed] = &[any(SYS_poll), any(SYS_ppoll), any(SYS_read)];

/// virtio-console: guest output to a file or stdout (`write`) or a socket (`sendto`);
/// host input is `read`.
pub const CONSOLE: &[Allowed] = &[any(SYS_sendto)];

/// virtio-blk, synchronous engine: data straight between the image and guest memory,
/// FLUSH, DISCARD and WRITE_ZEROES.
pub const BLK: &[Allowed] = &[
    any(SYS_preadv),
    any(SYS_pwritev),
    any(SYS_fdatasync),
    any(SYS_fsync),
    any(SYS_fallocate),
];

/// virtio-blk, io_uring engine: [`BLK`] (GET_ID, DISCARD, WRITE_ZEROES and the
/// write-through sync still run synchronously) and submitting to its ring, which only
/// accepts READV, WRITEV and FSYNC (ring restrictions).
pub const BLK_URING: &[Allowed] = &[any(SYS_io_uring_enter)];

/// virtio-net: frames through the TAP queue, queue pairs attached and detached
/// (VQ_PAIRS_SET on the control queue).
pub const NET: &[Allowed] = &[any(SYS_readv), any(SYS_writev), ioctl(&[req::TUNSETQUEUE])];

/// virtio-iommu: only [`WORKER`].
pub const IOMMU: &[Allowed] = &[];

/// What activating a device does on the vCPU thread besides starting its workers:
/// the io_uring rings are set up (and restricted) there, the TAP offloads and queues
/// set.
pub const BLK_URING_ACTIVATE: &[Allowed] = &[any(SYS_io_uring_setup), any(SYS_io_uring_register)];
/// See [`BLK_URING_ACTIVATE`].
pub const NET_ACTIVATE: &[Allowed] = &[ioctl(&[req::TUNSETOFFLOAD, req::TUNSETQUEUE])];

/// VFIO passthrough (`--device`) on the vCPU threads: config space and trapped BAR
/// accesses (`pread64`/`pwrite64` on the device fd), MSI/MSI-X triggers
/// (VFIO_DEVICE_SET_IRQS), function reset, direct-mapped BAR areas that follow BAR
/// moves (KVM_SET_USER_MEMORY_REGION). Taken from the code: no host function to pass
/// through was at hand to run it (`--seccomp log` shows what it lacks).
pub const VFIO_VCPU: &[Allowed] = &[
    any(SYS_pread64),
    any(SYS_pwrite64),
    ioctl(&[
        req::VFIO_DEVICE_SET_IRQS,
        req::VFIO_DEVICE_RESET,
        req::KVM_SET_USER_MEMORY_REGION,
    ]),
];
/// VFIO passthrough behind the virtio-iommu: its worker mirrors the guest's MAP and
/// UNMAP into the host IOMMU (type1 container or iommufd IOAS). As [`VFIO_VCPU`], not
/// run yet.
pub const VFIO_IOMMU: &[Allowed] = &[ioctl(&[
    req::VFIO_IOMMU_MAP_DMA,
    req::VFIO_IOMMU_UNMAP_DMA,
    req::IOMMU_IOAS_MAP,
    req::IOMMU_IOAS_UNMAP,
])];
