//! `ferrio-guest`: boot one guest scenario and print what the guest saw.
//!
//! ```text
//! cargo run --release -p ferrio-guest-tests --bin ferrio-guest -- boot [--cpus N]
//!     [--memory 512M] [--timeout SECS] [--cmdline EXTRA] [--qemu] [--net]
//!     [-- FERRIO-ARGS...]
//! ```
//! Builds the guest image and ferrio when needed, boots the scenario (under QEMU
//! instead with `--qemu`), prints the checks as a table and exits 1 if any failed.
//! `--net` (for scenario `net`; root) adds a virtio-net NIC with 2 queue pairs on a
//! TAP in a throw-away network namespace where the host peer serves the guest's
//! flows, and prints what the peer saw.

use std::process::ExitCode;
use std::time::Duration;

use ferrio_guest_tests::{
    boot_lock, direction_mbps, ensure_image, ferrio_binary, net_wire, qemu_command, qemu_net_args,
    run_command, run_with, Boot, NetNs, NetPeer,
};

/// Queue pairs of the `--net` NIC.
const NET_QUEUE_PAIRS: u8 = 2;

/// What the host peer saw of the guest's flows.
fn print_peer(peer: &NetPeer) {
    let flows = peer.flows();
    for f in &flows {
        println!(
            "peer: {} flow {}: {} bytes in {:.2} s, sha256 {}",
            f.direction.tag(),
            f.flow,
            f.bytes,
            f.seconds(),
            f.sha256
        );
    }
    for d in net_wire::Direction::BOTH {
        if let Some(mbps) = direction_mbps(&flows, d) {
            println!("peer: {} {mbps:.1} MB/s", d.tag());
        }
    }
    for e in peer.errors() {
        println!("peer error: {e}");
    }
}

const USAGE: &str = "usage: ferrio-guest SCENARIO [--cpus N] [--memory SIZE] [--timeout SECS] \
[--cmdline EXTRA] [--qemu] [--net] [-- FERRIO-RUN-ARGS...]";

struct Args {
    boot: Boot,
    qemu: bool,
    net: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut scenario = None;
    let mut boot = Boot::new("");
    let mut qemu = false;
    let mut net = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--cpus" => {
                let v = value("--cpus")?;
                boot.cpus = v.parse().map_err(|_| format!("bad --cpus {v:?}"))?;
            }
            "--memory" => boot.memory = value("--memory")?,
            "--timeout" => {
                let v = value("--timeout")?;
                let secs = v.parse().map_err(|_| format!("bad --timeout {v:?}"))?;
                boot.timeout = Duration::from_secs(secs);
            }
            "--cmdline" => boot.extra_cmdline = value("--cmdline")?,
            "--qemu" => qemu = true,
            "--net" => net = true,
            "--" => boot.extra_args.extend(args.by_ref()),
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s if scenario.is_none() => scenario = Some(s.to_owned()),
            s => return Err(format!("unexpected argument {s}\n{USAGE}")),
        }
    }
    boot.scenario = scenario.ok_or_else(|| USAGE.to_owned())?;
    Ok(Args { boot, qemu, net })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut boot = args.boot.clone();
    let outcome = (|| {
        let image = ensure_image()?;
        // The namespace outlives the boot: the peer is dropped first, then the namespace.
        let net = if args.net {
            let ns = NetNs::create()?;
            Some((NetPeer::start(&ns, true)?, ns))
        } else {
            None
        };
        let outcome = if args.qemu {
            // qemu_command builds the command line from the scenario alone.
            let mut image = image.clone();
            if !boot.extra_cmdline.trim().is_empty() {
                image.base_cmdline.push(' ');
                image.base_cmdline.push_str(boot.extra_cmdline.trim());
            }
            let mut cmd = qemu_command(&image, &boot.scenario, boot.cpus, &boot.memory);
            if let Some((_, ns)) = &net {
                cmd.args(qemu_net_args(
                    ns.tap(),
                    net_wire::GUEST_MAC,
                    NET_QUEUE_PAIRS,
                ));
                ns.enter_on_exec(&mut cmd);
            }
            let _lock = boot_lock()?;
            run_command(cmd, &boot.scenario, boot.timeout)
        } else {
            if let Some((_, ns)) = &net {
                boot.extra_args
                    .extend(ns.ferrio_net_args(net_wire::GUEST_MAC, NET_QUEUE_PAIRS));
                boot.netns = Some(ns.path().to_path_buf());
            }
            run_with(&ferrio_binary()?, &image, &boot)
        };
        if let Some((peer, _)) = &net {
            print_peer(peer);
        }
        outcome
    })();
    match outcome {
        Err(e) => {
            eprintln!("ferrio-guest: {e}");
            ExitCode::from(1)
        }
        Ok(outcome) => {
            println!("{}", outcome.table());
            let problems = outcome.problems();
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", outcome.failure_report(&problems));
                ExitCode::from(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_options() {
        let a = parse("boot --cpus 2 --memory 1G --qemu --net -- --config x").unwrap();
        assert!(a.net && !parse("boot").unwrap().net);
        assert_eq!(a.boot.scenario, "boot");
        assert_eq!((a.boot.cpus, a.boot.memory.as_str()), (2, "1G"));
        assert!(a.qemu);
        assert_eq!(a.boot.extra_args, ["--config", "x"]);
        assert!(parse("").is_err());
        assert!(parse("boot --cpus two").is_err());
        assert!(parse("boot --bogus").is_err());
        assert!(parse("boot extra").is_err());
    }
}
