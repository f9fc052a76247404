//! The pure in-memory model: the services and endpoint slices every source has reported, and
//! the dataplane state they call for. No I/O; sources write it, the reconciler reads it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use weft_common::{
    ip_proto,
    maps::{EndpointValue, RemoteNode, ServiceKey, Vtep},
};

use crate::objects::{ObjectRef, ServiceSpec, SliceEndpoint, SliceSpec, protocol_name};

/// A service port, the unit that owns one endpoint list (kube-proxy's `ServicePortName`).
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

/// What the dataplane must do for one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPort {
    /// Addresses, ports and protocols clients reach it on.
    pub frontends: BTreeSet<ServiceKey>,
    /// Endpoints new connections are spread over.
    pub endpoints: BTreeSet<EndpointValue>,
}

/// Another node's lease, as the overlay needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// The whole desired dataplane state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub ports: BTreeMap<ServicePortName, DesiredPort>,
    /// Remote pod subnets and the node to encapsulate to.
    pub subnets: BTreeMap<Ipv4Net, RemoteNode>,
    /// Nodes whose VXLAN this node accepts, by PublicIP.
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    /// Problems the model resolved on its own (e.g. two services claiming one frontend), for logs.
    pub notes: Vec<String>,
}

/// The endpoints each UDP frontend may lead to.
pub type UdpEndpoints = BTreeMap<ServiceKey, BTreeSet<EndpointValue>>;

impl Desired {
    /// Each UDP frontend with the endpoints it leads to (for purging flows whose endpoint left).
    #[must_use]
    pub fn udp_endpoints(&self) -> UdpEndpoints {
        self.ports
            .values()
            .flat_map(|port| {
                port.frontends
                    .iter()
                    .filter(|frontend| frontend.proto == ip_proto::UDP)
                    .map(|frontend| (*frontend, port.endpoints.clone()))
            })
            .collect()
    }
}

/// Services, slices and other nodes' leases, as the sources last reported them.
#[derive(Clone, Debug, Default)]
pub struct Model {
    services: BTreeMap<ObjectRef, ServiceSpec>,
    slices: BTreeMap<ObjectRef, SliceSpec>,
    leases: BTreeMap<Ipv4Net, NodeLease>,
}

impl Model {
    /// Records a service; returns whether anything changed.
    pub fn set_service(&mut self, name: ObjectRef, spec: ServiceSpec) -> bool {
        self.services.insert(name, spec.clone()).as_ref() != Some(&spec)
    }

    /// Forgets a service; returns whether it was known.
    pub fn remove_service(&mut self, name: &ObjectRef) -> bool {
        self.services.remove(name).is_some()
    }

    /// Records an EndpointSlice (by its own name); returns whether anything changed.
    pub fn set_slice(&mut self, name: ObjectRef, spec: SliceSpec) -> bool {
        self.slices.insert(name, spec.clone()).as_ref() != Some(&spec)
    }

    /// Forgets an EndpointSlice; returns whether it was known.
    pub fn remove_slice(&mut self, name: &ObjectRef) -> bool {
        self.slices.remove(name).is_some()
    }

    /// Records another node's lease; returns whether anything changed.
    pub fn set_lease(&mut self, subnet: Ipv4Net, lease: NodeLease) -> bool {
        self.leases.insert(subnet, lease) != Some(lease)
    }

    /// Forgets a lease; returns whether it was known.
    pub fn remove_lease(&mut self, subnet: &Ipv4Net) -> bool {
        self.leases.remove(subnet).is_some()
    }

    /// Replaces every lease (after a full re-list); returns whether anything changed.
    pub fn replace_leases(&mut self, leases: BTreeMap<Ipv4Net, NodeLease>) -> bool {
        let changed = self.leases != leases;
        self.leases = leases;
        changed
    }

