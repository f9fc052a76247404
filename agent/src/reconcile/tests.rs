use std::{collections::BTreeMap, sync::Arc};

use super::*;
use crate::datapath::maps::fake::{FakeMaps, Op};

const CLUSTER: Scope = Scope::Cluster;
const LOCAL: Scope = Scope::NodeLocal;

fn endpoint(last: u8) -> EndpointValue {
    EndpointValue {
        addr: [172, 30, 20, last],
        port: 80,
        _pad: 0,
    }
}

fn frontend(port: u16) -> ServiceKey {
    ServiceKey {
        addr: [10, 254, 40, 119],
        port,
        proto: 6,
        _pad: 0,
    }
}

fn port_name(name: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        },
        port: String::new(),
    }
}

fn cluster_port(port: u16, endpoints: &[u8]) -> DesiredPort {
    DesiredPort {
        sets: [(
            CLUSTER,
            endpoints.iter().map(|last| endpoint(*last)).collect(),
        )]
        .into(),
        frontends: [(port_key(port), FrontendSpec::default())].into(),
        source_ranges: BTreeMap::new(),
    }
}

fn port_key(port: u16) -> ServiceKey {
    frontend(port)
}

fn desired(ports: &[(&str, u16, &[u8])]) -> Desired {
    Desired {
        ports: ports
            .iter()
            .map(|(name, port, endpoints)| {
                (port_name(name), Arc::new(cluster_port(*port, endpoints)))
            })
            .collect(),
        ..Desired::default()
    }
}

fn overlay(nodes: &[(&str, u8)]) -> Desired {
    let mut desired = Desired::default();
    for (subnet, last) in nodes {
        let public_ip = Ipv4Addr::new(192, 168, 50, *last);
        let subnet: Ipv4Net = subnet.parse().unwrap();
        desired.subnets.insert(
            subnet,
            RemoteNode {
                public_ip: public_ip.octets(),
                vtep_mac: [2, 0, 0, 0, 0, *last],
                ..RemoteNode::default()
            },
        );
        desired.vteps.insert(
            public_ip,
            Vtep {
                subnet_addr: subnet.network().octets(),
                subnet_prefix_len: 24,
                _pad: [0; 3],
            },
        );
    }
    desired
}

fn named_port(port: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectRef {
            namespace: "default".into(),
            name: "svc".into(),
        },
        port: port.into(),
    }
}

fn two_ports(first: (&str, u16), second: (&str, u16)) -> Desired {
    let mut desired = Desired::default();
    for (port, number, last) in [(first.0, first.1, 6), (second.0, second.1, 7)] {
        desired
            .ports
            .insert(named_port(port), Arc::new(cluster_port(number, &[last])));
    }
    desired
}

/// nginx with a NodePort-like external frontend (port 30080) under `externalTrafficPolicy:
/// Local`: `local` endpoints on this node, `cluster` everywhere.
fn local_external(local: &[u8], cluster: &[u8]) -> Desired {
    let set = |lasts: &[u8]| lasts.iter().map(|l| endpoint(*l)).collect();
    let mut desired = Desired::default();
    desired.ports.insert(
        port_name("nginx"),
        Arc::new(DesiredPort {
            sets: [(CLUSTER, set(cluster)), (LOCAL, set(local))].into(),
            frontends: [
                (frontend(4432), FrontendSpec::default()),
                (
                    frontend(30080),
                    FrontendSpec {
                        scope: LOCAL,
                        policy: FrontendPolicy {
                            local_external: true,
                            ..FrontendPolicy::default()
                        },
                        affinity_timeout_s: 0,
                    },
                ),
            ]
            .into(),
            source_ranges: BTreeMap::new(),
        }),
    );
    desired
}

