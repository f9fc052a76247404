//! `weft agent`: wires the sources, the reconciler and the dataplane together on one node.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use weft::{
    conntrack::{Conntrack, monotonic_now_ns},
    dataplane::{Dataplane, MapLimits, cgroup2_mount},
    manifests,
    maps::{AyaServiceMaps, MapWriteError},
    model::ServicePortName,
    netdev::{self, PortEvent, PortWatch},
    nft,
    reconcile::{Reconciler, Report},
    source::ModelHandle,
    sys,
};
use weft_common::maps::{
    DEFAULT_CT_ENTRIES, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SERVICES, DatapathConfig,
};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Directory (on a BPF filesystem) where the maps are pinned; give each node its own when
    /// several share a host.
    #[arg(long, env = "WEFT_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// Directory of Service and discovery.k8s.io/v1 EndpointSlice manifests (YAML or JSON),
    /// re-read whenever a file in it changes.
    #[arg(long, env = "WEFT_MANIFESTS")]
    manifests: PathBuf,
    /// The bridge local pods are attached to.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "cni0")]
    bridge: String,
    /// This node's pod subnet; a bridge weft creates gets its first address.
    #[arg(long, env = "WEFT_POD_SUBNET")]
    pod_subnet: Ipv4Net,
    /// The cluster's pod network. Service traffic from sources outside it is masqueraded;
    /// without it, only hairpin traffic is (as kube-proxy without --cluster-cidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    cluster_cidr: Option<Ipv4Net>,
    /// cgroup v2 directory whose sockets get service translation (default: the cgroup v2 root,
    /// covering every process of the node).
    #[arg(long, env = "WEFT_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Capacity for service frontends (ClusterIP, port, protocol).
    #[arg(long, env = "WEFT_MAX_SERVICES", default_value_t = DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity for endpoint slots, summed over all service ports.
    #[arg(long, env = "WEFT_MAX_ENDPOINTS", default_value_t = DEFAULT_MAX_ENDPOINTS)]
    max_endpoints: u32,
    /// Capacity of the conntrack table (two entries per connection).
    #[arg(long, env = "WEFT_CT_ENTRIES", default_value_t = DEFAULT_CT_ENTRIES)]
    ct_entries: u32,
}

