#!/usr/bin/env bash
# The main job: a two-node flannel-udp overlay between network namespaces, with a "pod" behind each node.
#
#     pod A (10.244.1.2)                                        pod B (10.244.2.2)
#        | veth, mtu 1472                                          | veth, mtu 1472
#     node A: cni 10.244.1.1/24, flannel0 10.244.1.0/32      node B: cni 10.244.2.1/24, flannel0 10.244.2.0/32
#        |  eth0 192.168.77.1/24  ==== underlay veth ====  eth0 192.168.77.2/24  |
#
# Brings both nodes up with `flannel-udp up --detach`, tells each about the other with `flannel-udp route add`,
# pings and runs iperf3 pod to pod across the overlay, shows `status`, then takes everything down. Everything
# happens inside namespaces this script creates (removed on exit, also on failure); the root namespace is not
# touched. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

[ "$(id -u)" -eq 0 ] || die "run as root: the demo creates network namespaces"
install_packages "${BASE_PACKAGES[@]}"
require_swift
step "swift build -c release"
swift build -c release --product flannel-udp 2>&1 | tail -1
BIN="$(swift build -c release --show-bin-path)/flannel-udp"

ID="fu-demo-$$"
A="$ID-a" B="$ID-b" PA="$ID-pa" PB="$ID-pb"
TMP="$(mktemp -d /tmp/flannel-udp-demo.XXXXXX)"
export FLANNEL_UDP_RUN_DIR="$TMP/run"

cleanup() {
    set +e
    for ns in "$A" "$B"; do
        ip netns exec "$ns" "$BIN" down >/dev/null 2>&1
    done
    for ns in "$A" "$B" "$PA" "$PB"; do
        pids=$(ip netns pids "$ns" 2>/dev/null) && [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

n() { local ns=$1; shift; printf '[+] %s: %s\n' "$ns" "$*"; ip netns exec "$ns" "$@"; }

for ns in "$A" "$B" "$PA" "$PB"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
ip -n "$A" addr add 192.168.77.1/24 dev eth0 && ip -n "$A" link set eth0 up
ip -n "$B" addr add 192.168.77.2/24 dev eth0 && ip -n "$B" link set eth0 up
pod() {  # pod NODE POD NODE_ADDR POD_ADDR
    ip -n "$1" link add cni0 mtu 1472 type veth peer name eth0 mtu 1472 netns "$2"
    ip -n "$1" addr add "$3/24" dev cni0 && ip -n "$1" link set cni0 up
    ip -n "$2" addr add "$4/24" dev eth0 && ip -n "$2" link set eth0 up
    ip -n "$2" route add default via "$3"
    ip netns exec "$1" sysctl -qw net.ipv4.ip_forward=1
}
pod "$A" "$PA" 10.244.1.1 10.244.1.2
pod "$B" "$PB" 10.244.2.1 10.244.2.2

n "$A" "$BIN" up --network 10.244.0.0/16 --subnet 10.244.1.0/24 --iface eth0 --subnet-file "$TMP/a.env" --detach
n "$B" "$BIN" up --network 10.244.0.0/16 --subnet 10.244.2.0/24 --iface eth0 --subnet-file "$TMP/b.env" --detach
n "$A" "$BIN" route add 10.244.2.0/24 via 192.168.77.2
n "$B" "$BIN" route add 10.244.1.0/24 via 192.168.77.1
n "$A" cat "$TMP/a.env"
n "$A" ip addr show dev flannel0
n "$A" ip route show

n "$PA" ping -c 3 -i 0.2 10.244.2.2
n "$PB" iperf3 -s -1 -D -B 10.244.2.2 >/dev/null
for _ in $(seq 50); do ip netns exec "$PB" ss -ltn | grep -q ':5201' && break; sleep 0.1; done
n "$PA" iperf3 -c 10.244.2.2 -t 3 -f m | grep -E 'sender|receiver'

n "$A" "$BIN" route del 10.244.2.0/24
n "$PA" ping -c 1 -W 1 10.244.2.2 || true
n "$A" "$BIN" route add 10.244.2.0/24 via 192.168.77.2
n "$PA" ping -c 1 -W 1 10.244.2.2

n "$A" "$BIN" status
n "$A" "$BIN" down
n "$B" "$BIN" down
n "$A" ip link show flannel0 2>&1 || true
step "demo finished: both nodes are down and the namespaces are removed on exit"
