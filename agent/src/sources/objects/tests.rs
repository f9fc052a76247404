use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;

pub(crate) fn service(json: serde_json::Value) -> Service {
    serde_json::from_value(json).expect("test Service parses")
}

pub(crate) fn slice(json: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json).expect("test EndpointSlice parses")
}

fn nginx() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "nginx", "namespace": "default"},
        "spec": {"clusterIP": "10.254.40.119",
                 "ports": [{"port": 4432, "targetPort": 80, "protocol": "TCP"}]}
    })
}

#[test]
fn seed_service_is_served() {
    let checked = check_service(&service(nginx())).unwrap();
    assert_eq!(
        checked,
        Checked::Serve(ServiceSpec {
            cluster_ip: Ipv4Addr::new(10, 254, 40, 119),
            ports: vec![ServicePort {
                name: String::new(),
                port: 4432,
                protocol: 6,
                node_port: None,
            }],
            ..ServiceSpec::default()
        })
    );
}

fn served(json: serde_json::Value) -> ServiceSpec {
    match check_service(&service(json)) {
        Ok(Checked::Serve(spec)) => spec,
        other => panic!("not served: {other:?}"),
    }
}

#[test]
fn a_load_balancer_carries_every_way_in() {
    let spec = served(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer", "clusterIP": "10.254.0.20",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                      {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
            "externalIPs": ["192.0.2.10", "2001:db8::1"],
            "loadBalancerSourceRanges": ["198.51.100.0/24", " 203.0.113.7/32 ", "nonsense"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "ClientIP"
        },
        "status": {"loadBalancer": {"ingress": [
            {"ip": "192.0.2.100"}, {"ip": "192.0.2.101", "ipMode": "Proxy"},
            {"hostname": "lb.example"}]}}
    }));
    assert_eq!(
        spec.ports.iter().map(|p| p.node_port).collect::<Vec<_>>(),
        vec![Some(30080), Some(30053)]
    );
    assert_eq!(spec.external_ips, vec![Ipv4Addr::new(192, 0, 2, 10)]);
    assert_eq!(spec.load_balancer_ips, vec![Ipv4Addr::new(192, 0, 2, 100)]);
    assert_eq!(
        spec.source_ranges,
        vec![
            "198.51.100.0/24".parse::<Ipv4Net>().unwrap(),
            "203.0.113.7/32".parse().unwrap()
        ]
    );
    assert_eq!(spec.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    assert!(spec.external_local && !spec.internal_local);
    assert_eq!(spec.health_check_node_port, Some(32000));
    assert!(spec.externally_accessible());
}

#[test]
fn node_ports_and_load_balancer_addresses_belong_to_their_types() {
    let spec = served(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.254.0.20",
                 "ports": [{"port": 80, "nodePort": 30080}],
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}}
    }));
    assert_eq!(spec.ports[0].node_port, None);
    assert!(spec.load_balancer_ips.is_empty());
    assert_eq!(spec.health_check_node_port, None);
    assert!(!spec.externally_accessible());
}

#[test]
fn affinity_timeouts_are_checked() {
    let with_timeout = |seconds: i64| {
        check_service(&service(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.254.0.20", "ports": [{"port": 80}],
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": seconds}}}
        })))
    };
    assert!(matches!(
        with_timeout(5),
        Ok(Checked::Serve(ServiceSpec {
            affinity_timeout_s: Some(5),
            ..
        }))
    ));
    assert_eq!(
        with_timeout(0).unwrap_err(),
        ObjectError::InvalidAffinityTimeout(0)
    );
    assert_eq!(
        with_timeout(86_401).unwrap_err().to_string(),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401 is not in 1-86400"
    );
}

#[test]
fn services_kube_proxy_ignores_are_ignored() {
    let mut headless = nginx();
    headless["spec"]["clusterIP"] = "None".into();
    let mut external = nginx();
    external["spec"]["type"] = "ExternalName".into();
    let mut other_proxy = nginx();
    other_proxy["metadata"]["labels"] =
        serde_json::json!({"service.kubernetes.io/service-proxy-name": "other"});
    let mut headless_label = nginx();
    headless_label["metadata"]["labels"] =
        serde_json::json!({"service.kubernetes.io/headless": ""});
    for json in [headless, external, other_proxy, headless_label] {
        assert!(matches!(
            check_service(&service(json)),
            Ok(Checked::Ignore(_))
        ));
    }
}

