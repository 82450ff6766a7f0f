//! What the guest's `hostile` scenario and the host's test (`guest-tests/tests/hostile.rs`,
//! which includes this file with `#[path]`) agree on: the machine (serials, MAC, image
//! sizes), the bystander disk's layout and seeds, the tags of the frames the user-space
//! net driver sends, the notify-storm sizes, and the name of every attack, in the order
//! the agent runs them. No dependencies: both sides compile it as is.

/// The virtio-blk serials: the disk the agent keeps using through the kernel's driver
/// while it attacks the others, the disk it attacks from user space, and the small disk
/// behind the virtio-iommu whose endpoint the IOMMU attacks attach.
pub const BYSTANDER_SERIAL: &str = "ferrio-bystander";
pub const VICTIM_SERIAL: &str = "ferrio-victim";
pub const ENDPOINT_SERIAL: &str = "ferrio-iommu-ep";
/// The attacked NIC's MAC (on the TAP of a throw-away network namespace).
pub const VICTIM_MAC: &str = "52:54:00:00:0a:01";

/// Image sizes. The victim's capacity is what the sector-range attacks aim past.
pub const BYSTANDER_LEN: u64 = 2 << 20;
pub const VICTIM_LEN: u64 = 1 << 20;
pub const ENDPOINT_LEN: u64 = 1 << 20;
/// The endpoint disk's data (blocks as for the bystander), which its kernel driver
/// must read through the IOMMU again once the IOMMU is given back.
pub const ENDPOINT_SEED: u64 = 0xfe11_0000_4057_e9e9;

/// The bystander is checked in 4 KiB blocks, block `i` of a region with seed `s`
/// holding `pattern::fill(pattern::chunk_seed(s, i))`. The host fills the whole image
/// with [`HOST_SEED`]; before the attacks the guest overwrites blocks
/// `BEFORE_BLOCKS` with [`BEFORE_SEED`], after them blocks `AFTER_BLOCKS` with
/// [`AFTER_SEED`]; the blocks between keep the host's data throughout.
pub const BLOCK: usize = 4096;
pub const BYSTANDER_BLOCKS: u64 = BYSTANDER_LEN / BLOCK as u64;
pub const HOST_SEED: u64 = 0xfe11_0000_4057_0001;
pub const BEFORE_SEED: u64 = 0xfe11_0000_4057_0b0e;
pub const AFTER_SEED: u64 = 0xfe11_0000_4057_0af7;
pub const BEFORE_BLOCKS: std::ops::Range<u64> = 0..128;
pub const AFTER_BLOCKS: std::ops::Range<u64> = 384..512;

/// The sector of the victim disk where every good request after an attack writes and
/// reads back one block, and the seed of the block written after attack `n`:
/// `pattern::chunk_seed(GOOD_SEED, n)` (so the last one tells the attacks ran to the
/// end).
pub const GOOD_SECTOR: u64 = 64;
pub const GOOD_SEED: u64 = 0xfe11_0000_4057_9000;

/// Frames the user-space net driver sends: a good frame after every net attack carries
/// [`NET_GOOD_TAG`]; frames ferrio itself must drop (bad header, too long, outside
/// memory) carry [`NET_DROP_TAG`], which must never reach the TAP; frames ferrio may
/// pass to the TAP for the host kernel to judge (odd GSO sizes, 64 KiB) carry
/// [`NET_HOST_TAG`]. Ethertype of all of them.
pub const NET_GOOD_TAG: &[u8; 16] = b"ferrio-hostile-G";
pub const NET_DROP_TAG: &[u8; 16] = b"ferrio-hostile-D";
pub const NET_HOST_TAG: &[u8; 16] = b"ferrio-hostile-H";
pub const NET_ETHERTYPE: u16 = 0x88b5;

/// Doorbell storms: kicks on a queue's doorbell (an ioeventfd: KVM completes each store
/// without the VMM), and kicks on doorbells no queue has (each one an exit to the VMM).
/// Millions would take minutes on a PVM host (measured from guest user space on a
/// loaded 2-core host: 3400-8000 ioeventfd kicks/s, 2700-6200 VMM exits/s).
pub const STORM_KICKS: u64 = 100_000;
pub const STORM_BAD_KICKS: u64 = 6_000;
/// Flushes in the flush storm.
pub const FLUSH_STORM: u64 = 5_000;

/// Every attack, in the order the agent runs them; each is one check of that name.
pub const ATTACKS: &[&str] = &[
    // Rings, on the victim virtio-blk.
    "blk_loop_direct",
    "blk_loop_indirect",
    "blk_indirect_in_indirect",
    "blk_chain_longer_than_queue",
    "blk_len_4gib",
    "blk_addr_beyond_ram",
    "blk_addr_mmio_hole",
    "blk_ring_in_mmio_hole",
    "blk_avail_idx_jump",
    "blk_used_over_desc",
    "blk_queue_size_not_pow2",
    "blk_queue_enable_twice",
    "blk_notify_storm",
    "blk_config_write_driver_ok",
    "blk_reset_in_flight",
    // virtio-blk requests.
    "blk_sector_overflow",
    "blk_discard_past_end",
    "blk_write_zeroes_past_end",
    "blk_flush_storm",
    "blk_bad_request_types",
    // MSI-X of the victim virtio-blk.
    "msix_unprogrammed_unmask",
    "msix_garbage_entries",
    "msix_pba_writes",
    "msix_odd_accesses",
    // The victim virtio-net.
    "net_tx_bogus_gso",
    "net_tx_bogus_csum",
    "net_tx_frame_0",
    "net_tx_frame_64k",
    "net_ctrl_wrong_lengths",
    "net_loop_chain",
    "net_avail_idx_jump",
    "net_reset_in_flight",
    // Configuration space (both victims bound to vfio-pci).
    "ecam_sweep",
    "bar_over_other_ranges",
    // The virtio-iommu itself.
    "iommu_attach_unknown",
    "iommu_map_overlap",
    "iommu_map_wrap",
    "iommu_request_lengths",
    "iommu_loop_chain",
    "iommu_avail_idx_jump",
];
