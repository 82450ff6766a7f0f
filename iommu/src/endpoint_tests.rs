use ferrio_devices::virtio::testing::{memory, Mem};
use vm_memory::{Bytes, GuestMemory, IommuMemory};

use super::*;
use crate::fault::FaultReason;
use crate::mapping::Access;
use crate::{IommuConfig, VirtioIommu};

const RW: Access = Access::READ_WRITE;
const RO: Access = Access::READ_ONLY;
const EP: u32 = 0x8;

struct Setup {
    iommu: VirtioIommu,
    endpoint: Endpoint,
    ram: Mem,
    dma: IommuMemory<Mem, Endpoint>,
}

/// An endpoint attached to domain 1, its memory as a device sees it, and RAM.
fn setup() -> Setup {
    let iommu = VirtioIommu::new(IommuConfig::default());
    let endpoint = iommu.add_endpoint(EP).unwrap();
    iommu.shared().lock().attach(1, EP).unwrap().wait();
    let ram = memory();
    let dma = IommuMemory::new(ram.clone(), endpoint.clone(), true, ());
    Setup {
        iommu,
        endpoint,
        ram,
        dma,
    }
}

impl Setup {
    fn map(&self, virt: u64, len: u64, phys: u64, access: Access) {
        self.iommu
            .shared()
            .lock()
            .map(1, virt, virt + len - 1, phys, access)
            .unwrap();
    }

    fn unmap(&self, virt: u64, len: u64) {
        self.iommu
            .shared()
            .lock()
            .unmap(1, virt, virt + len - 1)
            .unwrap()
            .wait();
    }

    fn faults(&self) -> Vec<Fault> {
        std::iter::from_fn(|| self.iommu.shared().faults.pop()).collect()
    }

    fn ram_bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.ram.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }
}

fn pieces(e: &Endpoint, iova: u64, len: usize, access: Permissions) -> Vec<(u64, usize)> {
    e.translate(GuestAddress(iova), len, access)
        .unwrap()
        .map(|r| (r.base.0, r.length))
        .collect()
}

#[test]
fn translation_spans_two_adjacent_mappings() {
    let s = setup();
    s.map(0x1000, 0x1000, 0x10_0000, RW);
    s.map(0x2000, 0x1000, 0x20_0000, RW);
    assert_eq!(
        pieces(&s.endpoint, 0x1800, 0x1000, Permissions::Write),
        vec![(0x10_0800, 0x800), (0x20_0000, 0x800)]
    );
    let data: Vec<u8> = (0..0x1000u32).map(|i| i as u8).collect();
    s.dma.write_slice(&data, GuestAddress(0x1800)).unwrap();
    assert_eq!(s.ram_bytes(0x10_0800, 0x800), &data[..0x800]);
    assert_eq!(s.ram_bytes(0x20_0000, 0x800), &data[0x800..]);
    let mut back = vec![0u8; 0x1000];
    s.dma.read_slice(&mut back, GuestAddress(0x1800)).unwrap();
    assert_eq!(back, data);
    assert!(s.faults().is_empty());
}

#[test]
fn crossing_into_an_unmapped_page_writes_nothing_and_faults() {
    let s = setup();
    s.map(0x1000, 0x1000, 0x10_0000, RW);
    s.ram
        .write_slice(&[0xaa; 0x1000], GuestAddress(0x10_0000))
        .unwrap();
    assert!(!s
        .dma
        .check_range(GuestAddress(0x1800), 0x1000, Permissions::Write));
    let err = s.dma.write_slice(&[0x55; 0x1000], GuestAddress(0x1800));
    assert!(err.is_err());
    // The whole range is translated before any byte moves: the mapped half is intact.
    assert_eq!(s.ram_bytes(0x10_0000, 0x1000), vec![0xaa; 0x1000]);
    let faults = s.faults();
    assert_eq!(faults.len(), 2, "check_range and write_slice: {faults:?}");
    for f in faults {
        assert_eq!(
            f,
            Fault {
                endpoint: EP,
                reason: FaultReason::Mapping,
                address: 0x2000,
                access: Permissions::Write,
            }
        );
    }
}

