//! A node's life: [`bootstrap`] sets the node up from a validated [`Config`] (the overlay
//! lease, the bridge, the programs, the first reconcile pass) and starts its tasks;
//! [`Node::run`] serves until one of them ends. What it puts in the kernel (programs, maps,
//! routes, the nftables table) stays when the agent stops.

pub mod config;
mod ports;
pub mod tasks;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};
use weft_common::{
    maps::{OverlayConfig, overlay_flags},
    vxlan,
};

pub use self::config::{
    Config, Etcd, HostRouting, KubeSubnets, ServiceSource, SocketLb, SubnetManager,
};
use self::{
    ports::{Ports, attach_fresh_ports},
    tasks::{Tasks, forever},
};
use crate::{
    datapath::conntrack::{Conntrack, lost_udp_endpoints},
    datapath::loader::{Dataplane, KernelSupport, XdpPlacement, datapath_config},
    datapath::maps::{AyaMaps, MapWriteError},
    host::netdev::{self, PortWatch, Uplink},
    host::nft::{self, Masquerade},
    host::privilege,
    host::sys,
    model::{Changes, HealthCheck, ServicePortName, UdpEndpoints},
    reconcile::{Reconciler, Report},
    serve::health::{self, Health, HealthCheckServers},
    serve::http,
    serve::metrics::{self, Metrics},
    sources::ModelHandle,
    sources::etcd::{self, OwnLease, SubnetSettings, client},
    sources::flannel::{self, Lease, NetworkConfig, subnet_env},
    sources::kube,
    sources::kube_subnets::{self, OwnNodeLease},
    sources::manifests::{self, ManifestWatch},
    sources::nexthops,
    sources::pods::PodNamespaces,
};

/// The least time between two reconcile passes (kube-proxy's `--min-sync-period`): a change
/// after a quiet spell is applied at once; in a burst, what arrives within this time after a
/// pass waits and goes into the next one, so a burst costs a pass per period, not per change.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(10);
/// How often a pass that failed (a full map) is retried.
const RETRY: Duration = Duration::from_secs(5);
/// How often expired connections are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(30);

/// A node set up and serving: its tasks are running.
pub struct Node {
    tasks: Tasks,
}

impl Node {
    /// The names of the node's tasks.
    #[must_use]
    pub fn tasks(&self) -> Vec<&'static str> {
        self.tasks.names()
    }

    /// Serves until a task ends, which only a fault makes happen: the error names the task.
    /// Dropping the future stops every task (the dataplane keeps forwarding).
    pub async fn run(mut self) -> anyhow::Result<Infallible> {
        let ended = self.tasks.first_end().await;
        Err(anyhow::Error::from(ended).context(
            "the agent stops; the dataplane keeps forwarding until the next agent adopts it",
        ))
    }
}

/// The overlay of a node: its uplink, the network config and its own lease.
struct Overlay {
    uplink: Uplink,
    /// This node's address on the underlay: the source of what it encapsulates.
    local_ip: Ipv4Addr,
    config: NetworkConfig,
    subnet: Ipv4Net,
    /// What this node publishes (its PublicIP is `local_ip` unless an operator overrode it).
    lease: Lease,
    store: LeaseStore,
    /// MTU of pod interfaces: the uplink's, less the VXLAN overhead (or Backend.MTU).
    mtu: u32,
}

/// Where the leases are, and this node's.
#[expect(
    clippy::large_enum_variant,
    reason = "one per agent, made once: boxing the etcd client would buy nothing"
)]
enum LeaseStore {
    Etcd {
        client: etcd_client::Client,
        prefix: String,
        own: OwnLease,
    },
    Kube {
        client: ::kube::Client,
        settings: KubeSubnets,
        own: OwnNodeLease,
    },
}