    /// The dataplane state the current objects call for.
    #[must_use]
    pub fn desired(&self) -> Desired {
        let mut slices_by_service: BTreeMap<&ObjectRef, Vec<&SliceSpec>> = BTreeMap::new();
        for slice in self.slices.values() {
            slices_by_service
                .entry(&slice.service)
                .or_default()
                .push(slice);
        }
        let mut desired = Desired::default();
        for (subnet, lease) in &self.leases {
            desired.subnets.insert(
                *subnet,
                RemoteNode {
                    public_ip: lease.public_ip.octets(),
                    vtep_mac: lease.vtep_mac,
                    _pad: [0; 2],
                },
            );
            // A node has one lease; should two name one PublicIP (an address that moved), either
            // subnet identifies the member.
            desired.vteps.insert(
                lease.public_ip,
                Vtep {
                    subnet_addr: subnet.network().octets(),
                    subnet_prefix_len: subnet.prefix_len(),
                    _pad: [0; 3],
                },
            );
        }
        let mut claimed: BTreeMap<ServiceKey, ServicePortName> = BTreeMap::new();
        for (service, spec) in &self.services {
            let slices = slices_by_service
                .get(service)
                .map_or(&[][..], Vec::as_slice);
            for port in &spec.ports {
                if !matches!(port.protocol, ip_proto::TCP | ip_proto::UDP) {
                    // SCTP needs a CRC32c rewrite the datapath does not do yet.
                    continue;
                }
                let name = ServicePortName {
                    service: service.clone(),
                    port: port.name.clone(),
                };
                let frontend = ServiceKey {
                    addr: spec.cluster_ip.octets(),
                    port: port.port,
                    proto: port.protocol,
                    _pad: 0,
                };
                if let Some(owner) = claimed.get(&frontend) {
                    desired.notes.push(format!(
                        "{name}: {}:{}/{} is already served by {owner}; ignoring it here",
                        spec.cluster_ip,
                        port.port,
                        protocol_name(port.protocol)
                    ));
                    continue;
                }
                claimed.insert(frontend, name.clone());
                let endpoints = select_endpoints(slices, &port.name, port.protocol);
                let entry = desired.ports.entry(name).or_default();
                entry.frontends.insert(frontend);
                entry.endpoints = endpoints;
            }
        }
        desired
    }
}

