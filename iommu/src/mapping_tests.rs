use super::*;

const RW: Access = Access::READ_WRITE;
const RO: Access = Access::READ_ONLY;
const PAGE: u64 = PAGE_SIZE;

fn space() -> AddressSpace {
    AddressSpace::new(1024)
}

#[test]
fn map_and_find() {
    let mut s = space();
    s.map(0x1000, 0x2fff, 0x8000, RW).unwrap();
    assert_eq!(s.len(), 1);
    let m = s.find(0x2fff).unwrap();
    assert_eq!(
        (m.virt_start, m.virt_end, m.phys_start),
        (0x1000, 0x2fff, 0x8000)
    );
    assert_eq!(m.size(), 0x2000);
    assert_eq!(m.translate(0x1234), 0x8234);
    assert!(s.find(0xfff).is_none());
    assert!(s.find(0x3000).is_none());
}

#[test]
fn map_rejects_overlaps_with_inval() {
    let mut s = space();
    s.map(0x10000, 0x1ffff, 0, RW).unwrap();
    // Inside, straddling either end, covering it whole.
    for (start, end) in [
        (0x11000, 0x11fff),
        (0xf000, 0x10fff),
        (0x1f000, 0x20fff),
        (0x0, 0xfffff),
    ] {
        assert_eq!(
            s.map(start, end, 0, RW),
            Err(MapError::Invalid),
            "{start:#x}"
        );
    }
    // Adjacent on both sides is fine.
    s.map(0xf000, 0xffff, 0, RW).unwrap();
    s.map(0x20000, 0x20fff, 0, RW).unwrap();
    assert_eq!(s.len(), 3);
}

#[test]
fn map_checks_order_range_and_alignment() {
    let mut s = space();
    assert_eq!(s.map(0x2000, 0x1fff, 0, RW), Err(MapError::Invalid));
    // Outside the 48-bit input range.
    assert_eq!(
        s.map(INPUT_END + 1, INPUT_END + PAGE, 0, RW),
        Err(MapError::Range)
    );
    assert_eq!(
        s.map(INPUT_END + 1 - PAGE, INPUT_END + PAGE, 0, RW),
        Err(MapError::Range)
    );
    assert_eq!(s.map(0, u64::MAX, 0, RW), Err(MapError::Range));
    // Unaligned start, end + 1, phys.
    assert_eq!(s.map(0x1001, 0x1fff, 0, RW), Err(MapError::Range));
    assert_eq!(s.map(0x1000, 0x1ffe, 0, RW), Err(MapError::Range));
    assert_eq!(s.map(0x1000, 0x1fff, 0x10, RW), Err(MapError::Range));
    // phys_end past 2^64.
    assert_eq!(s.map(0, 0x1fff, u64::MAX - 0xfff, RW), Err(MapError::Range));
    assert!(s.is_empty());
    // The last page of the input range is fine.
    s.map(INPUT_END + 1 - PAGE, INPUT_END, 0, RW).unwrap();
}

#[test]
fn map_refuses_the_msi_doorbell() {
    let mut s = space();
    assert_eq!(
        s.map(MSI_START, MSI_START + 0xfff, 0, RW),
        Err(MapError::Invalid)
    );
    // Linux's identity domain maps around the reserved region.
    s.map(0, MSI_START - 1, 0, RW).unwrap();
    s.map(MSI_END + 1, INPUT_END, MSI_END + 1, RW).unwrap();
    assert!(s.find(MSI_START).is_none());
}

#[test]
fn map_limit_gives_nomem() {
    let mut s = AddressSpace::new(2);
    s.map(0, 0xfff, 0, RW).unwrap();
    s.map(0x1000, 0x1fff, 0, RW).unwrap();
    assert_eq!(s.map(0x2000, 0x2fff, 0, RW), Err(MapError::NoMemory));
    s.unmap(0, 0xfff).unwrap();
    s.map(0x2000, 0x2fff, 0, RW).unwrap();
}

