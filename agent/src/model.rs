//! The pure in-memory model: the services, endpoint slices, leases and node facts every source
//! has reported, and the dataplane state they call for. No I/O; sources write it, the
//! reconciler reads it.
//!
//! Endpoint selection follows kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`):
//! ready endpoints, else serving-and-terminating ones; topology hints for this node or its zone
//! when every ready endpoint carries them; node-local endpoints for `Local` traffic policies.
//! Each service's part is computed once per change to it, so a change to one service among
//! thousands costs one service's work.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use weft_common::{
    ip_proto,
    maps::{EndpointValue, RemoteNode, ServiceKey, Vtep},
};

use crate::sources::objects::{ObjectRef, ServiceSpec, SliceEndpoint, SliceSpec, protocol_name};

/// A service port, the unit that owns its endpoint sets (kube-proxy's `ServicePortName`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ObjectRef,
    /// Port name; empty for an unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// Which endpoints of a service port an endpoint set holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every usable endpoint of the service port (after topology hints).
    #[default]
    Cluster,
    /// Only this node's endpoints (`internalTrafficPolicy` or `externalTrafficPolicy: Local`).
    NodeLocal,
}

/// How a frontend treats new connections (the reconciler writes it as `service_flags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendPolicy {
    /// Every new connection is masqueraded: external frontends with
    /// `externalTrafficPolicy: Cluster` (kube-proxy's `KUBE-EXT-*` chains mark them all).
    pub masquerade_all: bool,
    /// `externalTrafficPolicy: Local`: clients from outside reach this node's endpoints with
    /// their address kept; pods and the node use the cluster-wide set.
    pub local_external: bool,
    /// Only clients inside the frontend's `loadBalancerSourceRanges` may connect.
    pub source_ranges: bool,
    /// No usable endpoint anywhere: new connections are rejected, not dropped.
    pub reject: bool,
}

/// How one frontend uses its service port's endpoint sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    /// The set new connections use; with [`FrontendPolicy::local_external`], clients inside
    /// the cluster use the cluster set instead.
    pub scope: Scope,
    pub policy: FrontendPolicy,
    /// ClientIP affinity timeout in seconds; 0 for none.
    pub affinity_timeout_s: u32,
}

impl FrontendSpec {
    /// The scopes of the sets this frontend may lead to.
    pub fn scopes(&self) -> impl Iterator<Item = Scope> {
        let fallback = self.policy.local_external.then_some(Scope::Cluster);
        std::iter::once(self.scope).chain(fallback)
    }
}

/// What the dataplane must do for one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPort {
    /// The endpoint sets its frontends use.
    pub sets: BTreeMap<Scope, BTreeSet<EndpointValue>>,
    /// Addresses, ports and protocols clients reach it on.
    pub frontends: BTreeMap<ServiceKey, FrontendSpec>,
    /// `loadBalancerSourceRanges` of the frontends with [`FrontendPolicy::source_ranges`].
    pub source_ranges: BTreeMap<ServiceKey, BTreeSet<Ipv4Net>>,
}

/// A health-check NodePort (`healthCheckNodePort`) and what it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectRef,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// Another node's lease, as the overlay needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// The next hop towards an overlay member's PublicIP, from the node's routes and neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The device it is reached through.
    pub ifindex: u32,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// What the model knows of the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's name, which `nodeName` and node hints of endpoints are compared with.
    pub name: Option<String>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The addresses NodePorts are served on.
    pub node_port_addresses: BTreeSet<Ipv4Addr>,
}

/// The whole desired dataplane state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the model's own copy when the port owns every frontend it wants (nearly
    /// always), so a large cluster's ports are held once.
    pub ports: BTreeMap<ServicePortName, Arc<DesiredPort>>,
    /// Remote pod subnets and the node to encapsulate to.
    pub subnets: BTreeMap<Ipv4Net, RemoteNode>,
    /// Nodes whose VXLAN this node accepts, by PublicIP.
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    /// Health-check NodePorts to serve, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// This node's pods by network namespace cookie, for the socket hooks (`--socket-lb=all`).
    pub pod_namespaces: BTreeMap<u64, Ipv4Addr>,
    /// Problems the model resolved on its own (e.g. two services claiming one frontend), for logs.
    pub notes: Vec<String>,
}

