//! The blk PF and its VFs in the `sriov` scenario. Every image holds the host's
//! chunked pattern ([`spec::host_seed`]); the guest reads chunk 0 of a disk to prove
//! which image is behind it, overwrites chunk [`spec::GUEST_CHUNK`] of each VF's disk
//! with its own pattern ([`spec::guest_seed`]) and reads it back, all with O_DIRECT in
//! 1 MiB requests. The PF's disk is only read.

use super::pf;
use super::spec;
use crate::disk::{self, AlignedBuf};
use crate::pattern;
use crate::report::Reporter;
use crate::sys;

const KIND: &str = "blk";

/// The disk (`vdb`) of PCI function `bdf` (`virtioN/block/vdX` below it).
pub fn disk_of(bdf: &str) -> Result<String, String> {
    let (virtio, driver) =
        pf::virtio_child(bdf).ok_or_else(|| format!("{bdf}: no virtio device"))?;
    let dir = pf::dir(bdf).join(&virtio).join("block");
    pf::list(&dir).into_iter().next().ok_or_else(|| {
        format!(
            "{bdf}: no disk below {virtio} (driver {})",
            driver.as_deref().unwrap_or("none")
        )
    })
}

/// The disk's virtio-blk serial.
fn serial(disk: &str) -> String {
    sys::read_trimmed(disk::sysfs_dir(disk).join("serial")).unwrap_or_else(|e| e)
}

/// FNV-1a of chunk `chunk` of `/dev/DISK`, read with O_DIRECT.
fn read_chunk_fnv(disk: &str, chunk: u64) -> Result<String, String> {
    let file = disk::open(&format!("/dev/{disk}"), false, true)?;
    let mut buf = AlignedBuf::new(spec::CHUNK as usize);
    disk::read_at(&file, buf.as_mut_slice(), chunk * spec::CHUNK)?;
    Ok(pattern::fnv1a(buf.as_slice()))
}

/// FNV-1a of chunk `chunk` of image `image` as the host wrote it.
pub fn host_chunk_fnv(image: usize, chunk: u64) -> String {
    let seed = pattern::chunk_seed(spec::host_seed(image), chunk);
    pattern::fnv1a(&pattern::bytes(seed, spec::CHUNK as usize))
}

/// What the guest writes to VF `vf`'s disk.
fn guest_chunk(vf: usize) -> Vec<u8> {
    pattern::bytes(spec::guest_seed(vf), spec::CHUNK as usize)
}

/// A check whose value is the FNV of chunk `chunk` of `disk`, which must be `want`.
fn fnv_check(r: &mut Reporter, name: &str, disk: &str, chunk: u64, want: &str) {
    match read_chunk_fnv(disk, chunk) {
        Ok(fnv) => r.check(name, fnv == want, fnv),
        Err(e) => r.check(name, false, e),
    }
}

/// The PF's disk: its serial (first time only) and chunk 0 as the host wrote it;
/// `sriov_blk_pf_read_<when>`.
pub fn pf_read(r: &mut Reporter, pf_bdf: &str, when: &str) {
    let name = format!("sriov_blk_pf_read_{when}");
    let disk = match disk_of(pf_bdf) {
        Ok(d) => d,
        Err(e) => return r.check(&name, false, e),
    };
    if when == "before" {
        let s = serial(&disk);
        r.check("sriov_blk_pf_serial", s == spec::PF_SERIAL, s);
    }
    fnv_check(r, &name, &disk, 0, &host_chunk_fnv(0, 0));
}

/// VF `i`'s disk with its serial checked (`sriov_blk_vfI_<check>`).
fn vf_disk(r: &mut Reporter, i: usize, bdf: &str, check: &str) -> Option<String> {
    let name = spec::vf_check(KIND, i, check);
    match disk_of(bdf) {
        Ok(disk) => {
            let s = serial(&disk);
            r.note(&format!("{name}: {disk} on {bdf}"));
            r.check(&name, s == spec::VF_SERIALS[i], s);
            Some(disk)
        }
        Err(e) => {
            r.check(&name, false, e);
            None
        }
    }
}

