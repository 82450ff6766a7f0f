//! The virtio-iommu itself as the victim ([`Iommu`]): its PCI function is not behind
//! an IOMMU, so the guest's VFIO takes it in no-IOMMU mode (once the kernel's
//! virtio_iommu driver let go of it) and a raw driver sends requests on its requestq:
//! ATTACH of endpoints that do not exist, MAPs that overlap or wrap, requests of every
//! length from 0 to 64 bytes (device-readable and device-writable), broken chains.
//! The good request afterwards: PROBE, ATTACH, MAP, UNMAP, DETACH of the real endpoint
//! (the small disk the host put behind the IOMMU). The attacks are in `iommu_attacks`.

use std::time::Duration;

use super::attack::Victim;
use super::driver::{Driver, Queue, Reaction};
use super::session::Session;
use crate::scenarios::vfio::virtio::{
    find_block, RingLayout, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1,
};
use crate::vfio::pci::{u32_at, VIRTIO_PCI_CAP_DEVICE_CFG};

pub const F_INPUT_RANGE: u64 = 1 << 0;
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
pub const F_MAP_UNMAP: u64 = 1 << 2;
pub const F_PROBE: u64 = 1 << 4;
pub const WANTED: u64 = F_VERSION_1 | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE;

pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;
pub const S_OK: u8 = 0;
pub const S_INVAL: u8 = 4;
pub const S_RANGE: u8 = 5;
pub const S_NOENT: u8 = 6;
pub const MAP_RW: u32 = 3;
pub const ATTACH_F_BYPASS: u32 = 1;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_MSI: u8 = 1;

pub const REQ: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x0800,
    used: 0x1000,
};
pub const EVT: RingLayout = RingLayout {
    desc: 0x2000,
    avail: 0x2800,
    used: 0x3000,
};
pub const REQUEST: usize = 0x4000;
pub const REPLY: usize = 0x6000;
pub const INDIRECT: usize = 0x9000;
pub const REACT: Duration = Duration::from_secs(5);

/// The VIOT endpoint id of `bdf` (`0000:00:05.0`): bus << 8 | device << 3 | function.
pub fn endpoint_id(bdf: &str) -> Option<u32> {
    let (rest, func) = bdf.rsplit_once('.')?;
    let mut parts = rest.rsplit(':');
    let dev = u32::from_str_radix(parts.next()?, 16).ok()?;
    let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
    let func = u32::from_str_radix(func, 16).ok()?;
    (bus < 256 && dev < 32 && func < 8).then_some(bus << 8 | dev << 3 | func)
}

pub fn status_name(s: Option<u8>) -> String {
    match s {
        None => "no reply".into(),
        Some(0) => "OK".into(),
        Some(1) => "IOERR".into(),
        Some(2) => "UNSUPP".into(),
        Some(3) => "DEVERR".into(),
        Some(4) => "INVAL".into(),
        Some(5) => "RANGE".into(),
        Some(6) => "NOENT".into(),
        Some(7) => "FAULT".into(),
        Some(8) => "NOMEM".into(),
        Some(v) => format!("{v:#x}"),
    }
}