/// kube-proxy's IPv4 proxier takes a Service's IPv4 ClusterIP by family (`GetClusterIPByFamily`):
/// on a cluster whose first family is IPv6, a dual-stack Service's IPv4 address is its second.
#[test]
fn a_dual_stack_service_is_served_on_its_ipv4_cluster_ip_whichever_family_is_first() {
    let with = |families: &[&str], ips: &[&str]| {
        let mut json = nginx();
        json["spec"]["clusterIP"] = ips.first().copied().unwrap_or("").into();
        json["spec"]["clusterIPs"] = serde_json::json!(ips);
        json["spec"]["ipFamilies"] = serde_json::json!(families);
        json["spec"]["ipFamilyPolicy"] = "PreferDualStack".into();
        check_service(&service(json))
    };
    let cluster_ip = |checked: Result<Checked<ServiceSpec>, ObjectError>| match checked {
        Ok(Checked::Serve(spec)) => spec.cluster_ip,
        other => panic!("not served: {other:?}"),
    };
    let v4 = Ipv4Addr::new(10, 254, 40, 119);
    assert_eq!(
        cluster_ip(with(&["IPv6", "IPv4"], &["fd00:10:96::7", "10.254.40.119"])),
        v4
    );
    assert_eq!(
        cluster_ip(with(&["IPv4", "IPv6"], &["10.254.40.119", "fd00:10:96::7"])),
        v4
    );
    assert_eq!(cluster_ip(with(&["IPv4"], &["10.254.40.119"])), v4);
    let mut without_list = nginx();
    without_list["spec"]["ipFamilies"] = serde_json::json!(["IPv4"]);
    assert_eq!(
        cluster_ip(check_service(&service(without_list.clone()))),
        v4,
        "clusterIPs defaults to [clusterIP], as the API server defaults it"
    );
    without_list["spec"]["clusterIP"] = "fd00:10:96::7".into();
    assert_eq!(
        check_service(&service(without_list))
            .unwrap_err()
            .to_string(),
        "spec.clusterIP \"fd00:10:96::7\" is not an IPv4 address",
        "the error names the field the manifest has"
    );
    assert_eq!(
        cluster_ip(with(
            &["IPv4"],
            &["10.254.40.119", "10.254.40.120", "fd00:10:96::7"]
        )),
        v4,
        "entries beyond the families are not read"
    );
    // IPv6 only: nothing for an IPv4 dataplane, as for kube-proxy's IPv4 proxier.
    let ipv6_only = Ok(Checked::Ignore("IPv6 only (weft serves IPv4)"));
    assert_eq!(with(&["IPv6"], &["fd00:10:96::7"]), ipv6_only);
    let mut old_api = nginx();
    old_api["spec"]["clusterIP"] = "fd00:10:96::7".into();
    assert_eq!(check_service(&service(old_api)), ipv6_only);
    // Headless and unallocated are told before any family.
    assert_eq!(with(&["IPv4"], &["None"]), Ok(Checked::Ignore("headless")));
    assert_eq!(
        with(&["IPv4"], &[]),
        Ok(Checked::Ignore("no ClusterIP allocated"))
    );
    // A family that names an address of the other is refused, naming the entry.
    assert_eq!(
        with(&["IPv6", "IPv4"], &["fd00:10:96::7", "fd00:10:96::8"])
            .unwrap_err()
            .to_string(),
        "spec.clusterIPs[1] \"fd00:10:96::8\" is not an IPv4 address"
    );
    assert_eq!(
        with(&["IPv6", "IPv4"], &["fd00:10:96::7"]),
        Ok(Checked::Ignore(
            "no IPv4 ClusterIP allocated yet (spec.clusterIPs has no entry for IPv4)"
        ))
    );
}

