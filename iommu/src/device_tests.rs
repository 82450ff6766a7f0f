use std::sync::atomic::Ordering;

use ferrio_devices::virtio::features::VIRTIO_F_VERSION_1;
use ferrio_devices::virtio::testing::{
    activation, memory, ro, wait_for, wo, Driver, Mem, TestInterrupt,
};
use vm_memory::{Bytes, GuestAddress, IommuMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::fault::{FaultReason, FAULT_F_ADDRESS, FAULT_F_READ};
use crate::request::{Status, MAP_F_READ};
use crate::testing::req;

const REQ_RING: u64 = 0x1000;
const EVT_RING: u64 = 0x4000;
const DATA: u64 = 0x10_0000;

fn config(dev: &VirtioIommu) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    VirtioDevice::<Mem>::read_config(dev, 0, &mut c);
    c
}

#[test]
fn features_and_config_space() {
    let mut dev = VirtioIommu::new(IommuConfig {
        domain_range: (1, 0xffff),
        probe_size: 100,
        ..IommuConfig::default()
    });
    let offered = VirtioDevice::<Mem>::device_features(&dev);
    assert_eq!(offered, 0b1_0111 | VIRTIO_F_EVENT_IDX);
    assert_eq!(
        offered & (VIRTIO_IOMMU_F_BYPASS | VIRTIO_IOMMU_F_BYPASS_CONFIG),
        0
    );
    assert_eq!(offered & VIRTIO_IOMMU_F_MMIO, 0);
    assert_eq!(VirtioDevice::<Mem>::device_type(&dev), 23);
    assert_eq!(VirtioDevice::<Mem>::queue_max_sizes(&dev), &[256, 256]);
    let c = config(&dev);
    let le64 = |at: usize| u64::from_le_bytes(c[at..at + 8].try_into().unwrap());
    let le32 = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
    assert_eq!(le64(0), 0x1000, "page_size_mask");
    assert_eq!((le64(8), le64(16)), (0, (1 << 48) - 1), "input_range");
    assert_eq!((le32(24), le32(28)), (1, 0xffff), "domain_range");
    assert_eq!(le32(32), 104, "probe_size rounded up to 8 bytes");
    assert_eq!(&c[36..40], &[0; 4], "bypass off");
    // Read-only; past the end reads 0.
    VirtioDevice::<Mem>::write_config(&mut dev, 36, &[1]);
    assert_eq!(config(&dev)[36], 0);
    let mut tail = [9u8; 4];
    VirtioDevice::<Mem>::read_config(&dev, 38, &mut tail);
    assert_eq!(tail, [0; 4]);
    // Acked features are a subset of the offer.
    VirtioDevice::<Mem>::set_acked_features(&mut dev, u64::MAX);
    assert_eq!(dev.acked_features, offered);
    // VERSION_1 is the transport's.
    assert_eq!(offered & VIRTIO_F_VERSION_1, 0);
}

#[test]
fn endpoints_are_registered_once() {
    let dev = VirtioIommu::new(IommuConfig::default());
    let ep = dev.add_endpoint(0x18).unwrap();
    assert_eq!(ep.id(), 0x18);
    assert!(matches!(
        dev.add_endpoint(0x18),
        Err(Error::DuplicateEndpoint(0x18))
    ));
    assert_eq!(ep.domain(), None);
}

struct Running<'m> {
    requests: Driver<'m>,
    events: Driver<'m>,
    req_notify: EventFd,
    evt_notify: EventFd,
    interrupt: Arc<TestInterrupt>,
}

fn activate<'m>(dev: &mut VirtioIommu, mem: &'m Mem) -> Running<'m> {
    let requests = Driver::new(mem, REQ_RING, 16);
    let events = Driver::new(mem, EVT_RING, 16);
    let interrupt = Arc::new(TestInterrupt::default());
    let queues = [(REQUEST_QUEUE, &requests), (EVENT_QUEUE, &events)];
    let (act, kicks) = activation(mem, &queues, &interrupt);
    let [req_notify, evt_notify] = <[EventFd; 2]>::try_from(kicks).unwrap();
    let features = VIRTIO_IOMMU_F_MAP_UNMAP | VIRTIO_IOMMU_F_PROBE | VIRTIO_F_EVENT_IDX;
    VirtioDevice::<Mem>::set_acked_features(dev, features);
    dev.activate(act).unwrap();
    Running {
        requests,
        events,
        req_notify,
        evt_notify,
        interrupt,
    }
}

