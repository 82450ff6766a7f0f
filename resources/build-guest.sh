#!/usr/bin/env bash
# Builds the guest-test assets into target/guest/ (reproducibly, and only when an input
# changed):
#   vmlinux or bzImage    the guest kernel
#   initramfs.cpio        busybox (Debian busybox-static) + ferrio-agent as /init;
#                         uncompressed by default (FERRIO_INITRAMFS_COMPRESSION=gzip|zstd
#                         gives .cpio.gz/.cpio.zst): on PVM hosts the emulated kernel
#                         took ~50 s longer to boot with a gzip initramfs (measured)
#   cmdline               the base kernel command line for that kernel
#   manifest              key=value: hash of all inputs, output paths, input details
#
# Kernel: $FERRIO_KERNEL if set (an ELF vmlinux, a bzImage, or either .zst-compressed).
# Else on PVM hosts (/sys/module/kvm_pvm exists) the patched kernel in
# $FERRIO_SHARED_DIR (default <repo>/../shared/guest), see its README. Else Debian's
# current linux-image-amd64 (a bzImage); its virtio/vfio drivers are modules, copied
# into /lib/modules of the initramfs where the agent insmods them at start.
#
# FERRIO_GUEST_EXTRAS=fio builds the benchmark image instead, into target/guest-bench/
# (same layout, its own manifest): the same tree plus Debian's fio, its shared
# libraries (the ELF closure of /usr/bin/fio, taken from the library packages fio
# depends on, downloaded like busybox) and the dynamic loader. ~80 MB and ~65 more
# files, so it is kept out of the test image (each file costs boot time).
#
# Other environment: FERRIO_GUEST_FLAVOUR=pvm|stock overrides the host detection,
# FERRIO_GUEST_DIR the output directory, FERRIO_BUSYBOX a busybox binary to use.
# Downloaded packages are kept in <out>/cache; delete it to pick up newer versions.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT="$REPO/resources/build-guest.sh"
EXTRAS=${FERRIO_GUEST_EXTRAS:-}
case "$EXTRAS" in
"") OUT=${FERRIO_GUEST_DIR:-$REPO/target/guest} ;;
fio) OUT=${FERRIO_GUEST_DIR:-$REPO/target/guest-bench} ;;
*)
    echo "build-guest: error: FERRIO_GUEST_EXTRAS must be empty or fio, not '$EXTRAS'" >&2
    exit 1
    ;;
esac
CACHE="$OUT/cache"
SHARED=${FERRIO_SHARED_DIR:-$REPO/../shared/guest}
CARGO=${CARGO:-cargo}
export SOURCE_DATE_EPOCH=0 LC_ALL=C
umask 022

PVM_CMDLINE="console=ttyS0 panic=-1 mitigations=off noxsave nofsgsbase nopku nopcid noinvpcid acpi=noirq clearcpuid=cx16,popcnt,rdrand,rdseed,smap,rdtscp,rdpid,sse4_2,erms,fsrm,fsrs,rep_good,movbe loglevel=4"
STOCK_CMDLINE="console=ttyS0 panic=-1 loglevel=4"
# busybox applets that get a /bin link (for interactive use and scripts).
APPLETS="sh mount umount cat ls sync poweroff ip ping dd sha256sum md5sum blkdiscard
mkdir echo grep sleep insmod dmesg hexdump"
# Drivers a stock Debian kernel needs as modules (paths below lib/modules/<ver>/kernel).
STOCK_MODULES="drivers/virtio drivers/block/virtio_blk.ko* drivers/net/virtio_net.ko*
drivers/net/net_failover.ko* net/core/failover.ko* drivers/iommu/virtio-iommu.ko*
drivers/vfio virt/lib/irqbypass.ko*"

