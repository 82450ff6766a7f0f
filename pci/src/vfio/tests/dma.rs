//! DMA map bookkeeping, without (IOVA = GPA, all RAM at once) and with the IOMMU.

use std::sync::Arc;

use super::fake::{Call, FakeDma, Log};
use crate::vfio::{DmaError, DmaMapping, DmaMappings};

fn mappings(fail_iova: Option<u64>) -> (DmaMappings, Log) {
    let log = Log::default();
    let dma = DmaMappings::new(Arc::new(FakeDma {
        log: log.clone(),
        fail_iova,
    }));
    (dma, log)
}

#[test]
fn map_all_is_identity() {
    let (mut dma, log) = mappings(None);
    let ram = [
        (0, 0xa_0000, 0x7f00_0000_0000),
        (0x10_0000, 0xbff0_0000, 0x7f00_0010_0000),
    ];
    dma.map_all(&ram).unwrap();
    assert_eq!(
        log.take(),
        vec![
            Call::DmaMap {
                iova: 0,
                size: 0xa_0000,
                host: 0x7f00_0000_0000
            },
            Call::DmaMap {
                iova: 0x10_0000,
                size: 0xbff0_0000,
                host: 0x7f00_0010_0000
            },
        ]
    );
    assert_eq!(dma.mappings().len(), 2);
}

#[test]
fn map_all_failure_undoes_what_it_mapped() {
    let (mut dma, log) = mappings(Some(0x1_0000_0000));
    let ram = [
        (0, 0x1000, 0x1000),
        (0x10_0000, 0x1000, 0x2000),
        (0x1_0000_0000, 0x1000, 0x3000),
    ];
    let err = dma.map_all(&ram).unwrap_err();
    assert!(matches!(
        err,
        DmaError::Map {
            iova: 0x1_0000_0000,
            ..
        }
    ));
    assert_eq!(
        log.take(),
        vec![
            Call::DmaMap {
                iova: 0,
                size: 0x1000,
                host: 0x1000
            },
            Call::DmaMap {
                iova: 0x10_0000,
                size: 0x1000,
                host: 0x2000
            },
            Call::DmaUnmap {
                iova: 0x10_0000,
                size: 0x1000
            },
            Call::DmaUnmap {
                iova: 0,
                size: 0x1000
            },
        ]
    );
    assert!(dma.is_empty());
}

#[test]
fn iommu_map_refuses_overlaps() {
    let (mut dma, log) = mappings(None);
    dma.map(0x1000, 0x2000, 0xa000).unwrap();
    for (iova, size) in [(0x2000, 0x1000), (0, 0x1001), (0x2fff, 1), (0, 0x10000)] {
        let err = dma.map(iova, size, 0xb000).unwrap_err();
        assert!(
            matches!(
                err,
                DmaError::Overlap {
                    existing: 0x1000,
                    ..
                }
            ),
            "{iova:#x}+{size:#x}"
        );
    }
    // Adjacent ranges are fine.
    dma.map(0, 0x1000, 0xc000).unwrap();
    dma.map(0x3000, 0x1000, 0xd000).unwrap();
    assert!(matches!(
        dma.map(0x5000, 0, 0),
        Err(DmaError::InvalidRange { .. })
    ));
    assert!(matches!(
        dma.map(u64::MAX, 2, 0),
        Err(DmaError::InvalidRange { .. })
    ));
    assert!(matches!(
        dma.map(0x9000, 2, u64::MAX),
        Err(DmaError::InvalidRange { .. })
    ));
    assert_eq!(log.take().len(), 3);
    assert_eq!(
        dma.mappings(),
        vec![
            DmaMapping {
                iova: 0,
                size: 0x1000,
                host_addr: 0xc000
            },
            DmaMapping {
                iova: 0x1000,
                size: 0x2000,
                host_addr: 0xa000
            },
            DmaMapping {
                iova: 0x3000,
                size: 0x1000,
                host_addr: 0xd000
            },
        ]
    );
}

#[test]
fn iommu_unmap_whole_mappings_only() {
    let (mut dma, log) = mappings(None);
    dma.map(0x1000, 0x2000, 0xa000).unwrap();
    dma.map(0x3000, 0x1000, 0xb000).unwrap();
    log.take();
    // Unknown range: an error, VFIO not called.
    assert!(matches!(
        dma.unmap(0x8000, 0x1000),
        Err(DmaError::NotMapped { .. })
    ));
    // A range that would split a mapping: refused, nothing unmapped.
    assert!(matches!(
        dma.unmap(0x2000, 0x2000),
        Err(DmaError::Split {
            existing: 0x1000,
            ..
        })
    ));
    assert!(log.take().is_empty());
    // A range covering both: both unmapped, by IOVA, each as mapped.
    dma.unmap(0, 0x8000).unwrap();
    assert_eq!(
        log.take(),
        vec![
            Call::DmaUnmap {
                iova: 0x1000,
                size: 0x2000
            },
            Call::DmaUnmap {
                iova: 0x3000,
                size: 0x1000
            },
        ]
    );
    assert!(dma.is_empty());
    // The IOVA is free again.
    dma.map(0x1000, 0x1000, 0xa000).unwrap();
}

#[test]
fn unmap_all_in_iova_order_and_on_drop() {
    let (mut dma, log) = mappings(None);
    for iova in [0x5000, 0x1000, 0x3000] {
        dma.map(iova, 0x1000, iova).unwrap();
    }
    log.take();
    assert_eq!(dma.unmap_all(), 0);
    assert_eq!(
        log.take(),
        [0x1000, 0x3000, 0x5000]
            .map(|iova| Call::DmaUnmap { iova, size: 0x1000 })
            .to_vec()
    );
    dma.map(0x7000, 0x1000, 0x7000).unwrap();
    log.take();
    drop(dma);
    assert_eq!(
        log.take(),
        vec![Call::DmaUnmap {
            iova: 0x7000,
            size: 0x1000
        }]
    );
}
