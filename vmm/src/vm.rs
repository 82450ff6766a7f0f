//! Builds a VM from a [`VmConfig`] and runs it to completion: KVM set-up, guest memory,
//! ACPI and boot structures, legacy devices, vCPU threads and the I/O thread, then waits
//! for the first stop reason. Every thread runs under its seccomp filter
//! ([`crate::seccomp`]): each installs it on itself, the main thread once the VM runs
//! ([`Vm::confine_main_thread`]).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use ferrio_devices::legacy::{AcpiPmDevice, I8042Device};
use ferrio_devices::virtio::block::IoEngine;
use ferrio_devices::virtio::worker_util::{ThreadHook, WorkerKind};
use ferrio_devices::{Bus, GuestEvent, GuestEventSink, InterruptLine, SharedDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::viot::ViotConfig;
use crate::acpi::{create_acpi_tables, AcpiConfig};
use crate::boot::{self, BootSetup};
use crate::config::{SerialConfig, VmConfig};
use crate::console::{ConsoleOut, Serial, StdinForwarder};
use crate::cpu::cpuid::{self, CpuidSpec};
use crate::cpu::{pvm, regs, vcpu};
use crate::error::Error;
use crate::exit::{StopReason, StopSignal};
use crate::interrupts::GsiRouting;
use crate::layout::{self, pio};
use crate::pci::placement::Placement;
use crate::pci::{self, PciBuilder};
use crate::seccomp::{Seccomp, ThreadKind, VmProfile};
use crate::{memory, mptable};

/// How long a guest that announced a panic may keep running to finish its report
/// (with `panic=-1` it resets much sooner).
const PANIC_GRACE: Duration = Duration::from_secs(5);

/// Address of the 3-page TSS region KVM needs on Intel hosts (just below the BIOS).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// An irqfd-backed interrupt line towards the in-kernel irqchip.
struct IrqFd(EventFd);

impl InterruptLine for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// An eventfd the I/O thread listens to.
struct Notify(EventFd);

impl InterruptLine for Notify {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A VM that was built and is running. It owns the KVM and VM descriptors; the process
/// exits after [`Vm::wait`] while it is still alive (vCPU threads are not joined).
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    _routing: Arc<GsiRouting>,
    stop: Arc<StopSignal>,
    serial: Arc<Mutex<Serial>>,
    _vcpus: Vec<JoinHandle<()>>,
    _io_thread: JoinHandle<()>,
    timeout: Option<Duration>,
    started: Instant,
    soft_ints: Arc<AtomicU64>,
    seccomp: Arc<Seccomp>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: &VmConfig) -> Result<Self, Error> {
        let started = Instant::now();
        // Compiled (and the SIGSYS handler installed) before any thread starts.
        let seccomp = Arc::new(Seccomp::new(config.seccomp, &vm_profile(config))?);
        let kvm = open_kvm(config)?;
        let pvm = pvm::host_is_pvm();
        if pvm {
            tracing::info!("host KVM is PVM: completing int3/int n for the emulator, hiding CPUID features it cannot run");
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let routing = GsiRouting::new(vm.clone()).map_err(io_err("KVM_SET_GSI_ROUTING"))?;

        let mem =
            memory::create_guest_memory(config.memory_bytes).map_err(|e| Error::GuestMemory {
                size: config.memory_bytes,
                detail: e.to_string(),
            })?;
        register_memory(&vm, &mem)?;

        let ram_end = memory::ram_end(config.memory_bytes);
        let pci_segments = layout::pci_segments(1, ram_end);
        let mut pci = PciBuilder::new(routing.clone(), &pci_segments)?;
        let viot = add_pci_devices(config, &mut pci, &mem, seccomp.thread_hook(), &vm)?;
        let rsdp = create_acpi_tables(
            &mem,
            &AcpiConfig {
                vcpus: config.cpus,
                pci_segments: &pci_segments,
                viot: viot.as_ref(),
            },
        )?;
        mptable::setup_mptable(&mem, config.cpus)?;
        let entry = boot::load(
            &mem,
            &BootSetup {
                kernel: &config.kernel,
                initramfs: config.initramfs.as_deref(),
                cmdline: &config.cmdline,
                mem_size: config.memory_bytes,
                e820: &memory::e820_map(config.memory_bytes, &pci_segments),
                rsdp,
            },
        )?;

        let stop = Arc::new(StopSignal::new().map_err(io_err("creating the stop eventfd"))?);
        let events: Arc<dyn GuestEventSink> = stop.clone();
        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        // COM1, its IRQ and the "guest drained the FIFO" notification.
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating the COM1 irqfd"))?;
        vm.register_irqfd(&irq, pio::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let drained = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating the console eventfd"))?;
        let drained_line = drained
            .try_clone()
            .map_err(io_err("cloning the console eventfd"))?;
        let out =
            ConsoleOut::open(&config.serial, events.clone()).map_err(|source| {
                match &config.serial {
                    SerialConfig::File(path) => Error::SerialFile {
                        path: path.clone(),
                        source,
                    },
                    _ => Error::Io {
                        what: "opening the console output",
                        source,
                    },
                }
            })?;
        let serial = Arc::new(Mutex::new(Serial::new(
            Arc::new(IrqFd(irq)),
            out,
            Some(Arc::new(Notify(drained_line))),
        )));
        let serial_dev: SharedDevice = serial.clone();
        pio_bus.insert(serial_dev, pio::COM1, pio::COM1_LEN)?;
        let i8042: SharedDevice = Arc::new(Mutex::new(I8042Device::new(events.clone())));
        pio_bus.insert(i8042, pio::I8042, pio::I8042_LEN)?;
        let acpi_pm: SharedDevice = Arc::new(Mutex::new(AcpiPmDevice::new(
            events,
            pio::ACPI_S5_SLP_TYP,
            pio::ACPI_RESET_VALUE,
        )));
        pio_bus.insert(acpi_pm, pio::ACPI_SLEEP_CONTROL, pio::ACPI_REGS_LEN)?;

        pci.attach(vm.clone(), &mmio_bus, &pio_bus, mem.num_regions() as u32)?;

        let io_thread = spawn_io_thread(
            &serial,
            drained,
            &config.serial,
            stop.clone(),
            seccomp.clone(),
        )?;

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let soft_ints = Arc::new(AtomicU64::new(0));
        let ctx = vcpu::VcpuContext {
            soft_ints: soft_ints.clone(),
            pio: pio_bus,
            mmio: mmio_bus,
            mem: mem.clone(),
            stop: stop.clone(),
            pvm,
            seccomp: seccomp.clone(),
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpuid::fixup(
                &supported,
                CpuidSpec {
                    cpu_id: id,
                    cpu_count: config.cpus,
                    pvm,
                },
            )
            .map_err(|e| Error::Cpuid(format!("{e:?}")))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            if id == 0 {
                regs::setup_boot_vcpu(&fd, &mem, entry)?;
            }
            vcpus.push((id, fd));
        }
        // Start them only once all exist: the boot vCPU may send INIT/SIPI at once.
        let handles = vcpus
            .into_iter()
            .map(|(id, fd)| vcpu::spawn(id, fd, ctx.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("spawning a vCPU thread"))?;
        tracing::debug!("VM started in {:?}", started.elapsed());
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            _routing: routing,
            stop,
            serial,
            _vcpus: handles,
            _io_thread: io_thread,
            timeout: config.timeout,
            started,
            soft_ints,
            seccomp,
        })
    }

    /// Installs the main thread's seccomp filter: call it once the main thread has
    /// done its own set-up (signal handlers, terminal mode), before [`Vm::wait`].
    pub fn confine_main_thread(&self) -> Result<(), Error> {
        Ok(self.seccomp.install(ThreadKind::Main)?)
    }

    /// The stop signal (for SIGINT/SIGTERM handling).
    pub fn stop_signal(&self) -> &StopSignal {
        &self.stop
    }

    /// Blocks until the VM stops or the timeout expires; flushes the console.
    pub fn wait(&self) -> StopReason {
        let fd = self.stop.eventfd().as_raw_fd();
        let mut panic_deadline = None;
        let reason = loop {
            if let Some(r) = self.stop.reason() {
                break r;
            }
            if let Some(sig) = crate::exit::caught_signal() {
                break StopReason::Signal(sig);
            }
            if self.stop.has_panicked() {
                let deadline = *panic_deadline.get_or_insert_with(|| Instant::now() + PANIC_GRACE);
                if Instant::now() >= deadline {
                    break StopReason::Guest(GuestEvent::Panic);
                }
            }
            let until_timeout = match self.timeout {
                Some(t) => match t.checked_sub(self.started.elapsed()) {
                    Some(r) => r,
                    None => break StopReason::Timeout(t),
                },
                None => Duration::from_secs(3600),
            };
            let remaining = match panic_deadline {
                Some(d) => until_timeout.min(d.saturating_duration_since(Instant::now())),
                None => until_timeout,
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = remaining.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `pfd` is a valid pollfd array of length 1 for the call's duration.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        };
        self.stop.stop(reason.clone());
        tracing::info!(
            "VM ran {:.1} s; {} int3/int n completed for the PVM emulator",
            self.started.elapsed().as_secs_f64(),
            self.soft_ints.load(Ordering::Relaxed)
        );
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = std::io::Write::flush(serial.writer_mut()) {
            tracing::warn!("console flush failed: {e}");
        }
        reason
    }
}

fn open_kvm(config: &VmConfig) -> Result<Kvm, Error> {
    let path = &config.kvm_device;
    let open_err = |source| Error::KvmOpen {
        path: path.clone(),
        source,
    };
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(open_err)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::SetTssAddr, "SET_TSS_ADDR"),
        (Cap::Pit2, "PIT2"),
        (Cap::ExtCpuid, "EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if usize::from(config.cpus) > max {
        return Err(Error::TooManyVcpus {
            requested: config.cpus,
            max,
        });
    }
    Ok(kvm)
}

/// Builds the configured virtio devices onto segment 0 (the virtio-iommu last, after
/// its endpoints); returns what the VIOT must describe, if there is an IOMMU. A
/// device with VFs becomes an SR-IOV PF; the VFs are built through it, when the guest
/// enables them.
fn add_pci_devices(
    config: &VmConfig,
    pci: &mut PciBuilder,
    mem: &GuestMemoryMmap,
    hook: ThreadHook,
    vm: &Arc<VmFd>,
) -> Result<Option<ViotConfig>, Error> {
    let mut place = Placement::new(pci, mem.clone(), config.iommu).with_thread_hook(hook);
    if let Some(c) = &config.console {
        let address = place.add(pci::console::create(&c.backend)?, c.slot, c.iommu)?;
        tracing::info!(%address, iommu = c.iommu, "virtio-console");
    }
    for d in config.disks.iter().filter(|d| !d.is_vf()) {
        let vfs = config.disk_vfs(d);
        if vfs.is_empty() {
            let address = place.add(pci::disk::create(d)?, d.slot, d.iommu)?;
            tracing::info!(%address, path = %d.path.display(), iommu = d.iommu, "virtio-blk");
            continue;
        }
        let vf_devices = vfs
            .iter()
            .map(|v| Ok((pci::disk::create(v)?, v.iommu)))
            .collect::<Result<Vec<_>, Error>>()?;
        let pf = (pci::disk::create(d)?, d.iommu);
        let (address, vf_addresses) = place.add_pf(pf, vf_devices, d.slot)?;
        tracing::info!(%address, path = %d.path.display(), iommu = d.iommu, vfs = vfs.len(), "virtio-blk SR-IOV PF");
        for (v, at) in vfs.iter().zip(vf_addresses) {
            tracing::info!(vf = %at, path = %v.path.display(), iommu = v.iommu, "virtio-blk VF");
        }
    }
    for n in config.nets.iter().filter(|n| !n.is_vf()) {
        let vfs = config.net_vfs(n);
        if vfs.is_empty() {
            let address = place.add(pci::net::create(n)?, n.slot, n.iommu)?;
            tracing::info!(%address, mac = %n.mac, iommu = n.iommu, "virtio-net");
            continue;
        }
        let vf_devices = vfs
            .iter()
            .map(|v| Ok((pci::net::create(v)?, v.iommu)))
            .collect::<Result<Vec<_>, Error>>()?;
        let pf = (pci::net::create(n)?, n.iommu);
        let (address, vf_addresses) = place.add_pf(pf, vf_devices, n.slot)?;
        tracing::info!(%address, mac = %n.mac, iommu = n.iommu, vfs = vfs.len(), "virtio-net SR-IOV PF");
        for (v, at) in vfs.iter().zip(vf_addresses) {
            tracing::info!(vf = %at, mac = %v.mac, iommu = v.iommu, "virtio-net VF");
        }
    }
    let kvm_vfio = crate::vfio::attach::KvmVfio::new(vm.clone());
    for d in &config.devices {
        let host = crate::vfio::host::check(&d.path, d.backend, &config.vfio_host)
            .map_err(crate::config::ConfigError::from)?;
        let routing = place.routing().clone();
        let opened = crate::vfio::attach::open(&host, &routing, &kvm_vfio)?;
        let mirror: Option<Arc<dyn ferrio_iommu::DmaMirror>> = if d.iommu {
            Some(Arc::new(crate::vfio::attach::VfioMirror {
                dma: opened.dma.clone(),
                mem: mem.clone(),
            }))
        } else {
            crate::vfio::attach::map_guest_ram(&opened.dma, mem, &host.bdf)?;
            None
        };
        let address = place.add_passthrough(opened.device, d.slot, mirror)?;
        tracing::info!(%address, bdf = %host.bdf, iommu = d.iommu, "VFIO passthrough");
    }
    place.finish()
}

/// What the threads of `config`'s VM do beyond the basics (the worker kinds its
/// devices start, passthrough), which their seccomp filters must allow: keep in step
/// with [`add_pci_devices`].
fn vm_profile(config: &VmConfig) -> VmProfile {
    let mut kinds = BTreeSet::new();
    if config.console.is_some() {
        kinds.insert(WorkerKind::Console);
    }
    for d in &config.disks {
        kinds.insert(match d.io_engine {
            IoEngine::Sync => WorkerKind::Blk,
            IoEngine::Uring => WorkerKind::BlkUring,
        });
    }
    if !config.nets.is_empty() {
        kinds.insert(WorkerKind::Net);
    }
    if config.iommu {
        kinds.insert(WorkerKind::Iommu);
    }
    VmProfile {
        workers: kinds,
        passthrough: !config.devices.is_empty(),
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
        // `mem`; a clone of `mem` (an Arc) is kept by every vCPU thread, which run until
        // the process exits, so the mapping outlives the VM's use of it.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn spawn_io_thread(
    serial: &Arc<Mutex<Serial>>,
    drained: EventFd,
    serial_cfg: &SerialConfig,
    stop: Arc<StopSignal>,
    seccomp: Arc<Seccomp>,
) -> Result<JoinHandle<()>, Error> {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| Error::EventManager(format!("{e:?}")))?;
    if *serial_cfg == SerialConfig::Stdio {
        let fwd =
            StdinForwarder::new(serial.clone(), drained).map_err(io_err("duplicating stdin"))?;
        manager.add_subscriber(Arc::new(Mutex::new(fwd)));
    }
    std::thread::Builder::new()
        .name("io".into())
        .spawn(move || {
            if let Err(e) = seccomp.install(ThreadKind::Io) {
                stop.stop(StopReason::IoThread(e.to_string()));
                return;
            }
            while !stop.is_stopping() {
                if let Err(e) = manager.run_with_timeout(1000) {
                    stop.stop(StopReason::IoThread(format!("event loop failed: {e:?}")));
                }
            }
        })
        .map_err(io_err("spawning the I/O thread"))
}
