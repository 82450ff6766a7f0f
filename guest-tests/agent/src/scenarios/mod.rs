//! The scenarios the agent can run, selected by `ferrio.scenario=NAME` on the kernel
//! command line. A scenario is a module with `pub fn run(r: &mut Reporter)` that
//! reports one line per check; add new ones (pci, blk, net, iommu, vfio) to `SCENARIOS`.

use crate::report::Reporter;

pub mod blk;
pub mod boot;
pub mod fio;
pub mod hostile;
pub mod iommu;
pub mod net;
pub mod passthrough;
pub mod pci;
pub mod sriov;
pub mod vfio;

/// A scenario entry point.
pub type Scenario = fn(&mut Reporter);

/// All known scenarios by name.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("boot", boot::run),
    ("pci", pci::run),
    ("blk", blk::run),
    ("blk-durable", blk::run_durable),
    ("fio", fio::run),
    ("net", net::run),
    ("iommu", iommu::run),
    ("vfio-in-guest", vfio::run),
    ("sriov", sriov::run),
    ("vfio-passthrough", passthrough::run),
    ("hostile", hostile::run),
    ("selftest-panic", selftest_panic),
];

/// Panics after one passing check: exercises the agent's panic path (a failing
/// `panic` result, then DONE and power-off) and the harness's handling of it.
fn selftest_panic(r: &mut Reporter) {
    r.check("before_panic", true, "reached");
    panic!("selftest-panic: deliberate panic");
}

/// The scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    SCENARIOS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Names of all scenarios, comma-separated (for error messages).
pub fn names() -> String {
    SCENARIOS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_is_registered() {
        assert!(super::find("boot").is_some());
        assert!(super::find("nope").is_none());
        assert!(super::find("blk").is_some());
        assert!(super::find("blk-durable").is_some());
        assert!(super::find("sriov").is_some());
        assert!(super::names().split(',').any(|n| n == "boot"));
    }
}
