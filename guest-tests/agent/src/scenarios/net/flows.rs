//! The TCP flows of the `net` scenario: per direction, N connections to the host's
//! peer, each from its own thread pinned to one CPU (the driver's XPS maps CPU i to
//! transmit queue i, and the TAP steers a flow's traffic to the queue its packets
//! came from, so each flow stays on one queue pair). Socket I/O is in 256 KiB pieces:
//! a guest syscall is expensive on PVM hosts.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::wire::{self, Direction, Header, Stream, ANSWER_LEN};
use crate::disk;

/// Bytes per socket read or write.
const IO_SIZE: usize = 256 << 10;
/// A flow that makes no progress for this long fails.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// What one flow did, as the guest saw it.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The CPU the thread was pinned to and the one it ended on.
    pub pinned: usize,
    pub ended_on: Option<usize>,
    pub bytes: u64,
    /// sha256 of what the guest sent (upload) or received (download); empty when not
    /// verifying.
    pub sha256: String,
    /// Upload: the peer's sha256 of what it received. Download: the expected sha256
    /// of the stream, computed after the transfer.
    pub reference: String,
    /// From connect to the receiver's answer.
    pub elapsed: Duration,
    /// Until connected, and until the last data byte was written or read.
    pub connect: Duration,
    pub data_done: Duration,
}

/// Runs `flows` concurrent flows of `len` bytes each in `direction` with the peer at
/// [`wire::PEER_IP`]; one result per flow, in flow order.
pub fn run(
    direction: Direction,
    flows: u8,
    len: u64,
    verify: bool,
    cpus: usize,
) -> Vec<Result<Flow, String>> {
    run_to(wire::PEER_IP, direction, flows, len, verify, cpus)
}

/// [`run`] with the peer listening at `peer_ip` (port [`wire::PORT`]).
pub fn run_to(
    peer_ip: [u8; 4],
    direction: Direction,
    flows: u8,
    len: u64,
    verify: bool,
    cpus: usize,
) -> Vec<Result<Flow, String>> {
    let peer = SocketAddrV4::new(Ipv4Addr::from(peer_ip), wire::PORT);
    let handles: Vec<_> = (0..flows)
        .map(|flow| {
            let cpu = usize::from(flow) % cpus.max(1);
            std::thread::spawn(move || one_flow(peer, direction, flow, cpu, len, verify))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("flow thread panicked".into()))
        })
        .collect()
}

fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments; a negative result is an error.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

fn one_flow(
    peer: SocketAddrV4,
    direction: Direction,
    flow: u8,
    cpu: usize,
    len: u64,
    verify: bool,
) -> Result<Flow, String> {
    disk::pin(&[cpu])?;
    let started = Instant::now();
    let mut sock = TcpStream::connect_timeout(&peer.into(), Duration::from_secs(30))
        .map_err(|e| format!("connect {peer}: {e}"))?;
    let connect = started.elapsed();
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| sock.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let header = Header {
        direction,
        flow,
        len,
        seed: wire::flow_seed(direction, flow),
    };
    sock.write_all(&header.encode())
        .map_err(|e| format!("send header: {e}"))?;
    let mut data_done = Duration::ZERO;
    let mut done = || data_done = started.elapsed();
    let (bytes, sha256, reference) = match direction {
        Direction::Upload => upload(&mut sock, &header, verify, &mut done)?,
        Direction::Download => download(&mut sock, &header, verify, &mut done)?,
    };
    let elapsed = started.elapsed();
    let reference = match (direction, verify) {
        (Direction::Download, true) => wire::stream_sha256(header.seed, len),
        _ => reference,
    };
    Ok(Flow {
        pinned: cpu,
        ended_on: current_cpu(),
        bytes,
        sha256,
        reference,
        elapsed,
        connect,
        data_done,
    })
}

/// Sends the stream, then reads the peer's sha256 of what it received. Calls `done`
/// after the last write.
fn upload(
    sock: &mut TcpStream,
    header: &Header,
    verify: bool,
    done: &mut dyn FnMut(),
) -> Result<(u64, String, String), String> {
    let mut stream = Stream::new(header.seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; IO_SIZE];
    let mut sent = 0u64;
    while sent < header.len {
        let n = usize::try_from((header.len - sent).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        stream.fill(&mut buf[..n]);
        if verify {
            hash.update(&buf[..n]);
        }
        sock.write_all(&buf[..n])
            .map_err(|e| format!("send at byte {sent}: {e}"))?;
        sent += n as u64;
    }
    done();
    let mut answer = [0u8; ANSWER_LEN];
    sock.read_exact(&mut answer)
        .map_err(|e| format!("read the peer's sha256 after {sent} bytes: {e}"))?;
    let ours = if verify {
        wire::hex(&hash.finalize())
    } else {
        String::new()
    };
    Ok((sent, ours, wire::hex(&answer)))
}

/// Receives the stream, then sends the sha256 of what arrived (zeros when not
/// verifying). Calls `done` after the last read.
fn download(
    sock: &mut TcpStream,
    header: &Header,
    verify: bool,
    done: &mut dyn FnMut(),
) -> Result<(u64, String, String), String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; IO_SIZE];
    let mut got = 0u64;
    while got < header.len {
        let want = usize::try_from((header.len - got).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        let n = match sock.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("the peer closed after {got} bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("receive at byte {got}: {e}")),
        };
        if verify {
            hash.update(&buf[..n]);
        }
        got += n as u64;
    }
    done();
    let (answer, ours) = if verify {
        let digest: [u8; ANSWER_LEN] = hash.finalize().into();
        (digest, wire::hex(&digest))
    } else {
        ([0u8; ANSWER_LEN], String::new())
    };
    sock.write_all(&answer)
        .map_err(|e| format!("send the sha256: {e}"))?;
    // Wait for the peer to close, so the answer is delivered before we go on.
    let _ = sock.read(&mut buf[..1]);
    Ok((got, ours, String::new()))
}
