use std::net::Ipv4Addr;

use super::*;
use crate::sources::objects::{ServicePort, SlicePort};

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
            node_port: None,
        }],
        ..ServiceSpec::default()
    }
}

pub(crate) fn endpoint(last: u8, ready: bool) -> SliceEndpoint {
    SliceEndpoint {
        addr: Ipv4Addr::new(172, 30, 20, last),
        ready,
        serving: ready,
        ..SliceEndpoint::default()
    }
}

fn on_node(last: u8, node: &str) -> SliceEndpoint {
    SliceEndpoint {
        node_name: Some(node.into()),
        ..endpoint(last, true)
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
        trigger_time: None,
    }
}

fn value(last: u8, port: u16) -> EndpointValue {
    EndpointValue {
        addr: [172, 30, 20, last],
        port,
        _pad: 0,
    }
}

fn key(addr: [u8; 4], port: u16) -> ServiceKey {
    ServiceKey {
        addr,
        port,
        proto: ip_proto::TCP,
        _pad: 0,
    }
}

const VIP: [u8; 4] = [10, 254, 40, 119];
const CLUSTER: Scope = Scope::Cluster;
const LOCAL: Scope = Scope::NodeLocal;
const REJECT: FrontendPolicy = FrontendPolicy {
    reject: true,
    masquerade_all: false,
    local_external: false,
    source_ranges: false,
};
const EXTERNAL: FrontendPolicy = FrontendPolicy {
    masquerade_all: true,
    ..NONE
};
const LOCAL_EXTERNAL: FrontendPolicy = FrontendPolicy {
    local_external: true,
    ..NONE
};
const NONE: FrontendPolicy = FrontendPolicy {
    masquerade_all: false,
    local_external: false,
    source_ranges: false,
    reject: false,
};

fn nginx_port() -> ServicePortName {
    ServicePortName {
        service: object("default", "nginx"),
        port: String::new(),
    }
}

fn lasts(set: &BTreeSet<EndpointValue>) -> Vec<u8> {
    set.iter().map(|e| e.addr[3]).collect()
}

/// A model holding nginx (changed by `edit`) with `endpoints`, on node `node-a` in
/// `zone-a` with the NodePort address 192.168.50.1.
fn nginx_model(edit: impl FnOnce(&mut ServiceSpec), endpoints: Vec<SliceEndpoint>) -> Model {
    let mut model = Model::default();
    model.update_node(|node| {
        node.name = Some("node-a".into());
        node.zone = Some("zone-a".into());
        node.node_port_addresses = [Ipv4Addr::new(192, 168, 50, 1)].into();
    });
    let mut spec = nginx_service();
    edit(&mut spec);
    model.set_service(object("default", "nginx"), spec);
    model.set_slice(object("default", "nginx-1"), nginx_slice(endpoints));
    model
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
        port.frontends.iter().collect::<Vec<_>>(),
        vec![(&key(VIP, 4432), &FrontendSpec::default())]
    );
    assert_eq!(
        port.sets[&CLUSTER].iter().copied().collect::<Vec<_>>(),
        vec![value(6, 80), value(7, 80), value(8, 80)]
    );
    assert_eq!(port.sets.len(), 1);
    assert!(desired.notes.is_empty());
}

#[test]
fn setting_the_same_object_twice_is_no_change() {
    let mut model = Model::default();
    assert!(model.set_service(object("default", "nginx"), nginx_service()));
    assert!(!model.set_service(object("default", "nginx"), nginx_service()));
    assert!(model.remove_service(&object("default", "nginx")));
    assert!(!model.remove_service(&object("default", "nginx")));
    assert!(model.desired().ports.is_empty());
}

