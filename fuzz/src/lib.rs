//! The fuzz harnesses of ferrio: one function per target, each driving the real code
//! path a guest reaches with memory, rings and register accesses built from the fuzz
//! input. The fuzz targets (`fuzz_targets/*.rs`, libFuzzer) are one-line wrappers;
//! `tests/replay.rs` replays the seed corpora and the regression inputs through the
//! same functions on stable, and `examples/replay.rs` replays any file.
//!
//! Contract of every harness: no input may make the device code panic, hang or break
//! the invariants asserted here (a failed assertion is a bug in the device model, or
//! in the harness).

use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Makes [`note!`] print (the replay example's `-v`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// What a harness saw (results of each step), on stderr with `-v` only.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if $crate::verbose() {
            eprintln!($($arg)*);
        }
    };
}

pub mod guest;
pub mod input;
pub mod iommu_view;
pub mod pci_common;
pub mod tap;
pub mod targets;

/// A seed: its file name and bytes.
pub type SeedFile = (&'static str, Vec<u8>);

/// A fuzz target: name, harness, seed generator.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<SeedFile>,
}

macro_rules! targets {
    ($($name:ident => $module:ident),* $(,)?) => {
        /// Every target, as `fuzz_targets/` names them.
        pub const TARGETS: &[Target] = &[
            $(Target { name: stringify!($name), run: $name, seeds: targets::$module::seeds },)*
        ];
        $(
            #[doc = concat!("The `", stringify!($name), "` harness (see [`targets::", stringify!($module), "`]).")]
            pub fn $name(data: &[u8]) {
                targets::$module::run(data)
            }
        )*
    };
}

targets! {
    virtio_ring => ring,
    virtio_blk => blk,
    virtio_net => net,
    virtio_net_ctrl => net_ctrl,
    virtio_console => console,
    virtio_iommu => iommu,
    virtio_pci => virtio_pci,
    pci_config => pci_config,
    pci_sriov => pci_sriov,
}

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