#[test]
fn the_model_types_become_the_wire_values_the_datapath_reads() {
    for scope in [Scope::Cluster, Scope::NodeLocal] {
        assert_eq!(scope_from_wire(scope_to_wire(scope)), Some(scope));
    }
    assert_eq!(scope_to_wire(Scope::NodeLocal), endpoint_scope::NODE_LOCAL);
    assert_eq!(scope_from_wire(7), None);
    let none = FrontendPolicy::default();
    assert_eq!(policy_flags(none), 0);
    for (policy, flag) in [
        (
            FrontendPolicy {
                masquerade_all: true,
                ..none
            },
            service_flags::MASQUERADE_ALL,
        ),
        (
            FrontendPolicy {
                local_external: true,
                ..none
            },
            service_flags::LOCAL_EXTERNAL,
        ),
        (
            FrontendPolicy {
                source_ranges: true,
                ..none
            },
            service_flags::SOURCE_RANGES,
        ),
        (
            FrontendPolicy {
                reject: true,
                ..none
            },
            service_flags::REJECT,
        ),
    ] {
        assert_eq!(policy_flags(policy), flag, "{policy:?}");
    }
}

#[test]
fn a_set_named_with_an_unknown_scope_is_removed() {
    let mut maps = FakeMaps::default();
    maps.names.insert(9, encode_name(&port_name("nginx"), 7));
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
    reconciler.maps.assert_consistent();
    assert!(!reconciler.maps.names.contains_key(&9));
}

#[test]
fn a_frontend_moving_to_another_port_of_the_service_stays_programmed() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    let mut first = Desired::default();
    first
        .ports
        .insert(named_port("web"), Arc::new(cluster_port(80, &[6])));
    reconciler.reconcile(&first);
    // "http" (sorted before "web") takes port 80; "web" moves to 8080.
    let next = two_ports(("http", 80), ("web", 8080));
    reconciler.reconcile(&next);
    reconciler.maps.assert_consistent();
    assert_eq!(
        reconciler.maps.endpoints_of(80),
        [6].into(),
        "80 now leads to http's endpoint"
    );
    assert_eq!(reconciler.maps.endpoints_of(8080), [7].into());
    assert!(reconciler.reconcile(&next).is_empty(), "and stays that way");
}

fn value(id: u32, count: u32) -> ServiceValue {
    ServiceValue {
        id,
        count,
        ..ServiceValue::default()
    }
}

#[test]
fn duplicated_slots_left_by_a_killed_agent_do_not_hide_a_missing_endpoint() {
    let mut maps = FakeMaps::default();
    maps.names
        .insert(1, encode_name(&port_name("nginx"), endpoint_scope::CLUSTER));
    for (slot, last) in [(0u32, 6u8), (1, 7), (2, 7)] {
        maps.endpoints.insert(
            EndpointKey {
                service_id: 1,
                slot,
            },
            endpoint(last),
        );
    }
    maps.frontends.insert(frontend(4432), value(1, 3));
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
    reconciler.maps.assert_consistent();
}

#[test]
fn an_adopted_count_beyond_the_slots_is_lowered_even_when_the_map_is_full() {
    let mut maps = FakeMaps {
        max_endpoints: Some(2),
        ..FakeMaps::default()
    };
    maps.names
        .insert(1, encode_name(&port_name("nginx"), endpoint_scope::CLUSTER));
    // The slot map was recreated empty under a frontend that still says 3.
    maps.frontends.insert(frontend(4432), value(1, 3));
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    assert_eq!(
        report.failed.len(),
        1,
        "three endpoints do not fit two slots"
    );
    reconciler.maps.assert_consistent();
}

#[test]
fn an_id_freed_in_a_pass_is_not_reused_in_the_same_pass() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("a", 1, &[1])]));
    reconciler.reconcile(&desired(&[("b", 2, &[2])]));
    assert_eq!(
        reconciler.maps.frontends[&frontend(2)].id,
        2,
        "id 1 was released in this pass"
    );
    reconciler.reconcile(&desired(&[("b", 2, &[2]), ("c", 3, &[3])]));
    assert_eq!(
        reconciler.maps.frontends[&frontend(3)].id,
        1,
        "and is reused in the next"
    );
}

#[test]
fn members_come_before_their_subnets_and_go_after_them() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    let report = reconciler.reconcile(&overlay(&[("172.30.44.0/24", 2)]));
    assert_eq!(report.node_changes, 2);
    let ip = Ipv4Addr::new(192, 168, 50, 2);
    let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
    assert_eq!(
        reconciler.maps.ops,
        vec![Op::SetVtep(ip), Op::SetSubnet(subnet)]
    );
    reconciler.maps.ops.clear();
    assert!(
        reconciler
            .reconcile(&overlay(&[("172.30.44.0/24", 2)]))
            .is_empty()
    );
    reconciler.reconcile(&overlay(&[]));
    assert_eq!(
        reconciler.maps.ops,
        vec![Op::RemoveSubnet(subnet), Op::RemoveVtep(ip)]
    );
    assert!(reconciler.maps.subnets.is_empty() && reconciler.maps.vteps.is_empty());
}

