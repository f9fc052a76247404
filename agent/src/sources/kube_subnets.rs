//! flannel's kube subnet manager (`--kube-subnet-mgr`): the overlay's leases are Node objects.
//! This node's subnet is its Node's podCIDR; it publishes its lease in the Node's annotations
//! ([`crate::sources::flannel::annotations`]) through the status subresource, as flanneld
//! does, so flannel nodes and weft nodes see each other; every other Node that published one
//! is a peer. Once the lease is published the Node's `NetworkUnavailable` condition is set to
//! False (flannel's `--set-node-network-unavailable`), and annotations someone removes or
//! changes are written again.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::{
    model::NodeLease,
    node::tasks::Tasks,
    sources::flannel::{
        Lease, NetworkConfig, NotPeer, Skipped, annotations::Annotations, vtep_mac_for,
    },
    sources::kube::{WAITING_NOTICE, ipv4_pod_cidr, pod_subnet},
    sources::{ModelHandle, with_causes},
};

/// How long to wait before writing this node's annotations or condition again after a failure.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KubeSubnetError {
    #[error(
        "this node's podCIDR {subnet} is outside net-conf.json's Network {network}: the \
         controller manager's --cluster-cidr and the Network must agree"
    )]
    OutsideNetwork { subnet: Ipv4Net, network: Ipv4Net },
}

/// What this node holds: its subnet and the lease it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnNodeLease {
    pub subnet: Ipv4Net,
    pub lease: Lease,
}

/// Takes this node's lease: waits for its Node to have a podCIDR (which must lie in the
/// Network), and publishes the lease with `local_ip` as its PublicIP, or the address an
/// operator set in the `public-ip-overwrite` annotation.
pub async fn acquire(
    client: Client,
    node_name: &str,
    annotations: &Annotations,
    network: &NetworkConfig,
    local_ip: Ipv4Addr,
) -> Result<OwnNodeLease, KubeSubnetError> {
    let (node, subnet) = pod_subnet(client.clone(), node_name).await;
    if !network.network.contains(&subnet) {
        return Err(KubeSubnetError::OutsideNetwork {
            subnet,
            network: network.network,
        });
    }
    let public_ip = match annotations.public_ip_overwrite(node.annotations()) {
        None => local_ip,
        Some(Ok(ip)) => {
            info!(
                public_ip = %ip,
                "advertising the address in {}", annotations.public_ip_overwrite
            );
            ip
        }
        Some(Err(value)) => {
            warn!(
                "{} is {value:?}, not an IPv4 address: ignored, advertising {local_ip}",
                annotations.public_ip_overwrite
            );
            local_ip
        }
    };
    let own = OwnNodeLease {
        subnet,
        lease: Lease {
            public_ip,
            vni: network.vni,
            vtep_mac: vtep_mac_for(public_ip),
        },
    };
    let nodes = Api::<Node>::all(client);
    if annotations.differ(node.annotations(), &own.lease) {
        let mut last_notice: Option<Instant> = None;
        let mut pause = Duration::from_secs(1);
        while let Err(e) = publish(&nodes, node_name, annotations, &own.lease).await {
            if last_notice.is_none_or(|at| at.elapsed() >= WAITING_NOTICE) {
                warn!(
                    "publishing this node's lease failed: {}; retrying{}",
                    with_causes(&e),
                    forbidden_hint(&e)
                );
                last_notice = Some(Instant::now());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY);
        }
        info!(
            node = node_name,
            "published this node's lease in its annotations"
        );
    }
    Ok(own)
}

/// What to do about a write the API server refused for want of permission.
fn forbidden_hint(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.is_forbidden() => {
            " (weft's ClusterRole must grant patch on nodes/status, as deploy/base/rbac.yaml does)"
        }
        _ => "",
    }
}

/// Writes the lease's annotations through the Node's status subresource, as flanneld does
/// (which is what its RBAC, and weft's, allows: `patch` on `nodes/status`).
async fn publish(
    nodes: &Api<Node>,
    name: &str,
    annotations: &Annotations,
    lease: &Lease,
) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"annotations": annotations.of_lease(lease)}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(drop)
}

