//! The host IOMMU of a hardware endpoint follows its domain's mappings.

use std::sync::Mutex;

use super::*;

const RW: Access = Access::READ_WRITE;

/// What the host IOMMU holds: (iova, size) -> (gpa, write); fails maps at `fail_at`.
#[derive(Default)]
struct HostIommu {
    maps: Mutex<BTreeMap<u64, (u64, u64, bool)>>,
    log: Mutex<Vec<String>>,
    fail_at: Mutex<Option<u64>>,
}

impl DmaMirror for HostIommu {
    fn map(&self, iova: u64, size: u64, gpa: u64, write: bool) -> Result<(), String> {
        if *self.fail_at.lock().unwrap() == Some(iova) {
            return Err("EFAULT".into());
        }
        let mut maps = self.maps.lock().unwrap();
        assert!(
            maps.insert(iova, (size, gpa, write)).is_none(),
            "mapped twice"
        );
        self.log
            .lock()
            .unwrap()
            .push(format!("map {iova:#x}+{size:#x}"));
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        let removed = self.maps.lock().unwrap().remove(&iova);
        assert_eq!(
            removed.map(|r| r.0),
            Some(size),
            "unmap of what was not mapped"
        );
        self.log
            .lock()
            .unwrap()
            .push(format!("unmap {iova:#x}+{size:#x}"));
        Ok(())
    }
}

impl HostIommu {
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.maps
            .lock()
            .unwrap()
            .iter()
            .map(|(&i, &(s, ..))| (i, s))
            .collect()
    }
}

fn setup() -> (State, Arc<HostIommu>) {
    let mut s = State::new((1, 100), 64);
    s.add_endpoint(0x8).unwrap();
    let host = Arc::new(HostIommu::default());
    s.add_endpoint_with(0x10, Some(host.clone())).unwrap();
    (s, host)
}

#[test]
fn attach_replays_and_map_unmap_follow() {
    let (mut s, host) = setup();
    s.attach(1, 0x8).unwrap().wait();
    s.map(1, 0x1000, 0x1fff, 0x5000, RW).unwrap();
    s.map(1, 0x4000, 0x7fff, 0x9000, Access::READ_ONLY).unwrap();
    assert!(host.ranges().is_empty(), "not attached yet");
    s.attach(1, 0x10).unwrap().wait();
    assert_eq!(host.ranges(), [(0x1000, 0x1000), (0x4000, 0x4000)]);
    assert_eq!(host.maps.lock().unwrap()[&0x4000], (0x4000, 0x9000, false));
    s.map(1, 0x10000, 0x10fff, 0x20000, RW).unwrap();
    assert_eq!(host.ranges().len(), 3);
    s.unmap(1, 0x0, 0x7fff).unwrap().wait();
    assert_eq!(host.ranges(), [(0x10000, 0x1000)]);
    // An UNMAP that splits a mapping fails and leaves the host IOMMU as it was.
    assert!(matches!(s.unmap(1, 0x10000, 0x107ff), Err(Status::Range)));
    assert_eq!(host.ranges(), [(0x10000, 0x1000)]);
    // Leaving the domain takes its mappings out of the host IOMMU.
    s.detach(1, 0x10).unwrap().wait();
    assert!(host.ranges().is_empty());
    assert_eq!(
        s.find_mapping(1, 0x10000).map(|m| m.phys_start),
        Some(0x20000)
    );
}

#[test]
fn a_failed_host_map_fails_the_request_and_leaves_nothing() {
    let (mut s, host) = setup();
    s.attach(2, 0x10).unwrap().wait();
    s.attach(2, 0x8).unwrap().wait();
    *host.fail_at.lock().unwrap() = Some(0x3000);
    assert!(matches!(
        s.map(2, 0x3000, 0x3fff, 0x1000, RW),
        Err(Status::DevErr)
    ));
    assert!(
        s.find_mapping(2, 0x3000).is_none(),
        "the software mapping went too"
    );
    assert!(host.ranges().is_empty());
    *host.fail_at.lock().unwrap() = None;
    s.map(2, 0x3000, 0x3fff, 0x1000, RW).unwrap();
    assert_eq!(host.ranges(), [(0x3000, 0x1000)]);
    // ATTACH to a domain whose replay fails is refused; the endpoint stays detached.
    s.attach(3, 0x8).unwrap().wait();
    s.map(3, 0x8000, 0x8fff, 0x1000, RW).unwrap();
    *host.fail_at.lock().unwrap() = Some(0x8000);
    assert!(matches!(s.attach(3, 0x10), Err(Status::DevErr)));
    assert_eq!(s.endpoint_domain(0x10), None, "detached from 2 on the way");
    assert!(host.ranges().is_empty());
}

#[test]
fn reset_empties_the_host_iommu() {
    let (mut s, host) = setup();
    s.attach(5, 0x10).unwrap().wait();
    s.map(5, 0x1000, 0x1fff, 0x5000, RW).unwrap();
    s.map(5, 0x2000, 0x2fff, 0x6000, RW).unwrap();
    s.reset().wait();
    assert!(host.ranges().is_empty());
    let log = host.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "map 0x1000+0x1000",
            "map 0x2000+0x1000",
            "unmap 0x1000+0x1000",
            "unmap 0x2000+0x1000"
        ]
    );
}