#[test]
fn a_lease_that_moves_to_another_node_is_rewritten_in_place() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&overlay(&[("172.30.44.0/24", 2)]));
    reconciler.maps.ops.clear();
    reconciler.reconcile(&overlay(&[("172.30.44.0/24", 3)]));
    let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::SetVtep(Ipv4Addr::new(192, 168, 50, 3)),
            Op::SetSubnet(subnet),
            Op::RemoveVtep(Ipv4Addr::new(192, 168, 50, 2))
        ]
    );
    assert_eq!(
        reconciler.maps.subnets[&subnet].public_ip,
        [192, 168, 50, 3]
    );
}

#[test]
fn a_new_service_writes_name_then_slots_and_members_then_frontend() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    assert_eq!(report.added, vec![port_name("nginx")]);
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::SetName(1),
            Op::SetEndpoint(1, 0),
            Op::SetMember(1, 6),
            Op::SetEndpoint(1, 1),
            Op::SetMember(1, 7),
            Op::SetEndpoint(1, 2),
            Op::SetMember(1, 8),
            Op::SetFrontend(4432, 3)
        ]
    );
    reconciler.maps.assert_consistent();
    assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
}

#[test]
fn an_unchanged_pass_writes_nothing() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    let state = local_external(&[6], &[6, 7]);
    reconciler.reconcile(&state);
    reconciler.maps.ops.clear();
    assert!(reconciler.reconcile(&state).is_empty());
    assert!(reconciler.maps.ops.is_empty());
}

#[test]
fn shrinking_drops_membership_first_and_lowers_the_count_before_deleting_slots() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    reconciler.maps.ops.clear();
    let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 8])]));
    assert_eq!(report.updated, vec![port_name("nginx")]);
    // .7 sat in slot 1: .8 moves there from the end, then the count drops, then slot 2 goes.
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::RemoveMember(1, 7),
            Op::SetEndpoint(1, 1),
            Op::SetMember(1, 8),
            Op::SetFrontend(4432, 2),
            Op::RemoveEndpoint(1, 2)
        ]
    );
    reconciler.maps.assert_consistent();
    assert_eq!(reconciler.maps.endpoints_of(4432), [6, 8].into());
}

#[test]
fn replacing_an_endpoint_rewrites_only_its_slot() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    reconciler.maps.ops.clear();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 8, 9])]));
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::RemoveMember(1, 7),
            Op::SetEndpoint(1, 1),
            Op::SetMember(1, 9)
        ]
    );
    assert_eq!(reconciler.maps.endpoints_of(4432), [6, 8, 9].into());
}

#[test]
fn growing_writes_slots_before_raising_the_count() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
    reconciler.maps.ops.clear();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::SetEndpoint(1, 1),
            Op::SetMember(1, 7),
            Op::SetEndpoint(1, 2),
            Op::SetMember(1, 8),
            Op::SetFrontend(4432, 3)
        ]
    );
}

#[test]
fn removal_goes_frontends_members_slots_name_and_frees_the_id() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7])]));
    reconciler.maps.ops.clear();
    let report = reconciler.reconcile(&desired(&[]));
    assert_eq!(report.removed, vec![port_name("nginx")]);
    assert_eq!(
        reconciler.maps.ops,
        vec![
            Op::RemoveFrontend(4432),
            Op::RemoveMember(1, 6),
            Op::RemoveMember(1, 7),
            Op::RemoveEndpoint(1, 1),
            Op::RemoveEndpoint(1, 0),
            Op::RemoveName(1)
        ]
    );
    assert!(reconciler.maps.frontends.is_empty() && reconciler.maps.endpoints.is_empty());
    assert!(reconciler.maps.members.is_empty() && reconciler.maps.names.is_empty());
    reconciler.reconcile(&desired(&[("other", 80, &[9])]));
    assert_eq!(
        reconciler.maps.frontends[&frontend(80)].id,
        1,
        "id 1 is reused"
    );
}

