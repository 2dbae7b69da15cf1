#!/usr/bin/env bash
# Provisions what Tabby's qemu guest tests boot (testkit's `guest` module):
# Debian's stock kernel, whose modules this machine's kernel lacks (ipip),
# cached by version outside the tree:
#
#   /var/cache/tabby/guest-<release>-<package version>/
#       vmlinux          the uncompressed kernel (boots by PVH with qboot)
#       vmlinuz          the bzImage (the fallback, with SeaBIOS)
#       lib/modules/<release>/modules.dep and the .ko files of GUEST_MODULES
#                        with everything they depend on (depmod -b)
#       RELEASE, BUILDINFO, .complete
#   /var/cache/tabby/guest   a symlink to the current one
#
# Run `bash scripts/guest.sh --help` for the usage.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$ROOT/scripts/lib.sh"

CACHE=${TABBY_UPSTREAM_CACHE:-/var/cache/tabby}
# The kernel package: the one Debian's linux-image-amd64 depends on now.
META=${TABBY_GUEST_KERNEL_META:-linux-image-amd64}
# The modules the guests may load (their dependencies come along): the NIC,
# pods' veths, the tunnels, and netfilter for natOutgoing.
GUEST_MODULES=(
    virtio_pci virtio_net veth ipip vxlan dummy
    crc32c_generic ip_tables iptable_filter iptable_nat xt_MASQUERADE xt_set
    xt_conntrack xt_mark xt_comment xt_addrtype ip_set_hash_net nft_compat
    nft_chain_nat nft_masq
)
# The guests' programs from Debian packages.
PACKAGES=(qemu-system-x86 busybox-static)
START=$SECONDS

usage() {
    cat <<EOF
usage: bash scripts/guest.sh [--refresh]

Downloads the kernel package that $META depends on (apt-get
download), extracts its kernel and the modules the guests load
(${GUEST_MODULES[*]}
and their dependencies) into $CACHE/guest-<release>-<version>/ and points
$CACHE/guest at it. Installs ${PACKAGES[*]} when missing.
Once $CACHE/guest points at a complete kernel, a run reuses it in a
second without asking apt; --refresh asks apt which kernel
$META names now (and fetches it when it is new). Environment:
  TABBY_UPSTREAM_CACHE     the cache root (default /var/cache/tabby)
  TABBY_GUEST_KERNEL_META  the package naming the kernel (default linux-image-amd64)
EOF
}

log() { printf '[%5ds] %s\n' $((SECONDS - START)) "$*"; }
die() {
    printf '\nguest.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

install_packages() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
    local f
    for f in /usr/bin/qemu-system-x86_64 /usr/share/qemu/qboot.rom /bin/busybox; do
        [ -e "$f" ] || die "$f is missing after installing ${PACKAGES[*]}"
    done
}

