//! ferrio-agent: the `/init` of the guest-test initramfs.
//!
//! It mounts proc/sysfs/devtmpfs, prints `FERRIO-AGENT start`, runs the scenario named
//! by `ferrio.scenario=NAME` on the kernel command line (one `FERRIO-RESULT {json}` line
//! per check), prints `FERRIO-DONE {json}` and powers the VM off — always, even after a
//! panic, because an init that exits panics the kernel.
//!
//! `ferrio.console=kmsg` sends the protocol lines through the kernel log instead of
//! the tty (see `console.rs`).
//!
//! Outside a VM (not PID 1) it skips the init duties and the power-off, and the
//! scenario may be given with the `FERRIO_SCENARIO` environment variable.

mod console;
mod disk;
mod parse;
mod pattern;
mod report;
mod scenarios;
mod sys;
mod vfio;

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use report::{Reporter, START_LINE};

/// Scenario name, for the panic path.
static SCENARIO: OnceLock<String> = OnceLock::new();
/// Message of the last panic, recorded by the hook.
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut slot) = PANIC_MESSAGE.lock() {
            *slot = Some(format!("{msg}{at}"));
        }
        default_hook(info);
    }));
}

fn take_panic_message() -> String {
    PANIC_MESSAGE
        .lock()
        .ok()
        .and_then(|mut m| m.take())
        .unwrap_or_else(|| "panic".into())
}

/// The scenario to run: from the kernel command line, or `FERRIO_SCENARIO` on a host.
fn scenario_name(init: bool, cmdline: &Result<String, String>) -> Result<String, String> {
    if !init {
        if let Ok(name) = std::env::var("FERRIO_SCENARIO") {
            return Ok(name);
        }
    }
    let cmdline = cmdline.as_ref().map_err(Clone::clone)?;
    parse::cmdline_param(cmdline, "ferrio.scenario")
        .map(str::to_owned)
        .ok_or_else(|| format!("no ferrio.scenario= on the kernel command line: {cmdline:?}"))
}

/// Everything but the power-off; returns the exit code (0 when all checks passed).
fn agent_main() -> i32 {
    let init = sys::is_init();
    let init_errors = if init { sys::init_system() } else { Vec::new() };
    let cmdline = sys::read("/proc/cmdline");
    let use_kmsg = cmdline
        .as_deref()
        .is_ok_and(|c| parse::cmdline_param(c, "ferrio.console") == Some("kmsg"));
    let mut console = console::open(init && use_kmsg);
    let _ = writeln!(console, "{START_LINE}");
    let _ = console.flush();

    let name = scenario_name(init, &cmdline);
    let mut r = Reporter::new(name.as_deref().unwrap_or("unknown"), console);
    let _ = SCENARIO.set(r.scenario().to_owned());
    for e in init_errors {
        r.check("init", false, e);
    }
    if init && std::path::Path::new(sys::MODULES_DIR).is_dir() {
        let (loaded, failures) = sys::load_modules(sys::MODULES_DIR);
        if failures.is_empty() {
            r.note(&format!("loaded {loaded} kernel modules"));
        } else {
            r.check("modules", false, failures.join("; "));
        }
    }

    match name {
        Err(e) => r.check("scenario", false, e),
        Ok(name) => match scenarios::find(&name) {
            None => r.check(
                "scenario",
                false,
                format!("unknown scenario {name:?} (known: {})", scenarios::names()),
            ),
            Some(run) => {
                if panic::catch_unwind(AssertUnwindSafe(|| run(&mut r))).is_err() {
                    r.check("panic", false, take_panic_message());
                }
            }
        },
    }
    r.finish();
    i32::from(r.failed() > 0)
}

fn main() {
    install_panic_hook();
    let code = match panic::catch_unwind(agent_main) {
        Ok(code) => code,
        Err(_) => {
            // The reporter itself failed: print by hand what we can.
            let scenario = SCENARIO.get().map(String::as_str).unwrap_or("unknown");
            let msg = report::Value::Str(take_panic_message());
            println!("{}", report::result_line(scenario, "panic", false, &msg));
            println!("{}", report::done_line(scenario, 0, 1));
            1
        }
    };
    let _ = std::io::stdout().flush();
    sys::power_off(code);
}
