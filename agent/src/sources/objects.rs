//! Kubernetes `Service` and `EndpointSlice` objects, checked and reduced to what the dataplane
//! needs. Every source (manifest files, the API server) converts through here, so they all
//! accept, ignore and reject the same objects.
//!
//! What is ignored follows kube-proxy: headless services, `ExternalName` services, services
//! labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`, and
//! EndpointSlices that are not IPv4 or belong to no service. Fields are read as kube-proxy reads
//! them (`pkg/proxy/service.go`): NodePorts and load-balancer addresses only for the types that
//! have them, IPv6 addresses skipped (a dual-stack Service is served on its IPv4 ClusterIP,
//! whichever family is first), unparsable source ranges skipped with a warning.

use std::{fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec as ServiceSpecApi},
    discovery::v1::EndpointSlice,
};
use weft_common::ip_proto;

use crate::model::Model;

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port a service exposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name; empty for the single unnamed port a service may have.
    pub name: String,
    pub port: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// The port on every node's addresses (types NodePort and LoadBalancer).
    pub node_port: Option<u16>,
}

/// ClientIP session affinity's default timeout (`sessionAffinityConfig.clientIP.timeoutSeconds`).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The longest affinity timeout the API accepts.
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// A service as the dataplane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (type LoadBalancer), except those whose `ipMode` is
    /// `Proxy`: the load balancer keeps that traffic, so nodes must not short-circuit it.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges`: who may reach the load-balancer addresses (all when empty).
    pub source_ranges: Vec<Ipv4Net>,
    /// ClientIP session affinity's timeout, when the service has it.
    pub affinity_timeout_s: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `spec.healthCheckNodePort` (type LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            cluster_ip: Ipv4Addr::UNSPECIFIED,
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout_s: None,
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
        }
    }
}

impl ServiceSpec {
    /// Whether anything outside the ClusterIP leads to the service (kube-proxy's
    /// `ExternallyAccessible`).
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// A port of an EndpointSlice: the service port `name` maps to `port` on every endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: u8,
}

/// One endpoint of an EndpointSlice with its conditions, with unset conditions defaulted as
/// kube-proxy reads them: ready and serving when unset, not terminating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addr: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node it runs on (`nodeName`), which decides whether it is local.
    pub node_name: Option<String>,
    /// Topology hints: the zones (`hints.forZones`) and nodes (`hints.forNodes`) it serves.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl Default for SliceEndpoint {
    /// An endpoint at 0.0.0.0 with unset conditions read as kube-proxy reads them.
    fn default() -> Self {
        Self {
            addr: Ipv4Addr::UNSPECIFIED,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }
}

/// An EndpointSlice as the dataplane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    /// The service it belongs to (label `kubernetes.io/service-name`).
    pub service: ObjectRef,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// When the change it carries happened ([`TRIGGER_TIME_ANNOTATION`]), for kube-proxy's
    /// network programming latency; none when unset or unreadable.
    pub trigger_time: Option<jiff::Timestamp>,
}

/// The annotation the endpoints controller stamps a slice with: when the change it carries
/// happened (a pod turning ready, a Service edited).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The outcome of checking an object that is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked<T> {
    /// The dataplane serves it.
    Serve(T),
    /// Valid, but not the dataplane's business; the reason is for logs.
    Ignore(&'static str),
}

