//! Loading the guest kernel, initramfs and command line, and writing the boot protocol
//! structures (PVH start info, or Linux boot_params for bzImage / non-PVH vmlinux).

mod linux64;
mod pvh;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::memory::E820Entry;

/// Errors of kernel loading and boot set-up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a kernel ferrio can boot (neither a vmlinux ELF nor a bzImage): {detail}"
    )]
    NotAKernel { path: PathBuf, detail: String },
    #[error("kernel {path} does not fit in guest memory: {detail}")]
    KernelTooLarge { path: PathBuf, detail: String },
    #[error("cannot read initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is too long ({len} bytes, at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("writing boot structures to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, RBX = start info.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = boot_params.
    Linux64 {
        entry: GuestAddress,
        boot_params: GuestAddress,
    },
}

/// Where the initramfs was placed.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Everything the boot structures need to describe.
pub struct BootSetup<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    /// The memory map ([`crate::memory::e820_map`]).
    pub e820: &'a [E820Entry],
    pub rsdp: GuestAddress,
}

enum Loaded {
    Pvh(GuestAddress),
    Elf64(GuestAddress),
    BzImage(loader::KernelLoaderResult),
}

/// Loads the kernel, initramfs and command line into `mem` and writes the boot
/// protocol structures; returns where the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, setup: &BootSetup) -> Result<EntryPoint, BootError> {
    let loaded = load_kernel(mem, setup.kernel)?;
    let initrd = match setup.initramfs {
        Some(p) => Some(load_initramfs(mem, p, setup.mem_size)?),
        None => None,
    };
    write_cmdline(mem, setup.cmdline)?;
    let cmdline_size = setup.cmdline.len() + 1;
    Ok(match loaded {
        Loaded::Pvh(entry) => EntryPoint::Pvh {
            entry,
            start_info: pvh::write_start_info(mem, setup.e820, initrd, setup.rsdp)?,
        },
        Loaded::Elf64(entry) => EntryPoint::Linux64 {
            entry,
            boot_params: linux64::write_boot_params(mem, None, setup, cmdline_size, initrd)?,
        },
        Loaded::BzImage(res) => EntryPoint::Linux64 {
            // The 64-bit entry point sits 0x200 after the protected-mode code start.
            entry: GuestAddress(res.kernel_load.0 + 0x200),
            boot_params: linux64::write_boot_params(
                mem,
                res.setup_header,
                setup,
                cmdline_size,
                initrd,
            )?,
        },
    })
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.to_owned(),
            source,
        })
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut open()?, highmem) {
        Ok(res) => {
            return Ok(match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Loaded::Pvh(entry),
                _ => Loaded::Elf64(res.kernel_load),
            })
        }
        Err(e) => e,
    };
    let not_elf = matches!(
        elf_err,
        loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)
    );
    if !not_elf {
        return Err(classify(path, elf_err));
    }
    match BzImage::load(mem, None, &mut open()?, highmem) {
        Ok(res) => Ok(Loaded::BzImage(res)),
        Err(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage | loader::bzimage::Error::ReadBzImageHeader,
        )) => Err(BootError::NotAKernel {
            path: path.to_owned(),
            detail: "no ELF magic and no bzImage header".into(),
        }),
        Err(e) => Err(classify(path, e)),
    }
}

/// Splits loader failures into "does not fit" and "malformed image".
fn classify(path: &Path, e: loader::Error) -> BootError {
    let detail = e.to_string();
    let too_large = matches!(
        e,
        loader::Error::MemoryOverflow
            | loader::Error::Elf(loader::elf::Error::ReadKernelImage)
            | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)
    );
    if too_large {
        BootError::KernelTooLarge {
            path: path.to_owned(),
            detail,
        }
    } else {
        BootError::NotAKernel {
            path: path.to_owned(),
            detail,
        }
    }
}

/// Places the initramfs page-aligned at the top of RAM below the 32-bit MMIO hole.
fn load_initramfs(mem: &GuestMemoryMmap, path: &Path, mem_size: u64) -> Result<Initrd, BootError> {
    let io = |source| BootError::Initramfs {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let top = mem_size.min(MMIO_HOLE_START);
    // Keep the first 64 MiB for the kernel image, its bss and early allocations.
    let floor = HIMEM_START + (64 << 20);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor)
        .ok_or(BootError::InitramfsTooLarge {
            path: path.to_owned(),
            size,
            limit: top,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => io(source),
            other => BootError::GuestMemory(other),
        })?;
    Ok(Initrd {
        addr: GuestAddress(addr),
        size,
    })
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        crate::memory::create_guest_memory(256 << 20).unwrap()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let f = file_with(&[0x5a; 8192]);
        let err = load_kernel(&mem(), f.path()).err().unwrap();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains(&f.path().display().to_string()));
    }

    #[test]
    fn empty_and_missing_files() {
        let f = file_with(&[]);
        assert!(matches!(
            load_kernel(&mem(), f.path()),
            Err(BootError::NotAKernel { .. })
        ));
        assert!(matches!(
            load_kernel(&mem(), Path::new("/nonexistent/vmlinux")),
            Err(BootError::OpenKernel { .. })
        ));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let f = file_with(&[7u8; 10_000]);
        let m = mem();
        let rd = load_initramfs(&m, f.path(), 256 << 20).unwrap();
        assert_eq!(rd.addr.0 % 4096, 0);
        assert!(rd.addr.0 + rd.size <= 256 << 20);
        let mut back = [0u8; 16];
        m.read_slice(&mut back, rd.addr).unwrap();
        assert_eq!(back, [7u8; 16]);
    }

    #[test]
    fn initramfs_larger_than_memory_is_refused() {
        let f = file_with(&vec![0u8; 200 << 20]);
        let err = load_initramfs(&mem(), f.path(), 256 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem(), &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        write_cmdline(&mem(), "console=ttyS0").unwrap();
    }
}
