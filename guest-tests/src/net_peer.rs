//! The host end of the net checks: a TCP server on 10.0.2.2 (or another host address
//! of the namespace, [`NetPeer::start_on`]) inside a [`NetNs`] that
//! serves the guest's flows (protocol and byte stream in
//! `agent/src/scenarios/net/wire.rs`, shared with the guest through `#[path]`). Per
//! connection it receives or sends the requested bytes, computes their sha256,
//! optionally compares them with the expected stream, and times the transfer from
//! the first data byte to the last (download: to the guest's answer, which it sends
//! once it has everything).

#[path = "../agent/src/scenarios/net/wire.rs"]
#[allow(dead_code)] // guest-only items
pub mod wire;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Error, NetNs, Result};
use wire::{Direction, Header, Stream, ANSWER_LEN, HEADER_LEN};

/// Bytes per socket read or write.
const IO_SIZE: usize = 256 << 10;
/// A connection that makes no progress for this long is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// One flow as the peer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowReport {
    pub direction: Direction,
    pub flow: u8,
    /// Stream bytes received (upload) or sent (download).
    pub bytes: u64,
    /// sha256 of those bytes, hex (empty when the peer does not verify).
    pub sha256: String,
    /// Upload, when verifying: whether every received byte was the expected stream.
    pub matches_stream: Option<bool>,
    /// Download: the sha256 the guest answered with (zeros when it does not verify).
    pub guest_sha256: Option<String>,
    /// First data byte received or sent.
    pub started: Instant,
    /// Last data byte received (upload), or the guest's answer received (download).
    pub finished: Instant,
}

impl FlowReport {
    pub fn seconds(&self) -> f64 {
        self.finished.duration_since(self.started).as_secs_f64()
    }
}

/// Aggregate throughput of `direction` in MB/s (10^6 bytes/s): all its flows' bytes
/// over the time from the first flow's start to the last flow's end.
pub fn direction_mbps(flows: &[FlowReport], direction: Direction) -> Option<f64> {
    let flows: Vec<&FlowReport> = flows.iter().filter(|f| f.direction == direction).collect();
    let start = flows.iter().map(|f| f.started).min()?;
    let end = flows.iter().map(|f| f.finished).max()?;
    let secs = end.duration_since(start).as_secs_f64();
    let bytes: u64 = flows.iter().map(|f| f.bytes).sum();
    (secs > 0.0).then(|| bytes as f64 / secs / 1e6)
}

#[derive(Default)]
struct Shared {
    flows: Mutex<Vec<FlowReport>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// The running server; stops accepting when dropped.
pub struct NetPeer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl NetPeer {
    /// Listens on 10.0.2.2:[`wire::PORT`] inside `ns`. With `verify`, uploads are
    /// compared with the expected stream and every flow is hashed.
    pub fn start(ns: &NetNs, verify: bool) -> Result<NetPeer> {
        NetPeer::start_on(ns, Ipv4Addr::from(wire::PEER_IP), verify)
    }

