//! The Kubernetes API source: Services, `discovery.k8s.io/v1` EndpointSlices and this node's
//! Node, watched with reflector semantics (kube-runtime's watcher: an initial list, a watch
//! from its resourceVersion, a fresh list after `410 Gone`, back-off on errors).
//!
//! A (re-)list is buffered and applied to the model as one change when it completes, so the
//! reconciler never sees half a list: a restart or a `410 Gone` cannot make services vanish
//! for a moment. Watch events between lists are applied one by one; the reconciler coalesces
//! them. Services and slices are selected as kube-proxy selects them (no
//! `service.kubernetes.io/service-proxy-name`, no `service.kubernetes.io/headless` label), and
//! checked through [`crate::sources::objects`] like every other source's.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    fmt::Debug,
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt as _, future};
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    node::tasks::Tasks,
    serve::health::Health,
    sources::objects::{Kind, ObjectRef, Triage, object_ref, triage},
    sources::{ModelHandle, reset, with_causes},
};

/// kube-proxy's selector for the Services and EndpointSlices it serves.
const PROXIED: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The Node label kube-proxy reads the zone from, for topology hints.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to delete; kube-proxy's
/// `/healthz` then reports the node ineligible, so load balancers drain it.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration: pass --kubeconfig, or run in a pod with a service account"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot read the Node {name} (is --hostname-override the node's name?)")]
    NodeUnreadable {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Node {0} has no IPv4 spec.podCIDR yet (the controller manager allocates them with \
         --allocate-node-cidrs and --cluster-cidr)"
    )]
    NoPodCidr(String),
}

/// A client for `--kubeconfig`, or for the pod's service account when there is none.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::incluster().map_err(KubeError::InCluster)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// The object's name and what the model takes from it, or `None` for an object the dataplane
/// does not serve (ignored as kube-proxy ignores it, or invalid: logged).
fn accept<K: Kind>(object: &K) -> Option<(ObjectRef, K::Spec)> {
    match triage(object) {
        Triage::Serve(name, spec) => Some((name, spec)),
        Triage::Ignore(name, why) => {
            tracing::debug!(kind = K::KIND, object = %name, "ignored: {why}");
            None
        }
        Triage::Reject(Some(name), e) => {
            warn!(kind = K::KIND, object = %name, "invalid, not served: {e}");
            None
        }
        Triage::Reject(None, e) => {
            warn!(kind = K::KIND, "skipping an object: {e}");
            None
        }
    }
}

/// Follows one kind, keeping the model in step; `synced` turns true after each complete list.
/// The model holds what this source put in it (and says whether an update changed anything);
/// the source keeps only the names, to know what a new list no longer has.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    model: Arc<ModelHandle>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<Infallible>
where
    K: Kind + Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let mut applied: BTreeSet<ObjectRef> = BTreeSet::new();
    let mut listing: BTreeMap<ObjectRef, K::Spec> = BTreeMap::new();
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(object)) => {
                if let Some((name, spec)) = accept(&object) {
                    listing.insert(name, spec);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let next = std::mem::take(&mut listing);
                let objects = next.len();
                let names: BTreeSet<ObjectRef> = next.keys().cloned().collect();
                let changes = model.update(|m| reset::<K>(m, &applied, next));
                if changes {
                    info!(
                        kind = K::KIND,
                        objects, "listed; the model follows the list"
                    );
                }
                applied = names;
                synced.send_replace(true);
            }
            Ok(watcher::Event::Apply(object)) => match accept(&object) {
                Some((name, spec)) => {
                    model.update(|m| K::apply(m, name.clone(), spec));
                    applied.insert(name);
                }
                // Now ignored or invalid: it stops being served, as if deleted.
                None => forget::<K>(&object, &mut applied, &model),
            },
            Ok(watcher::Event::Delete(object)) => forget::<K>(&object, &mut applied, &model),
            Err(error) => warn!(
                kind = K::KIND,
                "watching the Kubernetes API failed ({error}); retrying with back-off, \
                 the dataplane keeps what it has"
            ),
        }
    }
    anyhow::bail!("the {} watch stream ended", K::KIND)
}

fn forget<K: Kind>(object: &K, applied: &mut BTreeSet<ObjectRef>, model: &ModelHandle) {
    if let Ok(name) = object_ref(object.meta())
        && applied.remove(&name)
    {
        model.update(|m| K::delete(m, &name));
    }
}

