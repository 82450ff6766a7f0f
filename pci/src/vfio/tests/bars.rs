//! BAR layout: direct (mmap-ed) areas around the MSI-X structures, and bounded
//! trapped accesses.

use super::fake::{Bar0Mmap, Call, NicSpec};
use super::*;
use crate::vfio::bars::direct_layout;
use crate::vfio::interrupts::MsixLayout;
use crate::vfio::{RegionInfo, REGION_MMAP, REGION_READ};
use crate::DirectArea;

fn offsets(areas: &[DirectArea]) -> Vec<(u64, u64)> {
    areas.iter().map(|a| (a.offset, a.size)).collect()
}

#[test]
fn sparse_mmap_layout_excludes_table_and_pba_pages() {
    let fake = fake::FakeDevice::nic(NicSpec::default());
    let dev =
        VfioPciDevice::new(fake.clone(), fake::Vectors::new(8), VfioOptions::default()).unwrap();
    // The host's sparse areas are [0, 0x2000) and the PBA page [0x3000, 0x4000); the
    // PBA page is trapped too.
    assert_eq!(offsets(&dev.direct_areas(0)), vec![(0, 0x2000)]);
    let mmaps: Vec<Call> = fake
        .log
        .take()
        .into_iter()
        .filter(|c| matches!(c, Call::Mmap { .. }))
        .collect();
    assert_eq!(
        mmaps,
        vec![Call::Mmap {
            index: 0,
            offset: 0,
            size: 0x2000
        }]
    );
    // BAR 2 is not mmap-able; BAR 4 is not a BAR; unknown BARs have none.
    assert!(dev.direct_areas(2).is_empty());
    assert!(dev.direct_areas(4).is_empty());
    assert!(dev.direct_areas(9).is_empty());
    let area = dev.direct_areas(0)[0];
    assert_ne!(area.host_addr, 0);
    assert_eq!(area.host_addr % 0x1000, 0);
}

#[test]
fn whole_region_mmap_gives_the_same_layout() {
    let spec = NicSpec {
        bar0_mmap: Bar0Mmap::Whole,
        ..NicSpec::default()
    };
    let (dev, _, _) = build(spec, 8, VfioOptions::default());
    assert_eq!(offsets(&dev.direct_areas(0)), vec![(0, 0x2000)]);
}

#[test]
fn table_sharing_a_page_traps_only_that_page() {
    let spec = NicSpec {
        bar0_mmap: Bar0Mmap::Whole,
        table_offset: 0x1800,
        pba_offset: 0x1c00,
        ..NicSpec::default()
    };
    let (dev, _, _) = build(spec, 8, VfioOptions::default());
    assert_eq!(
        offsets(&dev.direct_areas(0)),
        vec![(0, 0x1000), (0x2000, 0x2000)]
    );
}

#[test]
fn layout_helper_edges() {
    let region = |areas: Vec<(u64, u64)>| RegionInfo {
        index: 0,
        size: 0x10000,
        flags: REGION_READ | REGION_MMAP,
        mmap_areas: areas,
    };
    let msix = MsixLayout {
        table_bar: 0,
        table_offset: 0x8000,
        table_size: 0x800,
        pba_bar: 1,
        pba_offset: 0,
        pba_size: 8,
    };
    // Unaligned and out-of-region areas are trimmed to whole pages inside the region.
    let r = region(vec![(0x10, 0x2000), (0xf000, 0x4000), (u64::MAX, 2)]);
    assert_eq!(
        direct_layout(&r, 0, None),
        vec![(0x1000, 0x1000), (0xf000, 0x1000)]
    );
    // The table carves its page out of the middle; the PBA is in another BAR.
    let r = region(vec![(0, 0x10000)]);
    assert_eq!(
        direct_layout(&r, 0, Some(&msix)),
        vec![(0, 0x8000), (0x9000, 0x7000)]
    );
    assert_eq!(direct_layout(&r, 1, Some(&msix)), vec![(0x1000, 0xf000)]);
    // Not mmap-able: nothing.
    assert!(direct_layout(&region(vec![]), 0, None).is_empty());
}

#[test]
fn trapped_accesses_are_bounded_by_the_region() {
    // BAR 2's VFIO region is 0x100 bytes; the guest sees a 4 KiB BAR.
    let spec = NicSpec {
        bar2_region: 0x100,
        ..NicSpec::default()
    };
    let (mut dev, fake, _) = build(spec, 8, VfioOptions::default());
    assert_eq!(dev.bars()[1].size, 0x1000);
    assert_eq!(bar_r32(&mut dev, 2, 0xfc), 0x5a5a_5a5a);
    assert_eq!(
        fake.log.take(),
        vec![Call::Read {
            index: 2,
            offset: 0xfc,
            len: 4
        }]
    );
    // Past the region: all-ones, and VFIO is not called (the fake asserts bounds).
    assert_eq!(bar_r32(&mut dev, 2, 0xfe), u32::MAX);
    assert_eq!(bar_r32(&mut dev, 2, 0x200), u32::MAX);
    let mut huge = [0u8; 8];
    dev.read_bar(2, u64::MAX - 3, &mut huge);
    assert_eq!(huge, [0xff; 8]);
    bar_w32(&mut dev, 2, 0x100, 1);
    dev.write_bar(2, u64::MAX, &[1]);
    dev.read_bar(2, 0, &mut []);
    assert!(fake.log.take().is_empty());
    // Inside: writes reach the region.
    bar_w32(&mut dev, 2, 0x10, 0xdead_beef);
    assert_eq!(
        fake.log.take(),
        vec![Call::Write {
            index: 2,
            offset: 0x10,
            data: 0xdead_beefu32.to_le_bytes().to_vec()
        }]
    );
    // BARs the device does not have (4 is I/O, hidden): all-ones, ignored.
    assert_eq!(bar_r32(&mut dev, 4, 0), u32::MAX);
    bar_w32(&mut dev, 4, 0, 0);
    assert!(fake.log.take().is_empty());
}

#[test]
fn non_table_bytes_of_the_table_page_go_to_the_device() {
    let (mut dev, fake, _) = nic();
    // After the 8-entry table (0x80 bytes) but in the trapped page.
    assert_eq!(
        bar_r32(&mut dev, 0, 0x2100),
        u32::from_le_bytes([0, 1, 2, 3])
    );
    assert_eq!(
        fake.log.take(),
        vec![Call::Read {
            index: 0,
            offset: 0x2100,
            len: 4
        }]
    );
}

#[test]
fn failed_mmap_leaves_the_area_trapped() {
    let spec = NicSpec {
        fail_mmap: true,
        ..NicSpec::default()
    };
    let (mut dev, fake, _) = build(spec, 8, VfioOptions::default());
    assert!(dev.direct_areas(0).is_empty());
    bar_r32(&mut dev, 0, 0x10);
    assert_eq!(
        fake.log.take(),
        vec![Call::Read {
            index: 0,
            offset: 0x10,
            len: 4
        }]
    );
}
