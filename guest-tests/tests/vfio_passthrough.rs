//! Scenario `vfio-passthrough`: ferrio's passthrough function model (`ferrio_pci::vfio`,
//! what `ferrio run --device` uses) embedded in a guest program that plays both the
//! VMM and the guest, against the guest kernel's real VFIO (group and iommufd cdev
//! back ends) on a VF of ferrio's emulated SR-IOV virtio-net PF, behind ferrio's
//! virtio-iommu. The host declares the PF (TAP ftap0) and one VF (ftap1) in a
//! throw-away network namespace and watches ftap1 with a packet socket: it hashes
//! the tagged frames the guest sends through the model, and once it has seen a back
//! end's first frame it writes that back end's tagged frames onto the TAP for the
//! guest to receive. It asserts every value the guest reports (IDs, BAR 0, MSI-X,
//! features, MAC, frames both ways with their sha256, teardown, the VF back on
//! virtio-pci pinging its TAP) and prints why the nested case was skipped.
//!
//! Only ferrio can run it (emulated SR-IOV). Needs root, `ip` and /dev/net/tun:
//! skipped (with a message) otherwise.

#[path = "../agent/src/scenarios/passthrough/spec.rs"]
#[allow(dead_code)]
mod spec;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrio_guest_tests::{run, Boot, NetNs, Outcome, TapSpec};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(900);
/// The net PF is the first device (slot 1), its VF function 1.
const PF_BDF: &str = "0000:00:01.0";
const VF_BDF: &str = "0000:00:01.1";
/// Size of a VF's BAR 0 (64-bit memory), as ferrio declares it.
const VF_BAR0: &str = "0x10000 mem64";

fn ferrio_args() -> Vec<String> {
    vec![
        "--iommu".into(),
        "--net".into(),
        format!("id=pf0,tap={},mac={},iommu=on", spec::TAPS[0], spec::PF_MAC),
        "--net".into(),
        format!(
            "tap={},mac={},vf_of=pf0,iommu=on",
            spec::TAPS[1],
            spec::VF_MAC
        ),
    ]
}

fn taps() -> Vec<TapSpec> {
    (0..spec::TAPS.len())
        .map(|link| {
            let [a, b, c, d] = spec::host_ip(link);
            TapSpec::new(
                spec::TAPS[link],
                &format!("{a}.{b}.{c}.{d}/{}", spec::PREFIX_LEN),
            )
        })
        .collect()
}

fn fresh_tag() -> [u8; spec::TAG_LEN] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::digest(format!("ferrio-passthrough {} {nanos}", std::process::id()));
    let mut tag = [0u8; spec::TAG_LEN];
    tag.copy_from_slice(&digest[..spec::TAG_LEN]);
    tag
}

fn sha256_hex(parts: impl IntoIterator<Item = Vec<u8>>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(&p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One back end's frames from the guest by seq: payload and source MAC.
type Frames = BTreeMap<u32, (Vec<u8>, [u8; 6])>;

/// What the host saw and did on the VF's TAP.
#[derive(Default)]
struct Seen {
    /// Per back end: the guest's tagged frames by seq (payload, source MAC).
    out: BTreeMap<u8, Frames>,
    /// Back ends the host answered, with the frames it wrote.
    answered: BTreeMap<u8, u32>,
    errors: Vec<String>,
}

/// A packet socket on one TAP that records the guest's tagged frames and answers
/// each back end's first one with that back end's frames. Stops when dropped.
struct Wire {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    reader: Option<JoinHandle<()>>,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// An AF_PACKET socket bound to `ifname` (all protocols), 100 ms receive timeout.
fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(os_err("if_nametoindex"));
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: creates a socket; checked before being owned.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = i32::try_from(index).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("bind"));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let buf: libc::c_int = 8 << 20;
    for (opt, ptr, len) in [
        (
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast::<libc::c_void>(),
            std::mem::size_of_val(&tv),
        ),
        (
            libc::SO_RCVBUF,
            std::ptr::addr_of!(buf).cast(),
            std::mem::size_of_val(&buf),
        ),
    ] {
        // SAFETY: `ptr` points to a live value of `len` bytes; the kernel only reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                ptr,
                len as libc::socklen_t,
            )
        };
        if rc != 0 && opt == libc::SO_RCVTIMEO {
            return Err(os_err("SO_RCVTIMEO"));
        }
    }
    Ok(fd)
}

