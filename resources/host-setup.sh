#!/usr/bin/env bash
# Installs what ferrio's build, guest image and tests need on a Debian/Ubuntu KVM host,
# and checks the host. Idempotent: does nothing when everything is there.
#   --with-qemu   also install qemu-system-x86 (only the benchmarks compare against QEMU)
#   --with-fio    also install fio (blk-bench runs it on the host as the upper limit)
set -euo pipefail

with_qemu=0
with_fio=0
for arg in "$@"; do
    case "$arg" in
        --with-qemu) with_qemu=1 ;;
        --with-fio) with_fio=1 ;;
        *) echo "usage: $0 [--with-qemu] [--with-fio]" >&2; exit 2 ;;
    esac
done

# Tools the build and resources/build-guest.sh use (busybox-static is fetched as a
# .deb by build-guest.sh itself, so it need not be installed). iproute2: the net tests
# make a network namespace and a TAP with `ip`.
need=(gcc libc6-dev zstd cpio iproute2)
[ "$with_qemu" = 1 ] && need+=(qemu-system-x86)
[ "$with_fio" = 1 ] && need+=(fio binutils)

missing=()
for pkg in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        sudo=sudo
        command -v sudo >/dev/null || { echo "host-setup: need root to install: ${missing[*]}" >&2; exit 1; }
    else
        sudo=
    fi
    echo "host-setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust: ferrio needs 1.85 or newer (rustup's stable; Debian's packaged rustc may be older).
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    echo "host-setup: no cargo found: install Rust with rustup (https://rustup.rs), then rerun" >&2
    exit 1
fi
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "${rust_minor:-0}" -lt 85 ]; then
    echo "host-setup: $(rustc --version) is too old, ferrio needs 1.85+ (rustup update stable)" >&2
    exit 1
fi

# KVM.
if [ ! -e /dev/kvm ]; then
    echo "host-setup: /dev/kvm is missing: enable virtualization (kvm_intel/kvm_amd) on this host" >&2
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "host-setup: no access to /dev/kvm: add yourself to the 'kvm' group or run as root" >&2
    exit 1
fi
if [ -d /sys/module/kvm_pvm ]; then
    echo "host-setup: ok (KVM is the PVM flavour: the guest kernel comes from ../shared/guest)"
else
    echo "host-setup: ok"
fi
