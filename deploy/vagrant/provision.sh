#!/usr/bin/env bash
# Runs as root in each VM (Vagrant's shell provisioner): builds weft with the project's own
# setup, starts etcd on node1 with flannel's network config, then this node's agent and one pod.
set -euo pipefail
: "${WEFT_NODE:?} ${WEFT_ADDRESS:?} ${WEFT_ETCD:?} ${WEFT_ETCD_NODE:?}"
export DEBIAN_FRONTEND=noninteractive
PREFIX=/coreos.com/network

apt-get update -q
apt-get install -y -q --no-install-recommends ca-certificates curl build-essential git python3
if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
export PATH=/root/.cargo/bin:$PATH
cd /weft
cargo xtask setup
cargo build --workspace --bins --locked
install -m 0755 target/debug/weft /usr/local/bin/weft

if [ "$WEFT_ETCD_NODE" = yes ]; then
    # Debian's etcd-server, listening on the private network too.
    cat > /etc/default/etcd <<CONF
ETCD_LISTEN_CLIENT_URLS="http://127.0.0.1:2379,http://$WEFT_ADDRESS:2379"
ETCD_ADVERTISE_CLIENT_URLS="http://$WEFT_ADDRESS:2379"
CONF
    systemctl restart etcd
    until ETCDCTL_API=3 etcdctl --endpoints="$WEFT_ETCD" endpoint health >/dev/null 2>&1; do sleep 1; done
    ETCDCTL_API=3 etcdctl --endpoints="$WEFT_ETCD" put "$PREFIX/config" \
        '{"Network":"172.30.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
fi

# The agent as a service: the overlay on the private network's interface, services from a
# manifest directory (no Kubernetes here).
mkdir -p /etc/weft/manifests
cat > /etc/systemd/system/weft-agent.service <<UNIT
[Unit]
Description=weft agent
After=network-online.target

[Service]
ExecStart=/usr/local/bin/weft agent --etcd-endpoints=$WEFT_ETCD --etcd-prefix=$PREFIX \
    --iface=eth1 --manifests=/etc/weft/manifests --hostname-override=$WEFT_NODE
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now weft-agent
until [ -s /run/flannel/subnet.env ]; do sleep 1; done
/weft/deploy/vagrant/cross-vm.sh pod
