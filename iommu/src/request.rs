//! requestq requests (virtio 1.2, 5.13.6): wire format, parsing with exact length
//! checks, and execution against the IOMMU state. Free of guest memory and rings: the
//! caller (the `queue` module) hands in the device-readable bytes and the sizes of both
//! parts, and writes back what the `Reply` says.

use crate::domain::{Fence, Shared};
use crate::mapping::{Access, MSI_END, MSI_START};

/// Request types.
pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

/// Size of `struct virtio_iommu_req_head` and of `struct virtio_iommu_req_tail`.
pub const HEAD_SIZE: usize = 4;
pub const TAIL_SIZE: usize = 4;
/// Device-readable sizes (head included) of each request.
pub const ATTACH_SIZE: usize = 20;
pub const DETACH_SIZE: usize = 20;
pub const MAP_SIZE: usize = 36;
pub const UNMAP_SIZE: usize = 28;
pub const PROBE_SIZE: usize = 72;
/// The largest device-readable part of any request.
pub const MAX_READABLE: usize = PROBE_SIZE;

/// VIRTIO_IOMMU_ATTACH_F_BYPASS (needs VIRTIO_IOMMU_F_BYPASS_CONFIG, not offered).
pub const ATTACH_F_BYPASS: u32 = 1 << 0;
/// MAP flags.
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
/// Needs VIRTIO_IOMMU_F_MMIO, not offered: refused like an unknown flag.
pub const MAP_F_MMIO: u32 = 1 << 2;

/// PROBE property types and the RESV_MEM subtypes.
pub const PROBE_T_NONE: u16 = 0;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;
/// Size of `struct virtio_iommu_probe_resv_mem`, header included.
pub const RESV_MEM_SIZE: usize = 24;
/// Size of a property header (`type`, `length`).
pub const PROPERTY_HEAD_SIZE: usize = 4;

/// Request status (`struct virtio_iommu_req_tail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

/// What the driver negotiated, as far as requests care.
#[derive(Debug, Clone, Copy)]
pub struct RequestCtx {
    /// VIRTIO_IOMMU_F_MAP_UNMAP.
    pub map_unmap: bool,
    /// VIRTIO_IOMMU_F_PROBE.
    pub probe: bool,
    /// `probe_size` of the configuration space.
    pub probe_size: u32,
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        /// The `reserved` bytes are not all zero.
        reserved_set: bool,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    Probe {
        endpoint: u32,
    },
}

/// How to answer a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A well-formed request, to execute.
    Request(Request),
    /// Refused before execution: write this status.
    Reject(Status),
    /// Write nothing and return the chain with used length 0 (a PROBE the driver did
    /// not negotiate, spec 5.13.6.8).
    Ignore,
}

/// What to write into the device-writable part.
pub(crate) struct Reply {
    pub status: Status,
    /// PROBE properties (`probe_size` bytes), written before the tail.
    pub properties: Option<Vec<u8>>,
    /// Wait on it before the chain is returned to the driver.
    pub fence: Fence,
}

impl Reply {
    fn status(status: Status) -> Self {
        Self {
            status,
            properties: None,
            fence: Fence::default(),
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Parses a request whose device-readable part is `readable` (all of it, at most
/// [`MAX_READABLE`] bytes; the caller refuses longer ones) and whose device-writable
/// part is `writable_len` bytes (at least the tail). Sizes must match the type
/// exactly, or the request is refused with VIRTIO_IOMMU_S_INVAL.
pub fn parse(readable: &[u8], writable_len: usize, ctx: &RequestCtx) -> Parsed {
    let Some(&kind) = readable.first() else {
        return Parsed::Reject(Status::Inval);
    };
    let (size, out_size) = match kind {
        T_ATTACH => (ATTACH_SIZE, TAIL_SIZE),
        T_DETACH => (DETACH_SIZE, TAIL_SIZE),
        T_MAP | T_UNMAP if !ctx.map_unmap => return Parsed::Reject(Status::Unsupp),
        T_MAP => (MAP_SIZE, TAIL_SIZE),
        T_UNMAP => (UNMAP_SIZE, TAIL_SIZE),
        T_PROBE if !ctx.probe => return Parsed::Ignore,
        T_PROBE => (PROBE_SIZE, ctx.probe_size as usize + TAIL_SIZE),
        _ => return Parsed::Reject(Status::Unsupp),
    };
    if readable.len() != size || writable_len != out_size {
        return Parsed::Reject(Status::Inval);
    }
    let b = readable;
    Parsed::Request(match kind {
        T_ATTACH => Request::Attach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
            flags: le32(b, 12),
            reserved_set: b[16..20].iter().any(|&x| x != 0),
        },
        T_DETACH => Request::Detach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
        },
        T_MAP => Request::Map {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
            phys_start: le64(b, 24),
            flags: le32(b, 32),
        },
        T_UNMAP => Request::Unmap {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
        },
        _ => Request::Probe {
            endpoint: le32(b, 4),
        },
    })
}

/// Executes `req` on the IOMMU state.
pub(crate) fn execute(req: Request, shared: &Shared, ctx: &RequestCtx) -> Reply {
    let mut state = shared.lock();
    let result = match req {
        Request::Attach {
            domain,
            endpoint,
            flags,
            reserved_set,
        } => {
            // BYPASS needs VIRTIO_IOMMU_F_BYPASS_CONFIG: every flag is unknown here.
            if reserved_set || flags != 0 {
                Err(Status::Inval)
            } else {
                state.attach(domain, endpoint)
            }
        }
        Request::Detach { domain, endpoint } => state.detach(domain, endpoint),
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => {
            if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 {
                Err(Status::Inval)
            } else {
                let access = Access {
                    read: flags & MAP_F_READ != 0,
                    write: flags & MAP_F_WRITE != 0,
                };
                state
                    .map(domain, virt_start, virt_end, phys_start, access)
                    .map(|()| Fence::default())
            }
        }
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => state.unmap(domain, virt_start, virt_end),
        Request::Probe { endpoint } => {
            if !state.has_endpoint(endpoint) {
                Err(Status::NoEnt)
            } else {
                return Reply {
                    status: Status::Ok,
                    properties: Some(probe_properties(ctx.probe_size as usize)),
                    fence: Fence::default(),
                };
            }
        }
    };
    drop(state);
    match result {
        Ok(fence) => Reply {
            status: Status::Ok,
            properties: None,
            fence,
        },
        Err(status) => {
            tracing::debug!("virtio-iommu: {req:?} refused: {status:?}");
            Reply::status(status)
        }
    }
}

/// The properties of every endpoint, `probe_size` bytes: the MSI doorbell as a
/// RESV_MEM region (subtype MSI), then zeroes (a property of type NONE ends the list).
/// `probe_size` is at least [`RESV_MEM_SIZE`] + [`PROPERTY_HEAD_SIZE`].
pub fn probe_properties(probe_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; probe_size];
    let length = (RESV_MEM_SIZE - PROPERTY_HEAD_SIZE) as u16;
    out[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    out[2..4].copy_from_slice(&length.to_le_bytes());
    out[4] = RESV_MEM_T_MSI;
    out[8..16].copy_from_slice(&MSI_START.to_le_bytes());
    out[16..24].copy_from_slice(&MSI_END.to_le_bytes());
    out
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