impl Desired {
    /// Service ports with a `Local` traffic policy and no endpoint on this node (kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`): those by `internalTrafficPolicy` (their
    /// cluster IP leads only to this node's endpoints), and those by `externalTrafficPolicy`.
    #[must_use]
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let (mut internal, mut external) = (0, 0);
        for port in self.ports.values() {
            let empty = port
                .sets
                .get(&Scope::NodeLocal)
                .is_none_or(BTreeSet::is_empty);
            if !empty {
                continue;
            }
            let frontends = || port.frontends.values();
            if frontends().any(|f| f.scope == Scope::NodeLocal && !f.policy.local_external) {
                internal += 1;
            }
            if frontends().any(|f| f.policy.local_external) {
                external += 1;
            }
        }
        (internal, external)
    }
}

/// The endpoints each UDP frontend may lead to.
pub type UdpEndpoints = BTreeMap<ServiceKey, BTreeSet<EndpointValue>>;

impl Desired {
    /// Each UDP frontend with the endpoints it may lead to (for purging flows whose endpoint
    /// left).
    #[must_use]
    pub fn udp_endpoints(&self) -> UdpEndpoints {
        let mut udp = UdpEndpoints::new();
        for port in self.ports.values() {
            for (key, frontend) in &port.frontends {
                if key.proto != ip_proto::UDP {
                    continue;
                }
                let endpoints = udp.entry(*key).or_default();
                for scope in frontend.scopes() {
                    endpoints.extend(port.sets.get(&scope).into_iter().flatten());
                }
            }
        }
        udp
    }
}

/// One service's part of the desired state, before frontends are shared out across services.
#[derive(Clone, Debug, Default)]
struct ServiceOutput {
    ports: Vec<(ServicePortName, Arc<DesiredPort>)>,
    health_check: Option<(u16, HealthCheck)>,
}

/// Which service ports' desired state changed since the reconciler last looked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Changed {
    /// Look at everything (the first look).
    #[default]
    Everything,
    Ports(BTreeSet<ServicePortName>),
}

impl Changed {
    fn extend(&mut self, ports: impl IntoIterator<Item = ServicePortName>) {
        if let Self::Ports(changed) = self {
            changed.extend(ports);
        }
    }
}

/// Services, slices, other nodes' leases and this node's facts, as the sources last reported
/// them, and the desired state they call for, kept up to date service by service: a change to
/// one service among thousands costs one service's work, and the reconciler is told which
/// service ports to look at.
#[derive(Clone, Debug, Default)]
pub struct Model {
    services: BTreeMap<ObjectRef, ServiceSpec>,
    slices: BTreeMap<ObjectRef, SliceSpec>,
    /// The slices of each service, by name.
    slices_of: BTreeMap<ObjectRef, SmallSet<ObjectRef>>,
    leases: BTreeMap<Ipv4Net, NodeLease>,
    /// The next hop towards each member's PublicIP, where the node knows it.
    next_hops: BTreeMap<Ipv4Addr, NextHop>,
    node: NodeFacts,
    /// Each service's own part; services whose objects changed since are in `stale`.
    computed: BTreeMap<ObjectRef, ServiceOutput>,
    stale: BTreeSet<ObjectRef>,
    /// The service ports that want each frontend; the first owns it, the rest are noted.
    frontend_claims: BTreeMap<ServiceKey, SmallSet<ServicePortName>>,
    /// The frontends more than one service port wants.
    contested: BTreeSet<ServiceKey>,
    /// The services that want each health-check NodePort; the first gets it.
    check_claims: BTreeMap<u16, SmallSet<ObjectRef>>,
    leases_changed: bool,
    desired: Arc<Desired>,
    changed: Changed,
    counts: ChangeCounts,
    /// The trigger times of the slice changes not yet taken.
    trigger_times: Vec<jiff::Timestamp>,
}