fn send_frame(fd: &OwnedFd, frame: &[u8]) -> Result<(), String> {
    // SAFETY: `frame` is live for the call; the socket is bound to the interface.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if usize::try_from(n) == Ok(frame.len()) {
        Ok(())
    } else {
        Err(os_err("send"))
    }
}

fn answer(fd: &OwnedFd, tag: &[u8; spec::TAG_LEN], backend: u8) -> Result<u32, String> {
    for seq in 0..spec::RX_FRAMES {
        let payload = spec::payload(tag, spec::IN, backend, seq);
        send_frame(
            fd,
            &spec::frame(spec::VF_MAC_BYTES, spec::HOST_MAC_BYTES, &payload),
        )?;
        thread::sleep(Duration::from_millis(spec::RX_GAP_MS));
    }
    Ok(spec::RX_FRAMES)
}

fn read_loop(fd: &OwnedFd, tag: &[u8; spec::TAG_LEN], stop: &AtomicBool, seen: &Mutex<Seen>) {
    let mut buf = vec![0u8; 1 << 16];
    let lock = || seen.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are live and writable for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut from_len,
            )
        };
        let Ok(len) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            lock().errors.push(format!("recvfrom: {e}"));
            return;
        };
        let f = &buf[..len];
        if from.sll_pkttype == libc::PACKET_OUTGOING
            || len < 14
            || f[12..14] != spec::ETHERTYPE.to_be_bytes()
        {
            continue;
        }
        let Some((spec::OUT, backend, seq)) = spec::parse_payload(tag, &f[14..]) else {
            continue;
        };
        let mut src = [0u8; 6];
        src.copy_from_slice(&f[6..12]);
        let payload = f[14..].to_vec();
        let first = {
            let mut s = lock();
            s.out
                .entry(backend)
                .or_default()
                .insert(seq, (payload, src));
            !s.answered.contains_key(&backend)
        };
        if first {
            let sent = answer(fd, tag, backend);
            let mut s = lock();
            match sent {
                Ok(n) => {
                    s.answered.insert(backend, n);
                }
                Err(e) => s.errors.push(format!("answering back end {backend}: {e}")),
            }
        }
    }
}

impl Wire {
    fn start(ns: &NetNs, ifname: &str, tag: [u8; spec::TAG_LEN]) -> Result<Wire, String> {
        let name = ifname.to_owned();
        let fd = ns
            .run(move || packet_socket(&name))
            .map_err(|e| e.to_string())??;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, w) = (stop.clone(), seen.clone());
        let reader = thread::spawn(move || read_loop(&fd, &tag, &s, &w));
        Ok(Wire {
            stop,
            seen,
            reader: Some(reader),
        })
    }

    fn stop(&mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop();
    }
}

fn str_of<'a>(o: &'a Outcome, check: &str) -> &'a str {
    o.value_str(check)
        .unwrap_or_else(|| panic!("{check}: no string value ({:?})", o.value(check)))
}

fn u64_of(o: &Outcome, check: &str) -> u64 {
    o.value_u64(check)
        .unwrap_or_else(|| panic!("{check}: no number ({:?})", o.value(check)))
}

/// One back end's checks against what the host saw and sent.
fn check_backend(o: &Outcome, seen: &Seen, b: u8, tag: &[u8; spec::TAG_LEN]) {
    let name = spec::BACKENDS[usize::from(b)];
    let c = |what: &str| spec::backend_check(name, what);
    assert_eq!(
        str_of(o, &c("ids")),
        "0x1af4:0x1041",
        "{name}: IDs through VFIO"
    );
    assert!(
        str_of(o, &c("bar0")).starts_with(VF_BAR0),
        "{name}: {}",
        str_of(o, &c("bar0"))
    );
    assert_eq!(str_of(o, &c("mac")), spec::VF_MAC);
    assert!(str_of(o, &c("msix")).contains("vfio-msix[0]"), "{name}");
    // Frames out: every seq once on the TAP, from the VF's MAC, hashing as sent.
    let expected_out =
        sha256_hex((0..spec::TX_FRAMES).map(|q| spec::payload(tag, spec::OUT, b, q)));
    assert_eq!(
        str_of(o, &c("tx_sha256")),
        expected_out,
        "{name}: guest's TX hash"
    );
    let out = seen.out.get(&b).cloned().unwrap_or_default();
    assert_eq!(
        out.keys().copied().collect::<Vec<_>>(),
        (0..spec::TX_FRAMES).collect::<Vec<_>>(),
        "{name}: seqs the host saw"
    );
    assert!(
        out.values().all(|(_, src)| *src == spec::VF_MAC_BYTES),
        "{name}: source MAC"
    );
    let sniffed = sha256_hex(out.into_values().map(|(p, _)| p));
    assert_eq!(
        sniffed, expected_out,
        "{name}: sha256 of the frames on the TAP"
    );
    // Frames in: the host answered; the guest got them all.
    assert_eq!(
        seen.answered.get(&b),
        Some(&spec::RX_FRAMES),
        "{name}: host answer"
    );
    assert_eq!(u64_of(o, &c("rx_count")), u64::from(spec::RX_FRAMES));
    let expected_in = sha256_hex((0..spec::RX_FRAMES).map(|q| spec::payload(tag, spec::IN, b, q)));
    assert_eq!(str_of(o, &c("rx_sha256")), expected_in, "{name}: RX hash");
    assert!(u64_of(o, &c("tx_irqs")) > 0 && u64_of(o, &c("rx_irqs")) > 0);
    assert!(
        o.result(&c("teardown")).is_some_and(|r| r.ok),
        "{name}: teardown"
    );
    eprintln!(
        "{name}: {} frames out (sha256 {expected_out}), {} in (sha256 {expected_in})",
        spec::TX_FRAMES,
        spec::RX_FRAMES
    );
}