impl Running<'_> {
    /// Sends one request through the running worker; its status.
    fn send(&mut self, mem: &Mem, n: u16, bytes: &[u8]) -> u8 {
        let at = DATA + u64::from(n) * 0x100;
        mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let status = at + 0x80;
        self.requests
            .add(&[ro(at, bytes.len() as u32), wo(status, 4)]);
        self.req_notify.write(1).unwrap();
        wait_for("the request to complete", || {
            self.requests.used_idx() == n + 1
        });
        assert_eq!(self.requests.used(n).1, 4);
        mem.read_obj(GuestAddress(status)).unwrap()
    }
}

#[test]
fn worker_serves_requests_and_reports_faults() {
    let mem = memory();
    let mut dev = VirtioIommu::new(IommuConfig::default());
    let ep = dev.add_endpoint(0x8).unwrap();
    let dma = IommuMemory::new(mem.clone(), ep.clone(), true, ());
    let mut run = activate(&mut dev, &mem);
    assert!(dev.is_active());
    // Unattached: DMA faults (domain reason); no event buffer yet, so it waits.
    let mut byte = [0u8; 1];
    assert!(dma.read_slice(&mut byte, GuestAddress(0x3000)).is_err());
    assert_eq!(dev.pending_faults(), 1);
    let ok = Status::Ok as u8;
    assert_eq!(run.send(&mem, 0, &req::attach(1, 0x8)), ok);
    assert_eq!(ep.domain(), Some(1));
    assert_eq!(
        run.send(&mem, 1, &req::map(1, 0x1000, 0x1fff, 0x20_0000, MAP_F_READ)),
        ok
    );
    mem.write_slice(&[0x5a; 4], GuestAddress(0x20_0010))
        .unwrap();
    let mut buf = [0u8; 4];
    dma.read_slice(&mut buf, GuestAddress(0x1010)).unwrap();
    assert_eq!(buf, [0x5a; 4]);
    assert!(run.interrupt.queue_count(REQUEST_QUEUE) > 0);

    // The driver posts event buffers: the pending fault is reported.
    let ev = DATA + 0x8000;
    run.events.add(&[wo(ev, 24)]);
    run.events.add(&[wo(ev + 24, 24)]);
    run.evt_notify.write(1).unwrap();
    wait_for("the first event", || run.events.used_idx() == 1);
    let mut event = [0u8; 24];
    mem.read_slice(&mut event, GuestAddress(ev)).unwrap();
    assert_eq!(event[0], FaultReason::Domain as u8);
    assert_eq!(
        u32::from_le_bytes(event[4..8].try_into().unwrap()),
        FAULT_F_READ | FAULT_F_ADDRESS
    );
    assert_eq!(u32::from_le_bytes(event[8..12].try_into().unwrap()), 0x8);
    assert_eq!(
        u64::from_le_bytes(event[16..24].try_into().unwrap()),
        0x3000
    );

    // A fault while active wakes the worker by itself.
    assert!(!dma.check_range(GuestAddress(0x1ff0), 0x20, Permissions::Read));
    wait_for("the second event", || run.events.used_idx() == 2);
    mem.read_slice(&mut event, GuestAddress(ev + 24)).unwrap();
    assert_eq!(event[0], FaultReason::Mapping as u8);
    assert_eq!(
        u64::from_le_bytes(event[16..24].try_into().unwrap()),
        0x2000
    );
    assert!(run.interrupt.queue_count(EVENT_QUEUE) > 0);
    assert_eq!(run.interrupt.errors.load(Ordering::SeqCst), 0);

    // Reset: no domain, DMA faults again, the device can be activated again.
    VirtioDevice::<Mem>::reset(&mut dev);
    assert!(!dev.is_active());
    assert_eq!(dev.domain_count(), 0);
    assert_eq!(ep.domain(), None);
    assert!(dma.read_slice(&mut buf, GuestAddress(0x1010)).is_err());
    let mut run = activate(&mut dev, &mem);
    assert_eq!(run.send(&mem, 0, &req::attach(2, 0x8)), ok);
    assert_eq!(ep.domain(), Some(2));
}

#[test]
fn malformed_ring_sets_needs_reset() {
    let mem = memory();
    let mut dev = VirtioIommu::new(IommuConfig::default());
    let run = activate(&mut dev, &mem);
    run.requests.set_avail_idx(1000);
    run.req_notify.write(1).unwrap();
    wait_for("device_error", || {
        run.interrupt.errors.load(Ordering::SeqCst) == 1
    });
}

#[test]
fn activation_needs_both_queues() {
    let mem = memory();
    let mut dev = VirtioIommu::new(IommuConfig::default());
    let requests = Driver::new(&mem, REQ_RING, 16);
    let irq = Arc::new(TestInterrupt::default());
    let result = dev.activate(activation(&mem, &[(REQUEST_QUEUE, &requests)], &irq).0);
    assert!(matches!(result, Err(ActivateError::MissingQueue(1))));
    assert!(!dev.is_active());
}
