//! Guest CPUID: KVM's supported set with the topology, the hypervisor leaves and, on
//! hosts whose KVM emulates guest kernel code (PVM), the features whose instructions
//! its emulator cannot run, fixed up per vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Feature bits that KVM's PVM emulator cannot execute at guest CPL0 (measured on the
/// kvm_pvm host: the instruction ends in KVM_EXIT_INTERNAL_ERROR).
mod pvm_hidden {
    /// Leaf 1 ECX.
    pub const LEAF1_ECX: u32 = (1 << 1)   // PCLMULQDQ
        | (1 << 13)  // CMPXCHG16B
        | (1 << 17)  // PCID
        | (1 << 20)  // SSE4.2 (crc32c in kernel)
        | (1 << 22)  // MOVBE
        | (1 << 23)  // POPCNT
        | (1 << 25)  // AES-NI
        | (1 << 26)  // XSAVE
        | (1 << 27)  // OSXSAVE
        | (1 << 28)  // AVX
        | (1 << 29)  // F16C
        | (1 << 30); // RDRAND
    /// Leaf 7.0 EBX.
    pub const LEAF7_EBX: u32 = 1        // FSGSBASE
        | (1 << 3)   // BMI1
        | (1 << 5)   // AVX2
        | (1 << 8)   // BMI2
        | (1 << 9)   // ERMS
        | (1 << 10)  // INVPCID
        | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31) // AVX-512
        | (1 << 18)  // RDSEED
        | (1 << 19)  // ADX
        | (1 << 20)  // SMAP
        | (1 << 23)  // CLFLUSHOPT
        | (1 << 24)  // CLWB
        | (1 << 29); // SHA
    /// Leaf 7.0 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, PKU/OSPKE, GFNI, VAES,
    /// VPCLMULQDQ, RDPID, MOVDIRI, MOVDIR64B.
    pub const LEAF7_ECX: u32 = (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 6)
        | (1 << 8)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 14)
        | (1 << 22)
        | (1 << 27)
        | (1 << 28);
    /// Leaf 7.0 EDX: FSRM, AVX-512 VP2INTERSECT/FP16, AMX, SERIALIZE.
    pub const LEAF7_EDX: u32 = (1 << 4) | (1 << 8) | (1 << 14) | (1 << 22) | (1 << 23) | (1 << 24);
    /// Leaf 0x8000_0001 ECX: ABM/LZCNT; EDX: RDTSCP.
    pub const EXT1_ECX: u32 = 1 << 5;
    pub const EXT1_EDX: u32 = 1 << 27;
}

/// KVM paravirt features (leaf 0x4000_0001 EAX) that are implemented with hypercalls.
/// `vmcall` does not return on PVM hosts, and the guest copes without them anywhere.
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7)  // PV_UNHALT (kick hypercall)
    | (1 << 9)   // PV_TLB_FLUSH
    | (1 << 11)  // PV_SEND_IPI
    | (1 << 13)  // PV_SCHED_YIELD
    | (1 << 16); // HC_MAP_GPA_RANGE

/// Per-vCPU inputs of the fix-up.
#[derive(Debug, Clone, Copy)]
pub struct CpuidSpec {
    pub cpu_id: u8,
    pub cpu_count: u8,
    /// The host KVM emulates guest kernel code (PVM): hide what it cannot run.
    pub pvm: bool,
}

/// Applies topology, hypervisor and PVM fix-ups to KVM's supported CPUID and returns
/// the guest's CPUID. The extended topology leaves (0xB, 0x1F) are rebuilt whole: KVM
/// may report only their sub-leaf 0 (the PVM host does), which tells the guest nothing.
pub fn fixup(supported: &CpuId, spec: CpuidSpec) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let amd = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == 0x6874_7541);
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    for e in supported.as_slice() {
        match e.function {
            TOPOLOGY_LEAF | TOPOLOGY_LEAF_V2 => {
                if e.index == 0 {
                    entries.extend(topology_subleaves(e.function, spec));
                }
            }
            _ => {
                let mut e = *e;
                fixup_entry(&mut e, spec, amd);
                entries.push(e);
            }
        }
    }
    CpuId::from_entries(&entries)
}

const TOPOLOGY_LEAF: u32 = 0xb;
const TOPOLOGY_LEAF_V2: u32 = 0x1f;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Sub-leaves 0 (SMT), 1 (core) and 2 (end) of an extended topology leaf: one thread
/// per core, all vCPUs cores of one package.
fn topology_subleaves(function: u32, spec: CpuidSpec) -> [kvm_cpuid_entry2; 3] {
    let count = u32::from(spec.cpu_count);
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    let level = |index: u32, eax: u32, ebx: u32, kind: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (kind << 8) | index,
        edx: u32::from(spec.cpu_id),
        ..Default::default()
    };
    [
        level(0, 0, 1, 1),
        level(1, core_bits, count, 2),
        level(2, 0, 0, 0),
    ]
}

