//! vCPU configuration (CPUID, registers, MSRs, LAPIC), PVM-host workarounds and the
//! vCPU threads.

pub mod cpuid;
pub mod pvm;
pub mod regs;
pub mod vcpu;
