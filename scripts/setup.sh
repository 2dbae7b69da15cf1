#!/usr/bin/env bash
# Installs what Tabby's demo and tests need on Debian 12. Idempotent: apt runs
# only when a package is missing. Needs root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$here/lib.sh"
need_root

packages=(
    # namespaces, links, routes, firewall and conntrack tooling
    iproute2 iptables nftables ipset conntrack iputils-ping procps util-linux kmod
    # real peers: BGP speakers, etcd, Debian's reference CNI plugins (the
    # namespace tests' host-local; conformance uses the upstream ones)
    bird2 gobgpd etcd-server etcd-client containernetworking-plugins
    # podman with its CNI backend (podman conformance test)
    podman conmon
    # qemu guests (a stock Debian kernel with ipip: scripts/guest.sh) and
    # the C toolchain Rust links with
    qemu-system-x86 busybox-static build-essential pkg-config ca-certificates
    # the OCI runtime of the Kubernetes lab and of the ctr conformance test
    # (containerd comes from scripts/upstream.sh)
    runc
    # pod-to-pod throughput in the encapsulation bench (bench encap-throughput)
    iperf3
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "setup: all ${#packages[@]} Debian packages present"
fi

find_cargo
echo "setup: $(cargo --version), $(rustc --version)"
# test.sh checks formatting and lints: the toolchain needs both components.
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
fi
# The Kubernetes lab's images are built from static binaries.
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    step "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl
fi
for bin in /usr/sbin/runc /usr/bin/podman /usr/lib/cni/ptp /usr/lib/cni/host-local /usr/lib/cni/portmap; do
    [ -x "$bin" ] || { echo "setup: $bin missing after install" >&2; exit 1; }
done