#[test]
fn read_only_mapping_refuses_writes() {
    let s = setup();
    s.map(0x4000, 0x1000, 0x30_0000, RO);
    s.ram
        .write_slice(&[7; 16], GuestAddress(0x30_0010))
        .unwrap();
    let mut buf = [0u8; 16];
    s.dma.read_slice(&mut buf, GuestAddress(0x4010)).unwrap();
    assert_eq!(buf, [7; 16]);
    assert!(s.dma.write_slice(&[1; 16], GuestAddress(0x4010)).is_err());
    assert_eq!(s.ram_bytes(0x30_0010, 16), vec![7; 16]);
    // Also when the read cached the mapping first (a permission miss in the IOTLB).
    assert!(s
        .endpoint
        .translate(GuestAddress(0x4000), 8, Permissions::ReadWrite)
        .is_err());
    let faults = s.faults();
    assert_eq!(faults.len(), 2);
    assert_eq!(faults[0].address, 0x4010);
    assert_eq!(faults[0].access, Permissions::Write);
    assert_eq!(faults[1].access, Permissions::ReadWrite);
}

#[test]
fn unmap_invalidates_the_iotlb() {
    let s = setup();
    s.map(0x1000, 0x1000, 0x10_0000, RW);
    let mut buf = [0u8; 8];
    s.dma.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
    // Cached now.
    {
        let tlb = s.endpoint.core.iotlb.read().unwrap();
        assert!(Iotlb::lookup(&*tlb, GuestAddress(0x1000), 8, Permissions::Read).is_ok());
    }
    s.unmap(0x1000, 0x1000);
    assert!(s.dma.read_slice(&mut buf, GuestAddress(0x1000)).is_err());
    assert_eq!(s.faults().len(), 1);
}

#[test]
fn unattached_endpoint_faults() {
    let s = setup();
    s.map(0x1000, 0x1000, 0x10_0000, RW);
    s.iommu.shared().lock().detach(1, EP).unwrap().wait();
    assert_eq!(s.endpoint.domain(), None);
    assert!(s.dma.write_slice(&[1], GuestAddress(0x1000)).is_err());
    let faults = s.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].reason, FaultReason::Domain);
}

#[test]
fn addresses_beyond_the_input_range_fault_without_panicking() {
    let s = setup();
    for (iova, len) in [(1u64 << 48, 1usize), ((1 << 48) - 1, 2), (u64::MAX, 2)] {
        assert!(s
            .endpoint
            .translate(GuestAddress(iova), len, Permissions::Read)
            .is_err());
    }
    let faults = s.faults();
    assert_eq!(faults.len(), 3);
    assert_eq!(faults[0].address, 1 << 48);
    assert_eq!(faults[1].address, 1 << 48);
    assert_eq!(faults[2].address, u64::MAX);
    // An empty access translates to nothing and faults nothing.
    assert!(pieces(&s.endpoint, 0x9000, 0, Permissions::Read).is_empty());
    assert!(s.faults().is_empty());
}

#[test]
fn translations_hold_no_lock() {
    let s = setup();
    s.map(0x1000, 0x1000, 0x10_0000, RW);
    s.map(0x8000, 0x1000, 0x18_0000, RO);
    // A live translation (cache hit) while another one refills the cache and an UNMAP
    // invalidates it: nothing blocks.
    let held = s
        .endpoint
        .translate(GuestAddress(0x1000), 0x10, Permissions::Read)
        .unwrap();
    assert_eq!(
        pieces(&s.endpoint, 0x8000, 0x10, Permissions::Read),
        vec![(0x18_0000, 0x10)]
    );
    s.unmap(0x1000, 0x1000);
    assert_eq!(
        held.map(|r| (r.base.0, r.length)).collect::<Vec<_>>(),
        vec![(0x10_0000, 0x10)]
    );
    assert_eq!(s.endpoint.id(), EP);
    assert!(s.endpoint.dma_tracker().is_tracked());
}
