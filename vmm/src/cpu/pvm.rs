//! Hosts whose KVM is the PVM flavour (`/sys/module/kvm_pvm`) execute guest kernel code
//! in KVM's instruction emulator. It gives up on `int3` / `int n` in long mode with
//! KVM_EXIT_INTERNAL_ERROR (suberror EMULATION). For those two instructions ferrio
//! completes the work itself: it advances RIP past the instruction and injects the
//! exception (or interrupt) with KVM_SET_VCPU_EVENTS, which the guest then handles as
//! if the CPU had raised it. Every other emulation failure is reported with the guest
//! RIP and instruction bytes.

use std::fmt;
use std::path::Path;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// True when this host's /dev/kvm runs guest kernel code through the emulator.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The instruction at the failing RIP, as far as KVM or guest memory told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedInsn {
    pub rip: u64,
    pub bytes: Vec<u8>,
}

impl fmt::Display for FailedInsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest RIP {:#x}, instruction bytes [", self.rip)?;
        for (i, b) in self.bytes.iter().enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        write!(f, "]")
    }
}

/// Why an internal-error exit could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("KVM could not emulate a guest instruction: {0}")]
    Emulation(FailedInsn),
    #[error("KVM internal error, suberror {suberror}, data {data:x?}")]
    Other { suberror: u32, data: Vec<u64> },
    #[error("KVM {what} failed while handling an emulation failure: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// A software interrupt instruction ferrio can complete on the emulator's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftInt {
    pub vector: u8,
    /// Bytes to skip, prefixes included.
    pub len: u8,
}

/// Decodes `int3` (CC) or `int imm8` (CD ib), skipping legacy and REX prefixes.
pub fn decode_soft_int(bytes: &[u8]) -> Option<SoftInt> {
    let prefixes = bytes
        .iter()
        .take_while(|&&b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf2 | 0xf3 | 0x40..=0x4f
            )
        })
        .count();
    let len = |n: usize| u8::try_from(prefixes + n).ok();
    match bytes.get(prefixes..)? {
        [0xcc, ..] => Some(SoftInt {
            vector: 3,
            len: len(1)?,
        }),
        [0xcd, vector, ..] => Some(SoftInt {
            vector: *vector,
            len: len(2)?,
        }),
        _ => None,
    }
}

/// Handles a KVM_EXIT_INTERNAL_ERROR. Returns the software interrupt it completed, or
/// the reason it could not (the vCPU must then stop).
pub fn handle_internal_error(
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
    pvm: bool,
) -> Result<SoftInt, InternalError> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
    // `internal` member of the union; `emulation_failure` overlays it with the same
    // leading suberror/ndata fields and is what KVM writes for suberror EMULATION.
    // Both are plain-old-data, so reading either is defined.
    let (suberror, ndata, data, flags, insn) = unsafe {
        let internal = run.__bindgen_anon_1.internal;
        let ef = run.__bindgen_anon_1.emulation_failure;
        (
            internal.suberror,
            internal.ndata,
            internal.data,
            ef.flags,
            ef.__bindgen_anon_1.__bindgen_anon_1,
        )
    };
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        let n = (ndata as usize).min(data.len());
        return Err(InternalError::Other {
            suberror,
            data: data[..n].to_vec(),
        });
    }
    let kvm = |what| move |source| InternalError::Kvm { what, source };
    let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let bytes = if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
        let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
        insn.insn_bytes[..n].to_vec()
    } else {
        read_insn(vcpu, mem, regs.rip)
    };
    let failed = FailedInsn {
        rip: regs.rip,
        bytes,
    };
    let soft = match decode_soft_int(&failed.bytes) {
        Some(s) if pvm => s,
        _ => return Err(InternalError::Emulation(failed)),
    };
    let mut events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    events.flags = 0;
    if soft.vector < 32 {
        events.exception.injected = 1;
        events.exception.nr = soft.vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
    } else {
        events.interrupt.injected = 1;
        events.interrupt.nr = soft.vector;
        events.interrupt.soft = 0;
    }
    regs.rip = regs.rip.wrapping_add(u64::from(soft.len));
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_vcpu_events(&events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(soft)
}

/// Reads up to 15 instruction bytes at the guest virtual address `rip`.
fn read_insn(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let Ok(t) = vcpu.translate_gva(rip) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let mut buf = [0u8; 15];
    // Stop at a page boundary: the next page may map elsewhere.
    let n = (0x1000 - (t.physical_address & 0xfff)).min(15) as usize;
    match mem.read_slice(&mut buf[..n], GuestAddress(t.physical_address)) {
        Ok(()) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_int3_and_int_n() {
        assert_eq!(
            decode_soft_int(&[0xcc, 0x90]),
            Some(SoftInt { vector: 3, len: 1 })
        );
        assert_eq!(
            decode_soft_int(&[0xcd, 0x80]),
            Some(SoftInt {
                vector: 0x80,
                len: 2
            })
        );
        assert_eq!(
            decode_soft_int(&[0x3e, 0xcc]),
            Some(SoftInt { vector: 3, len: 2 })
        );
        assert_eq!(decode_soft_int(&[0x0f, 0x01, 0xc1]), None, "vmcall");
        assert_eq!(decode_soft_int(&[0xcd]), None, "truncated");
        assert_eq!(decode_soft_int(&[]), None);
        assert_eq!(decode_soft_int(&[0x66; 15]), None);
    }

    #[test]
    fn failure_report_shows_rip_and_bytes() {
        let f = FailedInsn {
            rip: 0xffff_ffff_8100_0000,
            bytes: vec![0x0f, 0xae, 0x27],
        };
        assert_eq!(
            f.to_string(),
            "guest RIP 0xffffffff81000000, instruction bytes [0f ae 27]"
        );
    }
}
