//! `weft agent`: the flags, checked into the node's [`Config`], and the node run until a
//! signal or a fault stops it.

use std::{
    borrow::Cow,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use weft::{
    datapath::loader::{MapLimits, OBJECT, TcAttach, XdpChoice, cgroup2_mount},
    host::netdev,
    node::{self, Config, Etcd, HostRouting, KubeSubnets, ServiceSource, SocketLb, SubnetManager},
    sources::etcd::client::TlsFiles,
    sources::flannel::{self, annotations::Annotations},
};
use weft_common::maps::{DEFAULT_CT_ENTRIES, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SERVICES};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Directory (on a BPF filesystem) where the maps are pinned; give each node its own when
    /// several share a host.
    #[arg(long, env = "WEFT_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// Read Services and EndpointSlices from this directory of manifests (YAML or JSON),
    /// re-read whenever a file in it changes, instead of the Kubernetes API.
    #[arg(long, env = "WEFT_MANIFESTS", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig. In a pod (KUBERNETES_SERVICE_HOST is
    /// set) the service account is used when neither this nor --manifests is given.
    #[arg(long, env = "WEFT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, as its Node object and its pods' EndpointSlice entries (`nodeName`)
    /// call it (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    hostname_override: Option<String>,
    /// Serve NodePorts only on the node's addresses inside these CIDRs (default: every IPv4
    /// address of the node except loopback).
    #[arg(long, env = "WEFT_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<Ipv4Net>,
    /// Where `/healthz` and `/livez` are served (as kube-proxy's --healthz-bind-address).
    #[arg(
        long,
        env = "WEFT_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    healthz_bind_address: SocketAddr,
    /// Where Prometheus `/metrics` is served (as kube-proxy's --metrics-bind-address).
    #[arg(
        long,
        env = "WEFT_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    metrics_bind_address: SocketAddr,
    /// The bridge local pods are attached to.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "cni0")]
    bridge: String,
    /// This node's pod subnet, for a node without etcd (no overlay); with etcd, the lease decides
    /// it, and with the Kubernetes API and neither, the Node's spec.podCIDR. A bridge weft
    /// creates gets its first address.
    #[arg(long, env = "WEFT_POD_SUBNET")]
    pod_subnet: Option<Ipv4Net>,
    /// The cluster's pod network. Service traffic from sources outside it is masqueraded. With
    /// etcd it defaults to the flannel Network; without either, only hairpin traffic is
    /// masqueraded (as kube-proxy without --cluster-cidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    cluster_cidr: Option<Ipv4Net>,
    /// cgroup v2 directory whose sockets get service translation (default: the cgroup v2 root,
    /// covering every process of the node).
    #[arg(long, env = "WEFT_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Which sockets are load-balanced when they connect or send (Cilium's socket LB): `all`,
    /// the node's and its pods' (their packets then need no NAT, and the kernel picks each
    /// connection's port knowing its endpoint); `host-only`, the node's only, pods' service
    /// traffic being translated per packet (service meshes whose sidecars must see the
    /// ClusterIP need this, as Cilium's socketLB.hostNamespaceOnly). Pods are found by their
    /// namespace under /run/netns; `all` needs Linux 5.14 to tell them apart from the node.
    #[arg(long, env = "WEFT_SOCKET_LB", value_enum, default_value_t = SocketLb::All)]
    socket_lb: SocketLb,
    /// How TC programs attach: tcx links (Linux 6.6+), or netlink clsact filters (priority
    /// 1, handle 0x7766), for older kernels or beside tools that manage clsact filters.
    #[arg(long, env = "WEFT_TC_ATTACH", value_enum, default_value_t = TcAttach::Auto)]
    tc_attach: TcAttach,
    /// Load the eBPF programs from this object file instead of the ones built into weft:
    /// another build of this weft version (its maps must have this version's layouts).
    #[arg(long, env = "WEFT_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// Capacity for service frontends (ClusterIP, port, protocol).
    #[arg(long, env = "WEFT_MAX_SERVICES", default_value_t = DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity for endpoint slots, summed over all service ports.
    #[arg(long, env = "WEFT_MAX_ENDPOINTS", default_value_t = DEFAULT_MAX_ENDPOINTS)]
    max_endpoints: u32,
    /// Capacity of the conntrack table (two entries per connection).
    #[arg(long, env = "WEFT_CT_ENTRIES", default_value_t = DEFAULT_CT_ENTRIES)]
    ct_entries: u32,
    /// etcd endpoints (comma-separated URLs) holding flannel's network config and subnet leases;
    /// turns on the overlay.
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The etcd key prefix of flannel's config and leases.
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = flannel::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// PEM file of the CA certificates etcd's server certificate is checked against (https://
    /// endpoints; without it, the system's CA roots).
    #[arg(long, env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// PEM client certificate for etcd (an etcd with --client-cert-auth); with --etcd-keyfile.
    #[arg(long, env = "WEFT_ETCD_CERTFILE", requires = "etcd_keyfile")]
    etcd_certfile: Option<PathBuf>,
    /// PEM private key of --etcd-certfile's certificate.
    #[arg(long, env = "WEFT_ETCD_KEYFILE", requires = "etcd_certfile")]
    etcd_keyfile: Option<PathBuf>,
    /// Keep the overlay's leases as flannel's kube subnet manager does (kube-flannel.yml, k3s
    /// and RKE2 run flannel so): this node's subnet is its Node's podCIDR, every node's lease
    /// is in its Node's annotations, and the network config is --net-config-path. Needs the
    /// Kubernetes API; turns on the overlay.
    #[arg(long, env = "WEFT_KUBE_SUBNET_MGR", conflicts_with_all = ["etcd_endpoints", "manifests"])]
    kube_subnet_mgr: bool,
    /// flannel's network config with --kube-subnet-mgr: kube-flannel's ConfigMap key
    /// net-conf.json, mounted here.
    #[arg(
        long,
        env = "WEFT_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    net_config_path: PathBuf,
    /// The prefix of the lease annotations with --kube-subnet-mgr (flannel's own flag).
    #[arg(long, env = "WEFT_KUBE_ANNOTATION_PREFIX", default_value = flannel::annotations::DEFAULT_PREFIX)]
    kube_annotation_prefix: String,
    /// With --kube-subnet-mgr, set the Node's NetworkUnavailable condition to False once the
    /// lease is published, as flannel does (`--set-node-network-unavailable=false` leaves it).
    #[arg(
        long,
        env = "WEFT_SET_NODE_NETWORK_UNAVAILABLE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    set_node_network_unavailable: bool,
    /// The uplink: where the overlay runs and clients outside the node arrive (default: the
    /// interface of the default route).
    #[arg(long, env = "WEFT_IFACE")]
    iface: Option<String>,
    /// This node's address on the underlay (default: the uplink's first IPv4 address).
    #[arg(long, env = "WEFT_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env for the CNI plugin.
    #[arg(
        long,
        env = "WEFT_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the pod network, as flannel's --ip-masq does.
    #[arg(long, env = "WEFT_IP_MASQ")]
    ip_masq: bool,
    /// How pod traffic to and from other nodes crosses this node: `ebpf` decapsulates it
    /// straight into the pod and encapsulates it at the pod's port (the node's routing, bridge
    /// and netfilter never see it, as with Cilium's eBPF host routing); `kernel` hands both to
    /// the node's stack, so iptables rules (a NetworkPolicy agent's, say) see every packet.
    #[arg(long, env = "WEFT_HOST_ROUTING", value_enum, default_value_t = HostRouting::Ebpf)]
    host_routing: HostRouting,
    /// The overlay's `external` VXLAN device (weft-vxlan): its socket makes the kernel
    /// aggregate tunnel traffic in GRO and NICs offload for the port, and it decapsulates what
    /// weft hands on. `off` removes it (and with it GRO for VXLAN on physical NICs).
    #[arg(long, env = "WEFT_VXLAN_DEVICE", value_enum, default_value_t = Switch::On)]
    vxlan_device: Switch,
    /// The XDP filter on the uplink, which drops VXLAN from nodes without a lease before the
    /// kernel builds an skb: `auto` attaches it in driver mode only where that costs no
    /// offloads (never on veth or virtio-net uplinks); `native` and `generic` force a mode.
    #[arg(long, env = "WEFT_XDP", value_enum, default_value_t = XdpChoice::Auto)]
    xdp: XdpChoice,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl AgentArgs {
    /// The node's settings: names resolved, files read, choices made, so that nothing after
    /// this looks at a flag.
    fn into_config(self) -> anyhow::Result<Config> {
        let node_name = match self.hostname_override {
            Some(name) => name,
            // Kubernetes node names are lower case, as kubelet derives them.
            None => nix::unistd::gethostname()
                .context("reading the host name")?
                .to_string_lossy()
                .to_lowercase(),
        };
        let object = match &self.bpf_object {
            Some(path) => {
                Cow::Owned(fs::read(path).with_context(|| format!("reading {}", path.display()))?)
            }
            None => Cow::Borrowed(OBJECT),
        };
        let cgroup = self
            .cgroup
            .or_else(cgroup2_mount)
            .context("no cgroup v2 hierarchy is mounted; mount one or pass --cgroup")?;
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let services = ServiceSource::choose(self.manifests, self.kubeconfig, in_pod);
        let subnets = if self.kube_subnet_mgr {
            if !matches!(services, ServiceSource::Kubernetes { .. }) {
                bail!(
                    "--kube-subnet-mgr keeps the leases in Node objects: it needs the Kubernetes \
                     API (--kubeconfig, or running in a pod with a service account)"
                );
            }
            let network = read_net_conf(&self.net_config_path)?;
            if let Some(ipv6) = network.ipv6 {
                // flanneld with EnableIPv6 reads a Node only with its public-ipv6 annotation.
                bail!(
                    "{} enables IPv6 (IPv6Network {}), which weft does not serve yet: flannel \
                     nodes of a dual-stack network cannot read a Node without IPv6 annotations, \
                     so they would lose this node on both families. Keep flanneld on \
                     dual-stack clusters; where no flanneld is left, point --net-config-path \
                     at a config without EnableIPv6",
                    self.net_config_path.display(),
                    ipv6.network
                );
            }
            Some(SubnetManager::Kube(KubeSubnets {
                network,
                annotations: Annotations::new(&self.kube_annotation_prefix)?,
                set_network_unavailable: self.set_node_network_unavailable,
            }))
        } else if self.etcd_endpoints.is_empty() {
            None
        } else {
            Some(SubnetManager::Etcd(Etcd {
                endpoints: self.etcd_endpoints,
                prefix: self.etcd_prefix,
                tls: TlsFiles {
                    ca_file: self.etcd_cafile,
                    client: self.etcd_certfile.zip(self.etcd_keyfile),
                },
            }))
        };
        Ok(Config {
            node_name,
            pin_dir: self.pin_dir,
            services,
            nodeport_addresses: self.nodeport_addresses,
            healthz_bind_address: self.healthz_bind_address,
            metrics_bind_address: self.metrics_bind_address,
            bridge: self.bridge,
            pod_subnet: self.pod_subnet,
            cluster_cidr: self.cluster_cidr,
            cgroup,
            socket_lb: self.socket_lb,
            tc_attach: self.tc_attach,
            object,
            limits: MapLimits {
                max_services: self.max_services,
                max_endpoints: self.max_endpoints,
                ct_entries: self.ct_entries,
            },
            subnets,
            iface: self.iface,
            public_ip: self.public_ip,
            subnet_file: self.subnet_file,
            ip_masq: self.ip_masq,
            host_routing: self.host_routing,
            vxlan_device: self.vxlan_device == Switch::On,
            xdp: self.xdp,
        })
    }
}

/// flannel's network config from `net-conf.json`, checked as the etcd one is.
fn read_net_conf(path: &Path) -> anyhow::Result<flannel::NetworkConfig> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "reading flannel's network config {} (--net-config-path; kube-flannel mounts its \
             ConfigMap's net-conf.json at /etc/kube-flannel/)",
            path.display()
        )
    })?;
    flannel::parse_config(&text)
        .with_context(|| format!("{} is not a config weft can serve", path.display()))
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Signals first: a SIGTERM while starting must still end in a clean exit.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let config = args.into_config()?;
    let netlink = netdev::connect()?;
    let serving = async {
        node::bootstrap(&config, &netlink).await?.run().await?;
        anyhow::Ok(())
    };
    let outcome = tokio::select! {
        outcome = serving => outcome,
        _ = terminate.recv() => Ok(()),
        _ = interrupt.recv() => Ok(()),
    };
    // As Cilium's agent: the node keeps forwarding without its agent, and the next one takes
    // over in place. Taking the dataplane down is `weft cleanup`'s job.
    if outcome.is_ok() {
        info!(
            "stopping; the programs stay attached and the maps, routes and nftables table in \
             place, so the node keeps forwarding (`weft cleanup` removes them)"
        );
    }
    outcome
}
