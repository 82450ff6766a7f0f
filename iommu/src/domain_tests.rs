use super::*;

const RW: Access = Access::READ_WRITE;

fn state() -> (State, Arc<EndpointCore>, Arc<EndpointCore>) {
    let mut s = State::new((1, 100), 64);
    let a = s.add_endpoint(0x8).unwrap();
    let b = s.add_endpoint(0x10).unwrap();
    (s, a, b)
}

fn cached(core: &EndpointCore, iova: u64) -> bool {
    let tlb = core.iotlb.read().unwrap();
    Iotlb::lookup(&*tlb, GuestAddress(iova), 1, Permissions::Read).is_ok()
}

#[test]
fn endpoints_are_registered_once() {
    let (mut s, _, _) = state();
    assert!(s.add_endpoint(0x8).is_none());
    assert!(s.has_endpoint(0x10));
    assert!(!s.has_endpoint(0x18));
}

#[test]
fn attach_creates_the_domain_and_detach_frees_it() {
    let (mut s, _, _) = state();
    assert!(matches!(s.attach(1, 0x18), Err(Status::NoEnt)));
    assert_eq!(s.domain_count(), 0);
    s.attach(1, 0x8).unwrap().wait();
    assert_eq!(s.endpoint_domain(0x8), Some(1));
    assert_eq!(s.domain_count(), 1);
    s.map(1, 0x1000, 0x1fff, 0x5000, RW).unwrap();
    // Attaching again to the same domain changes nothing.
    s.attach(1, 0x8).unwrap().wait();
    s.detach(1, 0x8).unwrap().wait();
    assert_eq!(s.endpoint_domain(0x8), None);
    assert_eq!(s.domain_count(), 0);
    // The domain went with its mappings: re-created empty.
    s.attach(1, 0x8).unwrap().wait();
    s.unmap(1, 0, u64::MAX).unwrap().wait();
    let f = s.refill(&s.endpoints[&0x8].core, 0x1000, 1, Permissions::Read);
    assert_eq!(f.unwrap_err().reason, FaultReason::Mapping);
}

#[test]
fn attach_checks_the_domain_range() {
    let (mut s, _, _) = state();
    assert!(matches!(s.attach(0, 0x8), Err(Status::Range)));
    assert!(matches!(s.attach(101, 0x8), Err(Status::Range)));
    s.attach(100, 0x8).unwrap().wait();
}

#[test]
fn detach_rules() {
    let (mut s, _, _) = state();
    s.attach(1, 0x8).unwrap().wait();
    // Unknown endpoint, unknown domain, endpoint not in that domain.
    assert!(matches!(s.detach(1, 0x18), Err(Status::NoEnt)));
    assert!(matches!(s.detach(2, 0x8), Err(Status::NoEnt)));
    s.attach(2, 0x10).unwrap().wait();
    assert!(matches!(s.detach(2, 0x8), Err(Status::Inval)));
    assert_eq!(s.endpoint_domain(0x8), Some(1));
}

#[test]
fn domains_are_shared_by_endpoints() {
    let (mut s, a, b) = state();
    s.attach(3, 0x8).unwrap().wait();
    s.attach(3, 0x10).unwrap().wait();
    assert_eq!(s.domain_count(), 1);
    s.map(3, 0x1000, 0x1fff, 0x7000, RW).unwrap();
    s.refill(&a, 0x1000, 0x1000, Permissions::Read).unwrap();
    s.refill(&b, 0x1000, 0x1000, Permissions::Write).unwrap();
    assert!(cached(&a, 0x1800) && cached(&b, 0x1800));
    // One endpoint leaves: the domain and its mappings stay for the other.
    s.detach(3, 0x8).unwrap().wait();
    assert_eq!(s.domain_count(), 1);
    assert!(
        !cached(&a, 0x1800),
        "detach must flush the endpoint's IOTLB"
    );
    assert_eq!(
        s.refill(&a, 0x1000, 1, Permissions::Read)
            .unwrap_err()
            .reason,
        FaultReason::Domain
    );
    s.refill(&b, 0x1000, 1, Permissions::Read).unwrap();
    // UNMAP flushes every endpoint of the domain.
    s.attach(3, 0x8).unwrap().wait();
    s.refill(&a, 0x1000, 1, Permissions::Read).unwrap();
    s.unmap(3, 0x1000, 0x1fff).unwrap().wait();
    assert!(!cached(&a, 0x1000) && !cached(&b, 0x1000));
}

#[test]
fn attach_to_another_domain_detaches_first() {
    let (mut s, a, _) = state();
    s.attach(1, 0x8).unwrap().wait();
    s.map(1, 0x1000, 0x1fff, 0x7000, RW).unwrap();
    s.refill(&a, 0x1000, 1, Permissions::Read).unwrap();
    s.attach(2, 0x8).unwrap().wait();
    assert_eq!(s.endpoint_domain(0x8), Some(2));
    // Domain 1 lost its last endpoint: gone.
    assert_eq!(s.domain_count(), 1);
    assert!(matches!(
        s.map(1, 0x2000, 0x2fff, 0, RW),
        Err(Status::NoEnt)
    ));
    assert!(!cached(&a, 0x1000));
    assert_eq!(
        s.refill(&a, 0x1000, 1, Permissions::Read)
            .unwrap_err()
            .reason,
        FaultReason::Mapping
    );
}

#[test]
fn map_and_unmap_need_a_domain() {
    let (mut s, _, _) = state();
    assert!(matches!(
        s.map(5, 0x1000, 0x1fff, 0, RW),
        Err(Status::NoEnt)
    ));
    assert!(matches!(s.unmap(5, 0x1000, 0x1fff), Err(Status::NoEnt)));
    s.attach(5, 0x8).unwrap().wait();
    assert!(matches!(
        s.map(5, 0x1001, 0x1fff, 0, RW),
        Err(Status::Range)
    ));
    s.map(5, 0x1000, 0x2fff, 0, RW).unwrap();
    assert!(matches!(
        s.map(5, 0x2000, 0x2fff, 0, RW),
        Err(Status::Inval)
    ));
    assert!(matches!(s.unmap(5, 0x1000, 0x1fff), Err(Status::Range)));
}

#[test]
fn unattached_endpoint_faults_with_domain_reason() {
    let (s, a, _) = state();
    let fault = s.refill(&a, 0x4000, 8, Permissions::Write).unwrap_err();
    assert_eq!(
        fault,
        Fault {
            endpoint: 0x8,
            reason: FaultReason::Domain,
            address: 0x4000,
            access: Permissions::Write,
        }
    );
}

#[test]
fn reset_detaches_everything() {
    let (mut s, a, _) = state();
    s.attach(1, 0x8).unwrap().wait();
    s.attach(2, 0x10).unwrap().wait();
    s.map(1, 0, 0xfff, 0, RW).unwrap();
    s.refill(&a, 0, 1, Permissions::Read).unwrap();
    s.reset().wait();
    assert_eq!(s.domain_count(), 0);
    assert_eq!(s.endpoint_domain(0x8), None);
    assert_eq!(s.endpoint_domain(0x10), None);
    assert!(!cached(&a, 0));
    // Endpoints stay registered.
    assert!(s.has_endpoint(0x8));
}
