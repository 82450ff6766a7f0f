use std::sync::Mutex;

use super::*;
use crate::domain::State;
use crate::fault::FaultQueue;
use crate::testing::req;

const CTX: RequestCtx = RequestCtx {
    map_unmap: true,
    probe: true,
    probe_size: 64,
};

fn shared() -> Shared {
    let mut state = State::new((1, 1000), 128);
    state.add_endpoint(0x8).unwrap();
    state.add_endpoint(0x10).unwrap();
    Shared {
        state: Mutex::new(state),
        faults: FaultQueue::new(8),
    }
}

/// Parses and executes `bytes` with a 4-byte writable part (the PROBE size for
/// PROBE); the status.
fn run(shared: &Shared, bytes: &[u8]) -> Status {
    let out = if bytes[0] == T_PROBE {
        CTX.probe_size as usize + TAIL_SIZE
    } else {
        TAIL_SIZE
    };
    match parse(bytes, out, &CTX) {
        Parsed::Request(r) => {
            let reply = execute(r, shared, &CTX);
            reply.fence.wait();
            reply.status
        }
        Parsed::Reject(status) => status,
        Parsed::Ignore => panic!("ignored"),
    }
}

#[test]
fn parse_decodes_each_type() {
    let p = |b: &[u8], out| parse(b, out, &CTX);
    assert_eq!(
        p(&req::attach(7, 0x10), 4),
        Parsed::Request(Request::Attach {
            domain: 7,
            endpoint: 0x10,
            flags: 0,
            reserved_set: false
        })
    );
    assert_eq!(
        p(&req::detach(7, 0x10), 4),
        Parsed::Request(Request::Detach {
            domain: 7,
            endpoint: 0x10
        })
    );
    assert_eq!(
        p(&req::map(7, 0x1000, 0x1fff, 0x9000, 3), 4),
        Parsed::Request(Request::Map {
            domain: 7,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x9000,
            flags: 3
        })
    );
    assert_eq!(
        p(&req::unmap(7, 0x1000, 0x1fff), 4),
        Parsed::Request(Request::Unmap {
            domain: 7,
            virt_start: 0x1000,
            virt_end: 0x1fff
        })
    );
    assert_eq!(
        p(&req::probe(0x10), 68),
        Parsed::Request(Request::Probe { endpoint: 0x10 })
    );
}

#[test]
fn bad_lengths_are_inval_for_every_type() {
    let requests = [
        req::attach(1, 8),
        req::detach(1, 8),
        req::map(1, 0, 0xfff, 0, 1),
        req::unmap(1, 0, 0xfff),
        req::probe(8),
    ];
    for r in &requests {
        let out = if r[0] == T_PROBE { 68 } else { 4 };
        let short = &r[..r.len() - 1];
        let mut long = r.clone();
        long.push(0);
        assert_eq!(
            parse(short, out, &CTX),
            Parsed::Reject(Status::Inval),
            "type {}",
            r[0]
        );
        assert_eq!(parse(&long, out, &CTX), Parsed::Reject(Status::Inval));
        assert_eq!(parse(r, out + 4, &CTX), Parsed::Reject(Status::Inval));
        assert!(matches!(parse(r, out, &CTX), Parsed::Request(_)));
    }
    // A PROBE whose properties buffer is smaller than probe_size.
    assert_eq!(
        parse(&req::probe(8), 64, &CTX),
        Parsed::Reject(Status::Inval)
    );
    assert_eq!(parse(&[], 4, &CTX), Parsed::Reject(Status::Inval));
    assert_eq!(
        parse(&[T_ATTACH, 0, 0], 4, &CTX),
        Parsed::Reject(Status::Inval)
    );
}

#[test]
fn unknown_and_unnegotiated_types() {
    assert_eq!(parse(&[0; 20], 4, &CTX), Parsed::Reject(Status::Unsupp));
    assert_eq!(parse(&[6; 20], 4, &CTX), Parsed::Reject(Status::Unsupp));
    let no_map = RequestCtx {
        map_unmap: false,
        ..CTX
    };
    assert_eq!(
        parse(&req::map(1, 0, 0xfff, 0, 1), 4, &no_map),
        Parsed::Reject(Status::Unsupp)
    );
    let no_probe = RequestCtx {
        probe: false,
        ..CTX
    };
    assert_eq!(parse(&req::probe(8), 68, &no_probe), Parsed::Ignore);
}

