# The guest side of node-agent/tests/ipip_guests.rs, sourced by the
# harness's /init (testkit::guest: `result`, `fail`, `wait_for`). The
# per-guest /etc/tabby-guest/env names this node: NODE, ADDR, PEER, DEV (the
# device the route to the peer's pods must use), PINGS.
# shellcheck shell=sh disable=SC2034
set -e
. /etc/tabby-guest/env
trap 'status=$?; [ "$status" -eq 0 ] || { echo "---- tabby-node log"; tail -n 40 /var/log/tabby-node.log; echo "---- tabby CNI log"; tail -n 20 /var/log/tabby-cni.log; ip route; echo ==== pod; ip -n pod addr; ip -n pod route; ip -n pod neigh; echo ==== host; ip addr; ip neigh; for f in /proc/sys/net/ipv4/conf/*/proxy_arp /proc/sys/net/ipv4/conf/*/rp_filter /proc/sys/net/ipv4/conf/*/forwarding /proc/sys/net/ipv4/ip_forward; do echo "$f=$(cat $f)"; done; cat /proc/net/snmp; }' EXIT
N=1200 # wait_for's attempts: 60 s at 50 ms

# The node, as the lab's topology makes one: forwarding on, the uplink up.
sysctl -qw net.ipv4.ip_forward=1
ip link set eth0 up
ip addr add "$ADDR/24" dev eth0
# A default route, as every node has: proxy ARP answers the pods for
# 169.254.1.1 only when the node has a route to it.
ip route add default via "$PEER" dev eth0
result uplink_mtu "$(cat /sys/class/net/eth0/mtu)"

mkdir -p /etc/tabby /run/tabby /var/log /srv/cgi-bin
cat >/etc/tabby/node.toml <<EOF
node_name = "$NODE"
bgp_address = "$ADDR"
datastore = "/var/lib/tabby/datastore"
uplink = "eth0"
hold_time = 9
connect_retry = 1
poll_interval_ms = 200
status_socket = "/run/tabby/node.sock"
[proxy]
enabled = false
EOF
TABBY_LOG=info tabby-node --config /etc/tabby/node.toml >/var/log/tabby-node.log 2>&1 &
wait_for $N "the agent's first datastore pass" tabby-echo get --timeout-ms 500 http://127.0.0.1:9099/readyz
result agent_ready_at "$(cut -d' ' -f1 /proc/uptime)"

# The pod: the real plugin, as a runtime calls it.
ip netns add pod
CNI_COMMAND=ADD CNI_CONTAINERID="pod-$NODE" CNI_NETNS=/run/netns/pod CNI_IFNAME=eth0 \
    CNI_PATH=/opt/cni/bin CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-$NODE" \
    /opt/cni/bin/tabby </etc/cni/net.d/10-tabby.conf >/tmp/add.json || {
    cat /tmp/add.json
    fail "CNI ADD"
}
POD_IP=$(tr -d ' \n' </tmp/add.json | sed -n 's/.*"address":"\([0-9.]*\)\/[0-9]*".*/\1/p')
[ -n "$POD_IP" ] || fail "no address in the ADD result $(cat /tmp/add.json)"
result pod_ip "$POD_IP"
result pod_mtu "$(ip netns exec pod cat /sys/class/net/eth0/mtu)"
ip -n pod link set lo up
ip netns exec pod tabby-echo --name "pod-$NODE" --port 8080 >/var/log/echo.log 2>&1 &
wait_for $N "the pod's echo server" ip netns exec pod tabby-echo get --timeout-ms 500 http://127.0.0.1:8080/

# Tell the peer the pod's address (busybox httpd on the underlay); learn its.
echo "$POD_IP" >/srv/pod-ip
printf '#!/bin/sh\ntouch /tmp/peer-done\nprintf "Content-Type: text/plain\\r\\n\\r\\nok\\n"\n' >/srv/cgi-bin/done
chmod 755 /srv/cgi-bin/done
httpd -p "$ADDR:8000" -h /srv
wait_for $N "the peer's pod address" sh -c "tabby-echo get --timeout-ms 500 http://$PEER:8000/pod-ip >/tmp/peer-pod-ip"
PEER_POD=$(cat /tmp/peer-pod-ip)
result peer_pod "$PEER_POD"

# The route to the peer's block, learned over BGP, and the first packet.
wait_for 200 "a route to $PEER_POD via $PEER dev $DEV" sh -c "/usr/local/sbin/ip route get $PEER_POD | grep -q 'via $PEER dev $DEV'"
result route_get "$(ip route get "$PEER_POD" | head -n1)"
ip -4 route show proto 201 | while read -r line; do result route "$line"; done
wait_for 60 "a first ping of $PEER_POD" ip netns exec pod ping -c 1 -W 1 "$PEER_POD"
result reachable_at "$(cut -d' ' -f1 /proc/uptime)"

counters() {
    for dev in tunl0 eth0; do
        for c in tx_packets rx_packets; do
            result "${dev}_${c}_$1" "$(cat "/sys/class/net/$dev/statistics/$c")"
        done
    done
}
counters before
ip netns exec pod ping -q -A -c "$PINGS" -W 2 "$PEER_POD" >/tmp/ping.txt || fail "ping $PEER_POD: $(cat /tmp/ping.txt)"
result ping "$(grep 'packets transmitted' /tmp/ping.txt)"
ip netns exec pod tabby-echo get --timeout-ms 5000 "http://$PEER_POD:8080/" >/tmp/echo.txt || fail "GET http://$PEER_POD:8080/"
result echo_hostname "$(sed -n 's/^Hostname: //p' /tmp/echo.txt)"
result echo_remote "$(sed -n 's/^RemoteAddr: //p' /tmp/echo.txt)"
counters after

result tunl0_mtu "$(cat /sys/class/net/tunl0/mtu)"
result tunl0_addr "$(ip -4 -o addr show dev tunl0 | awk '{ print $4 }')"
result tunl0_flags "$(ip -o link show dev tunl0 | sed 's/^[0-9]*: //')"

# Done with the peer's pod: tell it (its CGI marks it), then wait until it
# is done with ours, so that neither powers off under the other's test.
wait_for $N "the peer's done mark" tabby-echo get --timeout-ms 500 "http://$PEER:8000/cgi-bin/done"
wait_for $N "the peer to be done" test -f /tmp/peer-done
result done_at "$(cut -d' ' -f1 /proc/uptime)"
