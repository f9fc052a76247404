//! `weft agent`: wires the sources, the reconciler and the dataplane together on one node.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};
use tracing::{error, info, warn};
use weft::{
    conntrack::{Conntrack, lost_udp_endpoints},
    dataplane::{
        Dataplane, KernelSupport, MapLimits, OBJECT, TcAttach, XdpChoice, XdpPlacement,
        cgroup2_mount,
    },
    etcd::{self, TlsFiles},
    flannel::{self, NetworkConfig, subnet_env},
    health::{self, Health, HealthCheckServers},
    http, kube,
    manifests::{self, ManifestWatch},
    maps::{AyaMaps, MapWriteError},
    metrics::{self, Metrics},
    model::{HealthCheck, ServicePortName},
    netdev::{self, PortEvent, PortWatch, Uplink},
    nexthops,
    nft::{self, Masquerade},
    pods::PodNamespaces,
    privilege,
    reconcile::{Reconciler, Report},
    source::ModelHandle,
    subnets::{self, OwnLease, SubnetSettings},
    sys,
};
use weft_common::{
    maps::{
        DEFAULT_CT_ENTRIES, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SERVICES, DatapathConfig,
        OverlayConfig, overlay_flags,
    },
    vxlan,
};

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

/// Where pod traffic to and from other nodes is routed (`--host-routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    Ebpf,
    Kernel,
}

/// Which sockets the socket hooks translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    All,
    HostOnly,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl AgentArgs {
    fn node_name(&self) -> anyhow::Result<String> {
        if let Some(name) = &self.hostname_override {
            return Ok(name.clone());
        }
        let host = nix::unistd::gethostname().context("reading the host name")?;
        // Kubernetes node names are lower case, as kubelet derives them.
        Ok(host.to_string_lossy().to_lowercase())
    }

    fn etcd_tls(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.etcd_cafile.clone(),
            client: self.etcd_certfile.clone().zip(self.etcd_keyfile.clone()),
        }
    }
}

/// The least time between two reconcile passes (kube-proxy's `--min-sync-period`): a change
/// after a quiet spell is applied at once; in a burst, what arrives within this time after a
/// pass waits and goes into the next one, so a burst costs a pass per period, not per change.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(10);
/// How often a pass that failed (a full map) is retried.
const RETRY: Duration = Duration::from_secs(5);
/// How often expired connections are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(30);

/// The overlay of an etcd-backed node: its uplink, the network config and its own lease.
struct Overlay {
    uplink: Uplink,
    public_ip: Ipv4Addr,
    config: NetworkConfig,
    own: OwnLease,
    client: etcd_client::Client,
    prefix: String,
    /// MTU of pod interfaces: the uplink's, less the VXLAN overhead (or Backend.MTU).
    mtu: u32,
}

