//! Scenario `boot`: a 2-vCPU, 512 MiB guest boots under ferrio to the agent, sees both
//! CPUs and about 512 MiB of RAM, gets its command line, and powers off cleanly.

use ferrio_guest_tests::{run, Boot};

const MIB: u64 = 1024 * 1024;

#[test]
fn boot_two_cpus_512m_reaches_agent_and_powers_off() {
    let boot = Boot::new("boot").cpus(2).memory("512M");
    let outcome = run(&boot).expect("could not boot the guest");
    eprintln!("{}", outcome.table());

    outcome.assert_all_ok();
    assert!(outcome.boot_to_init.is_some(), "agent never started");
    assert_eq!(
        outcome.value_u64("online_cpus"),
        Some(2),
        "online CPUs seen by the guest"
    );
    let mem_kib = outcome
        .value_u64("mem_total_kib")
        .expect("mem_total_kib is not a number");
    let ram_kib = 512 * MIB / 1024;
    assert!(
        (ram_kib * 9 / 10..=ram_kib).contains(&mem_kib),
        "MemTotal {mem_kib} KiB not within 90-100% of 512 MiB"
    );
    let cmdline = outcome
        .value_str("cmdline")
        .expect("cmdline is not a string");
    assert!(
        cmdline
            .split_whitespace()
            .any(|w| w == "ferrio.scenario=boot"),
        "guest cmdline: {cmdline}"
    );
    outcome.assert_exit_code(0);
}