/// Joins the overlay: takes this node's lease from flannel's subnet manager (waiting while
/// etcd or the API server is unreachable, or the config or podCIDR is missing).
async fn join_overlay(
    netlink: &rtnetlink::Handle,
    uplink: Uplink,
    subnets: &SubnetManager,
    config: &Config,
    api: Option<&::kube::Client>,
) -> anyhow::Result<Overlay> {
    let local_ip = config
        .public_ip
        .or(uplink.address)
        .ok_or_else(|| netdev::NetdevError::NoAddress(uplink.name.clone()))?;
    let bridge = netdev::bridge_addresses(netlink, &config.bridge).await?;
    let (network, store) = match subnets {
        SubnetManager::Etcd(settings) => {
            take_etcd_lease(settings, config, local_ip, &bridge).await?
        }
        SubnetManager::Kube(settings) => {
            let client = api
                .context("--kube-subnet-mgr needs the Kubernetes API (--kubeconfig, or a pod)")?
                .clone();
            let own = kube_subnets::acquire(
                client.clone(),
                &config.node_name,
                &settings.annotations,
                &settings.network,
                local_ip,
            )
            .await?;
            let store = LeaseStore::Kube {
                client,
                settings: settings.clone(),
                own,
            };
            (settings.network.clone(), store)
        }
    };
    let (subnet, lease) = match &store {
        LeaseStore::Etcd { own, .. } => (own.subnet, own.lease),
        LeaseStore::Kube { own, .. } => (own.subnet, own.lease),
    };
    // Before subnet.env is rewritten, which would lose the subnet the bridge was made for.
    netdev::bridge_fits(&config.bridge, &bridge, subnet)?;
    let mtu = network
        .mtu
        .unwrap_or(uplink.mtu.saturating_sub(vxlan::OVERHEAD));
    info!(
        %subnet,
        public_ip = %lease.public_ip,
        vtep_mac = %lease.vtep_mac,
        uplink = uplink.name,
        "holding the subnet lease"
    );
    Ok(Overlay {
        uplink,
        local_ip,
        config: network,
        subnet,
        lease,
        store,
        mtu,
    })
}