#[test]
fn no_endpoints_still_programs_the_frontend_with_count_zero() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[])]));
    assert_eq!(reconciler.maps.frontends[&frontend(4432)].count, 0);
}

#[test]
fn a_full_map_fails_one_service_and_keeps_the_others() {
    let maps = FakeMaps {
        max_endpoints: Some(4),
        ..FakeMaps::default()
    };
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let report = reconciler.reconcile(&desired(&[
        ("a", 1, &[1, 2]),
        ("b", 2, &[3, 4, 5]),
        ("c", 3, &[6]),
    ]));
    assert_eq!(report.added, vec![port_name("a"), port_name("c")]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, port_name("b"));
    assert!(matches!(report.failed[0].1, MapWriteError::Full { .. }));
    reconciler.maps.assert_consistent();
    assert!(
        !reconciler.maps.frontends.contains_key(&frontend(2)),
        "b is not half there"
    );
    assert_eq!(reconciler.maps.endpoints_of(1), [1, 2].into());
    assert_eq!(reconciler.maps.endpoints_of(3), [6].into());
    // Once space frees up, the next pass programs it.
    let report = reconciler.reconcile(&desired(&[("b", 2, &[3, 4, 5]), ("c", 3, &[6])]));
    assert_eq!(report.added, vec![port_name("b")]);
    assert_eq!(reconciler.maps.endpoints_of(2), [3, 4, 5].into());
}

#[test]
fn pod_namespaces_follow_the_desired_state_and_survive_a_restart() {
    let pod = |last: u8| Ipv4Addr::new(172, 30, 20, last);
    let mut state = Desired {
        pod_namespaces: [(11, pod(2)), (12, pod(3))].into(),
        ..Desired::default()
    };
    let mut first = Reconciler::adopt(FakeMaps::default()).unwrap();
    assert_eq!(first.reconcile(&state).node_changes, 2);
    assert_eq!(first.maps.pod_namespaces, state.pod_namespaces);
    // A pod gone, one whose namespace got another address, a new one.
    state.pod_namespaces = [(12, pod(4)), (13, pod(5))].into();
    first.maps.ops.clear();
    first.reconcile(&state);
    assert_eq!(
        first.maps.ops,
        [
            Op::RemovePodNamespace(11),
            Op::SetPodNamespace(12),
            Op::SetPodNamespace(13)
        ]
    );
    assert_eq!(first.maps.pod_namespaces, state.pod_namespaces);
    let mut maps = first.maps;
    maps.ops.clear();
    let mut second = Reconciler::adopt(maps).unwrap();
    assert!(second.reconcile(&state).is_empty());
    assert!(second.maps.ops.is_empty());
}

#[test]
fn a_restarted_agent_adopts_the_maps_and_rewrites_nothing() {
    let mut first = Reconciler::adopt(FakeMaps::default()).unwrap();
    let mut state = local_external(&[1], &[1, 2]);
    state.ports.extend(desired(&[("b", 2, &[3])]).ports);
    first.reconcile(&state);
    let mut maps = first.maps;
    maps.ops.clear();
    let mut second = Reconciler::adopt(maps).unwrap();
    assert!(second.reconcile(&state).is_empty());
    assert!(second.maps.ops.is_empty());
    // New ids do not collide with adopted ones.
    state.ports.extend(desired(&[("c", 3, &[4])]).ports);
    second.reconcile(&state);
    assert_eq!(second.maps.frontends[&frontend(3)].id, 4);
}

#[test]
fn adopting_removes_entries_without_names_and_fills_slot_gaps() {
    let mut maps = FakeMaps::default();
    // id 7: a frontend and one slot, but no name (an agent killed mid-removal).
    maps.frontends.insert(frontend(9), value(7, 1));
    maps.endpoints.insert(
        EndpointKey {
            service_id: 7,
            slot: 0,
        },
        endpoint(1),
    );
    // id 2: named, slot 1 missing (killed mid-write).
    maps.names
        .insert(2, encode_name(&port_name("a"), endpoint_scope::CLUSTER));
    maps.endpoints.insert(
        EndpointKey {
            service_id: 2,
            slot: 0,
        },
        endpoint(1),
    );
    maps.endpoints.insert(
        EndpointKey {
            service_id: 2,
            slot: 2,
        },
        endpoint(3),
    );
    maps.frontends.insert(frontend(1), value(2, 1));
    let mut reconciler = Reconciler::adopt(maps).unwrap();
    let report = reconciler.reconcile(&desired(&[("a", 1, &[1, 2, 3])]));
    assert_eq!(report.updated, vec![port_name("a")]);
    assert_eq!(report.removed.len(), 1);
    reconciler.maps.assert_consistent();
    assert_eq!(reconciler.maps.endpoints_of(1), [1, 2, 3].into());
    assert!(!reconciler.maps.frontends.contains_key(&frontend(9)));
    assert!(!reconciler.maps.endpoints.keys().any(|k| k.service_id == 7));
}

