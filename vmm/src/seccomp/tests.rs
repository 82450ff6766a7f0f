use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::lists::{self, req, Allowed, Args};
use super::*;

const KVMIO: u32 = 0xae;
const TUNIO: u32 = b'T' as u32;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_bindings::kvm_regs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_iow_nr!(
    KVM_SET_VCPU_EVENTS,
    KVMIO,
    0xa0,
    kvm_bindings::kvm_vcpu_events
);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_bindings::kvm_ioeventfd);
ioctl_iow_nr!(
    KVM_SET_GSI_ROUTING,
    KVMIO,
    0x6a,
    kvm_bindings::kvm_irq_routing
);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);
const VFIO: u32 = b';' as u32;
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO, 100 + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO, 100 + 11);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO, 100 + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO, 100 + 14);
// iommufd: IOMMUFD_CMD_BASE (0x80) + 5 and + 6.
ioctl_io_nr!(IOMMU_IOAS_MAP, VFIO, 0x85);
ioctl_io_nr!(IOMMU_IOAS_UNMAP, VFIO, 0x86);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNIO, 0xd0, libc::c_uint);
ioctl_iow_nr!(TUNSETQUEUE, TUNIO, 0xd9, libc::c_int);

#[test]
fn ioctl_numbers_match_their_definitions() {
    let pairs = [
        (req::KVM_RUN, KVM_RUN()),
        (req::KVM_GET_REGS, KVM_GET_REGS()),
        (req::KVM_SET_REGS, KVM_SET_REGS()),
        (req::KVM_TRANSLATE, KVM_TRANSLATE()),
        (req::KVM_GET_VCPU_EVENTS, KVM_GET_VCPU_EVENTS()),
        (req::KVM_SET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS()),
        (req::KVM_IRQFD, KVM_IRQFD()),
        (req::KVM_IOEVENTFD, KVM_IOEVENTFD()),
        (req::KVM_SET_GSI_ROUTING, KVM_SET_GSI_ROUTING()),
        (
            req::KVM_SET_USER_MEMORY_REGION,
            KVM_SET_USER_MEMORY_REGION(),
        ),
        (req::VFIO_DEVICE_SET_IRQS, VFIO_DEVICE_SET_IRQS()),
        (req::VFIO_DEVICE_RESET, VFIO_DEVICE_RESET()),
        (req::VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_MAP_DMA()),
        (req::VFIO_IOMMU_UNMAP_DMA, VFIO_IOMMU_UNMAP_DMA()),
        (req::IOMMU_IOAS_MAP, IOMMU_IOAS_MAP()),
        (req::IOMMU_IOAS_UNMAP, IOMMU_IOAS_UNMAP()),
        (req::TUNSETOFFLOAD, TUNSETOFFLOAD()),
        (req::TUNSETQUEUE, TUNSETQUEUE()),
        (req::TCSETS, libc::TCSETS),
    ];
    for (listed, defined) in pairs {
        assert_eq!(listed, defined, "{listed:#x}");
    }
}

fn only(workers: &[WorkerKind]) -> VmProfile {
    VmProfile {
        workers: workers.iter().copied().collect(),
        passthrough: false,
    }
}

fn allowed(kind: ThreadKind, profile: &VmProfile) -> BTreeMap<i64, Option<Vec<Args>>> {
    merge(&lists_for(kind, profile))
}

#[test]
fn every_filter_compiles_in_both_modes() {
    let all = VmProfile::everything();
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let prog = compile(kind, &all, mode).expect("compiles");
            assert!(prog.len() > syscall_count(kind, &all), "{kind}");
        }
    }
}

#[test]
fn the_vcpu_filter_covers_the_workers_it_starts() {
    let profiles = WorkerKind::ALL
        .into_iter()
        .flat_map(|w| [(w, only(&[w])), (w, VmProfile::everything())]);
    for (w, profile) in profiles {
        let vcpu = allowed(ThreadKind::Vcpu, &profile);
        for (nr, args) in allowed(ThreadKind::Worker(w), &profile) {
            let name = names::name(nr).unwrap_or("?");
            match (vcpu.get(&nr), args) {
                (None, _) => panic!("{w}: the vCPU filter lacks {name}"),
                (Some(None), _) => {}
                (Some(Some(_)), None) => panic!("{w}: the vCPU filter restricts {name}"),
                (Some(Some(v)), Some(w_args)) => {
                    assert!(w_args.iter().all(|a| v.contains(a)), "{w}: {name}")
                }
            }
        }
    }
}