/// The spec's UNMAP examples (virtio 1.2, 5.13.6.7), scaled to pages.
#[test]
fn unmap_follows_the_spec_examples() {
    let p = |n: u64| n * PAGE;
    let end = |n: u64| (n + 1) * PAGE - 1;
    // (1) nothing mapped: succeeds, removes nothing.
    let mut s = space();
    assert_eq!(s.unmap(p(0), end(4)), Ok(vec![]));
    // (2) exact.
    s.map(p(0), end(9), 0, RW).unwrap();
    assert_eq!(s.unmap(p(0), end(9)).unwrap().len(), 1);
    assert!(s.is_empty());
    // (3) two adjacent, both covered.
    s.map(p(0), end(4), 0, RW).unwrap();
    s.map(p(5), end(9), 0, RW).unwrap();
    assert_eq!(s.unmap(p(0), end(9)).unwrap().len(), 2);
    assert!(s.is_empty());
    // (4) would split: RANGE, nothing removed.
    s.map(p(0), end(9), 0, RW).unwrap();
    assert_eq!(s.unmap(p(0), end(4)), Err(MapError::Range));
    assert_eq!(s.len(), 1);
    s.unmap(p(0), end(9)).unwrap();
    // (5) first of two.
    s.map(p(0), end(4), 0, RW).unwrap();
    s.map(p(5), end(9), 0, RW).unwrap();
    let removed = s.unmap(p(0), end(4)).unwrap();
    assert_eq!(removed[0].virt_start, p(0));
    assert_eq!(s.len(), 1);
    assert!(s.find(p(5)).is_some());
    s.unmap(p(5), end(9)).unwrap();
    // (6) spills over unmapped addresses.
    s.map(p(0), end(4), 0, RW).unwrap();
    assert_eq!(s.unmap(p(0), end(9)).unwrap().len(), 1);
    // (7) a hole between two mappings.
    s.map(p(0), end(4), 0, RW).unwrap();
    s.map(p(10), end(14), 0, RW).unwrap();
    assert_eq!(s.unmap(p(0), end(14)).unwrap().len(), 2);
    assert!(s.is_empty());
}

#[test]
fn unmap_split_at_either_end_removes_nothing() {
    let mut s = space();
    s.map(0x1000, 0x1fff, 0, RW).unwrap();
    s.map(0x2000, 0x3fff, 0, RW).unwrap();
    s.map(0x4000, 0x4fff, 0, RW).unwrap();
    // Starts inside the second mapping.
    assert_eq!(s.unmap(0x3000, 0x4fff), Err(MapError::Range));
    // Covers the first whole and ends inside the second.
    assert_eq!(s.unmap(0x0, 0x2fff), Err(MapError::Range));
    // Unaligned but splitting nothing: fine.
    assert_eq!(s.unmap(0x10, 0xfff), Ok(vec![]));
    assert_eq!(s.len(), 3);
    assert_eq!(s.unmap(0x2000, 0x3fff).unwrap().len(), 1);
    assert_eq!(s.unmap(0x1000, 0x1ffe), Err(MapError::Range));
    assert_eq!(s.unmap(0x2, 0x1), Err(MapError::Invalid));
    assert_eq!(s.unmap(0, u64::MAX).unwrap().len(), 2);
    assert!(s.is_empty());
}

#[test]
fn resolve_spans_adjacent_mappings() {
    let mut s = space();
    s.map(0x1000, 0x1fff, 0x10_0000, RW).unwrap();
    s.map(0x2000, 0x3fff, 0x50_0000, RO).unwrap();
    let pieces = s.resolve(0x1800, 0x1000, Permissions::Read).unwrap();
    assert_eq!(
        pieces,
        vec![
            Piece {
                iova: 0x1800,
                gpa: 0x10_0800,
                len: 0x800
            },
            Piece {
                iova: 0x2000,
                gpa: 0x50_0000,
                len: 0x800
            },
        ]
    );
    // Writing the same range fails at the read-only mapping.
    assert_eq!(
        s.resolve(0x1800, 0x1000, Permissions::Write),
        Err(LookupFault {
            address: 0x2000,
            permission: true
        })
    );
    // Crossing into an unmapped page fails at its first byte.
    assert_eq!(
        s.resolve(0x3800, 0x1000, Permissions::Read),
        Err(LookupFault {
            address: 0x4000,
            permission: false
        })
    );
    // Empty and wrapping ranges fail.
    assert!(s.resolve(0x1000, 0, Permissions::Read).is_err());
    assert!(s.resolve(u64::MAX, 2, Permissions::Read).is_err());
}

#[test]
fn walk_returns_whole_mappings() {
    let mut s = space();
    s.map(0x1000, 0x4fff, 0x10_0000, RW).unwrap();
    let whole = s.walk(0x2000, 1, Permissions::ReadWrite).unwrap();
    assert_eq!(whole.len(), 1);
    assert_eq!((whole[0].virt_start, whole[0].virt_end), (0x1000, 0x4fff));
}

#[test]
fn access_to_permissions() {
    assert_eq!(RW.permissions(), Permissions::ReadWrite);
    assert_eq!(RO.permissions(), Permissions::Read);
    let wo = Access {
        read: false,
        write: true,
    };
    assert_eq!(wo.permissions(), Permissions::Write);
    let none = Access {
        read: false,
        write: false,
    };
    assert_eq!(none.permissions(), Permissions::No);
    let mut s = space();
    s.map(0, 0xfff, 0, wo).unwrap();
    assert!(s.resolve(0, 4, Permissions::Read).is_err());
    assert!(s.resolve(0, 4, Permissions::Write).is_ok());
}