#[test]
fn a_local_external_frontend_names_both_sets() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&local_external(&[6], &[6, 7, 8]));
    reconciler.maps.assert_consistent();
    let node_port = reconciler.maps.frontends[&frontend(30080)];
    assert_eq!(
        reconciler.maps.slots(node_port.id, node_port.count),
        [6].into()
    );
    assert_eq!(
        reconciler
            .maps
            .slots(node_port.cluster_id, node_port.cluster_count),
        [6, 7, 8].into()
    );
    assert_eq!(node_port.flags, service_flags::LOCAL_EXTERNAL);
    assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
    assert_eq!(reconciler.programmed().endpoint_slots, 4);
}

#[test]
fn a_set_no_frontend_uses_goes_after_the_frontends_stop_naming_it() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    reconciler.reconcile(&local_external(&[6], &[6, 7]));
    let local_id = reconciler.maps.frontends[&frontend(30080)].id;
    reconciler.maps.ops.clear();
    // The policy goes back to Cluster: the NodePort uses the cluster set.
    let mut cluster = desired(&[("nginx", 4432, &[6, 7])]);
    let port = Arc::make_mut(cluster.ports.get_mut(&port_name("nginx")).unwrap());
    port.frontends.insert(
        frontend(30080),
        FrontendSpec {
            scope: CLUSTER,
            policy: FrontendPolicy {
                masquerade_all: true,
                ..FrontendPolicy::default()
            },
            affinity_timeout_s: 0,
        },
    );
    reconciler.reconcile(&cluster);
    reconciler.maps.assert_consistent();
    let ops = &reconciler.maps.ops;
    let rewritten = ops
        .iter()
        .position(|op| *op == Op::SetFrontend(30080, 2))
        .expect("the NodePort is rewritten");
    let name_gone = ops
        .iter()
        .position(|op| *op == Op::RemoveName(local_id))
        .expect("the local set is removed");
    assert!(rewritten < name_gone, "{ops:?}");
    assert!(!reconciler.maps.names.contains_key(&local_id));
}

#[test]
fn source_ranges_are_written_before_their_frontend_and_removed_after() {
    let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
    let range: Ipv4Net = "198.51.100.0/24".parse().unwrap();
    let mut state = desired(&[("nginx", 4432, &[6])]);
    let port = Arc::make_mut(state.ports.get_mut(&port_name("nginx")).unwrap());
    port.frontends.insert(
        frontend(443),
        FrontendSpec {
            scope: CLUSTER,
            policy: FrontendPolicy {
                masquerade_all: true,
                source_ranges: true,
                ..FrontendPolicy::default()
            },
            affinity_timeout_s: 30,
        },
    );
    port.source_ranges.insert(frontend(443), [range].into());
    reconciler.reconcile(&state);
    reconciler.maps.assert_consistent();
    let ops = &reconciler.maps.ops;
    let range_at = ops.iter().position(|op| *op == Op::SetRange(443, range));
    let frontend_at = ops.iter().position(|op| *op == Op::SetFrontend(443, 1));
    assert!(range_at < frontend_at, "{ops:?}");
    assert_eq!(
        reconciler.maps.frontends[&frontend(443)].affinity_timeout_s,
        30
    );
    reconciler.maps.ops.clear();
    reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
    assert_eq!(
        reconciler.maps.ops,
        vec![Op::RemoveFrontend(443), Op::RemoveRange(443, range)]
    );
    assert!(reconciler.maps.ranges.is_empty());
}