/// What the reconciler takes from the model for a pass.
#[derive(Debug)]
pub struct Changes {
    pub desired: Arc<Desired>,
    /// Which service ports changed since the last take.
    pub changed: Changed,
    /// When the EndpointSlice changes in this pass happened (their
    /// `last-change-trigger-time`): kube-proxy's network programming latency runs from each to
    /// the end of the pass that programs it.
    pub trigger_times: Vec<jiff::Timestamp>,
}

/// How many Service and EndpointSlice changes the model took: in all, and since the reconciler
/// last took its changes (kube-proxy's `sync_proxy_rules_{service,endpoint}_changes_total` and
/// `_pending`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub services: u64,
    pub endpoints: u64,
    pub services_pending: u64,
    pub endpoints_pending: u64,
}

impl ChangeCounts {
    fn service(&mut self) {
        self.services += 1;
        self.services_pending += 1;
    }

    fn endpoints(&mut self) {
        self.endpoints += 1;
        self.endpoints_pending += 1;
    }
}

impl Model {
    /// Records a service; returns whether anything changed.
    pub fn set_service(&mut self, name: ObjectRef, spec: ServiceSpec) -> bool {
        let changed = self.services.get(&name) != Some(&spec);
        if changed {
            self.counts.service();
            self.stale.insert(name.clone());
            self.services.insert(name, spec);
        }
        changed
    }

    /// Forgets a service; returns whether it was known.
    pub fn remove_service(&mut self, name: &ObjectRef) -> bool {
        let known = self.services.remove(name).is_some();
        if known {
            self.counts.service();
            self.stale.insert(name.clone());
        }
        known
    }

    /// The Service and EndpointSlice changes taken so far.
    #[must_use]
    pub fn change_counts(&self) -> ChangeCounts {
        self.counts
    }

    /// Records an EndpointSlice (by its own name); returns whether anything changed.
    pub fn set_slice(&mut self, name: ObjectRef, spec: SliceSpec) -> bool {
        let changed = self.slices.get(&name) != Some(&spec);
        if changed {
            self.counts.endpoints();
            self.trigger_times.extend(spec.trigger_time);
            self.stale.insert(spec.service.clone());
            self.slices_of
                .entry(spec.service.clone())
                .or_default()
                .insert(name.clone());
            if let Some(old) = self.slices.insert(name.clone(), spec)
                && !self.slices[&name].service.eq(&old.service)
            {
                self.forget_slice_of(&old.service, &name);
            }
        }
        changed
    }

    /// Forgets an EndpointSlice; returns whether it was known.
    pub fn remove_slice(&mut self, name: &ObjectRef) -> bool {
        match self.slices.remove(name) {
            Some(old) => {
                self.counts.endpoints();
                self.forget_slice_of(&old.service, name);
                true
            }
            None => false,
        }
    }

    fn forget_slice_of(&mut self, service: &ObjectRef, slice: &ObjectRef) {
        self.stale.insert(service.clone());
        if let Some(slices) = self.slices_of.get_mut(service) {
            slices.remove(slice);
            if slices.is_empty() {
                self.slices_of.remove(service);
            }
        }
    }

    /// Records another node's lease; returns whether anything changed.
    pub fn set_lease(&mut self, subnet: Ipv4Net, lease: NodeLease) -> bool {
        let changed = self.leases.insert(subnet, lease) != Some(lease);
        self.leases_changed |= changed;
        changed
    }

    /// Forgets a lease; returns whether it was known.
    pub fn remove_lease(&mut self, subnet: &Ipv4Net) -> bool {
        let known = self.leases.remove(subnet).is_some();
        self.leases_changed |= known;
        known
    }

    /// Replaces every lease (after a full re-list); returns whether anything changed.
    pub fn replace_leases(&mut self, leases: BTreeMap<Ipv4Net, NodeLease>) -> bool {
        let changed = self.leases != leases;
        self.leases = leases;
        self.leases_changed |= changed;
        changed
    }