pub fn attach(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut b = vec![T_ATTACH, 0, 0, 0];
    for v in [domain, endpoint, flags, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

pub fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
    let mut b = attach(domain, endpoint, 0);
    b[0] = T_DETACH;
    b
}

pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![T_MAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    for v in [start, end, phys] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

pub fn unmap(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut b = vec![T_UNMAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    for v in [start, end] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&[0; 4]);
    b
}

pub fn probe(endpoint: u32) -> Vec<u8> {
    let mut b = vec![T_PROBE, 0, 0, 0];
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.resize(72, 0);
    b
}

/// The IOMMU's raw driver.
pub struct Iommu<'a> {
    pub d: Driver<'a>,
    req: Option<Queue<'a>>,
    evt: Option<Queue<'a>>,
    pub features: u64,
    /// The real endpoint's id.
    pub endpoint: u32,
    pub probe_size: u32,
    pub domains: (u32, u32),
}

impl<'a> Iommu<'a> {
    pub fn new(s: &'a Session, endpoint: u32) -> Result<Iommu<'a>, String> {
        let d = Driver::new(s)?;
        let cfg = find_block(
            &s.dev,
            &s.cfg,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            "device-configuration",
        )?;
        let mut c = [0u8; 40];
        s.dev.read(&cfg.region, cfg.base, &mut c)?;
        Ok(Iommu {
            d,
            req: None,
            evt: None,
            features: 0,
            endpoint,
            probe_size: u32_at(&c, 32).unwrap_or(0),
            domains: (u32_at(&c, 24).unwrap_or(0), u32_at(&c, 28).unwrap_or(0)),
        })
    }

    /// Reset, features, requestq and eventq (no buffers), DRIVER_OK.
    pub fn start(&mut self) -> Result<(), String> {
        (self.req, self.evt) = (None, None);
        self.d.reset()?;
        let size = |i| -> Result<u16, String> {
            let max = self.d.t.queue_max(i)?;
            if max == 0 {
                return Err(format!("queue {i} does not exist"));
            }
            Ok(1 << (15 - max.min(16).leading_zeros()))
        };
        let plans = [(0, size(0)?, REQ), (1, size(1)?, EVT)];
        let (features, queues) = self.d.start(WANTED, &plans)?;
        self.features = features;
        let mut queues = queues.into_iter();
        self.req = queues.next();
        self.evt = queues.next();
        Ok(())
    }

    pub fn queue(&self) -> Result<&Queue<'a>, String> {
        self.req
            .as_ref()
            .ok_or_else(|| "requestq not set up".into())
    }

    /// Publishes requestq chain `head` (already written) and waits for it.
    pub fn fire(&mut self, head: u16) -> Result<Reaction, String> {
        let q = self.req.as_mut().ok_or("requestq not set up")?;
        let since = q.ring.used_idx()?;
        q.ring.publish(head)?;
        self.d.kick(&q.info)?;
        Ok(self.d.watch(&self.queue()?.ring, since, head, REACT))
    }

    /// One request: `readable` bytes, then `writable` bytes for the reply. Returns the
    /// reaction and the status in the reply's tail (when the device wrote one).
    pub fn request(
        &mut self,
        readable: &[u8],
        writable: u32,
    ) -> Result<(Reaction, Option<u8>), String> {
        self.d.s.mem.write(REQUEST, readable)?;
        self.d.s.mem.write(REPLY, &vec![0xee; writable as usize])?;
        let q = self.queue()?;
        let mut i = 0u16;
        if !readable.is_empty() {
            let next = if writable > 0 { DESC_F_NEXT } else { 0 };
            q.ring
                .desc(0, self.d.at(REQUEST), readable.len() as u32, next, 1)?;
            i = 1;
        }
        if writable > 0 {
            q.ring
                .desc(i, self.d.at(REPLY), writable, DESC_F_WRITE, 0)?;
        }
        let r = self.fire(0)?;
        let status = match r.elem {
            Some(e) if e.len >= 4 && e.len == writable => {
                let mut s = [0u8; 1];
                self.d.s.mem.read(REPLY + writable as usize - 4, &mut s)?;
                Some(s[0])
            }
            _ => None,
        };
        Ok((r, status))
    }

    /// A request with a 4-byte tail (a PROBE gets room for its properties).
    pub fn ask(&mut self, readable: &[u8]) -> Result<Option<u8>, String> {
        let writable = if readable.first() == Some(&T_PROBE) {
            self.probe_size + 4
        } else {
            4
        };
        Ok(self.request(readable, writable)?.1)
    }
}

impl Victim for Iommu<'_> {
    fn recover(&mut self, n: u64) -> Result<String, String> {
        let before = self.d.status()?;
        self.start()?;
        let ep = self.endpoint;
        let st = self.ask(&probe(ep))?;
        let mut prop = [0u8; 8];
        self.d.s.mem.read(REPLY, &mut prop)?;
        let kind = u16::from_le_bytes([prop[0], prop[1]]);
        if st != Some(S_OK) || kind != PROBE_T_RESV_MEM || prop[4] != RESV_MEM_T_MSI {
            return Err(format!(
                "PROBE {ep}: {} property {prop:x?}",
                status_name(st)
            ));
        }
        let domain = self.domains.0.max(1) + (n % 16) as u32;
        let iova = 0x10_0000 * (1 + n % 8);
        let steps = [
            ("ATTACH", attach(domain, ep, 0)),
            ("MAP", map(domain, iova, iova + 0xf_ffff, 0x20_0000, MAP_RW)),
            ("UNMAP", unmap(domain, iova, iova + 0xf_ffff)),
            ("DETACH", detach(domain, ep)),
        ];
        for (what, req) in steps {
            let st = self.ask(&req)?;
            if st != Some(S_OK) {
                return Err(format!("{what}: {}", status_name(st)));
            }
        }
        Ok(format!(
            "status was {before:#04x}; reset; PROBE (MSI window), ATTACH/MAP/UNMAP/DETACH of \
             endpoint {ep} in domain {domain} OK"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_and_request_layouts() {
        assert_eq!(endpoint_id("0000:00:03.0"), Some(0x18));
        assert_eq!(endpoint_id("0000:01:1f.7"), Some(0x1ff));
        assert_eq!(endpoint_id("0000:00:20.0"), None);
        assert_eq!(endpoint_id("nonsense"), None);
        let a = attach(7, 0x18, 1);
        assert_eq!(a.len(), 20);
        assert_eq!(&a[..12], &[T_ATTACH, 0, 0, 0, 7, 0, 0, 0, 0x18, 0, 0, 0]);
        assert_eq!(&a[12..16], &[1, 0, 0, 0]);
        assert_eq!(detach(7, 0x18)[0], T_DETACH);
        let m = map(2, 0x1000, 0x1fff, 0x8000, MAP_RW);
        assert_eq!(m.len(), 36);
        assert_eq!(&m[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&m[32..36], &3u32.to_le_bytes());
        assert_eq!(unmap(2, 0x1000, 0x1fff).len(), 28);
        assert_eq!(probe(0x18).len(), 72);
        assert_eq!(status_name(Some(S_NOENT)), "NOENT");
        assert_eq!(status_name(None), "no reply");
    }
}