/// Joins the overlay: reads flannel's config from etcd (waiting while etcd is unreachable or
/// the config is missing) and takes this node's lease.
async fn join_overlay(
    netlink: &rtnetlink::Handle,
    uplink: Uplink,
    args: &AgentArgs,
) -> anyhow::Result<Overlay> {
    let public_ip = args
        .public_ip
        .or(uplink.address)
        .ok_or_else(|| netdev::NetdevError::NoAddress(uplink.name.clone()))?;
    let mut client = etcd::connect(&args.etcd_endpoints, &args.etcd_tls()).await?;
    let config = subnets::wait_for_config(&mut client, &args.etcd_prefix).await;
    // The subnet this node held before, as its subnet.env or its bridge remembers it.
    let bridge = netdev::bridge_addresses(netlink, &args.bridge).await?;
    let bridge_subnet = bridge
        .iter()
        .find(|address| config.network.contains(*address))
        .and_then(|address| Ipv4Net::new(*address, config.subnet_len).ok())
        .map(|subnet| subnet.trunc());
    let settings = SubnetSettings {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        public_ip,
        previous: fs::read_to_string(&args.subnet_file)
            .ok()
            .and_then(|text| flannel::previous_subnet(&text))
            .or(bridge_subnet),
    };
    let own = loop {
        match subnets::acquire(&mut client, &settings, &config).await {
            Ok(own) => break own,
            Err(e) if e.is_transient() => {
                warn!("taking a subnet lease failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("taking a subnet lease"),
        }
    };
    // Before subnet.env is rewritten, which would lose the subnet the bridge was made for.
    netdev::bridge_fits(&args.bridge, &bridge, own.subnet)?;
    let mtu = config
        .mtu
        .unwrap_or(uplink.mtu.saturating_sub(vxlan::OVERHEAD));
    info!(
        subnet = %own.subnet,
        public_ip = %public_ip,
        vtep_mac = %own.lease.vtep_mac,
        reservation = own.etcd_lease == 0,
        uplink = uplink.name,
        "holding the subnet lease"
    );
    Ok(Overlay {
        uplink,
        public_ip,
        config,
        own,
        client,
        prefix: args.etcd_prefix.clone(),
        mtu,
    })
}

/// Writes `subnet.env` atomically, as flannel does, for the CNI plugin.
fn write_subnet_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let staged = path.with_extension("tmp");
    fs::write(&staged, contents).with_context(|| format!("writing {}", staged.display()))?;
    fs::rename(&staged, path).with_context(|| format!("writing {}", path.display()))
}

/// How often the bridge's ports are listed again (netlink notifications can be lost).
const PORT_RESYNC: Duration = Duration::from_secs(30);

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Signals first: a SIGTERM while starting must still end in a clean exit.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let netlink = netdev::connect()?;
    let outcome = tokio::select! {
        outcome = serve(&args, &netlink) => outcome,
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

/// The uplink: `--iface`, else the default route's interface; `None` when there is neither
/// (a node without a default route serves only its pods and itself).
async fn find_uplink(
    netlink: &rtnetlink::Handle,
    args: &AgentArgs,
) -> anyhow::Result<Option<Uplink>> {
    match netdev::uplink(netlink, args.iface.as_deref()).await {
        Ok(uplink) => Ok(Some(uplink)),
        Err(netdev::NetdevError::NoDefaultRoute) if args.etcd_endpoints.is_empty() => {
            info!(
                "no default route and no --iface: clients outside the node (NodePorts, external \
                 IPs) are not served"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Where services come from.
enum ServiceSource {
    Manifests(ManifestWatch),
    Kubernetes,
    None,
}

/// Reads the service source once into the model (the first pass must not see a partial
/// cluster) and starts following it.
async fn start_services(
    args: &AgentArgs,
    api: Option<::kube::Client>,
    node_name: &str,
    model: &Arc<ModelHandle>,
    health: &Arc<Health>,
) -> anyhow::Result<ServiceSource> {
    if let Some(dir) = &args.manifests {
        return Ok(ServiceSource::Manifests(ManifestWatch::start(dir, model)?));
    }
    let Some(client) = api else {
        info!("no --manifests or --kubeconfig: serving no services, only the overlay");
        return Ok(ServiceSource::None);
    };
    kube::start(client, node_name, model, health).await;
    Ok(ServiceSource::Kubernetes)
}

/// A client for the Kubernetes API when it is the service source: `--kubeconfig`, or the
/// service account in a pod.
async fn api_client(args: &AgentArgs) -> anyhow::Result<Option<::kube::Client>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if args.manifests.is_some() || (args.kubeconfig.is_none() && !in_cluster) {
        return Ok(None);
    }
    Ok(Some(kube::client(args.kubeconfig.as_deref()).await?))
}

/// Sets the node up and serves until a task fails (the caller stops it on a signal). What it
/// puts in the kernel (programs, maps, routes, the nftables table) stays when it returns.
async fn serve(args: &AgentArgs, netlink: &rtnetlink::Handle) -> anyhow::Result<()> {
    let missing = privilege::missing(privilege::effective()?);
    if !missing.is_empty() {
        bail!(
            "weft needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN for the first \
             and last) and lacks {}; grant them as deploy/daemonset.yaml does",
            missing.join(", ")
        );
    }
    let node_name = args.node_name()?;
    let uplink = find_uplink(netlink, args).await?;
    let overlay = match (&uplink, args.etcd_endpoints.is_empty()) {
        (Some(uplink), false) => Some(join_overlay(netlink, uplink.clone(), args).await?),
        _ => None,
    };
    let api = api_client(args).await?;
    let pod_subnet = match (&overlay, args.pod_subnet) {
        (Some(overlay), Some(given)) if given != overlay.own.subnet => {
            bail!(
                "--pod-subnet {given} differs from this node's lease {}; drop the flag",
                overlay.own.subnet
            )
        }
        (Some(overlay), _) => overlay.own.subnet,
        (None, Some(given)) => given,
        (None, None) => match &api {
            Some(client) => kube::pod_subnet(client.clone(), &node_name).await?,
            None => bail!(
                "pass --pod-subnet (one node) or --etcd-endpoints (flannel-compatible overlay)"
            ),
        },
    };
    let gateway = pod_subnet.hosts().next().unwrap_or(pod_subnet.network());
    if let Some(overlay) = &overlay {
        write_subnet_file(
            &args.subnet_file,
            &subnet_env(&overlay.config, &pod_subnet, overlay.mtu, args.ip_masq),
        )?;
    }

    let (bridge_link, created) = netdev::ensure_bridge(
        netlink,
        &args.bridge,
        pod_subnet,
        overlay.as_ref().map(|o| o.mtu),
    )
    .await
    .with_context(|| format!("preparing the pod bridge {}", args.bridge))?;
    if created {
        info!(bridge = args.bridge, %pod_subnet, "created the pod bridge");
    }
    netdev::enable_ip_forwarding()?;

    let limits = MapLimits {
        max_services: args.max_services,
        max_endpoints: args.max_endpoints,
        ct_entries: args.ct_entries,
    };
    let object = match &args.bpf_object {
        Some(path) => {
            Cow::Owned(fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => Cow::Borrowed(OBJECT),
    };
    let kernel = KernelSupport::probe()?;
    info!(
        kernel = %kernel.version,
        tc_attach = ?args.tc_attach.resolve(),
        local_connect_refusal = if kernel.socket_errors {
            "ECONNREFUSED/EHOSTUNREACH"
        } else {
            "EPERM (no bpf_set_retval for socket hooks before Linux 5.18)"
        },
        "kernel features"
    );
    // The programs go through the verifier while the service source is read.
    let loading = {
        let (pin_dir, tc_attach) = (args.pin_dir.clone(), args.tc_attach);
        tokio::task::spawn_blocking(move || {
            Dataplane::load(&object, Some(&pin_dir), limits, tc_attach).with_context(|| {
                format!(
                    "loading the dataplane with maps pinned in {}",
                    pin_dir.display()
                )
            })
        })
    };
    let model = Arc::new(ModelHandle::default());
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new(limits, args.pin_dir.clone()));
    // Subscribe before reading the addresses, so no change falls in between.
    let mut ports = PortWatch::subscribe(bridge_link.index)?;
    let addresses = netdev::node_addresses(netlink, &args.nodeport_addresses).await?;
    model.update(|m| {
        m.update_node(|node| {
            node.name = Some(node_name.clone());
            node.node_port_addresses = addresses;
        })
    });
    // Every source is read once before the first pass, so a restart never drops a service or
    // a route only because its source was not read yet, and services are in the maps before
    // any port that carried translations gets the new programs (ports that carried none get
    // them meanwhile: see `attach_fresh_ports`).
    let (mut dataplane, services) = tokio::try_join!(
        async {
            let mut dataplane = loading.await.context("loading the dataplane")??;
            attach_fresh_ports(&mut dataplane, netlink, &args.bridge).await?;
            anyhow::Ok(dataplane)
        },
        start_services(args, api, &node_name, &model, &health),
    )?;
    let host_netns_cookie = match (sys::netns_cookie(), args.socket_lb) {
        (Ok(cookie), _) => cookie,
        (Err(e), SocketLb::HostOnly) => anyhow::bail!(
            "--socket-lb=host-only needs this network namespace's cookie, which this kernel does \
             not give ({e}; Linux 5.14 does): run with --socket-lb=all on this kernel"
        ),
        (Err(e), SocketLb::All) => {
            warn!(
                "cannot read this network namespace's cookie ({e}; needs Linux 5.14); the \
                 socket hooks will translate sockets of every namespace, the node as their client"
            );
            0
        }
    };
    let cluster_cidr = args
        .cluster_cidr
        .or(overlay.as_ref().map(|o| o.config.network));
    if cluster_cidr.is_none() {
        warn!(
            "--cluster-cidr is not set: service traffic from outside the cluster is not masqueraded"
        );
    }
    let cidr = cluster_cidr.unwrap_or_default();
    dataplane.set_config(&DatapathConfig {
        cluster_cidr_addr: cidr.network().octets(),
        cluster_cidr_prefix_len: cidr.prefix_len(),
        _pad: [0; 3],
        host_netns_cookie,
    })?;
    let tunnel = match (&overlay, args.vxlan_device) {
        (Some(overlay), Switch::On) => {
            match netdev::ensure_tunnel_device(
                netlink,
                overlay.config.port,
                overlay.own.lease.vtep_mac.0,
                overlay.mtu,
            )
            .await
            {
                Ok(device) => Some(device),
                Err(e) => {
                    warn!(
                        "no {} VXLAN device: {e:#}; without it the kernel does no GRO for the \
                         overlay and what weft cannot decapsulate itself is dropped",
                        netdev::TUNNEL_DEVICE
                    );
                    netdev::remove_tunnel_device(netlink).await?;
                    None
                }
            }
        }
        _ => {
            netdev::remove_tunnel_device(netlink).await?;
            None
        }
    };
    let mut overlay_config = overlay.as_ref().map(|overlay| OverlayConfig {
        public_ip: overlay.public_ip.octets(),
        network_addr: overlay.config.network.network().octets(),
        network_prefix_len: overlay.config.network.prefix_len(),
        flags: match args.host_routing {
            HostRouting::Ebpf => overlay_flags::EBPF_HOST_ROUTING,
            HostRouting::Kernel => 0,
        },
        port: overlay.config.port,
        vni: overlay.config.vni,
        vtep_mac: overlay.own.lease.vtep_mac.0,
        uplink_mac: overlay.uplink.mac,
        local_subnet_addr: pod_subnet.network().octets(),
        local_subnet_prefix_len: pod_subnet.prefix_len(),
        _pad: 0,
        inner_mtu: u16::try_from(overlay.mtu).unwrap_or(u16::MAX),
        uplink_ifindex: overlay.uplink.index,
        tunnel_ifindex: tunnel.as_ref().map_or(0, |device| device.index),
        bridge_mac: bridge_link.mac,
        _pad2: [0; 2],
    });
    if let Some(config) = &overlay_config {
        dataplane.set_overlay(config)?;
    }
    let maps = AyaMaps::take_from(dataplane.ebpf_mut())?;
    let mut conntrack = Conntrack::take_from(dataplane.ebpf_mut())?;

    let peers = match &overlay {
        Some(overlay) => {
            let mut peers = subnets::Peers::new(
                overlay.client.clone(),
                overlay.prefix.clone(),
                &overlay.own,
                overlay.config.vni,
                Arc::clone(&model),
            );
            let listed = peers
                .load()
                .await
                .context("listing the other nodes' leases")?;
            Some((peers, listed.revision))
        }
        None => None,
    };
    // Pods are known before the first pass, so a restart keeps their sockets translated.
    let may_enter = privilege::effective().is_ok_and(privilege::can_enter_namespaces);
    let pod_namespaces = match (args.socket_lb, host_netns_cookie) {
        (SocketLb::All, 1..) if !may_enter => {
            warn!(
                "socket load balancing for pods needs CAP_SYS_ADMIN to enter their network \
                 namespaces (setns), which this agent lacks: pods' service traffic is translated \
                 per packet; grant it, or pass --socket-lb=host-only to say so"
            );
            None
        }
        (SocketLb::All, 1..) => {
            let mut pods = PodNamespaces::new(netlink.clone(), args.bridge.clone(), pod_subnet);
            let found = pods.scan().await;
            model.update(|model| model.set_pod_namespaces(found));
            Some(pods)
        }
        _ => None,
    };
    let mut reconciler = Reconciler::adopt(maps).context("reading the pinned maps")?;
    let started = Instant::now();
    // The first pass looks at everything: the pinned maps may hold what no source has now.
    let (desired, _) = model.take_changes();
    for note in &desired.notes {
        warn!("{note}");
    }
    let first = reconciler.reconcile(&desired);
    let mut failed = log_pass(&first, &[]);
    metrics.pass(started.elapsed(), reconciler.programmed(), failed.len());

    nft::install(&Masquerade {
        overlay: overlay.as_ref().map(|o| nft::Overlay {
            network: o.config.network,
            gateway,
        }),
        ip_masq_subnet: args.ip_masq.then_some(pod_subnet),
    })?;
    if let Some(overlay) = &overlay {
        netdev::route_network(
            netlink,
            overlay.config.network,
            &overlay.uplink,
            gateway,
            overlay.own.lease.vtep_mac.0,
            overlay.mtu,
        )
        .await?;
        if let Some(device) = &tunnel {
            dataplane.attach_tunnel_device(&device.name, device.index)?;
        }
        let xdp = match dataplane.attach_xdp_filter(
            &overlay.uplink.name,
            overlay.uplink.index,
            args.xdp,
        )? {
            XdpPlacement::On(mode) => format!("{mode:?}"),
            XdpPlacement::Off(why) => format!("off ({why})"),
        };
        info!(
            uplink = overlay.uplink.name,
            host_routing = ?args.host_routing,
            vxlan_device = tunnel.as_ref().map(|device| device.name.as_str()),
            xdp,
            "overlay attached"
        );
    }
    if let Some(uplink) = &uplink {
        dataplane.attach_uplink(&uplink.name, uplink.index)?;
    }
    resync_ports(&mut dataplane, netlink, &args.bridge, &mut ports).await?;
    follow_bridge_mac(&mut dataplane, netlink, &args.bridge, &mut overlay_config).await;
    let cgroup = args
        .cgroup
        .clone()
        .or_else(cgroup2_mount)
        .context("no cgroup v2 hierarchy is mounted; mount one or pass --cgroup")?;
    dataplane.attach_socket_hooks(&cgroup)?;
    for stale in dataplane.prune_attachments()? {
        info!(attachment = stale, "removed an attachment no longer wanted");
    }

    let healthz = http::bind(args.healthz_bind_address).await?;
    let metrics_listener = http::bind(args.metrics_bind_address).await?;
    tokio::spawn(http::serve(healthz, health::handler(Arc::clone(&health))));
    tokio::spawn(http::serve(
        metrics_listener,
        metrics::handler(Arc::clone(&metrics)),
    ));
    let mut health_checks = HealthCheckServers::new(Arc::clone(&health));
    health_checks.sync(&desired.health_checks).await;
    health.synced(failed.is_empty());
    health.set_ready();
    info!(
        node = node_name,
        service_ports = reconciler.programmed().service_ports,
        bridge = args.bridge,
        %pod_subnet,
        ports = dataplane.attached_ports(),
        uplink = uplink.as_ref().map(|u| u.name.as_str()),
        cgroup = %cgroup.display(),
        healthz = %args.healthz_bind_address,
        metrics = %args.metrics_bind_address,
        "ready"
    );

    if let Some(pods) = pod_namespaces {
        tokio::spawn(pods.follow(Arc::clone(&model)));
    }
    if let ServiceSource::Manifests(watch) = services {
        tokio::spawn(manifests::follow(watch, Arc::clone(&model)));
    }
    if let (Some(overlay), Some((peers, revision))) = (overlay, peers) {
        tokio::spawn(nexthops::follow(
            netlink.clone(),
            overlay.uplink.index,
            Arc::clone(&model),
        ));
        let lost = Arc::new(Notify::new());
        tokio::spawn(peers.watch(revision, Arc::clone(&lost)));
        tokio::spawn(subnets::keep_lease(
            overlay.client,
            overlay.prefix,
            overlay.own,
            lost,
        ));
    }
    let (udp_endpoints, mut udp_changes) = watch::channel(Arc::new(desired.udp_endpoints()));
    let (checks_out, mut checks_in) = watch::channel(desired.health_checks.clone());
    let mut reconciling = {
        let (model, health, metrics) = (
            Arc::clone(&model),
            Arc::clone(&health),
            Arc::clone(&metrics),
        );
        tokio::spawn(async move {
            let mut notes = Vec::new();
            let mut last_pass = tokio::time::Instant::now();
            loop {
                if failed.is_empty() {
                    model.changed().await;
                } else {
                    // Retry failed entries even when nothing changed: space may have freed up.
                    let _ = tokio::time::timeout(RETRY, model.changed()).await;
                }
                health.queued();
                tokio::time::sleep_until(last_pass + MIN_PASS_INTERVAL).await;
                let started = Instant::now();
                last_pass = started.into();
                let (desired, changed) = model.take_changes();
                if desired.notes != notes {
                    for note in &desired.notes {
                        warn!("{note}");
                    }
                    notes.clone_from(&desired.notes);
                }
                failed = log_pass(&reconciler.reconcile_changes(&desired, &changed), &failed);
                metrics.pass(started.elapsed(), reconciler.programmed(), failed.len());
                health.synced(failed.is_empty());
                let udp = desired.udp_endpoints();
                udp_endpoints.send_if_modified(|current| {
                    let changed = **current != udp;
                    if changed {
                        *current = Arc::new(udp);
                    }
                    changed
                });
                checks_out.send_if_modified(|current| {
                    let changed = *current != desired.health_checks;
                    if changed {
                        current.clone_from(&desired.health_checks);
                    }
                    changed
                });
            }
        })
    };
    let mut collecting = {
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CONNTRACK_GC);
            let mut known = Arc::clone(&udp_changes.borrow());
            loop {
                let purge = tokio::select! {
                    _ = ticks.tick() => None,
                    Ok(()) = udp_changes.changed() => {
                        let next = Arc::clone(&udp_changes.borrow_and_update());
                        let lost = lost_udp_endpoints(&known, &next);
                        known = Arc::clone(&next);
                        lost.then_some(next)
                    }
                };
                // A sweep makes a syscall per entry; it runs beside the async workers, not on one.
                let metrics = Arc::clone(&metrics);
                conntrack = tokio::task::spawn_blocking(move || {
                    match purge {
                        None => match conntrack.collect_garbage() {
                            Ok(sweep) => {
                                metrics.conntrack_entries(sweep.remaining);
                                if sweep.removed > 0 {
                                    tracing::debug!(
                                        removed = sweep.removed,
                                        "collected expired connections"
                                    );
                                }
                            }
                            Err(e) => warn!("conntrack collection failed: {e}"),
                        },
                        Some(valid) => match conntrack.purge_udp(&valid) {
                            Ok(removed) => info!(
                                removed,
                                "purged UDP flows of endpoints that left their service"
                            ),
                            Err(e) => warn!("purging stale UDP flows failed: {e}"),
                        },
                    }
                    conntrack
                })
                .await
                .expect("conntrack work does not panic");
            }
        })
    };

    let mut resync = tokio::time::interval(PORT_RESYNC);
    resync.tick().await;
    loop {
        tokio::select! {
            event = ports.next() => match event {
                Some(PortEvent::Joined(link)) => {
                    attach_port(&mut dataplane, netlink, &link).await;
                    follow_bridge_mac(&mut dataplane, netlink, &args.bridge, &mut overlay_config)
                        .await;
                }
                Some(PortEvent::Left(index)) => {
                    dataplane.detach_pod_port(index);
                    follow_bridge_mac(&mut dataplane, netlink, &args.bridge, &mut overlay_config)
                        .await;
                }
                Some(PortEvent::AddressesChanged) => {
                    refresh_addresses(netlink, &args.nodeport_addresses, &model).await;
                }
                Some(PortEvent::Resync) => {
                    warn!("link notifications were lost; listing the bridge's ports again");
                    resync_ports(&mut dataplane, netlink, &args.bridge, &mut ports).await?;
                    refresh_addresses(netlink, &args.nodeport_addresses, &model).await;
                }
                None => bail!("the netlink link notifications stopped"),
            },
            _ = resync.tick() => {
                resync_ports(&mut dataplane, netlink, &args.bridge, &mut ports).await?;
                refresh_addresses(netlink, &args.nodeport_addresses, &model).await;
            }
            Ok(()) = checks_in.changed() => {
                let wanted: BTreeMap<u16, HealthCheck> = checks_in.borrow_and_update().clone();
                health_checks.sync(&wanted).await;
            }
            // These loops never return; one that does has panicked.
            ended = &mut reconciling => bail!("the reconciler stopped: {ended:?}"),
            ended = &mut collecting => bail!("conntrack collection stopped: {ended:?}"),
        }
    }
}

/// Keeps the bridge's MAC in the overlay settings: the source of frames the datapath delivers
/// straight into pods, as their gateway's. A bridge without a MAC of its own takes its
/// lowest port's, so it changes as pods come and go.
async fn follow_bridge_mac(
    dataplane: &mut Dataplane,
    netlink: &rtnetlink::Handle,
    bridge: &str,
    overlay: &mut Option<OverlayConfig>,
) {
    let Some(config) = overlay else {
        return;
    };
    let mac = match netdev::link_by_name(netlink, bridge).await {
        Ok(Some(link)) => link.mac,
        Ok(None) => return,
        Err(e) => {
            warn!("reading the pod bridge's MAC: {e:#}");
            return;
        }
    };
    if mac != config.bridge_mac {
        config.bridge_mac = mac;
        if let Err(e) = dataplane.set_overlay(config) {
            warn!("writing the pod bridge's new MAC to the overlay settings: {e:#}");
        }
    }
}

/// Reads the node's addresses again, for NodePorts.
async fn refresh_addresses(netlink: &rtnetlink::Handle, only: &[Ipv4Net], model: &ModelHandle) {
    match netdev::node_addresses(netlink, only).await {
        Ok(addresses) => {
            model.update(|m| m.update_node(|node| node.node_port_addresses = addresses));
        }
        Err(e) => warn!("listing the node's addresses for NodePorts: {e:#}"),
    }
}

/// Brings the attached ports in line with the bridge's ports: attaches to the ones missed
/// (lost notifications, failed attaches) and forgets the ones gone. Follows the bridge if it was
/// made again.
async fn resync_ports(
    dataplane: &mut Dataplane,
    netlink: &rtnetlink::Handle,
    bridge: &str,
    ports: &mut PortWatch,
) -> anyhow::Result<()> {
    let Some(bridge_link) = netdev::link_by_name(netlink, bridge).await? else {
        warn!(
            bridge,
            "the pod bridge is gone; pods on it are unreachable until it is back"
        );
        return Ok(());
    };
    ports.set_bridge(bridge_link.index);
    let links = netdev::links(netlink).await?;
    let current: Vec<&netdev::Link> = links
        .iter()
        .filter(|link| link.controller == Some(bridge_link.index))
        .collect();
    for link in &current {
        attach_port(dataplane, netlink, link).await;
    }
    let gone: Vec<u32> = dataplane
        .pod_ports()
        .filter(|index| !current.iter().any(|link| link.index == *index))
        .collect();
    for index in gone {
        dataplane.detach_pod_port(index);
    }
    // Pods learned on ports that left while no agent ran, or whose notification was lost.
    let forgotten = dataplane.forget_pods(|port| current.iter().any(|link| link.index == port))?;
    if forgotten > 0 {
        info!(forgotten, "forgot pods of ports that are gone");
    }
    Ok(())
}

/// Attaches the service programs to the bridge's ports that carry no earlier agent's: nothing
/// is translated on them yet, so they lose nothing by running before the first pass fills the
/// maps, and each new tcx attachment costs an RCU grace period in the kernel (some 15 ms,
/// serialized under the RTNL lock: measured, 0.3 s for 11 ports), which is better spent while
/// the service source is read. Ports an earlier agent attached to are swapped after the first
/// pass ([`resync_ports`]), so its translations never meet maps that are still filling.
async fn attach_fresh_ports(
    dataplane: &mut Dataplane,
    netlink: &rtnetlink::Handle,
    bridge: &str,
) -> anyhow::Result<()> {
    let Some(bridge_link) = netdev::link_by_name(netlink, bridge).await? else {
        return Ok(());
    };
    for link in netdev::links(netlink).await? {
        if link.controller == Some(bridge_link.index) && dataplane.is_fresh_port(link.index) {
            attach_port(dataplane, netlink, &link).await;
        }
    }
    Ok(())
}

async fn attach_port(dataplane: &mut Dataplane, netlink: &rtnetlink::Handle, port: &netdev::Link) {
    if dataplane.has_pod_port(port.index) {
        return;
    }
    if let Err(e) = netdev::set_hairpin(netlink, port).await {
        warn!(
            port = port.name,
            "a pod on this port cannot reach itself through a service: {e:#}"
        );
    }
    match dataplane.attach_pod_port(&port.name, port.index, port.veth, port.peer_netns) {
        Ok(()) => tracing::debug!(port = port.name, "service translation attached"),
        // The port may already be gone again (a pod that failed to start).
        Err(e) => warn!(port = port.name, "cannot attach service translation: {e:#}"),
    }
}

/// Logs one line per pass that changed something, and each failure once; returns what failed.
fn log_pass(report: &Report, failed_before: &[String]) -> Vec<String> {
    if !report.is_empty() {
        info!(
            added = report.added.len(),
            updated = report.updated.len(),
            removed = report.removed.len(),
            overlay = report.node_changes,
            failed = report.failed.len() + report.node_failed.len(),
            "reconciled the maps"
        );
    }
    let failures = report
        .failed
        .iter()
        .map(|(name, e): &(ServicePortName, MapWriteError)| (name.to_string(), e))
        .chain(report.node_failed.iter().map(|(name, e)| (name.clone(), e)));
    let mut failed = Vec::new();
    for (name, e) in failures {
        if !failed_before.contains(&name) {
            let hint = match e {
                MapWriteError::Full { .. } => "; it is retried when space frees up",
                MapWriteError::Syscall { .. } => "",
            };
            error!(entry = name, "not programmed: {e}{hint}");
        }
        failed.push(name);
    }
    failed
}
