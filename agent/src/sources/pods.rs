//! Source: this node's pods by network namespace, for socket-level load balancing
//! (`--socket-lb=all`).
//!
//! The socket hooks run for every socket of the machine, and translate a pod's socket only when
//! its namespace is known here, with the pod's address as the client (what the per-packet path
//! sees). A pod is found by its port: a veth on the bridge, or a veth on no bridge at all (CNIs
//! that route to each pod's veth: ptp, Calico), has its peer in a namespace this node's
//! namespace numbers (`link-netnsid`); the container runtime names that namespace under
//! `/run/netns` (containerd, CRI-O and `ip netns` do), and `RTM_GETNSID` says which name has
//! that number. Inside the namespace, its cookie and the pod's address in the pod network are
//! read. A namespace found nowhere is left to the per-packet path, which serves the bridge's
//! pods as before; a routed veth's pod it leaves without service translation.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::Ipv4Net;
use nix::sched::{CloneFlags, setns};
use tracing::{debug, info, warn};

use crate::{host::netdev, host::sys, sources::ModelHandle};

/// Where container runtimes and `ip netns` name network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// How often the bridge's ports are looked at again. A pod's sockets are served by the
/// per-packet path until its namespace is found.
const RESCAN: Duration = Duration::from_secs(1);

/// A pod namespace found behind a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodNamespace {
    /// `bpf_get_netns_cookie()` of the namespace.
    pub cookie: u64,
    /// The pod's address in the node's pod subnet.
    pub addr: Ipv4Addr,
}

/// This node's pod namespaces as last found, by port ifindex (a new pod gets a new port, so a
/// namespace id the kernel reuses is never mistaken for an earlier pod's).
pub struct PodNamespaces {
    netlink: rtnetlink::Handle,
    bridge: String,
    /// The uplink, a veth on test nodes, is no pod's.
    uplink: Option<u32>,
    /// Where pods have their addresses: the cluster's pod network, or this node's subnet.
    pod_network: Ipv4Net,
    known: BTreeMap<u32, PodNamespace>,
    unresolved: BTreeSet<u32>,
    /// Ports whose namespace could not be read, so each is reported once.
    failed: BTreeSet<u32>,
}

impl PodNamespaces {
    #[must_use]
    pub fn new(
        netlink: rtnetlink::Handle,
        bridge: String,
        uplink: Option<u32>,
        pod_network: Ipv4Net,
    ) -> Self {
        Self {
            netlink,
            bridge,
            uplink,
            pod_network,
            known: BTreeMap::new(),
            unresolved: BTreeSet::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Looks at the pods' ports, finds the namespaces of new ones and forgets the ones gone;
    /// returns the pods by namespace cookie.
    pub async fn scan(&mut self) -> BTreeMap<u64, Ipv4Addr> {
        match pod_ports(&self.netlink, &self.bridge, self.uplink).await {
            Ok(ports) => self.resolve(&ports).await,
            Err(e) => warn!("listing the pods' ports for socket load balancing: {e:#}"),
        }
        self.known
            .values()
            .map(|pod| (pod.cookie, pod.addr))
            .collect()
    }

    async fn resolve(&mut self, ports: &BTreeMap<u32, i32>) {
        self.known.retain(|port, _| ports.contains_key(port));
        self.failed.retain(|port| ports.contains_key(port));
        let wanted: BTreeMap<i32, u32> = ports
            .iter()
            .filter(|(port, _)| !self.known.contains_key(port))
            .map(|(port, nsid)| (*nsid, *port))
            .collect();
        if !wanted.is_empty() {
            for (port, path) in find_namespaces(&self.netlink, Path::new(NETNS_DIR), &wanted).await
            {
                match read_namespace(path.clone(), self.pod_network).await {
                    Ok(Some(pod)) => {
                        debug!(port, path = %path.display(), addr = %pod.addr, "pod namespace found");
                        self.known.insert(port, pod);
                    }
                    Ok(None) => debug!(
                        path = %path.display(),
                        pod_network = %self.pod_network,
                        "a namespace behind a pod port has no address in the pod network"
                    ),
                    Err(e) => {
                        if self.failed.insert(port) {
                            warn!(path = %path.display(), "reading a pod namespace: {e}");
                        }
                    }
                }
            }
        }
        let unresolved: BTreeSet<u32> = ports
            .keys()
            .filter(|port| !self.known.contains_key(port))
            .copied()
            .collect();
        if unresolved != self.unresolved && !unresolved.is_empty() {
            info!(
                ports = unresolved.len(),
                dir = NETNS_DIR,
                "pods whose namespace is not named in the netns directory are served per packet"
            );
        }
        self.unresolved = unresolved;
    }

    /// Keeps the model's pod namespaces up to date; runs until the agent stops.
    pub async fn follow(mut self, model: Arc<ModelHandle>) -> Infallible {
        let mut ticks = tokio::time::interval(RESCAN);
        loop {
            ticks.tick().await;
            let pods = self.scan().await;
            model.update(|model| model.set_pod_namespaces(pods));
        }
    }
}

/// The veths pods are behind, the bridge's and those on no bridge (but the uplink), whose peer
/// is in another namespace: ifindex -> that namespace's id.
async fn pod_ports(
    netlink: &rtnetlink::Handle,
    bridge: &str,
    uplink: Option<u32>,
) -> Result<BTreeMap<u32, i32>, netdev::NetdevError> {
    let bridge = netdev::link_by_name(netlink, bridge)
        .await?
        .map(|bridge| bridge.index);
    Ok(netdev::links(netlink)
        .await?
        .into_iter()
        .filter(|link| {
            link.veth
                && Some(link.index) != uplink
                && (link.controller.is_none() || link.controller == bridge)
        })
        .filter_map(|link| Some((link.index, link.peer_netns.filter(|id| *id >= 0)?)))
        .collect())
}

/// The named namespaces whose id is wanted: port -> the namespace's path.
async fn find_namespaces(
    netlink: &rtnetlink::Handle,
    dir: &Path,
    wanted: &BTreeMap<i32, u32>,
) -> Vec<(u32, PathBuf)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(dir = %dir.display(), "listing network namespaces: {e}");
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only the namespaces this one has numbered have an id; the others are no pods of ours.
        let Ok(Some(id)) = netlink.link().get_netns_id(name.clone()).execute().await else {
            continue;
        };
        if let Some(port) = wanted.get(&id) {
            found.push((*port, entry.path()));
        }
    }
    found
}

/// The cookie of the namespace at `path` and its address in `pod_network`, read from a thread
/// that enters it (and ends with it).
async fn read_namespace(path: PathBuf, pod_network: Ipv4Net) -> io::Result<Option<PodNamespace>> {
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            let netns = fs::File::open(&path)?;
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let cookie = sys::netns_cookie()?;
            let addr = nix::ifaddrs::getifaddrs()
                .map_err(io::Error::from)?
                .filter_map(|interface| Some(interface.address?.as_sockaddr_in()?.ip()))
                .find(|addr| pod_network.contains(addr));
            Ok(addr.map(|addr| PodNamespace { cookie, addr }))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace reader panicked")))
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
}