#[test]
fn ferrio_args_declare_the_pf_and_its_vf() {
    assert_eq!(
        ferrio_args(),
        [
            "--iommu",
            "--net",
            "id=pf0,tap=ftap0,mac=52:54:00:12:34:56,iommu=on",
            "--net",
            "tap=ftap1,mac=52:54:00:00:02:01,vf_of=pf0,iommu=on",
        ]
    );
    assert_eq!(taps()[1], TapSpec::new("ftap1", "10.0.3.2/24"));
    let mac: Vec<String> = spec::VF_MAC_BYTES
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(mac.join(":"), spec::VF_MAC);
}

#[test]
fn vfio_passthrough_model_drives_a_vf_through_guest_vfio() {
    if let Some(why) = NetNs::unavailable() {
        eprintln!("skipping the vfio-passthrough test: {why}");
        return;
    }
    let ns = NetNs::with_taps(&taps()).expect("could not create the network namespace");
    let tag = fresh_tag();
    let mut wire = Wire::start(&ns, spec::TAPS[1], tag).expect("could not open the VF's TAP");
    let mut boot = Boot::new("vfio-passthrough")
        .memory("512M")
        .timeout(TIMEOUT)
        .netns(ns.path());
    boot.extra_cmdline = format!("{}={}", spec::TAG_PARAM, spec::tag_hex(&tag));
    boot.extra_args = ferrio_args();
    let outcome = run(&boot).expect("could not boot the guest");
    let seen = wire.stop();
    eprintln!("{}", outcome.table());
    eprintln!(
        "host on {}: out {:?}, answered {:?}, errors {:?}",
        spec::TAPS[1],
        seen.out
            .iter()
            .map(|(b, m)| (*b, m.len()))
            .collect::<Vec<_>>(),
        seen.answered,
        seen.errors
    );
    // The nested part is never counted as passed here: say why it did not run.
    match outcome.value_str("pt_nested_skipped") {
        Some(why) => {
            eprintln!("NOTE: nested passthrough (ferrio run --device in the guest) SKIPPED: {why}")
        }
        None => eprintln!(
            "NOTE: nested passthrough NOT automated: {:?}",
            outcome.value("pt_nested")
        ),
    }
    outcome.assert_all_ok();
    outcome.assert_exit_code(0);
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(str_of(&outcome, "pt_tag"), spec::tag_hex(&tag));
    assert!(str_of(&outcome, "pt_pf").starts_with(PF_BDF));
    assert!(str_of(&outcome, "pt_vf").starts_with(VF_BDF));
    assert_eq!(str_of(&outcome, "pt_vf_mac"), spec::VF_MAC);
    check_backend(&outcome, &seen, 0, &tag);
    if outcome.result("pt_cdev_open").is_some() {
        check_backend(&outcome, &seen, 1, &tag);
    } else {
        eprintln!(
            "NOTE: the cdev back end did not run: {:?}",
            outcome.value("pt_cdev_nodes")
        );
    }
    assert_eq!(str_of(&outcome, "pt_rebind"), "virtio-pci");
    assert_eq!(u64_of(&outcome, "pt_rebind_ping"), u64::from(spec::PINGS));
}