/// Why an object was rejected. The messages name the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("spec is missing")]
    MissingSpec,
    #[error("{field} {ip:?} is not {what}")]
    InvalidClusterIp {
        field: String,
        ip: String,
        what: &'static str,
    },
    #[error("spec.ports[{index}].port {port} is not in 1-65535")]
    InvalidPort { index: usize, port: i32 },
    #[error("spec.ports[{index}].protocol {protocol:?} is not TCP, UDP or SCTP")]
    InvalidProtocol { index: usize, protocol: String },
    #[error("spec.ports[{index}] repeats port {port}/{protocol}")]
    DuplicatePort {
        index: usize,
        port: u16,
        protocol: String,
    },
    #[error("spec.ports[{index}] repeats the port name {name:?}")]
    DuplicatePortName { index: usize, name: String },
    #[error("spec.ports[{index}] has no name, but a service with several ports must name them all")]
    UnnamedPort { index: usize },
    #[error("spec.ports[{index}].nodePort {port} is not in 1-65535")]
    InvalidNodePort { index: usize, port: i32 },
    #[error("spec.externalIPs[{index}] {address:?} is not an IP address")]
    InvalidExternalIp { index: usize, address: String },
    #[error("spec.sessionAffinityConfig.clientIP.timeoutSeconds {0} is not in 1-86400")]
    InvalidAffinityTimeout(i32),
    #[error("spec.healthCheckNodePort {0} is not in 1-65535")]
    InvalidHealthCheckNodePort(i32),
    #[error("ports[{index}].port {port} is not in 1-65535")]
    InvalidSlicePort { index: usize, port: i32 },
    #[error("ports[{index}].protocol {protocol:?} is not TCP, UDP or SCTP")]
    InvalidSliceProtocol { index: usize, protocol: String },
    #[error("endpoints[{index}] has no addresses")]
    MissingAddress { index: usize },
    #[error("endpoints[{index}].addresses[0] {address:?} is not an IPv4 address")]
    InvalidAddress { index: usize, address: String },
}

const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The protocol number of a Kubernetes protocol name (`TCP` when unset, as the API defaults it).
fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(ip_proto::TCP),
        "UDP" => Some(ip_proto::UDP),
        "SCTP" => Some(ip_proto::SCTP),
        _ => None,
    }
}

/// The Kubernetes name of a protocol number.
#[must_use]
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        ip_proto::TCP => "TCP",
        ip_proto::UDP => "UDP",
        ip_proto::SCTP => "SCTP",
        _ => "?",
    }
}

/// A kind of object the service sources read: how it is checked, and how the model takes it.
/// Both sources (manifests, the Kubernetes API) go through it, so an object is served, ignored
/// or rejected the same way whichever source it comes from.
pub trait Kind: kube::Resource {
    /// What the model keeps of it.
    type Spec: Clone;
    const KIND: &'static str;
    fn check(&self) -> Result<Checked<Self::Spec>, ObjectError>;
    /// Puts `spec` in the model under `name`; returns whether anything changed.
    fn apply(model: &mut Model, name: ObjectRef, spec: Self::Spec) -> bool;
    /// Takes `name` out of the model; returns whether it was there.
    fn delete(model: &mut Model, name: &ObjectRef) -> bool;
}

impl Kind for Service {
    type Spec = ServiceSpec;
    const KIND: &'static str = "Service";

    fn check(&self) -> Result<Checked<ServiceSpec>, ObjectError> {
        check_service(self)
    }

    fn apply(model: &mut Model, name: ObjectRef, spec: ServiceSpec) -> bool {
        model.set_service(name, spec)
    }

    fn delete(model: &mut Model, name: &ObjectRef) -> bool {
        model.remove_service(name)
    }
}

impl Kind for EndpointSlice {
    type Spec = SliceSpec;
    const KIND: &'static str = "EndpointSlice";

    fn check(&self) -> Result<Checked<SliceSpec>, ObjectError> {
        check_endpoint_slice(self)
    }

    fn apply(model: &mut Model, name: ObjectRef, spec: SliceSpec) -> bool {
        model.set_slice(name, spec)
    }

    fn delete(model: &mut Model, name: &ObjectRef) -> bool {
        model.remove_slice(name)
    }
}

