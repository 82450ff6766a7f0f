//! Scenario `boot`: what the guest sees of the machine right after boot — kernel
//! release, online CPUs, RAM size, the command line and the uptime at /init.

use crate::parse;
use crate::report::Reporter;
use crate::sys;

pub fn run(r: &mut Reporter) {
    // Measured first, so it is the kernel's boot time and not the checks' time.
    let uptime = sys::read("/proc/uptime").and_then(|s| {
        s.split_whitespace()
            .next()
            .and_then(|w| w.parse::<f64>().ok())
            .ok_or_else(|| format!("bad /proc/uptime: {s:?}"))
    });
    r.check_result("uptime_s", uptime);

    r.check_result(
        "kernel_version",
        sys::read_trimmed("/proc/sys/kernel/osrelease"),
    );

    let online = sys::read("/sys/devices/system/cpu/online").and_then(|s| {
        parse::count_cpu_list(&s).and_then(|n| u64::try_from(n).map_err(|e| e.to_string()))
    });
    r.check_result("online_cpus", online);

    let mem = sys::read("/proc/meminfo").and_then(|s| {
        parse::meminfo_kib(&s, "MemTotal").ok_or_else(|| "no MemTotal in /proc/meminfo".into())
    });
    r.check_result("mem_total_kib", mem);

    r.check_result("cmdline", sys::read_trimmed("/proc/cmdline"));
}