#[test]
fn a_vm_without_devices_gives_vcpus_no_thread_creation() {
    let vcpu = allowed(ThreadKind::Vcpu, &VmProfile::default());
    assert!(!vcpu.contains_key(&libc::SYS_clone3));
    assert!(!vcpu.contains_key(&libc::SYS_io_uring_enter));
    assert!(!vcpu.contains_key(&libc::SYS_pread64), "no passthrough");
    let with_blk = allowed(ThreadKind::Vcpu, &only(&[WorkerKind::Blk]));
    assert!(with_blk.contains_key(&libc::SYS_clone3));
    assert!(!with_blk.contains_key(&libc::SYS_io_uring_enter));
    let iommu = ThreadKind::Worker(WorkerKind::Iommu);
    assert!(!allowed(iommu, &only(&[WorkerKind::Iommu])).contains_key(&libc::SYS_ioctl));
    assert!(allowed(iommu, &VmProfile::everything()).contains_key(&libc::SYS_ioctl));
}

#[test]
fn never_allowed() {
    let all = VmProfile::everything();
    let forbidden = [
        // The selftest's call.
        libc::SYS_socket,
        // Taking the SIGSYS handler over.
        libc::SYS_rt_sigaction,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_connect,
        libc::SYS_ptrace,
        libc::SYS_kill,
    ];
    for kind in ThreadKind::ALL {
        let a = allowed(kind, &all);
        for nr in forbidden {
            assert!(!a.contains_key(&nr), "{kind} allows {:?}", names::name(nr));
        }
        // Memory never becomes executable.
        for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
            let mask = libc::PROT_EXEC as u64;
            assert_eq!(a[&nr], Some(vec![Args::Clear { index: 2, mask }]), "{kind}");
        }
    }
}

#[test]
fn ioctl_is_limited_to_listed_requests() {
    let all = VmProfile::everything();
    for kind in ThreadKind::ALL {
        if let Some(args) = allowed(kind, &all).get(&libc::SYS_ioctl) {
            let args = args.as_ref().expect("ioctl restricted");
            assert!(args
                .iter()
                .all(|a| matches!(a, Args::OneOf { index: 1, .. })));
        }
    }
    let blk = allowed(ThreadKind::Worker(WorkerKind::Blk), &all);
    assert!(!blk.contains_key(&libc::SYS_ioctl));
}

#[test]
fn lists_hold_no_duplicates() {
    let lists: [&[Allowed]; 15] = [
        lists::COMMON,
        lists::MAIN,
        lists::VCPU,
        lists::SPAWN,
        lists::IO,
        lists::WORKER,
        lists::CONSOLE,
        lists::BLK,
        lists::BLK_URING,
        lists::NET,
        lists::IOMMU,
        lists::BLK_URING_ACTIVATE,
        lists::NET_ACTIVATE,
        lists::VFIO_VCPU,
        lists::VFIO_IOMMU,
    ];
    for list in lists {
        let nrs: BTreeSet<i64> = list.iter().map(|a| a.nr).collect();
        assert_eq!(nrs.len(), list.len(), "{:?}", list.first());
    }
}

#[test]
fn modes_and_kinds_parse() {
    assert_eq!("on".parse(), Ok(SeccompMode::On));
    assert_eq!("log".parse(), Ok(SeccompMode::Log));
    assert_eq!("off".parse(), Ok(SeccompMode::Off));
    assert!("yes".parse::<SeccompMode>().is_err());
    for kind in ThreadKind::ALL {
        assert_eq!(kind.name().parse(), Ok(kind));
    }
    assert!("gpu".parse::<ThreadKind>().is_err());
}

/// The table in the README ("seccomp") must show these numbers; run with
/// `--nocapture` to see them.
#[test]
fn syscall_counts_per_kind() {
    let mut table = String::new();
    for kind in ThreadKind::ALL {
        let own = match kind {
            ThreadKind::Worker(w) => syscall_count(kind, &only(&[w])),
            _ => syscall_count(kind, &VmProfile::default()),
        };
        let full = syscall_count(kind, &VmProfile::everything());
        table.push_str(&match kind {
            _ if own == full => format!("| {kind} | {own} |\n"),
            ThreadKind::Vcpu => {
                format!("| {kind} | {own} with no device, {full} with every kind of device |\n")
            }
            _ => format!("| {kind} | {own}, {full} with `--device` |\n"),
        });
    }
    println!("{table}");
    let readme = include_str!("../../../README.md");
    for line in table.lines() {
        assert!(readme.contains(line), "README lacks the row `{line}`");
    }
}