/// What a source makes of one object.
#[derive(Debug, PartialEq, Eq)]
pub enum Triage<S> {
    /// The dataplane serves it.
    Serve(ObjectRef, S),
    /// Valid, but not the dataplane's business (as kube-proxy ignores it); why, for logs.
    Ignore(ObjectRef, &'static str),
    /// Invalid: not served, and the source reports why (and its name, unless that is what is
    /// wrong).
    Reject(Option<ObjectRef>, ObjectError),
}

/// Names and checks `object`: the one accept/ignore/reject decision every source takes.
pub fn triage<K: Kind>(object: &K) -> Triage<K::Spec> {
    let name = match object_ref(object.meta()) {
        Ok(name) => name,
        Err(error) => return Triage::Reject(None, error),
    };
    match object.check() {
        Ok(Checked::Serve(spec)) => Triage::Serve(name, spec),
        Ok(Checked::Ignore(why)) => Triage::Ignore(name, why),
        Err(error) => Triage::Reject(Some(name), error),
    }
}

/// The namespace and name of an object (`default` when the namespace is unset, as `kubectl`
/// assumes).
pub fn object_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectRef, ObjectError> {
    let name = meta.name.clone().ok_or(ObjectError::MissingName)?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Ok(ObjectRef { namespace, name })
}

/// A port number field, checked.
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Checks a Service.
pub fn check_service(service: &Service) -> Result<Checked<ServiceSpec>, ObjectError> {
    if let Some(labels) = &service.metadata.labels {
        if labels.contains_key(SERVICE_PROXY_NAME_LABEL) {
            return Ok(Checked::Ignore(
                "served by another proxy (service-proxy-name label)",
            ));
        }
        if labels.contains_key(HEADLESS_LABEL) {
            return Ok(Checked::Ignore("headless (label)"));
        }
    }
    let spec = service.spec.as_ref().ok_or(ObjectError::MissingSpec)?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok(Checked::Ignore("type ExternalName"));
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") => return Ok(Checked::Ignore("no ClusterIP allocated")),
        Some("None") => return Ok(Checked::Ignore("headless")),
        Some(_) => match ipv4_cluster_ip(spec)? {
            Ok(ip) => ip,
            Err(why) => return Ok(Checked::Ignore(why)),
        },
    };
    let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let declared = spec.ports.as_deref().unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::with_capacity(declared.len());
    for (index, port) in declared.iter().enumerate() {
        let number = port_number(port.port).ok_or(ObjectError::InvalidPort {
            index,
            port: port.port,
        })?;
        let protocol = protocol_number(port.protocol.as_deref()).ok_or_else(|| {
            ObjectError::InvalidProtocol {
                index,
                protocol: port.protocol.clone().unwrap_or_default(),
            }
        })?;
        let name = port.name.clone().unwrap_or_default();
        if name.is_empty() && declared.len() > 1 {
            return Err(ObjectError::UnnamedPort { index });
        }
        if ports
            .iter()
            .any(|p| p.port == number && p.protocol == protocol)
        {
            return Err(ObjectError::DuplicatePort {
                index,
                port: number,
                protocol: protocol_name(protocol).to_owned(),
            });
        }
        if ports.iter().any(|p| p.name == name) {
            return Err(ObjectError::DuplicatePortName { index, name });
        }
        let node_port = match port.node_port.filter(|_| has_node_ports) {
            None | Some(0) => None,
            Some(value) => Some(
                port_number(value).ok_or(ObjectError::InvalidNodePort { index, port: value })?,
            ),
        };
        ports.push(ServicePort {
            name,
            port: number,
            protocol,
            node_port,
        });
    }
    let mut external_ips = Vec::new();
    for (index, address) in spec
        .external_ips
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match address.trim().parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => external_ips.push(ip),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(ObjectError::InvalidExternalIp {
                    index,
                    address: address.clone(),
                });
            }
        }
    }
    let load_balancer_ips = if service_type == "LoadBalancer" {
        service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip.as_deref()?.parse::<Ipv4Addr>().ok())
            .collect()
    } else {
        Vec::new()
    };
    // kube-proxy skips source ranges it cannot parse rather than refusing the service.
    let source_ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|range| {
            let parsed = range.trim().parse::<Ipv4Net>();
            if parsed.is_err() && range.trim().parse::<ipnet::Ipv6Net>().is_err() {
                tracing::warn!(
                    range,
                    "skipping a loadBalancerSourceRanges entry that is not a CIDR"
                );
            }
            parsed.ok().map(|net| net.trunc())
        })
        .collect();
    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds);
        Some(match timeout {
            None => DEFAULT_AFFINITY_TIMEOUT_S,
            Some(seconds) => u32::try_from(seconds)
                .ok()
                .filter(|s| (1..=MAX_AFFINITY_TIMEOUT_S).contains(s))
                .ok_or(ObjectError::InvalidAffinityTimeout(seconds))?,
        })
    } else {
        None
    };
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec
        .health_check_node_port
        .filter(|_| service_type == "LoadBalancer" && external_local)
    {
        None | Some(0) => None,
        Some(value) => {
            Some(port_number(value).ok_or(ObjectError::InvalidHealthCheckNodePort(value))?)
        }
    };
    Ok(Checked::Serve(ServiceSpec {
        cluster_ip,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout_s,
        external_local,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
    }))
}