/// After the first `echo 2`: per VF, its serial, chunk 0 of its own image, and the
/// guest's chunk written, flushed and read back.
pub fn first(r: &mut Reporter, vfs: &[String]) {
    for (i, bdf) in vfs.iter().enumerate() {
        let Some(disk) = vf_disk(r, i, bdf, "serial") else {
            continue;
        };
        let host = host_chunk_fnv(1 + i, 0);
        fnv_check(r, &spec::vf_check(KIND, i, "host_fnv"), &disk, 0, &host);
        let name = spec::vf_check(KIND, i, "write_fnv");
        let data = guest_chunk(i);
        let want = pattern::fnv1a(&data);
        let written = disk::open(&format!("/dev/{disk}"), true, true).and_then(|file| {
            let mut buf = AlignedBuf::new(data.len());
            buf.as_mut_slice().copy_from_slice(&data);
            disk::write_at(&file, buf.as_slice(), spec::GUEST_CHUNK * spec::CHUNK)?;
            disk::fsync(&file)
        });
        match written {
            Ok(()) => fnv_check(r, &name, &disk, spec::GUEST_CHUNK, &want),
            Err(e) => r.check(&name, false, e),
        }
    }
}

/// After the second `echo 2`: each VF's serial again, and its disk still holds what
/// the guest wrote before the VFs went away.
pub fn again(r: &mut Reporter, vfs: &[String]) {
    for (i, bdf) in vfs.iter().enumerate() {
        if let Some(disk) = vf_disk(r, i, bdf, "serial_again") {
            let want = pattern::fnv1a(&guest_chunk(i));
            let name = spec::vf_check(KIND, i, "read_again_fnv");
            fnv_check(r, &name, &disk, spec::GUEST_CHUNK, &want);
        }
    }
}

/// VF `i`'s MSI-X lines after its I/O: `sriov_blk_vfI_msix`, with a request-queue
/// interrupt on the VF's own function.
pub fn msix(r: &mut Reporter, i: usize, bdf: &str, interrupts: &str) {
    let name = spec::vf_check(KIND, i, "msix");
    let chip = format!("PCI-MSIX-{bdf}");
    let lines = disk::irq_lines(interrupts, &chip);
    let reqs: u64 = lines
        .iter()
        .filter(|(n, _)| n.contains("-req."))
        .map(|(_, c)| c)
        .sum();
    let list: Vec<String> = lines.iter().map(|(n, c)| format!("{n}={c}")).collect();
    r.check(&name, reqs > 0, format!("{chip} {}", list.join(" ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk lookup against this machine's virtio-blk function, when it has one.
    #[test]
    fn finds_the_disk_below_a_virtio_blk_function() {
        let Some(bdf) = pf::list(std::path::Path::new(pf::PCI_DEVICES))
            .into_iter()
            .find(|b| pf::drivers(b) == "virtio-pci/virtio_blk")
        else {
            eprintln!("skipping: no virtio-blk function here");
            return;
        };
        let disk = disk_of(&bdf).unwrap();
        assert!(disk.starts_with("vd"), "{disk}");
        assert!(disk::sysfs_dir(&disk).join("serial").exists());
        assert!(disk_of("0000:ff:1f.9").is_err());
    }

    #[test]
    fn host_and_guest_data_differ_per_image_and_chunk() {
        let a = host_chunk_fnv(0, 0);
        assert_eq!(a, host_chunk_fnv(0, 0));
        assert_ne!(a, host_chunk_fnv(1, 0));
        assert_ne!(a, host_chunk_fnv(0, 1));
        assert_ne!(guest_chunk(0), guest_chunk(1));
        assert_eq!(guest_chunk(1).len(), spec::CHUNK as usize);
        assert_eq!(spec::CHUNK as usize, pattern::CHUNK);
    }
}
