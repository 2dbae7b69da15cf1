#!/usr/bin/env bash
# Tabby's main job: a 3-node cluster on this machine. Installs what is
# missing, builds, runs `tabby-lab up` (an underlay bridge, 3 node network
# namespaces each running a real tabby-node that peers over BGP, 2 pods per
# node made by the real tabby CNI plugin), applies the seeds' hello-service,
# and shows what the seeds show: BGP sessions, routes, IPAM blocks, the nat
# table, requests across nodes and their spread through a ClusterIP. The lab
# stays up to explore; `target/release/tabby-lab down` removes all of it.
#
#   bash scripts/lab.sh [--nodes N] [--pods-per-node M] [--down]
#
# --down tears the lab down at the end (CI and smoke tests use it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib.sh
. scripts/lib.sh
need_root

nodes=3 pods=2 teardown=0
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --pods-per-node) pods="$2"; shift 2 ;;
        --down) teardown=1; shift ;;
        *) echo "usage: $0 [--nodes N] [--pods-per-node M] [--down]" >&2; exit 2 ;;
    esac
done

step "setup (Debian packages, toolchain)"
bash scripts/setup.sh
find_cargo

step "building tabby, tabby-ipam, tabby-node, tabbyctl and tabby-lab (cargo build --release)"
cargo build --release -p tabby-cni -p tabby-ctl -p tabby-node -p tabby-lab
lab="$root/target/release/tabby-lab"
if [ "$teardown" = 1 ]; then
    trap '"$lab" down >/dev/null 2>&1 || true' EXIT
fi

step "removing an earlier lab, if any"
"$lab" down

step "tabby-lab up --nodes $nodes --pods-per-node $pods"
"$lab" up --nodes "$nodes" --pods-per-node "$pods"

step "applying the hello-service (ClusterIP 10.96.0.10, NodePort 30080)"
"$lab" apply -f lab/examples/hello-service.yaml

step "tabby-lab status"
"$lab" status

step "node-1-pod1 -> node-${nodes}-pod${pods} across nodes (no encapsulation)"
target_ip=$(python3 -c 'import json,sys; s=json.load(open("/run/tabby-lab/lab.json")); print([p["ip"] for p in s["pods"] if p["name"]==sys.argv[1]][0])' "node-${nodes}-pod${pods}")
"$lab" exec node-1-pod1 -- tabby-lab http-get "http://$target_ip:8080/"

step "100 requests from node-1-pod1 to the ClusterIP 10.96.0.10"
for _ in $(seq 1 50); do
    "$lab" exec node-1-pod1 -- tabby-lab http-get --timeout-ms 300 http://10.96.0.10/ >/dev/null 2>&1 && break
    sleep 0.1
done
"$lab" exec node-1-pod1 -- tabby-lab http-get --count 100 http://10.96.0.10/ | grep '^Hostname:' | sort | uniq -c

step "a client outside the cluster -> NodePort 30080 on node-1"
"$lab" exec external -- tabby-lab http-get http://10.98.0.1:30080/ | head -4

if [ "$teardown" = 1 ]; then
    step "tabby-lab down"
    "$lab" down
else
    cat <<MSG

The lab is up. Try:
  $lab status
  $lab exec node-1-pod1 -- ip route
  $lab exec external -- tabby-lab http-get http://10.98.0.2:30080/
  $lab apply -f lab/examples/hello-service.yaml
  $root/target/release/tabbyctl --datastore /run/tabby-lab/datastore ipam show --show-blocks
  $lab down            # removes every namespace, process and file
MSG
fi