/// How long the reconciler waits after a change for more to arrive, so bursts cost one pass.
const COALESCE: Duration = Duration::from_millis(10);
/// How often a pass that failed (a full map) is retried.
const RETRY: Duration = Duration::from_secs(5);
/// How often expired connections are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(30);

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let AgentArgs {
        pin_dir,
        manifests: manifest_dir,
        bridge,
        pod_subnet,
        cluster_cidr,
        cgroup,
        max_services,
        max_endpoints,
        ct_entries,
    } = args;
    let limits = MapLimits {
        max_services,
        max_endpoints,
        ct_entries,
    };

    let netlink = netdev::connect()?;
    let (bridge_link, created) = netdev::ensure_bridge(&netlink, &bridge, pod_subnet)
        .await
        .with_context(|| format!("preparing the pod bridge {bridge}"))?;
    if created {
        info!(%bridge, %pod_subnet, "created the pod bridge");
    }
    netdev::enable_ip_forwarding()?;

    let mut dataplane = Dataplane::load(Some(&pin_dir), limits).with_context(|| {
        format!(
            "loading the dataplane with maps pinned in {}",
            pin_dir.display()
        )
    })?;
    let host_netns_cookie = sys::netns_cookie().unwrap_or_else(|e| {
        warn!(
            "cannot read this network namespace's cookie ({e}; needs Linux 5.14); \
               the socket hooks will translate sockets of every namespace"
        );
        0
    });
    if cluster_cidr.is_none() {
        warn!(
            "--cluster-cidr is not set: service traffic from outside the cluster is not masqueraded"
        );
    }
    let cidr = cluster_cidr.unwrap_or(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0)?);
    dataplane.set_config(&DatapathConfig {
        cluster_cidr_addr: cidr.network().octets(),
        cluster_cidr_prefix_len: cidr.prefix_len(),
        _pad: [0; 3],
        host_netns_cookie,
    })?;
    let service_maps = AyaServiceMaps::take_from(dataplane.ebpf_mut())?;
    let mut conntrack = Conntrack::take_from(dataplane.ebpf_mut())?;

    // Services are in the maps before any program is attached, and the first pass sees every
    // manifest, so a restart never drops a service it still has.
    let model = Arc::new(ModelHandle::default());
    let loaded = manifests::load(&manifest_dir, &model)?;
    let mut reconciler =
        Reconciler::adopt(service_maps).context("reading the pinned service maps")?;
    let desired = model.desired();
    for note in &desired.notes {
        warn!("{note}");
    }
    let mut failed = log_pass(&reconciler.reconcile(&desired), &[]);

    nft::install()?;
    let mut ports = PortWatch::subscribe(bridge_link.index)?;
    for link in netdev::links(&netlink).await? {
        if link.controller == Some(bridge_link.index) {
            attach_port(&mut dataplane, &netlink, &link).await;
        }
    }
    let cgroup = cgroup
        .or_else(cgroup2_mount)
        .context("no cgroup v2 hierarchy is mounted; mount one or pass --cgroup")?;
    dataplane.attach_socket_hooks(&cgroup)?;
    info!(
        service_ports = reconciler.programmed(),
        %bridge,
        ports = dataplane.attached_ports(),
        cgroup = %cgroup.display(),
        "ready"
    );

    let watch_model = Arc::clone(&model);
    tokio::spawn(async move {
        if let Err(e) = manifests::watch(manifest_dir, loaded, watch_model).await {
            error!("manifest source stopped: {e}; the last known services keep working");
        }
    });
    let mut reconciling = tokio::spawn(async move {
        let mut notes = Vec::new();
        loop {
            if failed.is_empty() {
                model.changed().await;
            } else {
                // Retry failed service ports even when nothing changed: space may have freed up.
                let _ = tokio::time::timeout(RETRY, model.changed()).await;
            }
            tokio::time::sleep(COALESCE).await;
            let desired = model.desired();
            if desired.notes != notes {
                for note in &desired.notes {
                    warn!("{note}");
                }
                notes.clone_from(&desired.notes);
            }
            failed = log_pass(&reconciler.reconcile(&desired), &failed);
        }
    });
    let mut collecting = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(CONNTRACK_GC);
        loop {
            ticks.tick().await;
            match conntrack.collect_garbage(monotonic_now_ns()) {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "collected expired connections"),
                Err(e) => warn!("conntrack collection failed: {e}"),
            }
        }
    });

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            event = ports.next() => match event {
                Some(PortEvent::Joined(link)) => attach_port(&mut dataplane, &netlink, &link).await,
                Some(PortEvent::Left(index)) => dataplane.detach_pod_port(index),
                None => anyhow::bail!("the netlink link notifications stopped"),
            },
            // These loops never return; one that does has panicked.
            ended = &mut reconciling => anyhow::bail!("the reconciler stopped: {ended:?}"),
            ended = &mut collecting => anyhow::bail!("conntrack collection stopped: {ended:?}"),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("stopping: detaching programs and removing the masquerade table; pinned maps stay");
    nft::remove()?;
    drop(dataplane);
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
    match dataplane.attach_pod_port(&port.name, port.index) {
        Ok(()) => tracing::debug!(port = port.name, "service translation attached"),
        // The port may already be gone again (a pod that failed to start).
        Err(e) => warn!(port = port.name, "cannot attach service translation: {e:#}"),
    }
}

/// Logs one line per pass that changed something, and each failure once; returns the failed
/// service ports.
fn log_pass(report: &Report, failed_before: &[ServicePortName]) -> Vec<ServicePortName> {
    if !report.added.is_empty() || !report.updated.is_empty() || !report.removed.is_empty() {
        info!(
            added = report.added.len(),
            updated = report.updated.len(),
            removed = report.removed.len(),
            failed = report.failed.len(),
            "reconciled service maps"
        );
    }
    for (name, e) in &report.failed {
        if !failed_before.contains(name) {
            let hint = match e {
                MapWriteError::Full { .. } => "; it is retried when space frees up",
                MapWriteError::Syscall { .. } => "",
            };
            error!(service = %name, "not programmed: {e}{hint}");
        }
    }
    report.failed.iter().map(|(name, _)| name.clone()).collect()
}
