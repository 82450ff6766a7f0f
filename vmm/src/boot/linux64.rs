//! Linux x86 64-bit boot protocol: the `boot_params` "zero page" for a bzImage (or a
//! vmlinux without a PVH note).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, BootSetup, Initrd};
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Writes `boot_params` for the kernel and returns its address.
pub(super) fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    setup: &BootSetup,
    cmdline_size: usize,
    initrd: Option<Initrd>,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr.0 as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    params.acpi_rsdp_addr = setup.rsdp.0;
    let map = setup.e820;
    for (slot, e) in params
        .e820_table
        .iter_mut()
        .zip(map.iter())
        .take(E820_MAX_ENTRIES_ZEROPAGE)
    {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(GuestAddress(ZERO_PAGE_START))
}