#[test]
fn invalid_services_name_the_field() {
    let mut bad_ip = nginx();
    bad_ip["spec"]["clusterIP"] = "10.254.40".into();
    assert_eq!(
        check_service(&service(bad_ip)).unwrap_err().to_string(),
        "spec.clusterIP \"10.254.40\" is not an IP address"
    );
    let mut bad_port = nginx();
    bad_port["spec"]["ports"][0]["port"] = 70000.into();
    assert_eq!(
        check_service(&service(bad_port)).unwrap_err(),
        ObjectError::InvalidPort {
            index: 0,
            port: 70000
        }
    );
    let mut bad_protocol = nginx();
    bad_protocol["spec"]["ports"][0]["protocol"] = "ICMP".into();
    assert!(matches!(
        check_service(&service(bad_protocol)),
        Err(ObjectError::InvalidProtocol { index: 0, .. })
    ));
    let mut duplicate = nginx();
    duplicate["spec"]["ports"] = serde_json::json!([
        {"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]);
    assert!(matches!(
        check_service(&service(duplicate)),
        Err(ObjectError::DuplicatePort {
            index: 1,
            port: 80,
            ..
        })
    ));
    let mut unnamed = nginx();
    unnamed["spec"]["ports"] = serde_json::json!([{"name": "a", "port": 80}, {"port": 81}]);
    assert_eq!(
        check_service(&service(unnamed)).unwrap_err(),
        ObjectError::UnnamedPort { index: 1 }
    );
}

#[test]
fn endpoint_conditions_default_as_kube_proxy_reads_them() {
    let checked = check_endpoint_slice(&slice(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "nginx-abc", "namespace": "web",
                     "labels": {"kubernetes.io/service-name": "nginx"}},
        "addressType": "IPv4",
        "ports": [{"port": 80}, {"name": "all"}],
        "endpoints": [
            {"addresses": ["172.30.20.6"]},
            {"addresses": ["172.30.20.7"], "conditions": {"ready": false}},
            {"addresses": ["172.30.20.8"],
             "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]
    })))
    .unwrap();
    let Checked::Serve(spec) = checked else {
        panic!("slice ignored")
    };
    assert_eq!(
        spec.service,
        ObjectRef {
            namespace: "web".into(),
            name: "nginx".into()
        }
    );
    assert_eq!(
        spec.ports,
        vec![SlicePort {
            name: String::new(),
            port: 80,
            protocol: 6
        }]
    );
    let conditions: Vec<_> = spec
        .endpoints
        .iter()
        .map(|e| (e.ready, e.serving, e.terminating))
        .collect();
    assert!(spec.endpoints.iter().all(|e| e.node_name.is_none()));
    assert_eq!(
        conditions,
        vec![
            (true, true, false),
            (false, true, false),
            (false, true, true)
        ]
    );
}

#[test]
fn endpoint_nodes_and_hints_are_read() {
    let checked = check_endpoint_slice(&slice(serde_json::json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 8080}],
        "endpoints": [{"addresses": ["172.30.20.6"], "nodeName": "node-a",
                       "hints": {"forZones": [{"name": "zone-a"}],
                                 "forNodes": [{"name": "node-a"}]}}]
    })))
    .unwrap();
    let Checked::Serve(spec) = checked else {
        panic!("slice ignored")
    };
    let endpoint = &spec.endpoints[0];
    assert_eq!(endpoint.node_name.as_deref(), Some("node-a"));
    assert_eq!(endpoint.zone_hints, vec!["zone-a".to_owned()]);
    assert_eq!(endpoint.node_hints, vec!["node-a".to_owned()]);
}

#[test]
fn slices_without_a_service_or_ipv4_are_ignored_and_bad_addresses_rejected() {
    let base = serde_json::json!({
        "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "x"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["172.30.20.300"]}]
    });
    assert_eq!(
        check_endpoint_slice(&slice(base.clone())).unwrap_err(),
        ObjectError::InvalidAddress {
            index: 0,
            address: "172.30.20.300".into()
        }
    );
    let mut v6 = base.clone();
    v6["addressType"] = "IPv6".into();
    assert!(matches!(
        check_endpoint_slice(&slice(v6)),
        Ok(Checked::Ignore(_))
    ));
    let mut orphan = base;
    orphan["metadata"]["labels"] = serde_json::json!({});
    assert!(matches!(
        check_endpoint_slice(&slice(orphan)),
        Ok(Checked::Ignore(_))
    ));
}
