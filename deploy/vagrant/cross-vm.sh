#!/usr/bin/env bash
# The cross-VM check, run as root in a VM of deploy/vagrant.
#   cross-vm.sh pod     this node's pod: a namespace on the agent's bridge, .10 of the node's
#                       lease, serving HTTP on port 80 (the provisioner runs it)
#   cross-vm.sh check   from node1's pod: node2's pod directly over VXLAN, then through a
#                       ClusterIP whose only endpoint is node2's pod; exits non-zero on failure
set -euo pipefail
. /run/flannel/subnet.env            # FLANNEL_SUBNET=172.30.N.1/24, FLANNEL_NETWORK, ...
pod_address() { echo "${1%.*}.10"; }  # 172.30.N.1/24 -> 172.30.N.10

case "${1:-}" in
pod)
    gateway=${FLANNEL_SUBNET%/*}
    address=$(pod_address "$gateway")
    ip netns del pod 2>/dev/null || true
    ip netns add pod
    ip link del weft-pod 2>/dev/null || true
    ip link add name weft-pod type veth peer name eth0 netns pod
    ip link set weft-pod master cni0 up
    ip -n pod addr add "$address/24" dev eth0
    ip -n pod link set lo up
    ip -n pod link set eth0 mtu "${FLANNEL_MTU:-1450}" up
    ip -n pod route add default via "$gateway"
    echo "$(hostname) pod $address" > /run/weft-pod.txt
    nohup ip netns exec pod python3 -m http.server 80 --directory /run \
        > /var/log/weft-pod-http.log 2>&1 &
    echo "pod $address on $(hostname)"
    ;;
check)
    [ "$(hostname)" = node1 ] || { echo "run the check on node1" >&2; exit 2; }
    # node2's pod: the node2 lease, read from etcd.
    remote=$(ETCDCTL_API=3 etcdctl --endpoints=http://192.168.56.11:2379 get \
        --prefix /coreos.com/network/subnets/ --print-value-only | grep -c PublicIP)
    [ "$remote" -ge 2 ] || { echo "only $remote lease(s) in etcd" >&2; exit 1; }
    node2_subnet=$(ETCDCTL_API=3 etcdctl --endpoints=http://192.168.56.11:2379 get \
        --prefix /coreos.com/network/subnets/ --keys-only | grep -v "${FLANNEL_SUBNET%.*}.0-" \
        | grep . | head -n1 | sed 's#.*/##; s#-24##')
    target=$(pod_address "$node2_subnet")
    echo "direct: node1's pod -> $target over VXLAN"
    ip netns exec pod curl -sf --max-time 5 "http://$target/weft-pod.txt"
    cat > /etc/weft/manifests/cross-vm.yaml <<YAML
apiVersion: v1
kind: Service
metadata: {name: cross-vm, namespace: default}
spec:
  clusterIP: 10.254.56.80
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cross-vm-1
  namespace: default
  labels: {kubernetes.io/service-name: cross-vm}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints: [{addresses: ["$target"], conditions: {ready: true}, nodeName: node2}]
YAML
    echo "service: node1's pod -> 10.254.56.80:80 -> $target"
    for _ in $(seq 50); do
        if ip netns exec pod curl -sf --max-time 2 http://10.254.56.80/weft-pod.txt; then
            echo "cross-VM check passed"
            exit 0
        fi
        sleep 0.2
    done
    echo "the ClusterIP did not answer" >&2
    exit 1
    ;;
*)
    echo "usage: $0 pod|check" >&2
    exit 2
    ;;
esac