# Sets PKG (linux-image-<release>), VERSION (its package version) and
# RELEASE from the metapackage's `Depends: linux-image-R (= V)` (one apt-cache
# call: this machine's apt keeps no binary cache, each call reads the lists).
resolve_kernel() {
    local depends
    depends=$(apt-cache show --no-all-versions "$META" 2>/dev/null | sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*$/\1 \2/p' | head -n1)
    if [ -z "$depends" ]; then
        log "apt-cache knows no $META: apt-get update"
        apt-get update -q >/dev/null
        depends=$(apt-cache show --no-all-versions "$META" 2>/dev/null | sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*$/\1 \2/p' | head -n1)
    fi
    [ -n "$depends" ] || die "apt-cache show $META names no linux-image-<release> (= <version>)"
    PKG=${depends% *}
    VERSION=${depends#* }
    RELEASE=${PKG#linux-image-}
}

# The XZ payload of a bzImage, uncompressed: an ELF kernel with a PVH entry.
extract_vmlinux() {
    local vmlinuz=$1 out=$2 offset
    offset=$(LC_ALL=C grep -abo -m1 -P '\xfd\x37\x7a\x58\x5a\x00' "$vmlinuz" | head -n1 | cut -d: -f1) ||
        die "no XZ payload in $vmlinuz (is it still CONFIG_KERNEL_XZ?)"
    # xz stops after the first stream: tail's SIGPIPE is no failure.
    { tail -c +$((offset + 1)) "$vmlinuz" || true; } | xz --single-stream -dc >"$out" ||
        die "decompressing the kernel in $vmlinuz failed"
    [ "$(head -c4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ] || die "$out is not an ELF file"
    readelf -n "$out" | grep -q 'Xen' || die "$out has no PVH (Xen ELF) note: qboot cannot boot it"
}

# modules.dep's line of module NAME (dashes and underscores are one).
dep_line() {
    local name=${1//-/_}
    awk -v n="$name" -F: '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", f); gsub(/-/, "_", f) } f == n { print; exit }' "$2"
}

copy_modules() {
    local tree=$1 out=$2 dep=$1/lib/modules/$RELEASE/modules.dep m line path
    mkdir -p "$out/lib/modules/$RELEASE"
    local -A want=()
    for m in "${GUEST_MODULES[@]}"; do
        line=$(dep_line "$m" "$dep")
        [ -n "$line" ] || die "module $m is not in $PKG (built in? grep its CONFIG_ in boot/config-$RELEASE)"
        for path in ${line/:/}; do want[$path]=1; done
    done
    : >"$out/lib/modules/$RELEASE/modules.dep"
    for path in "${!want[@]}"; do
        install -D -m 644 "$tree/lib/modules/$RELEASE/$path" "$out/lib/modules/$RELEASE/$path"
        grep "^$path:" "$dep" >>"$out/lib/modules/$RELEASE/modules.dep"
    done
    log "kept ${#want[@]} modules ($(du -sh "$out/lib/modules" | cut -f1)) of $(wc -l <"$dep")"
}

WORK=
cleanup() { [ -n "$WORK" ] && rm -rf "$WORK"; }

main() {
    local refresh=
    case ${1:-} in
    -h | --help | help)
        usage
        exit 0
        ;;
    --refresh) refresh=1 ;;
    "") ;;
    *)
        usage >&2
        die "unexpected argument '$1'"
        ;;
    esac
    need_root
    install_packages
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.guest.lock"
    flock -n 9 || {
        log "another guest.sh holds $CACHE/.guest.lock; waiting"
        flock 9
    }
    local current
    current=$(readlink -f "$CACHE/guest" 2>/dev/null || true)
    if [ -z "$refresh" ] && [ -n "$current" ] && [ -f "$current/.complete" ]; then
        log "guest kernel $(cat "$current/RELEASE"): $current, cached (--refresh looks for a newer one)"
        return 0
    fi
    resolve_kernel
    local dir=$CACHE/guest-$RELEASE-$VERSION
    if [ ! -f "$dir/.complete" ]; then
        step "guest kernel $PKG $VERSION: into $dir"
        trap cleanup EXIT
        WORK=$(mktemp -d "$CACHE/.guest.tmp.XXXXXX")
        log "apt-get download $PKG=$VERSION"
        (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$PKG=$VERSION") >/dev/null ||
            die "apt-get download $PKG=$VERSION failed"
        log "dpkg -x ($(du -h "$WORK"/*.deb | cut -f1))"
        dpkg -x "$WORK"/*.deb "$WORK/root"
        [ -f "$WORK/root/boot/vmlinuz-$RELEASE" ] || die "$PKG has no boot/vmlinuz-$RELEASE"
        mkdir "$WORK/out"
        cp "$WORK/root/boot/vmlinuz-$RELEASE" "$WORK/out/vmlinuz"
        cp "$WORK/root/boot/config-$RELEASE" "$WORK/out/config"
        extract_vmlinux "$WORK/out/vmlinuz" "$WORK/out/vmlinux"
        log "vmlinux: $(du -h "$WORK/out/vmlinux" | cut -f1), PVH"
        depmod -b "$WORK/root" "$RELEASE"
        copy_modules "$WORK/root" "$WORK/out"
        echo "$RELEASE" >"$WORK/out/RELEASE"
        {
            echo "package=$PKG"
            echo "version=$VERSION"
            echo "release=$RELEASE"
            echo "modules=${GUEST_MODULES[*]}"
            echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        } >"$WORK/out/BUILDINFO"
        touch "$WORK/out/.complete"
        chmod 755 "$WORK/out"
        [ -e "$dir" ] && rm -rf "$dir"
        mv -T "$WORK/out" "$dir"
    fi
    ln -sfn "$(basename "$dir")" "$CACHE/.guest.new"
    mv -Tf "$CACHE/.guest.new" "$CACHE/guest"
    log "guest kernel $RELEASE ($PKG $VERSION): $dir ($(du -sh "$dir" | cut -f1)); $CACHE/guest points at it"
}

main "$@"