/// The endpoints of one service port, chosen as kube-proxy's `CategorizeEndpoints` does: the
/// ready ones; if none is ready, the ones still serving while terminating (so connections
/// keep landing somewhere during a rolling update).
fn select_endpoints(
    slices: &[&SliceSpec],
    port_name: &str,
    protocol: u8,
) -> BTreeSet<EndpointValue> {
    let mut candidates: BTreeMap<EndpointValue, SliceEndpoint> = BTreeMap::new();
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
            // The same endpoint in two slices (a slice being replaced) counts once, with the
            // best conditions either slice gives it.
            candidates
                .entry(value)
                .and_modify(|seen| {
                    seen.ready |= endpoint.ready;
                    seen.serving |= endpoint.serving;
                    seen.terminating &= endpoint.terminating;
                })
                .or_insert(*endpoint);
        }
    }
    let ready: BTreeSet<_> = candidates
        .iter()
        .filter(|(_, e)| e.ready)
        .map(|(value, _)| *value)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .iter()
        .filter(|(_, e)| e.serving && e.terminating)
        .map(|(value, _)| *value)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::objects::{ServicePort, SlicePort};

    pub(crate) fn object(namespace: &str, name: &str) -> ObjectRef {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub(crate) fn nginx_service() -> ServiceSpec {
        ServiceSpec {
            cluster_ip: Ipv4Addr::new(10, 254, 40, 119),
            ports: vec![ServicePort {
                name: String::new(),
                port: 4432,
                protocol: ip_proto::TCP,
            }],
        }
    }

    pub(crate) fn endpoint(last: u8, ready: bool) -> SliceEndpoint {
        SliceEndpoint {
            addr: Ipv4Addr::new(172, 30, 20, last),
            ready,
            serving: ready,
            terminating: false,
        }
    }

    pub(crate) fn nginx_slice(endpoints: Vec<SliceEndpoint>) -> SliceSpec {
        SliceSpec {
            service: object("default", "nginx"),
            ports: vec![SlicePort {
                name: String::new(),
                port: 80,
                protocol: ip_proto::TCP,
            }],
            endpoints,
        }
    }

    fn value(last: u8, port: u16) -> EndpointValue {
        EndpointValue {
            addr: [172, 30, 20, last],
            port,
            _pad: 0,
        }
    }

    fn nginx_port() -> ServicePortName {
        ServicePortName {
            service: object("default", "nginx"),
            port: String::new(),
        }
    }

    #[test]
    fn seed_service_maps_its_frontend_to_its_ready_endpoints() {
        let mut model = Model::default();
        assert!(model.set_service(object("default", "nginx"), nginx_service()));
        assert!(model.set_slice(
            object("default", "nginx-1"),
            nginx_slice(vec![
                endpoint(6, true),
                endpoint(7, true),
                endpoint(8, true),
                endpoint(9, false)
            ]),
        ));
        let desired = model.desired();
        let port = &desired.ports[&nginx_port()];
        assert_eq!(
            port.frontends.iter().copied().collect::<Vec<_>>(),
            vec![ServiceKey {
                addr: [10, 254, 40, 119],
                port: 4432,
                proto: 6,
                _pad: 0
            }]
        );
        assert_eq!(
            port.endpoints.iter().copied().collect::<Vec<_>>(),
            vec![value(6, 80), value(7, 80), value(8, 80)]
        );
        assert!(desired.notes.is_empty());
    }

    #[test]
    fn setting_the_same_object_twice_is_no_change() {
        let mut model = Model::default();
        assert!(model.set_service(object("default", "nginx"), nginx_service()));
        assert!(!model.set_service(object("default", "nginx"), nginx_service()));
        assert!(model.remove_service(&object("default", "nginx")));
        assert!(!model.remove_service(&object("default", "nginx")));
    }

    #[test]
    fn service_without_slices_has_no_endpoints() {
        let mut model = Model::default();
        model.set_service(object("default", "nginx"), nginx_service());
        assert!(model.desired().ports[&nginx_port()].endpoints.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let mut model = Model::default();
        model.set_service(object("default", "nginx"), nginx_service());
        let terminating = SliceEndpoint {
            ready: false,
            serving: true,
            terminating: true,
            ..endpoint(7, false)
        };
        model.set_slice(
            object("default", "nginx-1"),
            nginx_slice(vec![endpoint(6, true), terminating]),
        );
        let chosen = |m: &Model| m.desired().ports[&nginx_port()].endpoints.clone();
        assert_eq!(
            chosen(&model).into_iter().collect::<Vec<_>>(),
            vec![value(6, 80)]
        );
        model.set_slice(
            object("default", "nginx-1"),
            nginx_slice(vec![endpoint(6, false), terminating]),
        );
        assert_eq!(
            chosen(&model).into_iter().collect::<Vec<_>>(),
            vec![value(7, 80)]
        );
    }

    #[test]
    fn slices_merge_and_match_ports_by_name_and_protocol() {
        let mut model = Model::default();
        let service = ServiceSpec {
            cluster_ip: Ipv4Addr::new(10, 254, 0, 10),
            ports: vec![
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: ip_proto::UDP,
                },
                ServicePort {
                    name: "dns-tcp".into(),
                    port: 53,
                    protocol: ip_proto::TCP,
                },
            ],
        };
        model.set_service(object("kube-system", "dns"), service);
        let slice = |last: u8| SliceSpec {
            service: object("kube-system", "dns"),
            ports: vec![
                SlicePort {
                    name: "dns".into(),
                    port: 5353,
                    protocol: ip_proto::UDP,
                },
                SlicePort {
                    name: "dns-tcp".into(),
                    port: 5354,
                    protocol: ip_proto::TCP,
                },
            ],
            endpoints: vec![endpoint(last, true)],
        };
        model.set_slice(object("kube-system", "dns-a"), slice(2));
        model.set_slice(object("kube-system", "dns-b"), slice(3));
        let desired = model.desired();
        let udp = &desired.ports[&ServicePortName {
            service: object("kube-system", "dns"),
            port: "dns".into(),
        }];
        assert_eq!(
            udp.endpoints.iter().copied().collect::<Vec<_>>(),
            vec![value(2, 5353), value(3, 5353)]
        );
        let tcp = &desired.ports[&ServicePortName {
            service: object("kube-system", "dns"),
            port: "dns-tcp".into(),
        }];
        assert_eq!(
            tcp.endpoints.iter().copied().collect::<Vec<_>>(),
            vec![value(2, 5354), value(3, 5354)]
        );
    }

    #[test]
    fn a_frontend_claimed_twice_is_served_once_and_noted() {
        let mut model = Model::default();
        model.set_service(object("a", "first"), nginx_service());
        model.set_service(object("b", "second"), nginx_service());
        let desired = model.desired();
        assert_eq!(desired.ports.len(), 1);
        assert!(
            desired
                .ports
                .keys()
                .all(|p| p.service == object("a", "first"))
        );
        assert_eq!(desired.notes.len(), 1, "{:?}", desired.notes);
        assert!(desired.notes[0].contains("already served by a/first"));
    }

    #[test]
    fn leases_become_remote_subnets_and_members() {
        let mut model = Model::default();
        let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
        let lease = NodeLease {
            public_ip: Ipv4Addr::new(192, 168, 50, 2),
            vtep_mac: [2, 0, 0, 0, 0, 2],
        };
        assert!(model.set_lease(subnet, lease));
        assert!(!model.set_lease(subnet, lease));
        let desired = model.desired();
        assert_eq!(desired.subnets[&subnet].public_ip, [192, 168, 50, 2]);
        assert_eq!(desired.subnets[&subnet].vtep_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            desired.vteps[&Ipv4Addr::new(192, 168, 50, 2)].subnet_prefix_len,
            24
        );
        assert!(model.replace_leases(BTreeMap::new()));
        assert!(model.desired().subnets.is_empty() && model.desired().vteps.is_empty());
    }

    #[test]
    fn sctp_ports_are_not_served() {
        let mut model = Model::default();
        let mut service = nginx_service();
        service.ports[0].protocol = ip_proto::SCTP;
        model.set_service(object("default", "nginx"), service);
        assert!(model.desired().ports.is_empty());
    }
}
