#!/usr/bin/env bash
# Tabby's demo on one machine: builds the plugin, creates an IP pool in a
# temporary datastore, makes a "node" network namespace and three pods in
# fresh namespaces by exec'ing the real `tabby` plugin exactly as a container
# runtime does (CNI_* environment + network config on stdin), shows the IPAM
# blocks and the node's routes, pings between the pods, then deletes the pods
# and removes everything it created (also on Ctrl-C or failure).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib.sh
. scripts/lib.sh
need_root

step "setup (Debian packages, toolchain)"
bash scripts/setup.sh
find_cargo

step "building tabby, tabby-ipam and tabbyctl (cargo build --release)"
cargo build --release -p tabby-cni -p tabby-ctl
bin="$root/target/release"

tmp="$(mktemp -d -t tabby-demo.XXXXXX)"
node="tabby-demo-node-$$"
pods=(pod-a pod-b pod-c)
declare -A ip=() result=()

# The network config a runtime hands the plugin (one entry of the conflist,
# with name and cniVersion injected). The pool comes from the datastore.
netconf() {
    cat <<JSON
{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"tabby","nodename":"node-a","mtu":1450,
 "log_file":"$tmp/cni.log",
 "ipam":{"type":"tabby-ipam","datastore":{"type":"file","path":"$tmp/datastore"}}$1}
JSON
}

# cni COMMAND POD [PREV_RESULT]: exec the plugin as a runtime would, inside
# the node namespace.
cni() {
    local prev=""
    [ -n "${3:-}" ] && prev=",\"prevResult\":$3"
    netconf "$prev" | ip netns exec "$node" env -i PATH="$PATH" \
        CNI_COMMAND="$1" CNI_CONTAINERID="demo-$2-$$" CNI_NETNS="/run/netns/tabby-demo-$2-$$" \
        CNI_IFNAME=eth0 CNI_PATH="$bin" \
        CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=$2" "$bin/tabby"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    step "cleaning up"
    local p
    for p in "${pods[@]}"; do
        if [ -n "${result[$p]:-}" ]; then
            cni DEL "$p" "${result[$p]}" >/dev/null 2>&1 || echo "warning: DEL $p failed" >&2
        fi
        ip netns del "tabby-demo-$p-$$" 2>/dev/null || true
    done
    ip netns del "$node" 2>/dev/null || true
    rm -rf "$tmp"
    echo "removed the namespaces and $tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "creating pool 10.244.0.0/16 (blocks of /26) in the datastore $tmp/datastore"
"$bin/tabbyctl" --datastore "$tmp/datastore" pool create --name default-ipv4-ippool --cidr 10.244.0.0/16 --block-size 26

step "creating the node namespace $node"
ip netns add "$node"
ip -n "$node" link set lo up
ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1   # as on a Kubernetes node
# Like a real node it has an uplink with an address and a default route: proxy
# ARP answers the pods' ARP for 169.254.1.1 only when the node has a route to
# it. (A veth pair with both ends in the node stands in for the underlay;
# 192.0.2.0/24 is a documentation range.)
ip -n "$node" link add uplink0 type veth peer name uplink1
ip -n "$node" link set uplink1 up
ip -n "$node" link set uplink0 up
ip -n "$node" addr add 192.0.2.1/24 dev uplink0
ip -n "$node" route add default via 192.0.2.254 dev uplink0

echo "network config given to the plugin:"
netconf ""

for p in "${pods[@]}"; do
    step "ADD $p: CNI_COMMAND=ADD $bin/tabby < config (netns tabby-demo-$p-$$)"
    ip netns add "tabby-demo-$p-$$"
    if ! out="$(cni ADD "$p")"; then
        echo "ADD $p failed: $out" >&2
        exit 1
    fi
    result[$p]="$out"
    echo "$out"
    ip[$p]="$(grep -oE '"address" *: *"[0-9.]+/[0-9]+"' <<<"${result[$p]}" | head -1 | grep -oE '[0-9.]+/' | tr -d /)"
    echo "$p has ${ip[$p]}"
done

step "tabbyctl ipam show --show-blocks"
"$bin/tabbyctl" --datastore "$tmp/datastore" ipam show --show-blocks

step "routes and links of the node (ip route; ip -br link)"
ip -n "$node" route
ip -n "$node" -br link

step "inside pod-a (ip addr show eth0; ip route)"
ip -n "tabby-demo-pod-a-$$" -br addr show dev eth0
ip -n "tabby-demo-pod-a-$$" route

step "ping between the pods, and from the node to each pod"
for pair in "pod-a pod-b" "pod-b pod-c" "pod-c pod-a"; do
    set -- $pair
    echo "-- $1 (${ip[$1]}) -> $2 (${ip[$2]})"
    ip netns exec "tabby-demo-$1-$$" ping -c 2 -W 2 "${ip[$2]}"
done
for p in "${pods[@]}"; do
    echo "-- node -> $p (${ip[$p]})"
    ip netns exec "$node" ping -c 1 -W 2 "${ip[$p]}"
done

for p in "${pods[@]}"; do
    step "DEL $p"
    cni DEL "$p" "${result[$p]}"
    unset "result[$p]"
    echo "deleted"
done

step "tabbyctl ipam show --show-blocks (after DEL: nothing in use)"
"$bin/tabbyctl" --datastore "$tmp/datastore" ipam show --show-blocks
echo "node links left: $(ip -n "$node" -br link | awk '{print $1}' | tr '\n' ' ')"
step "demo finished"
