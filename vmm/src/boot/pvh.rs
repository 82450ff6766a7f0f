//! PVH boot: `hvm_start_info`, one module (the initramfs) and the memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, Initrd};
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START};
use crate::memory::E820Entry;

/// "xEn3" with the 0x80 bit of the last byte set.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the start info (plus memmap and module list) and returns its address.
pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initrd: Option<Initrd>,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )?;
    }
    let modlist = GuestAddress(PVH_MEMMAP_START + map.len() as u64 * entry_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        mem.write_obj(
            hvm_modlist_entry {
                paddr: rd.addr.0,
                size: rd.size,
                ..Default::default()
            },
            modlist,
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist.0;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(GuestAddress(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_describes_memory_initrd_and_rsdp() {
        let mem = crate::memory::create_guest_memory(128 << 20).unwrap();
        let rd = Initrd {
            addr: GuestAddress(0x600_0000),
            size: 0x1234,
        };
        let segments = crate::layout::pci_segments(1, 128 << 20);
        let map = crate::memory::e820_map(128 << 20, &segments);
        let at = write_start_info(&mem, &map, Some(rd), GuestAddress(0xe0000)).unwrap();
        let info: hvm_start_info = mem.read_obj(at).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x600_0000, 0x1234));
        assert_eq!(info.memmap_entries as usize, map.len());
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                PVH_MEMMAP_START
                    + (map.len() as u64 - 1) * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(last.addr, map[map.len() - 1].addr);
        // The module list must not overlap the start info page's successor structures.
        assert!(info.modlist_paddr + 16 <= crate::layout::ZERO_PAGE_START);
    }
}
