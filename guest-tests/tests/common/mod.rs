//! Host-side checks shared by the disk scenarios' tests (`blk`, `iommu`). Each test
//! file declares `mod pattern` (the agent's pattern module) at its root.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::pattern;

/// FNV-1a of a whole file.
pub fn file_fnv(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hash = pattern::Fnv1a::new();
    let mut buf = vec![0u8; pattern::CHUNK];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hash.hex();
        }
        hash.update(&buf[..n]);
    }
}

/// FNV-1a of what a `len`-byte vda holds after the blk pattern (with its discarded
/// range).
pub fn expected_vda_fnv(len: u64) -> String {
    let mut hash = pattern::Fnv1a::new();
    let mut chunk = vec![0u8; pattern::CHUNK];
    for i in 0..len / pattern::CHUNK as u64 {
        pattern::blk_expected_chunk(i, &mut chunk);
        hash.update(&chunk);
    }
    hash.hex()
}