    /// Replaces the next hops towards the members' PublicIPs (as the node's routes and
    /// neighbours give them); returns whether anything changed.
    pub fn set_next_hops(&mut self, next_hops: BTreeMap<Ipv4Addr, NextHop>) -> bool {
        let changed = self.next_hops != next_hops;
        self.next_hops = next_hops;
        self.leases_changed |= changed;
        changed
    }

    /// The PublicIPs of the overlay's members, for the next hops to follow.
    #[must_use]
    pub fn members(&self) -> BTreeSet<Ipv4Addr> {
        self.leases.values().map(|lease| lease.public_ip).collect()
    }

    /// Updates what is known of this node; returns whether anything changed.
    pub fn update_node(&mut self, update: impl FnOnce(&mut NodeFacts)) -> bool {
        let before = self.node.clone();
        update(&mut self.node);
        let changed = self.node != before;
        if changed {
            // Locality, topology and NodePort addresses touch every service.
            self.stale.extend(self.services.keys().cloned());
        }
        changed
    }

    /// Replaces this node's pods by network namespace cookie.
    pub fn set_pod_namespaces(&mut self, pods: BTreeMap<u64, Ipv4Addr>) -> bool {
        if self.desired.pod_namespaces == pods {
            return false;
        }
        Arc::make_mut(&mut self.desired).pod_namespaces = pods;
        true
    }

    /// What is known of this node.
    #[must_use]
    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// The dataplane state the current objects call for.
    pub fn desired(&mut self) -> Arc<Desired> {
        self.refresh();
        Arc::clone(&self.desired)
    }

    /// The desired state, and which service ports changed since the last call (everything, on
    /// the first).
    pub fn take_changes(&mut self) -> Changes {
        self.counts.services_pending = 0;
        self.counts.endpoints_pending = 0;
        let desired = self.desired();
        let changed = std::mem::replace(&mut self.changed, Changed::Ports(BTreeSet::new()));
        Changes {
            desired,
            changed,
            trigger_times: std::mem::take(&mut self.trigger_times),
        }
    }

    /// Recomputes the services whose objects changed and brings the desired state up to date.
    fn refresh(&mut self) {
        if self.stale.is_empty() && !self.leases_changed {
            return;
        }
        let mut ports_changed: BTreeSet<ServicePortName> = BTreeSet::new();
        let mut frontends_touched: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut checks_touched: BTreeSet<u16> = BTreeSet::new();
        for name in std::mem::take(&mut self.stale) {
            if let Some(old) = self.computed.remove(&name) {
                for (port_name, port) in &old.ports {
                    ports_changed.insert(port_name.clone());
                    for key in port.frontends.keys() {
                        if let Some(claims) = self.frontend_claims.get_mut(key) {
                            claims.remove(port_name);
                        }
                        frontends_touched.insert(*key);
                    }
                }
                if let Some((port, _)) = old.health_check {
                    if let Some(claims) = self.check_claims.get_mut(&port) {
                        claims.remove(&name);
                    }
                    checks_touched.insert(port);
                }
            }
            let Some(spec) = self.services.get(&name) else {
                continue;
            };
            let slices: Vec<&SliceSpec> = self
                .slices_of
                .get(&name)
                .into_iter()
                .flatten()
                .map(|slice| &self.slices[slice])
                .collect();
            let output = compute(&name, spec, &slices, &self.node);
            for (port_name, port) in &output.ports {
                ports_changed.insert(port_name.clone());
                for key in port.frontends.keys() {
                    self.frontend_claims
                        .entry(*key)
                        .or_default()
                        .insert(port_name.clone());
                    frontends_touched.insert(*key);
                }
            }
            if let Some((port, _)) = &output.health_check {
                self.check_claims
                    .entry(*port)
                    .or_default()
                    .insert(name.clone());
                checks_touched.insert(*port);
            }
            self.computed.insert(name, output);
        }
        // A frontend whose wanters changed may have a new owner: every wanter is looked at.
        for key in &frontends_touched {
            let wanters = self.frontend_claims.get(key).map_or(0, SmallSet::len);
            if wanters > 1 {
                self.contested.insert(*key);
            } else {
                self.contested.remove(key);
            }
            match self.frontend_claims.get(key) {
                Some(claims) if claims.is_empty() => {
                    self.frontend_claims.remove(key);
                }
                Some(claims) => ports_changed.extend(claims.iter().cloned()),
                None => {}
            }
        }
        let desired = Arc::make_mut(&mut self.desired);
        for port_name in &ports_changed {
            let port = self.computed.get(&port_name.service).and_then(|output| {
                output
                    .ports
                    .iter()
                    .find(|(name, _)| name == port_name)
                    .map(|(_, port)| port)
            });
            match port {
                Some(port) => {
                    let owns = |key: &ServiceKey| {
                        self.frontend_claims.get(key).and_then(SmallSet::first) == Some(port_name)
                    };
                    let kept = if port.frontends.keys().all(owns) {
                        Arc::clone(port)
                    } else {
                        let mut kept = DesiredPort::clone(port);
                        kept.frontends.retain(|key, _| owns(key));
                        kept.source_ranges.retain(|key, _| owns(key));
                        Arc::new(kept)
                    };
                    desired.ports.insert(port_name.clone(), kept);
                }
                None => {
                    desired.ports.remove(port_name);
                }
            }
        }
        for port in checks_touched {
            let owner = self.check_claims.get(&port).and_then(SmallSet::first);
            let check = owner
                .and_then(|owner| self.computed.get(owner))
                .and_then(|output| output.health_check.clone());
            match check {
                Some((_, check)) => {
                    desired.health_checks.insert(port, check);
                }
                None => {
                    self.check_claims.remove(&port);
                    desired.health_checks.remove(&port);
                }
            }
        }
        desired.notes = conflicts(&self.frontend_claims, &self.contested, &self.check_claims);
        if std::mem::take(&mut self.leases_changed) {
            (desired.subnets, desired.vteps) = overlay_of(&self.leases, &self.next_hops);
        }
        self.changed.extend(ports_changed);
    }
}