log() { echo "build-guest: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# need CMD PACKAGE: make sure CMD exists, installing PACKAGE when we are root.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing $2 (for $1)"
        apt-get install -y --no-install-recommends "$2" >&2 ||
            { apt-get update >&2 && apt-get install -y --no-install-recommends "$2" >&2; } ||
            die "apt-get install $2 failed"
        command -v "$1" >/dev/null 2>&1 && return 0
    fi
    die "'$1' not found: install it with 'apt-get install $2'"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# fetch PACKAGE: path of a cached .deb of PACKAGE, downloading it if not cached.
fetch() {
    local deb
    deb=$(find "$CACHE" -maxdepth 1 -name "$1_*.deb" | sort | tail -n1)
    if [ -z "$deb" ]; then
        need apt-get apt
        log "downloading $1"
        # Empty package lists (a fresh machine) make the download fail: update once.
        (cd "$CACHE" && apt-get download "$1" >&2) ||
            { apt-get update >&2 && (cd "$CACHE" && apt-get download "$1" >&2); } || return 1
        deb=$(find "$CACHE" -maxdepth 1 -name "$1_*.deb" | sort | tail -n1)
    fi
    [ -n "$deb" ] && echo "$deb"
}

# deb_depends DEB: the packages DEB depends on (Pre-Depends and Depends; the first of
# alternatives, without versions or architecture qualifiers), one per line.
deb_depends() {
    { dpkg-deb -f "$1" Pre-Depends && dpkg-deb -f "$1" Depends; } | tr ',' '\n' |
        sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/[[:space:]]//g' | grep -v '^$' || true
}

# lib_closure PACKAGE: PACKAGE's .deb and, recursively, those of the library packages
# (lib*, zlib1g) it depends on, one path per line. Other dependencies (python3, init
# scripts) are not followed: only shared libraries are taken from these packages.
lib_closure() {
    local queue=$1 seen=" " pkg deb dep
    while [ -n "$queue" ]; do
        pkg=${queue%% *}
        queue=${queue#"$pkg"}
        queue=${queue# }
        case "$seen" in *" $pkg "*) continue ;; esac
        seen="$seen$pkg "
        deb=$(fetch "$pkg") || {
            log "error: cannot download $pkg (a dependency of $1)"
            return 1
        }
        echo "$deb"
        for dep in $(deb_depends "$deb"); do
            case "$dep" in lib* | zlib1g) queue="$queue $dep" ;; esac
        done
        queue=${queue# }
    done
}

# in_sysroot SYSROOT PATH: PATH (relative to SYSROOT) with its symlinks resolved inside
# SYSROOT (absolute link targets are taken relative to it, never to the host's /).
in_sysroot() {
    local p=$2 t n=0
    while [ -L "$1/$p" ]; do
        t=$(readlink "$1/$p")
        case "$t" in /*) p=${t#/} ;; *) p=$(dirname "$p")/$t ;; esac
        n=$((n + 1))
        [ $n -lt 20 ] || return 1
    done
    [ -f "$1/$p" ] && echo "$p"
}

# install_elf SYSROOT ROOT BIN: copies BIN (a path relative to SYSROOT), its program
# interpreter and every shared library it needs, recursively, from SYSROOT into ROOT,
# each as a regular file at the path the loader searches (RUNPATH, then the Debian
# multiarch directories). Dies naming any library no package provided.
install_elf() {
    local sys=$1 root=$2 queue=$3 done_=" " f dyn rpath so dir src found interp
    local libdirs="lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 usr/lib64 lib usr/lib"
    put() {
        mkdir -p "$root/$(dirname "$2")"
        cp "$sys/$1" "$root/$2"
        chmod 0755 "$root/$2"
    }
    interp=$(readelf -l "$sys/$3" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    [ -n "$interp" ] || die "$3 has no program interpreter"
    src=$(in_sysroot "$sys" "${interp#/}") || die "$3: interpreter $interp not in the packages"
    put "$src" "${interp#/}"
    src=$(in_sysroot "$sys" "$3") || die "$3 not in the packages"
    put "$src" "$3"
    while [ -n "$queue" ]; do
        f=${queue%% *}
        queue=${queue#"$f"}
        queue=${queue# }
        dyn=$(readelf -d "$root/$f")
        rpath=$(printf '%s\n' "$dyn" | sed -n 's/.*(R[UN]*PATH).*\[\(.*\)\]/\1/p' | tr ':' ' ')
        for so in $(printf '%s\n' "$dyn" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            # libc needs the loader by its soname: ld.so satisfies that with itself.
            [ "$so" = "$(basename "$interp")" ] && continue
            case "$done_" in *" $so "*) continue ;; esac
            found=""
            for dir in $rpath $libdirs; do
                if src=$(in_sysroot "$sys" "${dir#/}/$so"); then
                    found=${dir#/}/$so
                    break
                fi
            done
            [ -n "$found" ] || die "$so (needed by $f) is in none of the downloaded packages"
            put "$src" "$found"
            done_="$done_$so "
            queue="${queue:+$queue }$found"
        done
    done
}

mkdir -p "$OUT" "$CACHE"
need sha256sum coreutils
need cpio cpio
COMPRESSION=${FERRIO_INITRAMFS_COMPRESSION:-none}
case "$COMPRESSION" in
none) INITRAMFS_NAME=initramfs.cpio ;;
gzip) INITRAMFS_NAME=initramfs.cpio.gz && need gzip gzip ;;
zstd) INITRAMFS_NAME=initramfs.cpio.zst && need zstd zstd ;;
*) die "FERRIO_INITRAMFS_COMPRESSION must be none, gzip or zstd, not '$COMPRESSION'" ;;
esac
need dpkg-deb dpkg
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT/.lock"
    flock 9
fi

# ---- flavour and kernel source ----------------------------------------------------
if [ -n "${FERRIO_GUEST_FLAVOUR:-}" ]; then
    FLAVOUR=$FERRIO_GUEST_FLAVOUR
elif [ -d /sys/module/kvm_pvm ]; then
    FLAVOUR=pvm
else
    FLAVOUR=stock
fi
case "$FLAVOUR" in
pvm) CMDLINE=$PVM_CMDLINE ;;
stock) CMDLINE=$STOCK_CMDLINE ;;
*) die "FERRIO_GUEST_FLAVOUR must be pvm or stock, not '$FLAVOUR'" ;;
esac

KERNEL_DEB=""
if [ -n "${FERRIO_KERNEL:-}" ]; then
    KERNEL_SRC=$FERRIO_KERNEL
    [ -f "$KERNEL_SRC" ] || die "FERRIO_KERNEL=$KERNEL_SRC: no such file"
elif [ "$FLAVOUR" = pvm ]; then
    KERNEL_SRC=$(find "$SHARED" -maxdepth 1 -name 'vmlinux-*.zst' 2>/dev/null | sort | tail -n1)
    [ -n "$KERNEL_SRC" ] || die "no vmlinux-*.zst in $SHARED (set FERRIO_SHARED_DIR or FERRIO_KERNEL)"
else
    meta=$(fetch linux-image-amd64) || die "cannot download linux-image-amd64 (set FERRIO_KERNEL)"
    pkg=$(dpkg-deb -f "$meta" Depends | sed 's/[ ,(|].*//')
    case "$pkg" in linux-image-*) ;; *) die "unexpected Depends of $meta: '$pkg'" ;; esac
    KERNEL_DEB=$(fetch "$pkg") || die "cannot download $pkg (set FERRIO_KERNEL)"
    KERNEL_SRC=$KERNEL_DEB
fi
KERNEL_SRC=$(readlink -f "$KERNEL_SRC")

# ---- busybox source ----------------------------------------------------------------
BUSYBOX_DEB=""
if [ -n "${FERRIO_BUSYBOX:-}" ]; then
    BUSYBOX_SRC=$(readlink -f "$FERRIO_BUSYBOX")
elif BUSYBOX_DEB=$(fetch busybox-static); then
    BUSYBOX_SRC=$BUSYBOX_DEB
elif [ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; then
    log "warning: cannot download busybox-static, using the host's static /bin/busybox"
    BUSYBOX_SRC=/bin/busybox
else
    die "no busybox: 'apt-get download busybox-static' failed and /bin/busybox is not static (apt-get install busybox-static, or set FERRIO_BUSYBOX)"
fi

# ---- extras ------------------------------------------------------------------------
EXTRA_DEBS=""
EXTRAS_INPUT=none
if [ "$EXTRAS" = fio ]; then
    need readelf binutils
    EXTRA_DEBS=$(lib_closure fio) || die "cannot download fio and its libraries (apt-get download)"
    EXTRAS_INPUT="fio $(echo "$EXTRA_DEBS" | wc -l) debs $(echo "$EXTRA_DEBS" |
        while read -r deb; do echo "$(basename "$deb") $(sha "$deb")"; done | sha256sum | cut -d' ' -f1)"
fi

# ---- agent -------------------------------------------------------------------------
need "$CARGO" cargo
log "building ferrio-agent"
# Stripped: a smaller initramfs is unpacked faster by the (emulated, on PVM) kernel.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    "$CARGO" build --quiet --release -p ferrio-agent --target x86_64-unknown-linux-gnu \
    --manifest-path "$REPO/Cargo.toml" --target-dir "$REPO/target/agent" ||
    die "building ferrio-agent failed (is the x86_64-unknown-linux-gnu target and glibc-static support installed?)"
AGENT="$REPO/target/agent/x86_64-unknown-linux-gnu/release/ferrio-agent"

# ---- up to date? -------------------------------------------------------------------
INPUTS="script $(sha "$SCRIPT")
agent $(sha "$AGENT")
busybox $(basename "$BUSYBOX_SRC") $(sha "$BUSYBOX_SRC")
kernel $KERNEL_SRC $(sha "$KERNEL_SRC")
flavour $FLAVOUR
compression $COMPRESSION
extras $EXTRAS_INPUT
cmdline $CMDLINE"
INPUTS_HASH=$(printf '%s\n' "$INPUTS" | sha256sum | cut -d' ' -f1)
MANIFEST="$OUT/manifest"
manifest_get() { sed -n "s/^$1=//p" "$MANIFEST" 2>/dev/null | head -n1; }
if [ "$(manifest_get inputs)" = "$INPUTS_HASH" ] &&
    [ -f "$(manifest_get kernel)" ] && [ -f "$(manifest_get initramfs)" ] &&
    [ -f "$(manifest_get cmdline_file)" ]; then
    log "up to date"
    cat "$MANIFEST"
    exit 0
fi

STAGE=$(mktemp -d "$OUT/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# ---- kernel ------------------------------------------------------------------------
RAW_KERNEL="$STAGE/kernel.raw"
MODULES_SRC=""
if [ -n "$KERNEL_DEB" ]; then
    dpkg-deb -x "$KERNEL_DEB" "$STAGE/kdeb"
    vmlinuz=$(find "$STAGE/kdeb" -path '*/boot/vmlinuz-*' | sort | tail -n1)
    [ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $KERNEL_DEB"
    cp "$vmlinuz" "$RAW_KERNEL"
    kver=${vmlinuz##*/vmlinuz-}
    MODULES_SRC=$(find "$STAGE/kdeb" -type d -path "*/modules/$kver/kernel" | head -n1)
elif [[ "$KERNEL_SRC" == *.zst ]]; then
    need zstd zstd
    zstd -q -d -f "$KERNEL_SRC" -o "$RAW_KERNEL"
else
    cp "$KERNEL_SRC" "$RAW_KERNEL"
fi
if [ "$(head -c4 "$RAW_KERNEL" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
    KERNEL_NAME=vmlinux
elif [ "$(dd if="$RAW_KERNEL" bs=1 skip=514 count=4 status=none)" = HdrS ]; then
    KERNEL_NAME=bzImage
else
    die "$KERNEL_SRC is neither an ELF vmlinux nor a bzImage"
fi

# ---- initramfs tree ----------------------------------------------------------------
# Every file costs the (emulated, on PVM) kernel ~0.1 s to unpack, so the tree is kept
# small: busybox plus links for the applets we use. busybox sh runs any applet without
# a link, and the agent calls `busybox APPLET` directly.
ROOT="$STAGE/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp}
if [ -n "$BUSYBOX_DEB" ]; then
    dpkg-deb -x "$BUSYBOX_DEB" "$STAGE/bbdeb"
    cp "$STAGE/bbdeb/bin/busybox" "$ROOT/bin/busybox"
else
    cp "$BUSYBOX_SRC" "$ROOT/bin/busybox"
fi
chmod 0755 "$ROOT/bin/busybox"
"$ROOT/bin/busybox" --list >"$STAGE/applets" || die "cannot run busybox --list"
for applet in $APPLETS; do
    grep -qx "$applet" "$STAGE/applets" || die "busybox lacks the '$applet' applet"
    ln -s busybox "$ROOT/bin/$applet"
done
install -m 0755 "$AGENT" "$ROOT/init"
chmod 1777 "$ROOT/tmp"
# No /dev/console node: the kernel's built-in initramfs provides one, and the agent
# reopens it after mounting devtmpfs. (mknod would need root and break reproducibility.)

if [ -n "$MODULES_SRC" ]; then
    need xz xz-utils
    for pattern in $STOCK_MODULES; do
        # shellcheck disable=SC2086 # $pattern is a glob on purpose
        for src in "$MODULES_SRC"/$pattern; do
            [ -e "$src" ] || continue
            rel=${src#"$MODULES_SRC"/}
            mkdir -p "$ROOT/lib/modules/$(dirname "$rel")"
            cp -r "$src" "$ROOT/lib/modules/$rel"
        done
    done
    # busybox insmod wants plain .ko files.
    find "$ROOT/lib/modules" -name '*.ko.xz' -exec xz -d {} +
    if find "$ROOT/lib/modules" -name '*.ko.zst' | grep -q .; then
        need zstd zstd
        find "$ROOT/lib/modules" -name '*.ko.zst' -exec zstd -q -d --rm {} \;
    fi
fi

if [ -n "$EXTRA_DEBS" ]; then
    mkdir -p "$STAGE/sysroot"
    while read -r deb; do dpkg-deb -x "$deb" "$STAGE/sysroot"; done <<<"$EXTRA_DEBS"
    install_elf "$STAGE/sysroot" "$ROOT" usr/bin/fio
    log "fio: $(find "$ROOT/usr" "$ROOT/lib" "$ROOT/lib64" -type f -not -path "$ROOT/lib/modules/*" | wc -l) files"
fi

# ---- archive -----------------------------------------------------------------------
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) >"$STAGE/initramfs.cpio"
case "$COMPRESSION" in
gzip) gzip -n -9 "$STAGE/initramfs.cpio" ;;
zstd) zstd -q -19 --rm "$STAGE/initramfs.cpio" ;;
esac

# ---- install outputs ---------------------------------------------------------------
rm -f "$OUT/vmlinux" "$OUT/bzImage"
chmod 0644 "$RAW_KERNEL"
mv "$RAW_KERNEL" "$OUT/$KERNEL_NAME"
rm -f "$OUT"/initramfs.cpio*
mv "$STAGE/$INITRAMFS_NAME" "$OUT/$INITRAMFS_NAME"
printf '%s\n' "$CMDLINE" >"$OUT/cmdline"
{
    echo "inputs=$INPUTS_HASH"
    echo "kernel=$OUT/$KERNEL_NAME"
    echo "initramfs=$OUT/$INITRAMFS_NAME"
    echo "cmdline_file=$OUT/cmdline"
    echo "flavour=$FLAVOUR"
    echo "extras=$EXTRAS"
    echo "kernel_sha256=$(sha "$OUT/$KERNEL_NAME")"
    echo "initramfs_sha256=$(sha "$OUT/$INITRAMFS_NAME")"
    printf '%s\n' "$INPUTS" | sed 's/^/# input: /'
} >"$MANIFEST.tmp"
mv "$MANIFEST.tmp" "$MANIFEST"
log "built"
cat "$MANIFEST"