#[test]
fn attach_statuses() {
    let s = shared();
    assert_eq!(run(&s, &req::attach(1, 0x18)), Status::NoEnt);
    let mut bypass = req::attach(1, 0x8);
    bypass[12] = ATTACH_F_BYPASS as u8;
    assert_eq!(run(&s, &bypass), Status::Inval);
    let mut reserved = req::attach(1, 0x8);
    reserved[19] = 1;
    assert_eq!(run(&s, &reserved), Status::Inval);
    assert_eq!(run(&s, &req::attach(1, 0x8)), Status::Ok);
    assert_eq!(s.lock().endpoint_domain(0x8), Some(1));
}

#[test]
fn detach_statuses() {
    let s = shared();
    assert_eq!(run(&s, &req::attach(1, 0x8)), Status::Ok);
    assert_eq!(run(&s, &req::detach(2, 0x8)), Status::NoEnt);
    assert_eq!(run(&s, &req::detach(1, 0x18)), Status::NoEnt);
    assert_eq!(run(&s, &req::detach(1, 0x10)), Status::Inval);
    assert_eq!(run(&s, &req::detach(1, 0x8)), Status::Ok);
    assert_eq!(run(&s, &req::detach(1, 0x8)), Status::NoEnt);
}

#[test]
fn map_unmap_statuses() {
    let s = shared();
    let rw = MAP_F_READ | MAP_F_WRITE;
    let steps = [
        (req::map(1, 0x1000, 0x1fff, 0, MAP_F_READ), Status::NoEnt),
        (req::unmap(1, 0x1000, 0x1fff), Status::NoEnt),
        (req::attach(1, 0x8), Status::Ok),
        // Unaligned start, end + 1 or phys; beyond 48 bits.
        (req::map(1, 0x1200, 0x1fff, 0, MAP_F_READ), Status::Range),
        (req::map(1, 0x1000, 0x1ffe, 0, MAP_F_READ), Status::Range),
        (
            req::map(1, 0x1000, 0x1fff, 0x800, MAP_F_READ),
            Status::Range,
        ),
        (
            req::map(1, 1 << 48, (1 << 48) + 0xfff, 0, MAP_F_READ),
            Status::Range,
        ),
        // virt_end < virt_start; unknown or unnegotiated flags.
        (req::map(1, 0x2000, 0xfff, 0, MAP_F_READ), Status::Inval),
        (req::map(1, 0x1000, 0x1fff, 0, MAP_F_MMIO), Status::Inval),
        (req::map(1, 0x1000, 0x1fff, 0, 1 << 7), Status::Inval),
        // The MSI doorbell is reserved.
        (
            req::map(1, 0xfee0_0000, 0xfee0_0fff, 0, MAP_F_WRITE),
            Status::Inval,
        ),
        (req::map(1, 0x1000, 0x2fff, 0x9000, rw), Status::Ok),
        (req::map(1, 0x2000, 0x3fff, 0, MAP_F_READ), Status::Inval),
        (req::unmap(1, 0x1000, 0x1fff), Status::Range),
        (req::unmap(1, 0x0, 0x3fff), Status::Ok),
        (req::unmap(1, 0x0, 0x3fff), Status::Ok),
    ];
    for (i, (request, want)) in steps.iter().enumerate() {
        assert_eq!(run(&s, request), *want, "step {i}");
    }
}

#[test]
fn probe_statuses_and_properties() {
    let s = shared();
    assert_eq!(run(&s, &req::probe(0x18)), Status::NoEnt);
    let Parsed::Request(r) = parse(&req::probe(0x8), 68, &CTX) else {
        panic!("not parsed");
    };
    let reply = execute(r, &s, &CTX);
    assert_eq!(reply.status, Status::Ok);
    let props = reply.properties.unwrap();
    assert_eq!(props.len(), 64);
    let mut expect = vec![0u8; 64];
    expect[..24].copy_from_slice(&[
        1, 0, 20, 0, // RESV_MEM, length 20
        1, 0, 0, 0, // subtype MSI, reserved
        0, 0, 0xe0, 0xfe, 0, 0, 0, 0, // start 0xfee00000
        0xff, 0xff, 0xef, 0xfe, 0, 0, 0, 0, // end 0xfeefffff
    ]);
    assert_eq!(props, expect);
}