/// A set kept as a sorted `Vec`: nearly every one here holds a single element (a service's one
/// slice, a frontend's one claimant), where a `BTreeSet` allocates room for eleven (massif:
/// 13 MB of such leaves at 10,000 services).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    fn insert(&mut self, item: T) {
        if let Err(at) = self.0.binary_search(&item) {
            self.0.insert(at, item);
        }
    }

    fn remove(&mut self, item: &T) {
        if let Ok(at) = self.0.binary_search(item) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Notes on frontends and health-check NodePorts that several services want: who got them.
fn conflicts(
    frontend_claims: &BTreeMap<ServiceKey, SmallSet<ServicePortName>>,
    contested: &BTreeSet<ServiceKey>,
    check_claims: &BTreeMap<u16, SmallSet<ObjectRef>>,
) -> Vec<String> {
    let mut notes = Vec::new();
    for key in contested {
        let mut claims = frontend_claims[key].iter();
        let owner = claims.next().expect("more than one");
        for name in claims {
            notes.push(format!(
                "{name}: {}:{}/{} is already served by {owner}; ignoring it here",
                Ipv4Addr::from(key.addr),
                key.port,
                protocol_name(key.proto)
            ));
        }
    }
    for (port, claims) in check_claims.iter().filter(|(_, c)| c.len() > 1) {
        let mut claims = claims.iter();
        let owner = claims.next().expect("more than one");
        for name in claims {
            notes.push(format!(
                "{name}: healthCheckNodePort {port} is already served for {owner}; ignoring it here"
            ));
        }
    }
    notes
}

/// The remote subnets (with the next hop towards their node, where known) and overlay members
/// the leases call for.
fn overlay_of(
    leases: &BTreeMap<Ipv4Net, NodeLease>,
    next_hops: &BTreeMap<Ipv4Addr, NextHop>,
) -> (BTreeMap<Ipv4Net, RemoteNode>, BTreeMap<Ipv4Addr, Vtep>) {
    let mut subnets = BTreeMap::new();
    let mut vteps = BTreeMap::new();
    for (subnet, lease) in leases {
        let next_hop = next_hops.get(&lease.public_ip);
        subnets.insert(
            *subnet,
            RemoteNode {
                public_ip: lease.public_ip.octets(),
                vtep_mac: lease.vtep_mac,
                next_hop_mac: next_hop.map_or([0; 6], |hop| hop.mac),
                next_hop_ifindex: next_hop.map_or(0, |hop| hop.ifindex),
            },
        );
        // A node has one lease; should two name one PublicIP (an address that moved), either
        // subnet identifies the member.
        vteps.insert(
            lease.public_ip,
            Vtep {
                subnet_addr: subnet.network().octets(),
                subnet_prefix_len: subnet.prefix_len(),
                _pad: [0; 3],
            },
        );
    }
    (subnets, vteps)
}

/// One endpoint of a service port, merged over the slices that list it.
#[derive(Clone, Debug)]
struct Candidate {
    value: EndpointValue,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

/// One service's service ports and health check.
fn compute(
    service: &ObjectRef,
    spec: &ServiceSpec,
    slices: &[&SliceSpec],
    node: &NodeFacts,
) -> ServiceOutput {
    let mut output = ServiceOutput::default();
    let affinity_timeout_s = spec.affinity_timeout_s.unwrap_or(0);
    let externally_accessible = spec.externally_accessible();
    for port in &spec.ports {
        let name = ServicePortName {
            service: service.clone(),
            port: port.name.clone(),
        };
        let candidates = candidates(slices, &port.name, port.protocol, node);
        let has_any = candidates
            .iter()
            .any(|c| c.ready || (c.serving && c.terminating));
        let reject = !has_any;
        let mut desired = DesiredPort::default();
        let cluster_ip_scope = if spec.internal_local {
            Scope::NodeLocal
        } else {
            Scope::Cluster
        };
        let frontend = |addr: Ipv4Addr, number: u16| ServiceKey {
            addr: addr.octets(),
            port: number,
            proto: port.protocol,
            _pad: 0,
        };
        desired.frontends.insert(
            frontend(spec.cluster_ip, port.port),
            FrontendSpec {
                scope: cluster_ip_scope,
                policy: FrontendPolicy {
                    reject,
                    ..FrontendPolicy::default()
                },
                affinity_timeout_s,
            },
        );
        if externally_accessible {
            let external = FrontendSpec {
                scope: if spec.external_local {
                    Scope::NodeLocal
                } else {
                    Scope::Cluster
                },
                policy: FrontendPolicy {
                    masquerade_all: !spec.external_local,
                    local_external: spec.external_local,
                    source_ranges: false,
                    reject,
                },
                affinity_timeout_s,
            };
            let node_ports = port.node_port.into_iter().flat_map(|node_port| {
                node.node_port_addresses
                    .iter()
                    .map(move |addr| frontend(*addr, node_port))
            });
            let external_ips = spec.external_ips.iter().map(|ip| frontend(*ip, port.port));
            for key in node_ports.chain(external_ips) {
                desired.frontends.entry(key).or_insert(external);
            }
            for ip in &spec.load_balancer_ips {
                let key = frontend(*ip, port.port);
                if desired.frontends.contains_key(&key) {
                    continue;
                }
                let mut load_balancer = external;
                if !spec.source_ranges.is_empty() {
                    load_balancer.policy.source_ranges = true;
                    desired
                        .source_ranges
                        .insert(key, spec.source_ranges.iter().copied().collect());
                }
                desired.frontends.insert(key, load_balancer);
            }
        }
        let scopes: BTreeSet<Scope> = desired
            .frontends
            .values()
            .flat_map(|f| f.scopes())
            .collect();
        for scope in scopes {
            let endpoints = if scope == Scope::NodeLocal {
                local_endpoints(&candidates)
            } else {
                cluster_endpoints(&candidates, node)
            };
            desired.sets.insert(scope, endpoints);
        }
        output.ports.push((name, Arc::new(desired)));
    }
    if let Some(port) = spec.health_check_node_port {
        let local_ready: BTreeSet<Ipv4Addr> = slices
            .iter()
            .flat_map(|slice| &slice.endpoints)
            .filter(|e| e.ready && is_local(e, node))
            .map(|e| e.addr)
            .collect();
        output.health_check = Some((
            port,
            HealthCheck {
                service: service.clone(),
                local_endpoints: local_ready.len(),
            },
        ));
    }
    output
}

fn is_local(endpoint: &SliceEndpoint, node: &NodeFacts) -> bool {
    node.name.is_some() && endpoint.node_name == node.name
}

/// The endpoints of one service port over all its slices. The same endpoint in two slices (a
/// slice being replaced) counts once, with the best conditions either slice gives it.
fn candidates(
    slices: &[&SliceSpec],
    port_name: &str,
    protocol: u8,
    node: &NodeFacts,
) -> Vec<Candidate> {
    let mut merged: BTreeMap<EndpointValue, Candidate> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let value = EndpointValue {
                addr: endpoint.addr.octets(),
                port: port.port,
                _pad: 0,
            };
            let candidate = merged.entry(value).or_insert_with(|| Candidate {
                value,
                ready: false,
                serving: false,
                terminating: true,
                local: false,
                zone_hints: BTreeSet::new(),
                node_hints: BTreeSet::new(),
            });
            candidate.ready |= endpoint.ready;
            candidate.serving |= endpoint.serving;
            candidate.terminating &= endpoint.terminating;
            candidate.local |= is_local(endpoint, node);
            candidate
                .zone_hints
                .extend(endpoint.zone_hints.iter().cloned());
            candidate
                .node_hints
                .extend(endpoint.node_hints.iter().cloned());
        }
    }
    merged.into_values().collect()
}