/// The Service's IPv4 ClusterIP, chosen as kube-proxy's IPv4 proxier chooses it
/// (`GetClusterIPByFamily`): the `clusterIPs` entry at the index of `IPv4` in `ipFamilies`,
/// which on a dual-stack Service with IPv6 first is the second; without `ipFamilies` (an API
/// server from before dual-stack), `clusterIP` if it is IPv4. Beyond kube-proxy, which serves
/// nothing without `clusterIPs`, a hand-written manifest without them gets the API server's
/// defaulting (`[clusterIP]`). `Ok(Err(why))`: nothing for IPv4 to serve.
fn ipv4_cluster_ip(spec: &ServiceSpecApi) -> Result<Result<Ipv4Addr, &'static str>, ObjectError> {
    const IPV6_ONLY: &str = "IPv6 only (weft serves IPv4)";
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if families.is_empty() {
        let text = spec.cluster_ip.clone().unwrap_or_default();
        return match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => Ok(Ok(ip)),
            Ok(std::net::IpAddr::V6(_)) => Ok(Err(IPV6_ONLY)),
            Err(_) => Err(ObjectError::InvalidClusterIp {
                field: "spec.clusterIP".to_owned(),
                ip: text,
                what: "an IP address",
            }),
        };
    }
    let Some(index) = families.iter().position(|family| family == "IPv4") else {
        return Ok(Err(IPV6_ONLY));
    };
    let (field, listed) = match spec.cluster_ips.as_deref() {
        None | Some([]) => ("spec.clusterIP".to_owned(), spec.cluster_ip.as_slice()),
        Some(listed) => (format!("spec.clusterIPs[{index}]"), listed),
    };
    let Some(text) = listed.get(index) else {
        return Ok(Err(
            "no IPv4 ClusterIP allocated yet (spec.clusterIPs has no entry for IPv4)",
        ));
    };
    match text.parse() {
        Ok(ip) => Ok(Ok(ip)),
        Err(_) => Err(ObjectError::InvalidClusterIp {
            field,
            ip: text.clone(),
            what: "an IPv4 address",
        }),
    }
}

/// Checks an EndpointSlice.
pub fn check_endpoint_slice(slice: &EndpointSlice) -> Result<Checked<SliceSpec>, ObjectError> {
    if slice.address_type != "IPv4" {
        return Ok(Checked::Ignore("not an IPv4 EndpointSlice"));
    }
    let Some(service_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
    else {
        return Ok(Checked::Ignore("no kubernetes.io/service-name label"));
    };
    let slice_ref = object_ref(&slice.metadata)?;
    let service = ObjectRef {
        namespace: slice_ref.namespace,
        name: service_name.clone(),
    };
    let mut ports = Vec::new();
    for (index, port) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        // A port without a number means "all ports" for selector-less slices; kube-proxy skips it.
        let Some(number) = port.port else { continue };
        let number = u16::try_from(number).ok().filter(|p| *p != 0).ok_or(
            ObjectError::InvalidSlicePort {
                index,
                port: number,
            },
        )?;
        let protocol = protocol_number(port.protocol.as_deref()).ok_or_else(|| {
            ObjectError::InvalidSliceProtocol {
                index,
                protocol: port.protocol.clone().unwrap_or_default(),
            }
        })?;
        ports.push(SlicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
        });
    }
    let listed = slice.endpoints.as_deref().unwrap_or_default();
    // Exactly as long as the slice: the model keeps every slice for as long as it exists.
    let mut endpoints = Vec::with_capacity(listed.len());
    for (index, endpoint) in listed.iter().enumerate() {
        let address = endpoint
            .addresses
            .first()
            .ok_or(ObjectError::MissingAddress { index })?;
        let addr = address.parse().map_err(|_| ObjectError::InvalidAddress {
            index,
            address: address.clone(),
        })?;
        let conditions = endpoint.conditions.as_ref();
        let hints = endpoint.hints.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|zone| zone.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|node| node.name.clone())
                .collect(),
        });
    }
    let trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|time| time.parse().ok());
    Ok(Checked::Serve(SliceSpec {
        service,
        ports,
        endpoints,
        trigger_time,
    }))
}

#[cfg(test)]
pub(crate) mod tests;