/// The maps' content, ids aside: what each frontend leads to.
fn served(maps: &FakeMaps) -> BTreeMap<ServiceKey, (Vec<u8>, Vec<u8>, u16)> {
    maps.frontends
        .iter()
        .map(|(key, value)| {
            let set = |id: u32, count: u32| maps.slots(id, count).into_iter().collect();
            (
                *key,
                (
                    set(value.id, value.count),
                    set(value.cluster_id, value.cluster_count),
                    value.flags,
                ),
            )
        })
        .collect()
}

#[test]
fn passes_over_what_changed_reach_what_full_passes_reach() {
    use crate::{
        model::Model,
        sources::objects::{ServicePort, ServiceSpec, SliceEndpoint, SlicePort, SliceSpec},
    };
    let name = |i: u32| ObjectRef {
        namespace: "default".into(),
        name: format!("svc-{i}"),
    };
    let mut model = Model::default();
    let mut incremental = Reconciler::adopt(FakeMaps::default()).unwrap();
    let mut full = Reconciler::adopt(FakeMaps::default()).unwrap();
    // A fixed pseudo-random walk over services, slices, shared frontends and node facts.
    let mut seed = 0x2545_f491_u32;
    let mut next = |n: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed % n
    };
    for step in 0..400 {
        let i = next(12);
        match next(5) {
            0 | 1 => {
                // Services 0..12 share four ClusterIPs, so frontends are contested.
                let spec = ServiceSpec {
                    cluster_ip: Ipv4Addr::new(10, 254, 0, (i % 4) as u8 + 1),
                    ports: vec![ServicePort {
                        name: String::new(),
                        port: 80 + next(2) as u16,
                        protocol: 6,
                        node_port: (next(2) == 0).then_some(30_000 + i as u16),
                    }],
                    external_local: next(2) == 0,
                    ..ServiceSpec::default()
                };
                model.set_service(name(i), spec);
            }
            2 => {
                model.remove_service(&name(i));
            }
            3 => {
                let endpoints = (0..next(4))
                    .map(|e| SliceEndpoint {
                        addr: Ipv4Addr::new(172, 30, 20, (e + next(3)) as u8 + 2),
                        node_name: Some(if next(2) == 0 { "a" } else { "b" }.into()),
                        ..SliceEndpoint::default()
                    })
                    .collect();
                model.set_slice(
                    ObjectRef {
                        namespace: "default".into(),
                        name: format!("slice-{}", next(20)),
                    },
                    SliceSpec {
                        service: name(i),
                        ports: vec![SlicePort {
                            name: String::new(),
                            port: 8080,
                            protocol: 6,
                        }],
                        endpoints,
                        trigger_time: None,
                    },
                );
            }
            _ => {
                model.update_node(|node| {
                    node.name = Some("a".into());
                    node.node_port_addresses =
                        [Ipv4Addr::new(192, 168, 50, next(2) as u8 + 1)].into();
                });
            }
        }
        let crate::model::Changes {
            desired, changed, ..
        } = model.take_changes();
        incremental.reconcile_changes(&desired, &changed);
        full.reconcile(&desired);
        incremental.maps.assert_consistent();
        assert_eq!(
            served(&incremental.maps),
            served(&full.maps),
            "after step {step}"
        );
    }
}

#[test]
fn layout_keeps_stayers_fills_holes_and_compacts() {
    let e = |last: u8| Some(endpoint(last));
    let want = |lasts: &[u8]| lasts.iter().map(|l| endpoint(*l)).collect::<BTreeSet<_>>();
    let lasts = |layout: Vec<EndpointValue>| layout.iter().map(|e| e.addr[3]).collect::<Vec<_>>();
    assert_eq!(
        lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[1, 3, 4]))),
        vec![1, 4, 3]
    );
    assert_eq!(
        lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[1, 3]))),
        vec![1, 3]
    );
    assert_eq!(
        lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[3]))),
        vec![3]
    );
    assert_eq!(
        lasts(plan_layout(&[e(1), None, e(3)], &want(&[1, 3]))),
        vec![1, 3]
    );
    assert_eq!(lasts(plan_layout(&[e(2), e(2)], &want(&[2]))), vec![2]);
    assert_eq!(lasts(plan_layout(&[], &want(&[5, 6]))), vec![5, 6]);
    assert!(plan_layout(&[e(1)], &want(&[])).is_empty());
}