/// Which topology hints apply to a service port's cluster-wide endpoints.
enum Topology<'a> {
    None,
    /// Endpoints hinted for this node (`trafficDistribution: PreferSameNode`).
    Node(&'a str),
    /// Endpoints hinted for this node's zone.
    Zone(&'a str),
}

impl<'a> Topology<'a> {
    /// kube-proxy's `topologyModeFromHints`: this node's hints when every ready endpoint has
    /// node hints and one names this node, else this zone's likewise, else none.
    fn of(candidates: &[Candidate], node: &'a NodeFacts) -> Self {
        let ready = || candidates.iter().filter(|c| c.ready);
        if let Some(name) = &node.name
            && ready().all(|c| !c.node_hints.is_empty())
            && ready().any(|c| c.node_hints.contains(name))
        {
            return Self::Node(name);
        }
        if let Some(zone) = &node.zone
            && ready().all(|c| !c.zone_hints.is_empty())
            && ready().any(|c| c.zone_hints.contains(zone))
        {
            return Self::Zone(zone);
        }
        Self::None
    }

    fn admits(&self, candidate: &Candidate) -> bool {
        match self {
            Self::None => true,
            Self::Node(name) => candidate.node_hints.contains(*name),
            Self::Zone(zone) => candidate.zone_hints.contains(*zone),
        }
    }
}

fn values<'a>(candidates: impl Iterator<Item = &'a Candidate>) -> BTreeSet<EndpointValue> {
    candidates.map(|c| c.value).collect()
}

/// The cluster-wide endpoints: ready ones (narrowed by topology hints); if none is ready, the
/// ones still serving while terminating (without topology: a last resort, so connections keep
/// landing somewhere during a rolling update).
fn cluster_endpoints(candidates: &[Candidate], node: &NodeFacts) -> BTreeSet<EndpointValue> {
    let topology = Topology::of(candidates, node);
    let ready = values(candidates.iter().filter(|c| c.ready && topology.admits(c)));
    if !ready.is_empty() {
        return ready;
    }
    values(candidates.iter().filter(|c| c.serving && c.terminating))
}

/// This node's endpoints: the ready ones, else the serving-and-terminating ones.
fn local_endpoints(candidates: &[Candidate]) -> BTreeSet<EndpointValue> {
    let ready = values(candidates.iter().filter(|c| c.local && c.ready));
    if !ready.is_empty() {
        return ready;
    }
    values(
        candidates
            .iter()
            .filter(|c| c.local && c.serving && c.terminating),
    )
}

#[cfg(test)]
pub(crate) mod tests;