#[test]
fn a_service_without_endpoints_rejects() {
    let mut model = Model::default();
    model.set_service(object("default", "nginx"), nginx_service());
    let desired = model.desired();
    let port = &desired.ports[&nginx_port()];
    assert!(port.sets[&CLUSTER].is_empty());
    assert_eq!(port.frontends[&key(VIP, 4432)].policy, REJECT);
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let terminating = SliceEndpoint {
        ready: false,
        serving: true,
        terminating: true,
        ..endpoint(7, false)
    };
    let mut model = nginx_model(|_| {}, vec![endpoint(6, true), terminating.clone()]);
    let chosen = |m: &mut Model| lasts(&m.desired().ports[&nginx_port()].sets[&CLUSTER]);
    assert_eq!(chosen(&mut model), vec![6]);
    model.set_slice(
        object("default", "nginx-1"),
        nginx_slice(vec![endpoint(6, false), terminating]),
    );
    assert_eq!(chosen(&mut model), vec![7]);
    let desired = model.desired();
    assert_eq!(
        desired.ports[&nginx_port()].frontends[&key(VIP, 4432)].policy,
        NONE,
        "serving endpoints mean the service is not rejected"
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
                node_port: None,
            },
            ServicePort {
                name: "dns-tcp".into(),
                port: 53,
                protocol: ip_proto::TCP,
                node_port: None,
            },
        ],
        ..ServiceSpec::default()
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
        trigger_time: None,
    };
    model.set_slice(object("kube-system", "dns-a"), slice(2));
    model.set_slice(object("kube-system", "dns-b"), slice(3));
    let desired = model.desired();
    let udp = &desired.ports[&ServicePortName {
        service: object("kube-system", "dns"),
        port: "dns".into(),
    }];
    assert_eq!(
        udp.sets[&CLUSTER].iter().copied().collect::<Vec<_>>(),
        vec![value(2, 5353), value(3, 5353)]
    );
    let tcp = &desired.ports[&ServicePortName {
        service: object("kube-system", "dns"),
        port: "dns-tcp".into(),
    }];
    assert_eq!(
        tcp.sets[&CLUSTER].iter().copied().collect::<Vec<_>>(),
        vec![value(2, 5354), value(3, 5354)]
    );
    let udp_frontends = desired.udp_endpoints();
    assert_eq!(udp_frontends.len(), 1);
    assert_eq!(udp_frontends.values().next().unwrap().len(), 2);
}

