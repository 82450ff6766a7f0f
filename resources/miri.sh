#!/usr/bin/env bash
# Runs the unit tests that Miri can run (undefined-behaviour checks of the unsafe and
# lock-free code: split-ring walking, iovec building over guest memory, MSI-X mask and
# pending atomics, the IOTLB and mappings, config-space and SR-IOV register models).
# Needs the nightly toolchain with its miri component (`rustup component add
# --toolchain nightly miri`). Prints one line per set and exits non-zero if any fails.
#
# Not run under Miri, and why:
# - tests that start device worker threads while the test plays the guest on the same
#   memory (block/net/console worker and device tests, iommu device tests): the guest
#   and the device share guest RAM by design, and vm-memory's volatile copies race with
#   the other side's atomics; Miri's race detector (rightly, for Rust) reports that.
# - tests that need syscalls Miri does not emulate: io_uring (the uring engine, and the
#   block request tests, whose device set-up probes io_uring), TAP ioctls (net tap,
#   rx/tx over a socketpair with vnet headers), KVM (vmm crate).
# - the virtio-pci transport tests and root-complex tests run but take many minutes
#   under Miri (thousands of config accesses each); they are left to the normal run.
set -uo pipefail
cd "$(dirname "$0")/.."
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"
sets=(
    "ferrio-iommu mapping:: domain:: endpoint:: fault:: request::"
    "ferrio-pci bar:: capability:: config:: host_bridge:: sriov:: msix:: virtio_pci::interrupt::"
    "ferrio-devices bus::tests:: dma::tests:: virtio::ring:: virtio::dma_hold:: virtio::net::header:: virtio::net::features:: virtio::console::tests::queue"
)
failed=0
for set in "${sets[@]}"; do
    read -r crate filters <<<"$set"
    start=$(date +%s)
    out=$(cargo +nightly miri test -q -p "$crate" --lib -- $filters --skip uring 2>&1)
    rc=$?
    summary=$(grep -E "^test result:" <<<"$out" | tail -1)
    echo "miri: $crate [$filters]: ${summary:-no result} ($(( $(date +%s) - start )) s)"
    if [ $rc -ne 0 ]; then
        failed=1
        grep -E "Undefined Behavior|error:|panicked|FAILED" <<<"$out" | head -20
    fi
done
exit $failed
