//! Guest RAM: which ranges exist for a given size and the e820 map the guest sees.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Kinds of e820 entries the guest is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One e820 / PVH memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// RAM ranges for `size` bytes: below the 32-bit MMIO hole first, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(RAM_64BIT_START), (size - low) as usize));
    }
    ranges
}

/// First address after the last byte of RAM.
pub fn ram_end(size: u64) -> u64 {
    ram_ranges(size).last().map_or(0, |(a, l)| a.0 + *l as u64)
}

/// Allocates anonymous guest RAM of `size` bytes laid out by [`ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size))
}

/// The memory map handed to the guest (PVH memmap or bzImage e820 table), sorted by
/// address: RAM for `size` bytes, and every PCI segment's ECAM window reserved.
pub fn e820_map(size: u64, pci_segments: &[PciSegmentLayout]) -> Vec<E820Entry> {
    let low_end = size.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Kind::Ram,
        },
    ];
    if size > low_end {
        map.push(E820Entry {
            addr: RAM_64BIT_START,
            size: size - low_end,
            kind: E820Kind::Ram,
        });
    }
    // ECAM must be reserved for Linux to trust the MCFG table.
    map.extend(pci_segments.iter().map(|s| E820Entry {
        addr: s.ecam().start,
        size: s.ecam().size,
        kind: E820Kind::Reserved,
    }));
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_end(512 << 20), 512 << 20);
        let map = e820_map(512 << 20, &pci_segments(1, 512 << 20));
        assert_eq!(
            map[3],
            E820Entry {
                addr: PCI_ECAM_START,
                size: PCI_ECAM_SIZE,
                kind: E820Kind::Reserved
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let size = 6u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(RAM_64BIT_START),
                (size - MMIO_HOLE_START) as usize
            )
        );
        assert_eq!(ram_end(size), RAM_64BIT_START + size - MMIO_HOLE_START);
        // No RAM entry overlaps the hole, and entries are sorted and disjoint.
        let map = e820_map(size, &pci_segments(1, ram_end(size)));
        assert_eq!(map.len(), 5);
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        assert!(map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= RAM_64BIT_START));
    }

    #[test]
    fn every_ecam_window_is_reserved() {
        let size = 6u64 << 30;
        let segments = pci_segments(3, ram_end(size));
        let map = e820_map(size, &segments);
        for s in &segments {
            let ecam = s.ecam();
            assert!(map.contains(&E820Entry {
                addr: ecam.start,
                size: ecam.size,
                kind: E820Kind::Reserved
            }));
        }
        assert_eq!(map.len(), 5 + 2);
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