/// Reads flannel's config from etcd and takes this node's lease there.
async fn take_etcd_lease(
    settings: &Etcd,
    config: &Config,
    public_ip: Ipv4Addr,
    bridge: &[Ipv4Addr],
) -> anyhow::Result<(NetworkConfig, LeaseStore)> {
    let mut client = client::connect(&settings.endpoints, &settings.tls).await?;
    let network = etcd::wait_for_config(&mut client, &settings.prefix).await;
    if let Some(ipv6) = network.ipv6 {
        // flanneld reads an IPv4-only key as a node without IPv6, and keeps both families
        // for the others: only this node's IPv6 is missing.
        warn!(
            "the network config enables IPv6 (IPv6Network {}, /{} per node), which weft does \
             not serve yet: this node takes an IPv4-only lease, so its pods get no IPv6 \
             addresses and other nodes reach it over IPv4 only",
            ipv6.network, ipv6.subnet_len
        );
    }
    // The subnet this node held before, as its subnet.env or its bridge remembers it.
    let bridge_subnet = bridge
        .iter()
        .find(|address| network.network.contains(*address))
        .and_then(|address| Ipv4Net::new(*address, network.subnet_len).ok())
        .map(|subnet| subnet.trunc());
    let wanted = SubnetSettings {
        endpoints: settings.endpoints.clone(),
        prefix: settings.prefix.clone(),
        public_ip,
        previous: fs::read_to_string(&config.subnet_file)
            .ok()
            .and_then(|text| flannel::previous_subnet(&text))
            .or(bridge_subnet),
    };
    let own = loop {
        match etcd::acquire(&mut client, &wanted, &network).await {
            Ok(own) => break own,
            Err(e) if e.is_transient() => {
                warn!("taking a subnet lease failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("taking a subnet lease"),
        }
    };
    if own.etcd_lease == 0 {
        info!(subnet = %own.subnet, "the lease is an operator's reservation");
    }
    let store = LeaseStore::Etcd {
        client,
        prefix: settings.prefix.clone(),
        own,
    };
    Ok((network, store))
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

/// The uplink: `--iface`, else the default route's interface; `None` when there is neither
/// (a node without a default route serves only its pods and itself).
async fn find_uplink(
    netlink: &rtnetlink::Handle,
    config: &Config,
) -> anyhow::Result<Option<Uplink>> {
    match netdev::uplink(netlink, config.iface.as_deref()).await {
        Ok(uplink) => Ok(Some(uplink)),
        Err(netdev::NetdevError::NoDefaultRoute) if config.subnets.is_none() => {
            info!(
                "no default route and no --iface: clients outside the node (NodePorts, external \
                 IPs) are not served"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads the service source once into the model (the first pass must not see a partial
/// cluster) and starts following it. Returns the manifest watch, which is followed once the
/// node is ready.
async fn start_services(
    config: &Config,
    api: Option<::kube::Client>,
    model: &Arc<ModelHandle>,
    health: &Arc<Health>,
    tasks: &mut Tasks,
) -> anyhow::Result<Option<ManifestWatch>> {
    match (&config.services, api) {
        (ServiceSource::Manifests(dir), _) => Ok(Some(ManifestWatch::start(dir, model)?)),
        (ServiceSource::Kubernetes { .. }, Some(client)) => {
            kube::start(client, &config.node_name, model, health, tasks).await;
            Ok(None)
        }
        _ => {
            info!("no --manifests or --kubeconfig: serving no services, only the overlay");
            Ok(None)
        }
    }
}

/// A client for the Kubernetes API when it is the service source.
async fn api_client(config: &Config) -> anyhow::Result<Option<::kube::Client>> {
    match &config.services {
        ServiceSource::Kubernetes { kubeconfig } => {
            Ok(Some(kube::client(kubeconfig.as_deref()).await?))
        }
        _ => Ok(None),
    }
}

/// The pod subnet: the lease's with an overlay, else the one given, else the Node's podCIDR.
async fn pod_subnet(
    config: &Config,
    overlay: Option<&Overlay>,
    api: Option<&::kube::Client>,
) -> anyhow::Result<Ipv4Net> {
    Ok(match (overlay, config.pod_subnet) {
        (Some(overlay), Some(given)) if given != overlay.subnet => {
            bail!(
                "--pod-subnet {given} differs from this node's lease {}; drop the flag",
                overlay.subnet
            )
        }
        (Some(overlay), _) => overlay.subnet,
        (None, Some(given)) => given,
        (None, None) => match api {
            Some(client) => kube::pod_subnet(client.clone(), &config.node_name).await.1,
            None => bail!(
                "pass --pod-subnet (one node) or --etcd-endpoints (flannel-compatible overlay)"
            ),
        },
    })
}

/// The overlay's `external` VXLAN device, or none (not wanted, or the kernel refused it).
async fn tunnel_device(
    netlink: &rtnetlink::Handle,
    overlay: Option<&Overlay>,
    config: &Config,
) -> anyhow::Result<Option<netdev::Link>> {
    if let (Some(overlay), true) = (overlay, config.vxlan_device) {
        match netdev::ensure_tunnel_device(
            netlink,
            overlay.config.port,
            overlay.lease.vtep_mac.0,
            overlay.mtu,
        )
        .await
        {
            Ok(device) => return Ok(Some(device)),
            Err(e) => warn!(
                "no {} VXLAN device: {e:#}; without it the kernel does no GRO for the overlay and \
                 what weft cannot decapsulate itself is dropped",
                netdev::TUNNEL_DEVICE
            ),
        }
    }
    netdev::remove_tunnel_device(netlink).await?;
    Ok(None)
}

/// This netns's cookie, which tells the socket hooks the node's sockets from its pods'.
fn host_netns_cookie(socket_lb: SocketLb) -> anyhow::Result<u64> {
    match (sys::netns_cookie(), socket_lb) {
        (Ok(cookie), _) => Ok(cookie),
        (Err(e), SocketLb::HostOnly) => bail!(
            "--socket-lb=host-only needs this network namespace's cookie, which this kernel does \
             not give ({e}; Linux 5.14 does): run with --socket-lb=all on this kernel"
        ),
        (Err(e), SocketLb::All) => {
            warn!(
                "cannot read this network namespace's cookie ({e}; needs Linux 5.14); the \
                 socket hooks will translate sockets of every namespace, the node as their client"
            );
            Ok(0)
        }
    }
}

/// Sets the node up and starts its tasks: when this returns, the first pass is in the maps,
/// every hook is attached and `/healthz` is served.
#[expect(
    clippy::too_many_lines,
    reason = "the node's set-up in its one stated order; the steps are calls"
)]
pub async fn bootstrap(config: &Config, netlink: &rtnetlink::Handle) -> anyhow::Result<Node> {
    let missing = privilege::missing(privilege::effective()?);
    if !missing.is_empty() {
        bail!(
            "weft needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN for the first \
             and last) and lacks {}; grant them as deploy/base/daemonset.yaml does",
            missing.join(", ")
        );
    }
    let mut tasks = Tasks::default();
    // Served from the start, healthy while starting (as kube-proxy's), so a liveness probe
    // does not restart a node whose etcd or API server is not answering yet; `/readyz` waits
    // for the first sync.
    let health = Arc::new(Health::default());
    let healthz = http::bind(config.healthz_bind_address).await?;
    tasks.spawn(
        "healthz server",
        forever(http::serve(healthz, health::handler(Arc::clone(&health)))),
    );
    let uplink = find_uplink(netlink, config).await?;
    let api = api_client(config).await?;
    let overlay = match (&uplink, &config.subnets) {
        (Some(uplink), Some(subnets)) => {
            Some(join_overlay(netlink, uplink.clone(), subnets, config, api.as_ref()).await?)
        }
        _ => None,
    };
    let pod_subnet = pod_subnet(config, overlay.as_ref(), api.as_ref()).await?;
    let gateway = pod_subnet.hosts().next().unwrap_or(pod_subnet.network());
    if let Some(overlay) = &overlay {
        write_subnet_file(
            &config.subnet_file,
            &subnet_env(&overlay.config, &pod_subnet, overlay.mtu, config.ip_masq),
        )?;
    }

    // Subscribed before anything is read (the bridge, the addresses), so no change falls in
    // between.
    let mut port_watch = PortWatch::subscribe(&config.bridge)?;
    // The overlay's pods are on the bridge, as flannel's CNI puts them; without the overlay the
    // CNI in place decides, and one that routes to each pod's veth (ptp, Calico) has none.
    let bridge_link = if overlay.is_some()
        || netdev::link_by_name(netlink, &config.bridge)
            .await?
            .is_some()
    {
        let (link, created) = netdev::ensure_bridge(
            netlink,
            &config.bridge,
            pod_subnet,
            overlay.as_ref().map(|o| o.mtu),
        )
        .await
        .with_context(|| format!("preparing the pod bridge {}", config.bridge))?;
        if created {
            info!(bridge = config.bridge, %pod_subnet, "created the pod bridge");
        }
        port_watch.set_bridge(link.index);
        Some(link)
    } else {
        info!(
            bridge = config.bridge,
            "no pod bridge: pods behind routed veths (ptp, Calico) get services at connect() \
             (--socket-lb=all); a bridge made later is found"
        );
        None
    };
    netdev::enable_ip_forwarding()?;

    let kernel = KernelSupport::probe()?;
    info!(
        kernel = %kernel.version,
        tc_attach = ?config.tc_attach.resolve(),
        local_connect_refusal = if kernel.socket_errors {
            "ECONNREFUSED/EHOSTUNREACH"
        } else {
            "EPERM (no bpf_set_retval for socket hooks before Linux 5.18)"
        },
        "kernel features"
    );
    // The programs go through the verifier while the service source is read.
    let loading = {
        let (object, pin_dir) = (config.object.clone(), config.pin_dir.clone());
        let (limits, tc_attach) = (config.limits, config.tc_attach);
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
    let metrics = Arc::new(Metrics::new(
        config.limits,
        config.pin_dir.clone(),
        Arc::clone(&model),
    ));
    let addresses = netdev::node_addresses(netlink, &config.nodeport_addresses).await?;
    model.update(|m| {
        m.update_node(|node| {
            node.name = Some(config.node_name.clone());
            node.node_port_addresses = addresses;
        })
    });
    // Every source is read once before the first pass, so a restart never drops a service or
    // a route only because its source was not read yet, and services are in the maps before
    // any port that carried translations gets the new programs (ports that carried none get
    // them meanwhile: see `attach_fresh_ports`).
    let (mut dataplane, manifests) = tokio::try_join!(
        async {
            let mut dataplane = loading.await.context("loading the dataplane")??;
            attach_fresh_ports(&mut dataplane, netlink, &config.bridge).await?;
            anyhow::Ok(dataplane)
        },
        start_services(config, api, &model, &health, &mut tasks),
    )?;
    let host_netns_cookie = host_netns_cookie(config.socket_lb)?;
    let cluster_cidr = config
        .cluster_cidr
        .or(overlay.as_ref().map(|o| o.config.network));
    if cluster_cidr.is_none() {
        warn!(
            "--cluster-cidr is not set: service traffic from outside the cluster is not masqueraded"
        );
    }
    dataplane.set_config(&datapath_config(cluster_cidr, host_netns_cookie))?;
    let tunnel = tunnel_device(netlink, overlay.as_ref(), config).await?;
    let overlay_config = overlay.as_ref().map(|overlay| OverlayConfig {
        public_ip: overlay.local_ip.octets(),
        network_addr: overlay.config.network.network().octets(),
        network_prefix_len: overlay.config.network.prefix_len(),
        flags: match config.host_routing {
            HostRouting::Ebpf => overlay_flags::EBPF_HOST_ROUTING,
            HostRouting::Kernel => 0,
        },
        port: overlay.config.port,
        vni: overlay.config.vni,
        vtep_mac: overlay.lease.vtep_mac.0,
        uplink_mac: overlay.uplink.mac,
        local_subnet_addr: pod_subnet.network().octets(),
        local_subnet_prefix_len: pod_subnet.prefix_len(),
        _pad: 0,
        inner_mtu: u16::try_from(overlay.mtu).unwrap_or(u16::MAX),
        uplink_ifindex: overlay.uplink.index,
        tunnel_ifindex: tunnel.as_ref().map_or(0, |device| device.index),
        // The overlay always has its bridge.
        bridge_mac: bridge_link.as_ref().map_or([0; 6], |link| link.mac),
        _pad2: [0; 2],
    });
    if let Some(overlay_config) = &overlay_config {
        dataplane.set_overlay(overlay_config)?;
    }
    let maps = AyaMaps::open(dataplane.ebpf_mut())?;
    let conntrack = Conntrack::open(dataplane.ebpf_mut())?;

    // The other nodes' leases are read before the first pass, as the services are.
    let peers = match overlay.as_ref().map(|overlay| (overlay, &overlay.store)) {
        Some((
            overlay,
            LeaseStore::Etcd {
                client,
                prefix,
                own,
            },
        )) => {
            let mut peers = etcd::Peers::new(
                client.clone(),
                prefix.clone(),
                own,
                overlay.config.vni,
                Arc::clone(&model),
            );
            let listed = peers
                .load()
                .await
                .context("listing the other nodes' leases")?;
            Some((peers, listed.revision))
        }
        Some((
            overlay,
            LeaseStore::Kube {
                client,
                settings,
                own,
            },
        )) => {
            let settings = kube_subnets::Settings {
                own_name: config.node_name.clone(),
                own: own.clone(),
                annotations: settings.annotations.clone(),
                network: overlay.config.clone(),
                set_network_unavailable: settings.set_network_unavailable,
            };
            kube_subnets::start(client.clone(), settings, &model, &mut tasks).await;
            None
        }
        None => None,
    };
    // Pods are known before the first pass, so a restart keeps their sockets translated.
    let may_enter = privilege::effective().is_ok_and(privilege::can_enter_namespaces);
    let pod_namespaces = match (config.socket_lb, host_netns_cookie) {
        (SocketLb::All, 1..) if !may_enter => {
            warn!(
                "socket load balancing for pods needs CAP_SYS_ADMIN to enter their network \
                 namespaces (setns), which this agent lacks: pods' service traffic is translated \
                 per packet; grant it, or pass --socket-lb=host-only to say so"
            );
            None
        }
        (SocketLb::All, 1..) => {
            let mut pods = PodNamespaces::new(
                netlink.clone(),
                config.bridge.clone(),
                uplink.as_ref().map(|uplink| uplink.index),
                cluster_cidr.unwrap_or(pod_subnet),
            );
            let found = pods.scan().await;
            model.update(|model| model.set_pod_namespaces(found));
            Some(pods)
        }
        _ => {
            if bridge_link.is_none() {
                warn!(
                    bridge = config.bridge,
                    "no pod bridge and no socket load balancing for pods: pods behind routed \
                     veths get no service translation until the bridge appears; run with \
                     --socket-lb=all on a CNI without a bridge"
                );
            }
            None
        }
    };
    let mut reconciler = Reconciler::adopt(maps).context("reading the pinned maps")?;
    let started = Instant::now();
    // The first pass looks at everything: the pinned maps may hold what no source has now.
    let Changes {
        desired,
        trigger_times,
        ..
    } = model.take_changes();
    for note in &desired.notes {
        warn!("{note}");
    }
    let first = reconciler.reconcile(&desired);
    let failed = log_pass(&first, &[]);
    metrics.pass(started.elapsed(), reconciler.programmed(), failed.len());
    metrics.network_programmed(&trigger_times);

    nft::install(&Masquerade {
        overlay: overlay.as_ref().map(|o| nft::Overlay {
            network: o.config.network,
            gateway,
        }),
        ip_masq_subnet: config.ip_masq.then_some(pod_subnet),
    })?;
    if let Some(overlay) = &overlay {
        netdev::route_network(
            netlink,
            overlay.config.network,
            &overlay.uplink,
            gateway,
            overlay.lease.vtep_mac.0,
            overlay.mtu,
        )
        .await?;
        if let Some(device) = &tunnel {
            dataplane.attach_tunnel_device(&device.name, device.index)?;
        }
        let xdp = match dataplane.attach_xdp_filter(
            &overlay.uplink.name,
            overlay.uplink.index,
            config.xdp,
        )? {
            XdpPlacement::On(mode) => format!("{mode:?}"),
            XdpPlacement::Off(why) => format!("off ({why})"),
        };
        info!(
            uplink = overlay.uplink.name,
            host_routing = ?config.host_routing,
            vxlan_device = tunnel.as_ref().map(|device| device.name.as_str()),
            xdp,
            "overlay attached"
        );
    }
    if let Some(uplink) = &uplink {
        dataplane.attach_uplink(&uplink.name, uplink.index)?;
    }
    let mut ports = Ports {
        dataplane,
        netlink: netlink.clone(),
        bridge: config.bridge.clone(),
        nodeport_addresses: config.nodeport_addresses.clone(),
        watch: port_watch,
        overlay: overlay_config,
    };
    ports.resync().await?;
    ports.follow_bridge_mac().await;
    ports.dataplane.attach_socket_hooks(&config.cgroup)?;
    for stale in ports.dataplane.prune_attachments()? {
        info!(attachment = stale, "removed an attachment no longer wanted");
    }

    let metrics_listener = http::bind(config.metrics_bind_address).await?;
    tasks.spawn(
        "metrics server",
        forever(http::serve(
            metrics_listener,
            metrics::handler(Arc::clone(&metrics)),
        )),
    );
    let mut health_checks = HealthCheckServers::new(Arc::clone(&health));
    health_checks.sync(&desired.health_checks).await;
    health.synced(failed.is_empty());
    health.set_ready();
    info!(
        node = config.node_name,
        service_ports = reconciler.programmed().service_ports,
        bridge = config.bridge,
        %pod_subnet,
        ports = ports.dataplane.attached_ports(),
        uplink = uplink.as_ref().map(|u| u.name.as_str()),
        cgroup = %config.cgroup.display(),
        healthz = %config.healthz_bind_address,
        metrics = %config.metrics_bind_address,
        "ready"
    );

    if let Some(pods) = pod_namespaces {
        tasks.spawn("pod namespaces", forever(pods.follow(Arc::clone(&model))));
    }
    if let Some(watch) = manifests {
        tasks.spawn(
            "manifest watcher",
            forever(manifests::follow(watch, Arc::clone(&model))),
        );
    }
    if let Some(overlay) = overlay {
        tasks.spawn(
            "next hops",
            nexthops::follow(netlink.clone(), overlay.uplink.index, Arc::clone(&model)),
        );
        if let (
            LeaseStore::Etcd {
                client,
                prefix,
                own,
            },
            Some((peers, revision)),
        ) = (overlay.store, peers)
        {
            let lost = Arc::new(Notify::new());
            tasks.spawn(
                "lease watcher",
                forever(peers.watch(revision, Arc::clone(&lost))),
            );
            tasks.spawn(
                "lease keeper",
                forever(etcd::keep_lease(client, prefix, own, lost)),
            );
        }
    }
    let (udp_endpoints, udp_changes) = watch::channel(Arc::new(desired.udp_endpoints()));
    let (checks_out, checks_in) = watch::channel(desired.health_checks.clone());
    let reconciling = Reconciling {
        reconciler,
        failed,
        model: Arc::clone(&model),
        health,
        metrics: Arc::clone(&metrics),
        udp_endpoints,
        health_checks: checks_out,
    };
    tasks.spawn("reconciler", forever(reconciling.run()));
    tasks.spawn(
        "conntrack collector",
        forever(collect_conntrack(conntrack, udp_changes, metrics)),
    );
    tasks.spawn(
        "health-check servers",
        forever(follow_health_checks(health_checks, checks_in)),
    );
    tasks.spawn("port watcher", async move { ports.follow(&model).await });
    info!(tasks = tasks.names().join(", "), "supervising");
    Ok(Node { tasks })
}

/// The reconcile loop's state: it alone writes the service maps.
struct Reconciling {
    reconciler: Reconciler<AyaMaps>,
    /// What the last pass could not program.
    failed: Vec<String>,
    model: Arc<ModelHandle>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// The UDP endpoints now served, for the conntrack collector's stale-flow purge.
    udp_endpoints: watch::Sender<Arc<UdpEndpoints>>,
    /// The health-check NodePorts now wanted.
    health_checks: watch::Sender<BTreeMap<u16, HealthCheck>>,
}

impl Reconciling {
    /// A pass per batch of model changes, for as long as the agent runs.
    async fn run(mut self) -> Infallible {
        let mut notes = Vec::new();
        let mut last_pass = tokio::time::Instant::now();
        loop {
            if self.failed.is_empty() {
                self.model.changed().await;
            } else {
                // Retry failed entries even when nothing changed: space may have freed up.
                let _ = tokio::time::timeout(RETRY, self.model.changed()).await;
            }
            self.health.queued();
            tokio::time::sleep_until(last_pass + MIN_PASS_INTERVAL).await;
            let started = Instant::now();
            last_pass = started.into();
            let Changes {
                desired,
                changed,
                trigger_times,
            } = self.model.take_changes();
            if desired.notes != notes {
                for note in &desired.notes {
                    warn!("{note}");
                }
                notes.clone_from(&desired.notes);
            }
            let report = self.reconciler.reconcile_changes(&desired, &changed);
            self.failed = log_pass(&report, &self.failed);
            self.metrics.pass(
                started.elapsed(),
                self.reconciler.programmed(),
                self.failed.len(),
            );
            self.metrics.network_programmed(&trigger_times);
            self.health.synced(self.failed.is_empty());
            let udp = desired.udp_endpoints();
            self.udp_endpoints.send_if_modified(|current| {
                let changed = **current != udp;
                if changed {
                    *current = Arc::new(udp);
                }
                changed
            });
            self.health_checks.send_if_modified(|current| {
                let changed = *current != desired.health_checks;
                if changed {
                    current.clone_from(&desired.health_checks);
                }
                changed
            });
        }
    }
}

/// Sweeps expired connections every [`CONNTRACK_GC`], and purges UDP flows to endpoints that
/// left their service as soon as they leave.
async fn collect_conntrack(
    mut conntrack: Conntrack,
    mut udp_changes: watch::Receiver<Arc<UdpEndpoints>>,
    metrics: Arc<Metrics>,
) -> Infallible {
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
}

/// Serves the health-check NodePorts the reconciler asks for.
async fn follow_health_checks(
    mut servers: HealthCheckServers,
    mut wanted: watch::Receiver<BTreeMap<u16, HealthCheck>>,
) -> Infallible {
    loop {
        if wanted.changed().await.is_err() {
            // The reconciler is gone; its task's end is what the supervisor reports.
            std::future::pending::<()>().await;
        }
        let checks = wanted.borrow_and_update().clone();
        servers.sync(&checks).await;
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