/// Sets the Node's `NetworkUnavailable` condition to False, as flannel and Cilium do once
/// their network is up (cloud route controllers set it True on nodes they have not routed).
async fn mark_network_available(nodes: &Api<Node>, name: &str) -> Result<(), kube::Error> {
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .expect("now is a valid timestamp")
        .to_string();
    let patch = json!({"status": {"conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "WeftIsUp",
        "message": "weft is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(drop)
}

/// The other Nodes' leases, followed into the model, and this node's own kept published.
struct NodeLeases {
    nodes: Api<Node>,
    own_name: String,
    own: OwnNodeLease,
    annotations: Annotations,
    network: Ipv4Net,
    vni: u32,
    set_network_unavailable: bool,
    model: Arc<ModelHandle>,
    /// The peers' subnets by Node name, as in the model.
    members: BTreeMap<String, Ipv4Net>,
    skipped: Skipped<String>,
}

/// What the Node watcher is given.
pub struct Settings {
    pub own_name: String,
    pub own: OwnNodeLease,
    pub annotations: Annotations,
    pub network: NetworkConfig,
    pub set_network_unavailable: bool,
}

/// Starts following the Nodes and waits until the first complete list is in the model (the
/// agent's first pass must not see a partial overlay).
pub async fn start(
    client: Client,
    settings: Settings,
    model: &Arc<ModelHandle>,
    tasks: &mut Tasks,
) {
    let (synced, mut listed) = watch::channel(false);
    let leases = NodeLeases {
        nodes: Api::all(client),
        own_name: settings.own_name,
        own: settings.own,
        annotations: settings.annotations,
        network: settings.network.network,
        vni: settings.network.vni,
        set_network_unavailable: settings.set_network_unavailable,
        model: Arc::clone(model),
        members: BTreeMap::new(),
        skipped: Skipped::default(),
    };
    tasks.spawn("Node lease watcher", leases.follow(synced));
    let mut first = std::pin::pin!(listed.wait_for(|listed| *listed));
    while tokio::time::timeout(WAITING_NOTICE, &mut first)
        .await
        .is_err()
    {
        info!("waiting for the first list of Nodes (the other nodes' leases)");
    }
}

/// What this node still has to write to its Node.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    annotations: bool,
    condition: bool,
}

impl NodeLeases {
    async fn follow(mut self, synced: watch::Sender<bool>) -> anyhow::Result<Infallible> {
        let mut owed = Owed {
            annotations: false,
            condition: self.set_network_unavailable,
        };
        // Writes go out no sooner than RETRY after the last: a failed write is retried then,
        // and someone who keeps removing the annotations does not get a write per change.
        let mut next_write = Instant::now();
        let mut listing: BTreeMap<String, (Ipv4Net, NodeLease)> = BTreeMap::new();
        let mut listed_names: BTreeSet<String> = BTreeSet::new();
        let mut stream = std::pin::pin!(
            watcher(self.nodes.clone(), watcher::Config::default()).default_backoff()
        );
        loop {
            let due = (owed.annotations || owed.condition) && *synced.borrow();
            let event = tokio::select! {
                event = stream.next() => event,
                () = tokio::time::sleep_until(next_write), if due => {
                    owed = self.pay(owed).await;
                    next_write = Instant::now() + RETRY;
                    continue;
                }
            };
            let Some(event) = event else {
                anyhow::bail!("the Node watch stream ended");
            };
            match event {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    listed_names.clear();
                }
                Ok(watcher::Event::InitApply(node)) => {
                    let name = node.name_any();
                    if name == self.own_name {
                        owed.annotations |= self.own_node_changed(&node)?;
                    } else if let Some(member) = self.member(&node) {
                        listing.insert(name.clone(), member);
                    }
                    listed_names.insert(name);
                }
                Ok(watcher::Event::InitDone) => {
                    let listed = std::mem::take(&mut listing);
                    self.skipped
                        .retain_listed(|name| listed_names.contains(name));
                    self.members = listed
                        .iter()
                        .map(|(name, (subnet, _))| (name.clone(), *subnet))
                        .collect();
                    let leases: BTreeMap<Ipv4Net, NodeLease> = listed.into_values().collect();
                    let count = leases.len();
                    if self.model.update(|m| m.replace_leases(leases)) {
                        info!(
                            leases = count,
                            "read the other nodes' leases from their Nodes"
                        );
                    }
                    synced.send_replace(true);
                }
                Ok(watcher::Event::Apply(node)) => {
                    if node.name_any() == self.own_name {
                        if self.own_node_changed(&node)? {
                            warn!(
                                "this node's lease annotations were changed or removed; \
                                 writing them again"
                            );
                            owed.annotations = true;
                        }
                    } else {
                        let member = self.member(&node);
                        self.set_member(node.name_any(), member);
                    }
                }
                Ok(watcher::Event::Delete(node)) => {
                    self.skipped.clear(&node.name_any());
                    self.set_member(node.name_any(), None);
                }
                Err(error) => warn!(
                    "watching the Nodes failed ({error}); retrying with back-off, the last \
                     known leases stay in use"
                ),
            }
        }
    }

    /// Whether this node's Node lacks the annotations of its lease. A Node whose podCIDR is
    /// no longer this node's subnet (deleted and made again, given another) ends the task:
    /// the agent restarts and takes the new subnet, as flanneld does.
    fn own_node_changed(&self, node: &Node) -> anyhow::Result<bool> {
        if let Some(pod_cidr) = ipv4_pod_cidr(node)
            && pod_cidr != self.own.subnet
        {
            anyhow::bail!(
                "this node's podCIDR is now {pod_cidr}, not the {} its pods are in (was its \
                 Node deleted and made again?): restarting to take the new subnet",
                self.own.subnet
            );
        }
        Ok(self.annotations.differ(node.annotations(), &self.own.lease))
    }

    /// Writes what is owed; returns what still is.
    async fn pay(&self, mut owed: Owed) -> Owed {
        if owed.annotations {
            match publish(
                &self.nodes,
                &self.own_name,
                &self.annotations,
                &self.own.lease,
            )
            .await
            {
                Ok(()) => owed.annotations = false,
                Err(e) => warn!(
                    "writing this node's lease annotations failed ({}{}); retrying in {RETRY:?}",
                    with_causes(&e),
                    forbidden_hint(&e)
                ),
            }
        }
        if owed.condition {
            match mark_network_available(&self.nodes, &self.own_name).await {
                Ok(()) => owed.condition = false,
                Err(e) => warn!(
                    "setting this node's NetworkUnavailable condition to False failed ({}{}); \
                     retrying in {RETRY:?}",
                    with_causes(&e),
                    forbidden_hint(&e)
                ),
            }
        }
        owed
    }

    /// The lease a Node publishes, if it is a peer; why not is said once.
    fn member(&mut self, node: &Node) -> Option<(Ipv4Net, NodeLease)> {
        let name = node.name_any();
        let peer = self
            .annotations
            .node_lease(node.annotations(), ipv4_pod_cidr(node), self.network)
            .map_err(NotPeer::from)
            .and_then(|(subnet, lease)| {
                if lease.public_ip == self.own.lease.public_ip {
                    return Err(NotPeer::ThisNode);
                }
                if subnet == self.own.subnet {
                    return Err(NotPeer::OwnSubnet(subnet));
                }
                Ok((subnet, lease.peer_on(self.vni)?))
            });
        match peer {
            Ok(member) => {
                self.skipped.clear(&name);
                Some(member)
            }
            Err(why) => {
                self.skipped.skip(&name, why);
                None
            }
        }
    }

    /// Brings the model in step with one Node: a peer with `member`'s lease, or none.
    fn set_member(&mut self, name: String, member: Option<(Ipv4Net, NodeLease)>) {
        let before = match &member {
            Some((subnet, _)) => self.members.insert(name.clone(), *subnet),
            None => self.members.remove(&name),
        };
        if let Some(old) = before.filter(|old| member.is_none_or(|(subnet, _)| subnet != *old))
            && self.model.update(|m| m.remove_lease(&old))
        {
            info!(node = name, subnet = %old, "lease gone; route withdrawn");
        }
        if let Some((subnet, lease)) = member
            && self.model.update(|m| m.set_lease(subnet, lease))
        {
            info!(node = name, %subnet, public_ip = %lease.public_ip, "lease up");
        }
    }
}