#[test]
fn a_frontend_claimed_twice_is_served_once_and_noted() {
    let mut model = Model::default();
    model.set_service(object("a", "first"), nginx_service());
    model.set_service(object("b", "second"), nginx_service());
    let desired = model.desired();
    let serving: Vec<_> = desired
        .ports
        .iter()
        .filter(|(_, port)| !port.frontends.is_empty())
        .map(|(name, _)| name.service.clone())
        .collect();
    assert_eq!(serving, vec![object("a", "first")]);
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
fn a_members_next_hop_rides_with_its_subnets() {
    let mut model = Model::default();
    let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
    let public_ip = Ipv4Addr::new(192, 168, 50, 2);
    model.set_lease(
        subnet,
        NodeLease {
            public_ip,
            vtep_mac: [2, 0, 0, 0, 0, 2],
        },
    );
    assert_eq!(model.members(), BTreeSet::from([public_ip]));
    assert_eq!(
        model.desired().subnets[&subnet].next_hop_ifindex,
        0,
        "unknown: looked up per packet"
    );
    let hop = NextHop {
        ifindex: 7,
        mac: [2, 0, 0, 0, 0, 0x77],
    };
    assert!(model.set_next_hops(BTreeMap::from([(public_ip, hop)])));
    assert!(!model.set_next_hops(BTreeMap::from([(public_ip, hop)])));
    let remote = model.desired().subnets[&subnet];
    assert_eq!(
        (remote.next_hop_ifindex, remote.next_hop_mac),
        (7, [2, 0, 0, 0, 0, 0x77])
    );
    assert!(model.set_next_hops(BTreeMap::new()));
    assert_eq!(model.desired().subnets[&subnet].next_hop_ifindex, 0);
}

#[test]
fn sctp_ports_are_served() {
    let mut model = Model::default();
    let mut service = nginx_service();
    service.ports[0].protocol = ip_proto::SCTP;
    model.set_service(object("default", "nginx"), service);
    let desired = model.desired();
    assert_eq!(
        desired.ports[&nginx_port()]
            .frontends
            .keys()
            .map(|k| k.proto)
            .collect::<Vec<_>>(),
        vec![ip_proto::SCTP]
    );
}

#[test]
fn node_ports_external_and_load_balancer_addresses_masquerade_with_cluster_policy() {
    let mut model = nginx_model(
        |spec| {
            spec.ports[0].node_port = Some(30080);
            spec.external_ips = vec![Ipv4Addr::new(192, 0, 2, 10)];
            spec.load_balancer_ips = vec![Ipv4Addr::new(192, 0, 2, 100)];
            spec.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
            spec.affinity_timeout_s = Some(60);
        },
        vec![endpoint(6, true)],
    );
    let desired = model.desired();
    let port = &desired.ports[&nginx_port()];
    let policies: BTreeMap<ServiceKey, FrontendPolicy> =
        port.frontends.iter().map(|(k, f)| (*k, f.policy)).collect();
    assert_eq!(
        policies,
        BTreeMap::from([
            (key(VIP, 4432), NONE),
            (key([192, 168, 50, 1], 30080), EXTERNAL),
            (key([192, 0, 2, 10], 4432), EXTERNAL),
            (
                key([192, 0, 2, 100], 4432),
                FrontendPolicy {
                    source_ranges: true,
                    ..EXTERNAL
                }
            ),
        ])
    );
    assert!(port.frontends.values().all(|f| f.affinity_timeout_s == 60));
    assert!(port.frontends.values().all(|f| f.scope == CLUSTER));
    assert_eq!(
        port.source_ranges.keys().copied().collect::<Vec<_>>(),
        vec![key([192, 0, 2, 100], 4432)]
    );
    assert_eq!(port.sets.keys().copied().collect::<Vec<_>>(), vec![CLUSTER]);
}

#[test]
fn external_local_policy_uses_this_nodes_endpoints_and_counts_them_for_health_checks() {
    let mut model = nginx_model(
        |spec| {
            spec.ports[0].node_port = Some(30080);
            spec.external_local = true;
            spec.health_check_node_port = Some(32000);
        },
        vec![
            on_node(6, "node-a"),
            on_node(7, "node-b"),
            on_node(8, "node-a"),
        ],
    );
    let desired = model.desired();
    let port = &desired.ports[&nginx_port()];
    assert_eq!(lasts(&port.sets[&LOCAL]), vec![6, 8]);
    assert_eq!(lasts(&port.sets[&CLUSTER]), vec![6, 7, 8]);
    let node_port = port.frontends[&key([192, 168, 50, 1], 30080)];
    assert_eq!(node_port.scope, LOCAL);
    assert_eq!(node_port.policy, LOCAL_EXTERNAL);
    assert_eq!(port.frontends[&key(VIP, 4432)].scope, CLUSTER);
    assert_eq!(
        desired.health_checks[&32000],
        HealthCheck {
            service: object("default", "nginx"),
            local_endpoints: 2
        }
    );
    // Endpoints only elsewhere: outside clients are dropped here, not rejected.
    model.set_slice(
        object("default", "nginx-1"),
        nginx_slice(vec![on_node(7, "node-b")]),
    );
    let desired = model.desired();
    let port = &desired.ports[&nginx_port()];
    assert!(port.sets[&LOCAL].is_empty());
    assert_eq!(
        port.frontends[&key([192, 168, 50, 1], 30080)].policy,
        LOCAL_EXTERNAL
    );
    assert_eq!(desired.health_checks[&32000].local_endpoints, 0);
}

#[test]
fn internal_local_policy_confines_the_cluster_ip_to_this_node() {
    let mut model = nginx_model(
        |spec| spec.internal_local = true,
        vec![on_node(6, "node-a"), on_node(7, "node-b")],
    );
    let desired = model.desired();
    let port = &desired.ports[&nginx_port()];
    assert_eq!(port.frontends[&key(VIP, 4432)].scope, LOCAL);
    assert_eq!(port.sets.keys().copied().collect::<Vec<_>>(), vec![LOCAL]);
    assert_eq!(lasts(&port.sets[&LOCAL]), vec![6]);
}

#[test]
fn zone_hints_narrow_the_cluster_set_only_when_every_ready_endpoint_has_one() {
    let hinted = |last: u8, zone: &str| SliceEndpoint {
        zone_hints: vec![zone.into()],
        ..endpoint(last, true)
    };
    let mut model = nginx_model(
        |_| {},
        vec![
            hinted(6, "zone-a"),
            hinted(7, "zone-b"),
            hinted(8, "zone-a"),
        ],
    );
    let cluster = |m: &mut Model| lasts(&m.desired().ports[&nginx_port()].sets[&CLUSTER]);
    assert_eq!(cluster(&mut model), vec![6, 8]);
    model.set_slice(
        object("default", "nginx-1"),
        nginx_slice(vec![hinted(6, "zone-a"), endpoint(7, true)]),
    );
    assert_eq!(
        cluster(&mut model),
        vec![6, 7],
        "one endpoint without hints"
    );
    model.set_slice(
        object("default", "nginx-1"),
        nginx_slice(vec![hinted(6, "zone-b"), hinted(7, "zone-c")]),
    );
    assert_eq!(cluster(&mut model), vec![6, 7], "no hint for this zone");
}

#[test]
fn node_hints_win_over_zone_hints() {
    let hinted = |last: u8, node: &str| SliceEndpoint {
        zone_hints: vec!["zone-a".into()],
        node_hints: vec![node.into()],
        ..endpoint(last, true)
    };
    let mut model = nginx_model(|_| {}, vec![hinted(6, "node-a"), hinted(7, "node-b")]);
    let desired = model.desired();
    assert_eq!(lasts(&desired.ports[&nginx_port()].sets[&CLUSTER]), vec![6]);
}

#[test]
fn node_facts_reach_every_service() {
    let mut model = nginx_model(
        |spec| spec.ports[0].node_port = Some(30080),
        vec![endpoint(6, true)],
    );
    assert_eq!(model.desired().ports[&nginx_port()].frontends.len(), 2);
    assert!(model.update_node(|node| {
        node.node_port_addresses
            .insert(Ipv4Addr::new(192, 168, 60, 1));
    }));
    assert!(!model.update_node(|_| {}));
    assert_eq!(model.desired().ports[&nginx_port()].frontends.len(), 3);
}

#[test]
fn a_slice_that_moves_to_another_service_leaves_the_first() {
    let mut model = nginx_model(|_| {}, vec![endpoint(6, true)]);
    let mut other = nginx_service();
    other.cluster_ip = Ipv4Addr::new(10, 254, 0, 9);
    model.set_service(object("default", "other"), other);
    let mut moved = nginx_slice(vec![endpoint(6, true)]);
    moved.service = object("default", "other");
    model.set_slice(object("default", "nginx-1"), moved);
    let desired = model.desired();
    assert!(desired.ports[&nginx_port()].sets[&CLUSTER].is_empty());
    assert_eq!(
        desired.ports[&ServicePortName {
            service: object("default", "other"),
            port: String::new()
        }]
            .sets[&CLUSTER]
            .len(),
        1
    );
}

#[test]
fn udp_flows_of_a_local_external_frontend_may_reach_either_set() {
    let mut model = nginx_model(
        |spec| {
            spec.ports[0].protocol = ip_proto::UDP;
            spec.ports[0].node_port = Some(30053);
            spec.external_local = true;
        },
        vec![on_node(6, "node-a"), on_node(7, "node-b")],
    );
    let mut nginx_udp = nginx_slice(vec![on_node(6, "node-a"), on_node(7, "node-b")]);
    nginx_udp.ports[0].protocol = ip_proto::UDP;
    model.set_slice(object("default", "nginx-1"), nginx_udp);
    let udp = model.desired().udp_endpoints();
    let node_port = ServiceKey {
        proto: ip_proto::UDP,
        ..key([192, 168, 50, 1], 30053)
    };
    assert_eq!(lasts(&udp[&node_port]), vec![6, 7]);
}