    /// Listens on `ip`:[`wire::PORT`] inside `ns` (`ip` must be the host end of one of
    /// its TAPs, see [`NetNs::with_taps`]); otherwise as [`NetPeer::start`].
    pub fn start_on(ns: &NetNs, ip: Ipv4Addr, verify: bool) -> Result<NetPeer> {
        let addr = (ip, wire::PORT);
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .map_err(|e| Error::io(format!("listen on {addr:?} in {}", ns.name()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set the listener non-blocking", e))?;
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let accept = thread::spawn(move || accept_loop(&listener, &state, verify));
        Ok(NetPeer {
            shared,
            accept: Some(accept),
        })
    }

    /// The flows finished so far, in completion order.
    pub fn flows(&self) -> Vec<FlowReport> {
        lock(&self.shared.flows).clone()
    }

    /// Connections that failed (bad header, I/O error, timeout).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    /// Forgets the flows and errors so far (between two guests).
    pub fn clear(&self) {
        lock(&self.shared.flows).clear();
        lock(&self.shared.errors).clear();
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, verify: bool) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, from)) => {
                let shared = shared.clone();
                thread::spawn(move || match serve(sock, verify) {
                    Ok(report) => lock(&shared.flows).push(report),
                    Err(e) => lock(&shared.errors).push(format!("connection from {from}: {e}")),
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                lock(&shared.errors).push(format!("accept: {e}"));
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Serves one connection: header, data, answer.
fn serve(mut sock: TcpStream, verify: bool) -> std::result::Result<FlowReport, String> {
    sock.set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| sock.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    let mut raw = [0u8; HEADER_LEN];
    sock.read_exact(&mut raw)
        .map_err(|e| format!("read the header: {e}"))?;
    let header = Header::decode(&raw)?;
    match header.direction {
        Direction::Upload => receive(&mut sock, &header, verify),
        Direction::Download => send(&mut sock, &header, verify),
    }
}

/// Upload: reads `len` bytes, hashes (and compares) them, answers with the sha256.
fn receive(
    sock: &mut TcpStream,
    header: &Header,
    verify: bool,
) -> std::result::Result<FlowReport, String> {
    let mut buf = vec![0u8; IO_SIZE];
    let mut expected = vec![0u8; if verify { IO_SIZE } else { 0 }];
    let mut stream = Stream::new(header.seed);
    let mut hash = Sha256::new();
    let mut matches = true;
    let (mut got, mut started) = (0u64, None);
    while got < header.len {
        let want = usize::try_from((header.len - got).min(IO_SIZE as u64)).unwrap_or(IO_SIZE);
        let n = match sock.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("the guest closed after {got} bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("receive at byte {got}: {e}")),
        };
        started.get_or_insert_with(Instant::now);
        if verify {
            hash.update(&buf[..n]);
            stream.fill(&mut expected[..n]);
            matches &= buf[..n] == expected[..n];
        }
        got += n as u64;
    }
    let finished = Instant::now();
    let digest: [u8; ANSWER_LEN] = if verify {
        hash.finalize().into()
    } else {
        [0; ANSWER_LEN]
    };
    sock.write_all(&digest)
        .map_err(|e| format!("send the sha256: {e}"))?;
    Ok(FlowReport {
        direction: header.direction,
        flow: header.flow,
        bytes: got,
        sha256: if verify {
            wire::hex(&digest)
        } else {
            String::new()
        },
        matches_stream: verify.then_some(matches),
        guest_sha256: None,
        started: started.unwrap_or(finished),
        finished,
    })
}

/// Download: sends `len` stream bytes, then waits for the guest's answer.
fn send(
    sock: &mut TcpStream,
    header: &Header,
    verify: bool,
) -> std::result::Result<FlowReport, String> {
    let mut buf = vec![0u8; IO_SIZE];
    let mut stream = Stream::new(header.seed);
    let mut hash = Sha256::new();
    let started = Instant::now();
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
    let mut answer = [0u8; ANSWER_LEN];
    sock.read_exact(&mut answer)
        .map_err(|e| format!("read the guest's sha256 after {sent} bytes: {e}"))?;
    let finished = Instant::now();
    Ok(FlowReport {
        direction: header.direction,
        flow: header.flow,
        bytes: sent,
        sha256: if verify {
            wire::hex(&hash.finalize())
        } else {
            String::new()
        },
        matches_stream: None,
        guest_sha256: Some(wire::hex(&answer)),
        started,
        finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the guest's side of one flow from inside the namespace.
    fn guest_flow(ns: &NetNs, direction: Direction, flow: u8, len: u64) -> String {
        ns.run(move || {
            let mut s =
                TcpStream::connect((std::net::Ipv4Addr::from(wire::PEER_IP), wire::PORT)).unwrap();
            let seed = wire::flow_seed(direction, flow);
            let h = Header {
                direction,
                flow,
                len,
                seed,
            };
            s.write_all(&h.encode()).unwrap();
            let mut data = vec![0u8; len as usize];
            let mut answer = [0u8; ANSWER_LEN];
            match direction {
                Direction::Upload => {
                    Stream::new(seed).fill(&mut data);
                    s.write_all(&data).unwrap();
                    s.read_exact(&mut answer).unwrap();
                    wire::hex(&answer)
                }
                Direction::Download => {
                    s.read_exact(&mut data).unwrap();
                    let digest: [u8; 32] = Sha256::digest(&data).into();
                    s.write_all(&digest).unwrap();
                    wire::hex(&digest)
                }
            }
        })
        .unwrap()
    }

    #[test]
    fn serves_uploads_and_downloads_in_the_namespace() {
        if let Some(why) = NetNs::unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let ns = NetNs::create().unwrap();
        let peer = NetPeer::start(&ns, true).unwrap();
        let len = 3 << 20;
        let up = guest_flow(&ns, Direction::Upload, 0, len);
        let down = guest_flow(&ns, Direction::Download, 1, len + 5);
        // A bad header is an error, not a flow.
        ns.run(|| {
            let mut s =
                TcpStream::connect((std::net::Ipv4Addr::from(wire::PEER_IP), wire::PORT)).unwrap();
            s.write_all(&[0u8; HEADER_LEN]).unwrap();
            let _ = s.read(&mut [0u8; 1]);
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (peer.flows().len() < 2 || peer.errors().is_empty()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let mut flows = peer.flows();
        flows.sort_by_key(|f| f.direction);
        assert_eq!(flows.len(), 2, "{flows:?}");
        let (u, d) = (&flows[0], &flows[1]);
        assert_eq!((u.direction, u.flow, u.bytes), (Direction::Upload, 0, len));
        let up_expected = wire::stream_sha256(wire::flow_seed(Direction::Upload, 0), len);
        assert_eq!(u.sha256, up_expected);
        assert_eq!(up, up_expected);
        assert_eq!(u.matches_stream, Some(true));
        assert_eq!((d.direction, d.bytes), (Direction::Download, len + 5));
        assert_eq!(d.guest_sha256.as_deref(), Some(down.as_str()));
        assert_eq!(d.sha256, down);
        assert!(direction_mbps(&flows, Direction::Upload).unwrap() > 0.0);
        assert!(peer.errors()[0].contains("magic"), "{:?}", peer.errors());
        peer.clear();
        assert!(peer.flows().is_empty() && peer.errors().is_empty());
    }
}