/// This node's Node and its pod subnet, as the controller manager allocated it
/// (`spec.podCIDR(s)`): what a node without an etcd lease serves its pods from. While the API
/// server does not answer, or the Node has no IPv4 pod CIDR yet (the controller manager
/// allocates it after the node registers), it waits and says why every 10 s, as flannel's
/// kube-subnet-mgr waits: a node that boots before its control plane comes up when the control
/// plane does, not in a crash loop.
pub async fn pod_subnet(client: Client, node_name: &str) -> (Node, Ipv4Net) {
    let nodes = Api::<Node>::all(client);
    let mut last_notice: Option<std::time::Instant> = None;
    loop {
        let waiting = match nodes.get(node_name).await {
            Ok(node) => match ipv4_pod_cidr(&node) {
                Some(subnet) => return (node, subnet),
                None => KubeError::NoPodCidr(node_name.to_owned()),
            },
            Err(source) => KubeError::NodeUnreadable {
                name: node_name.to_owned(),
                source,
            },
        };
        if last_notice.is_none_or(|at| at.elapsed() >= WAITING_NOTICE) {
            warn!("{}; waiting for it", with_causes(&waiting));
            last_notice = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The IPv4 one of a Node's pod CIDRs (a dual-stack node lists one per family).
pub(crate) fn ipv4_pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .find_map(|cidr| cidr.parse().ok())
}

/// Follows this node's Node object: its zone (topology hints) and whether it is about to go
/// (`/healthz` eligibility).
async fn follow_node(
    api: Api<Node>,
    name: String,
    model: Arc<ModelHandle>,
    health: Arc<Health>,
) -> anyhow::Result<Infallible> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut seen = false;
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitApply(node) | watcher::Event::Apply(node)) => {
                seen = true;
                let zone = node.labels().get(ZONE_LABEL).cloned();
                model.update(|m| m.update_node(|facts| facts.zone = zone));
                let leaving = node.metadata.deletion_timestamp.is_some()
                    || node
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.taints.as_ref())
                        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
                health.set_node_eligible(!leaving);
            }
            Ok(watcher::Event::InitDone) => {
                if !seen {
                    warn!(
                        node = name,
                        "no Node object of this name: topology hints are not used \
                         (set --hostname-override to the node's name)"
                    );
                }
            }
            Ok(watcher::Event::Delete(_)) => {
                model.update(|m| m.update_node(|facts| facts.zone = None));
                health.set_node_eligible(false);
            }
            Err(error) => warn!("watching this node's Node failed ({error}); retrying"),
        }
    }
    anyhow::bail!("the Node watch stream ended")
}

/// How often to say that the first list (or the Node) is still awaited.
pub(crate) const WAITING_NOTICE: Duration = Duration::from_secs(10);

/// Starts the watchers and waits until the first complete list of Services and EndpointSlices
/// is in the model (the agent's first pass must not see a partial cluster).
pub async fn start(
    client: Client,
    node_name: &str,
    model: &Arc<ModelHandle>,
    health: &Arc<Health>,
    tasks: &mut Tasks,
) {
    let (services_synced, mut services) = watch::channel(false);
    let (slices_synced, mut slices) = watch::channel(false);
    let proxied = || watcher::Config::default().labels(PROXIED);
    tasks.spawn(
        "Service watcher",
        follow(
            Api::<Service>::all(client.clone()),
            proxied(),
            Arc::clone(model),
            services_synced,
        ),
    );
    tasks.spawn(
        "EndpointSlice watcher",
        follow(
            Api::<EndpointSlice>::all(client.clone()),
            proxied(),
            Arc::clone(model),
            slices_synced,
        ),
    );
    tasks.spawn(
        "Node watcher",
        follow_node(
            Api::<Node>::all(client),
            node_name.to_owned(),
            Arc::clone(model),
            Arc::clone(health),
        ),
    );
    let both = future::join(services.wait_for(|s| *s), slices.wait_for(|s| *s));
    let mut both = std::pin::pin!(both);
    loop {
        match tokio::time::timeout(WAITING_NOTICE, &mut both).await {
            Ok(_) => return,
            Err(_) => info!("waiting for the first list of Services and EndpointSlices"),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSpec;

    use super::*;

    fn node(pod_cidr: Option<&str>, pod_cidrs: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidr: pod_cidr.map(str::to_owned),
                pod_cidrs: (!pod_cidrs.is_empty())
                    .then(|| pod_cidrs.iter().map(|c| (*c).to_owned()).collect()),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn the_ipv4_pod_cidr_is_picked_from_either_field_and_either_family_order() {
        let v4: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(ipv4_pod_cidr(&node(Some("10.244.3.0/24"), &[])), Some(v4));
        assert_eq!(
            ipv4_pod_cidr(&node(
                Some("fd00:10:244:3::/64"),
                &["fd00:10:244:3::/64", "10.244.3.0/24"]
            )),
            Some(v4)
        );
        assert_eq!(
            ipv4_pod_cidr(&node(Some("fd00::/64"), &["fd00::/64"])),
            None
        );
        assert_eq!(ipv4_pod_cidr(&node(None, &[])), None);
        assert_eq!(ipv4_pod_cidr(&Node::default()), None);
    }
}