fn fixup_entry(e: &mut kvm_cpuid_entry2, spec: CpuidSpec, amd: bool) {
    let apic_id = u32::from(spec.cpu_id);
    let count = u32::from(spec.cpu_count);
    match e.function {
        0x1 => {
            e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            e.ecx |= 1 << 31; // hypervisor present
            if count > 1 {
                e.edx |= 1 << 28; // HTT: the logical-processor count field is valid
            }
            if spec.pvm {
                e.ecx &= !pvm_hidden::LEAF1_ECX;
            }
        }
        0x4 => {
            // Cache topology: all vCPUs are cores of one package; only the last
            // level is shared by all of them.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        0x6 => e.ecx &= !(1 << 3), // no energy-performance bias MSR
        0x7 if e.index == 0 && spec.pvm => {
            e.ebx &= !pvm_hidden::LEAF7_EBX;
            e.ecx &= !pvm_hidden::LEAF7_ECX;
            e.edx &= !pvm_hidden::LEAF7_EDX;
        }
        0xa => {
            // No architectural PMU.
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        0xd if spec.pvm => {
            // XSAVE hidden: no state components.
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        0x4000_0001 => e.eax &= !KVM_HYPERCALL_FEATURES,
        0x8000_0001 if spec.pvm => {
            e.ecx &= !pvm_hidden::EXT1_ECX;
            e.edx &= !pvm_hidden::EXT1_EDX;
        }
        0x8000_0008 if amd => e.ecx = (e.ecx & !0xff) | (count - 1),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn fixed(function: u32, index: u32, spec: CpuidSpec) -> kvm_cpuid_entry2 {
        let mut e = entry(function, index);
        fixup_entry(&mut e, spec, false);
        e
    }

    const SPEC: CpuidSpec = CpuidSpec {
        cpu_id: 3,
        cpu_count: 4,
        pvm: false,
    };

    #[test]
    fn topology_leaves_name_the_vcpu() {
        let l1 = fixed(1, 0, SPEC);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & (1 << 28), 0);
        let l4 = fixed(4, 0, SPEC);
        assert_eq!(l4.eax >> 26, 3);
    }

    #[test]
    fn topology_leaves_are_rebuilt_from_subleaf_zero() {
        // What the PVM host reports: only sub-leaf 0, all zero.
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            kvm_cpuid_entry2 {
                function: 0xb,
                flags: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                flags: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let out = fixup(&supported, SPEC).unwrap();
        for leaf in [0xb, 0x1f] {
            let sub: Vec<_> = out
                .as_slice()
                .iter()
                .filter(|e| e.function == leaf)
                .collect();
            assert_eq!(sub.len(), 3);
            let (smt, core, end) = (sub[0], sub[1], sub[2]);
            assert_eq!((smt.ebx, smt.edx, (smt.ecx >> 8) & 0xff), (1, 3, 1));
            assert_eq!(
                (core.eax, core.ebx, (core.ecx >> 8) & 0xff, core.index),
                (2, 4, 2, 1)
            );
            assert_eq!(((end.ecx >> 8) & 0xff, end.ebx), (0, 0));
        }
        assert_eq!(out.as_slice().iter().filter(|e| e.function == 1).count(), 1);
        let l4 = fixed(4, 0, SPEC);
        assert_eq!(l4.eax >> 26, 3);
    }

    #[test]
    fn hypercall_features_are_always_hidden() {
        let kvm = fixed(0x4000_0001, 0, SPEC);
        assert_eq!(kvm.eax & KVM_HYPERCALL_FEATURES, 0);
        assert_ne!(kvm.eax & 1, 0, "clocksource stays");
    }

    #[test]
    fn pvm_hides_what_the_emulator_cannot_run() {
        let pvm = CpuidSpec { pvm: true, ..SPEC };
        assert_eq!(fixed(1, 0, pvm).ecx & (1 << 26), 0, "xsave");
        assert_eq!(fixed(1, 0, pvm).ecx & (1 << 23), 0, "popcnt");
        assert_eq!(fixed(7, 0, pvm).ebx & (1 << 3), 0, "bmi1");
        assert_eq!(fixed(0x8000_0001, 0, pvm).edx & (1 << 27), 0, "rdtscp");
        assert_eq!(fixed(0xd, 0, pvm).eax, 0);
        // Real KVM keeps them.
        assert_ne!(fixed(1, 0, SPEC).ecx & (1 << 26), 0);
        assert_ne!(fixed(7, 0, SPEC).ebx & (1 << 3), 0);
    }
}
