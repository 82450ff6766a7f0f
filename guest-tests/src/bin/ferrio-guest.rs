//! `ferrio-guest`: boot one guest scenario and print what the guest saw.
//!
//! ```text
//! cargo run --release -p ferrio-guest-tests --bin ferrio-guest -- boot [--cpus N]
//!     [--memory 512M] [--timeout SECS] [--cmdline EXTRA] [--qemu] [-- FERRIO-ARGS...]
//! ```
//! Builds the guest image and ferrio when needed, boots the scenario (under QEMU
//! instead with `--qemu`), prints the checks as a table and exits 1 if any failed.

use std::process::ExitCode;
use std::time::Duration;

use ferrio_guest_tests::{
    boot_lock, ensure_image, ferrio_binary, qemu_command, run_command, run_with, Boot,
};

const USAGE: &str = "usage: ferrio-guest SCENARIO [--cpus N] [--memory SIZE] [--timeout SECS] \
[--cmdline EXTRA] [--qemu] [-- FERRIO-RUN-ARGS...]";

struct Args {
    boot: Boot,
    qemu: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut scenario = None;
    let mut boot = Boot::new("");
    let mut qemu = false;
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
            "--" => boot.extra_args.extend(args.by_ref()),
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s if scenario.is_none() => scenario = Some(s.to_owned()),
            s => return Err(format!("unexpected argument {s}\n{USAGE}")),
        }
    }
    boot.scenario = scenario.ok_or_else(|| USAGE.to_owned())?;
    Ok(Args { boot, qemu })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let outcome = (|| {
        let image = ensure_image()?;
        if args.qemu {
            let b = &args.boot;
            let cmd = qemu_command(&image, &b.scenario, b.cpus, &b.memory);
            let _lock = boot_lock()?;
            run_command(cmd, &b.scenario, b.timeout)
        } else {
            run_with(&ferrio_binary()?, &image, &args.boot)
        }
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
        let a = parse("boot --cpus 2 --memory 1G --qemu -- --config x").unwrap();
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
