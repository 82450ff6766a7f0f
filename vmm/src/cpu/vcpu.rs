//! vCPU threads: configuration of each vCPU and the KVM_RUN loop that dispatches exits
//! to the port-I/O and MMIO buses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ferrio_devices::{Bus, GuestEvent};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use super::pvm;
use crate::exit::{StopReason, StopSignal};
use crate::seccomp::{Seccomp, ThreadKind};

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub stop: Arc<StopSignal>,
    pub pvm: bool,
    /// Software interrupts completed for the PVM emulator, all vCPUs together.
    pub soft_ints: Arc<AtomicU64>,
    /// The filters; each vCPU thread installs its own before its first KVM_RUN.
    pub seccomp: Arc<Seccomp>,
}

/// Port 0x80 (POST code / I/O delay): written constantly by Linux, meaningless here.
const PORT_POST: u16 = 0x80;

/// Starts the thread running vCPU `id`.
pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            if let Err(e) = ctx.seccomp.install(ThreadKind::Vcpu) {
                let message = e.to_string();
                ctx.stop.stop(StopReason::VcpuError { cpu: id, message });
                return;
            }
            if let Err(message) = run_loop(id, &mut vcpu, &ctx) {
                ctx.stop.stop(StopReason::VcpuError { cpu: id, message });
            }
        })
}

/// Runs the vCPU until the VM stops; an `Err` is a fatal vCPU error.
fn run_loop(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Result<(), String> {
    while !ctx.stop.is_stopping() {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) && port != PORT_POST {
                    tracing::trace!("vcpu{id}: unclaimed port read {port:#x}/{}", data.len());
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) && port != PORT_POST {
                    tracing::trace!("vcpu{id}: unclaimed port write {port:#x} {data:x?}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::debug!("vcpu{id}: unclaimed MMIO read {addr:#x}/{}", data.len());
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::debug!("vcpu{id}: unclaimed MMIO write {addr:#x} {data:x?}");
                }
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let event = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => GuestEvent::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => GuestEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => GuestEvent::Panic,
                    other => return Err(format!("unexpected KVM system event {other}")),
                };
                ctx.stop.stop(StopReason::Guest(event));
            }
            // A triple fault: what a PC does next is reset.
            Ok(VcpuExit::Shutdown) => ctx.stop.stop(StopReason::Guest(GuestEvent::Reset)),
            Ok(VcpuExit::Hlt) => return Err("guest halted with interrupts off (HLT exit)".into()),
            Ok(VcpuExit::InternalError) => {
                let soft = pvm::handle_internal_error(vcpu, &ctx.mem, ctx.pvm)
                    .map_err(|e| e.to_string())?;
                let n = ctx.soft_ints.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::trace!(
                    "vcpu{id}: completed int {:#x} for the emulator ({n} so far)",
                    soft.vector
                );
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!(
                    "KVM_RUN entry failed: hardware reason {reason:#x} on host cpu {cpu}"
                ))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => return Err(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
    Ok(())
}
