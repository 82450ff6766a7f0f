//! What the guest's `sriov` scenario and the host's test (`guest-tests/tests/sriov.rs`,
//! which includes this file with `#[path]`) agree on: the devices the host declares
//! (VF counts, device IDs, MACs, serials), each NIC's TAP and addresses, the disk
//! images' layout and data seeds, the tag of the frame sent through VFIO, and the
//! names of the per-VF checks. No dependencies: both sides compile it as is.

/// VFs the host declares per PF (TotalVFs).
pub const VFS: usize = 2;
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device IDs (0x1040 + virtio device type), also the VF Device ID.
pub const NET_DEVICE_ID: u16 = 0x1041;
pub const BLK_DEVICE_ID: u16 = 0x1042;
/// The SR-IOV extended capability.
pub const SRIOV_CAP_ID: u16 = 0x0010;
/// Where ferrio puts it (the guest walks the list from 0x100 anyway).
pub const SRIOV_CAP_OFFSET: u16 = 0x100;
/// First VF Offset and VF Stride ferrio gives every PF.
pub const VF_OFFSET: u16 = 1;
pub const VF_STRIDE: u16 = 1;
/// Size of one VF's BAR 0 (64-bit memory).
pub const VF_BAR0_LEN: u64 = 64 << 10;
/// VIRTIO_F_SR_IOV.
pub const SR_IOV_FEATURE_BIT: usize = 37;

/// The PF NIC's MAC and each VF's, as the host declares them.
pub const PF_MAC: &str = "52:54:00:12:34:56";
pub const VF_MACS: [&str; VFS] = ["52:54:00:00:01:01", "52:54:00:00:01:02"];
/// The virtio-blk serials of the PF disk and of each VF's disk.
pub const PF_SERIAL: &str = "ferrio-pf";
pub const VF_SERIALS: [&str; VFS] = ["ferrio-vf0", "ferrio-vf1"];

/// The TAP behind each NIC, by link: 0 = the PF, 1 + i = VF i.
pub const TAPS: [&str; VFS + 1] = ["ftap0", "ftap1", "ftap2"];
pub const PREFIX_LEN: u8 = 24;
/// Pings per check.
pub const PINGS: u32 = 3;
/// Bytes each net VF moves each way (one TCP flow per direction, the `net`
/// scenario's wire format and peer).
pub const TRANSFER_LEN: u64 = 4 << 20;

/// The host end of link `link` (0 = PF, 1 + i = VF i): 10.0.(2 + link).2.
pub fn host_ip(link: usize) -> [u8; 4] {
    [10, 0, subnet(link), 2]
}

/// The guest end of link `link`: 10.0.(2 + link).15.
pub fn guest_ip(link: usize) -> [u8; 4] {
    [10, 0, subnet(link), 15]
}

fn subnet(link: usize) -> u8 {
    u8::try_from(2 + link).unwrap_or(u8::MAX)
}

/// Every disk image (the PF's and each VF's) has this size; the host fills chunk
/// `c` of image `k` with `pattern::fill(pattern::chunk_seed(host_seed(k), c))`.
pub const DISK_LEN: u64 = 4 << 20;
/// Bytes per chunk (`pattern::CHUNK`).
pub const CHUNK: u64 = 1 << 20;
/// The chunk of each VF disk the guest overwrites with `pattern::fill(guest_seed(i))`.
pub const GUEST_CHUNK: u64 = 1;

// The guest's chunk lies inside the disks, and the VFIO VF exists.
const _: () = assert!(GUEST_CHUNK < DISK_LEN / CHUNK && DISK_LEN % CHUNK == 0);
const _: () = assert!(USERNET_VF < VFS);

/// Seed of image `image` (0 = the PF's disk, 1 + i = VF i's).
pub fn host_seed(image: usize) -> u64 {
    0xfe11_5a10_0000_0000 | (image as u64) << 8
}

/// Seed of what the guest writes to VF `vf`'s disk (`pattern::fill` sets bit 0 of
/// its seed, so seeds must differ above it).
pub fn guest_seed(vf: usize) -> u64 {
    0xfe11_5a10_9e57_0000 | (vf as u64) << 8
}

/// The net VF the guest hands to vfio-pci for the user-space transmit.
pub const USERNET_VF: usize = 1;
/// `ferrio.sriov.tag=32 hex digits`: the 16 bytes the user-space driver sends.
pub const TAG_PARAM: &str = "ferrio.sriov.tag";
pub const TAG_LEN: usize = 16;

/// Parses a tag from 32 hex digits.
pub fn parse_tag(hex: &str) -> Option<[u8; TAG_LEN]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * TAG_LEN {
        return None;
    }
    let mut tag = [0u8; TAG_LEN];
    for (byte, pair) in tag.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(tag)
}

/// The tag as 32 lower-case hex digits.
pub fn tag_hex(tag: &[u8; TAG_LEN]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sriov_KIND_WHAT`, e.g. `sriov_net_total_vfs`.
pub fn pf_check(kind: &str, what: &str) -> String {
    format!("sriov_{kind}_{what}")
}

/// `sriov_KIND_vfI_WHAT`, e.g. `sriov_blk_vf1_serial`.
pub fn vf_check(kind: &str, vf: usize, what: &str) -> String {
    format!("sriov_{kind}_vf{vf}_{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_bad_ones_are_refused() {
        let tag: [u8; TAG_LEN] = std::array::from_fn(|i| (i * 17) as u8);
        let hex = tag_hex(&tag);
        assert_eq!(hex.len(), 32);
        assert_eq!(parse_tag(&hex), Some(tag));
        assert_eq!(parse_tag(&format!(" {hex}\n")), Some(tag));
        assert_eq!(parse_tag(&hex[..30]), None);
        assert_eq!(parse_tag(&format!("{}zz", &hex[..30])), None);
        assert_eq!(parse_tag(&"é".repeat(16)), None);
    }

    #[test]
    fn addresses_names_and_seeds() {
        assert_eq!(host_ip(0), [10, 0, 2, 2]);
        assert_eq!(guest_ip(2), [10, 0, 4, 15]);
        assert_eq!(pf_check("net", "total_vfs"), "sriov_net_total_vfs");
        assert_eq!(vf_check("blk", 1, "serial"), "sriov_blk_vf1_serial");
        let seeds = [host_seed(0), host_seed(1), guest_seed(0), guest_seed(1)];
        for (i, a) in seeds.iter().enumerate() {
            assert!(seeds[i + 1..].iter().all(|b| b | 1 != a | 1));
        }
    }
}
