//! Pods on a CNI other than a bridge: a node set up as the ptp plugin (or Calico) sets one up,
//! each pod behind its own routed veth and no `cni0`, gets its ClusterIPs served at `connect()`
//! and `sendmsg()` by the socket hooks, and its NodePorts from outside by the uplink's
//! programs.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use ipnet::Ipv4Net;
use weft_tests::{
    apps::{http_get, serve_http, serve_udp, udp_request},
    cluster::{Agent, AgentOptions, BRIDGE, Node, Pod},
    netns::{Netns, require_root, unique},
    seed::{endpoint_slice, service},
    within,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UPLINK_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

#[test]
fn a_ptp_cni_node_serves_its_pods_cluster_ips_at_connect_without_a_bridge() {
    require_root();
    let subnet: Ipv4Net = "10.244.7.0/24".parse().unwrap();
    let node = Node::routed(&unique("wptp"), subnet);
    // A client outside the node, on its uplink.
    let outside = Netns::create(&unique("wptpo")).expect("the outside namespace");
    node.ns
        .add_veth("eth0", &outside, "eth0")
        .expect("the uplink");
    for (ns, address) in [(&node.ns, "192.0.2.1/24"), (&outside, "192.0.2.2/24")] {
        ns.ip(&["addr", "add", address, "dev", "eth0"])
            .expect("addressing the uplink");
        ns.ip(&["link", "set", "eth0", "up"]).expect("uplink up");
    }
    let backends: Vec<Pod> = [11, 12]
        .map(|host| node.add_routed_pod(Ipv4Addr::new(10, 244, 7, host)))
        .into();
    let _servers: Vec<_> = backends
        .iter()
        .flat_map(|pod| [serve_http(&pod.ns, 8080), serve_udp(&pod.ns, 5353)])
        .collect();
    let client = node.add_routed_pod(Ipv4Addr::new(10, 244, 7, 20));
    let addresses: Vec<Ipv4Addr> = backends.iter().map(|pod| pod.addr).collect();
    let web = format!(
        "{}---\n{}",
        service("web", VIP, 80, "TCP", 8080),
        endpoint_slice("web", "TCP", 8080, &addresses)
    );
    let web_node_port = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-np, namespace: default}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  \
         ports: [{{port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]\n---\n{}",
        endpoint_slice("web-np", "TCP", 8080, &addresses)
    );
    let dns = format!(
        "{}---\n{}",
        service("dns", VIP, 53, "UDP", 5353),
        endpoint_slice("dns", "UDP", 5353, &addresses)
    );
    let agent = Agent::start(
        &node,
        &[
            ("web.yaml", &web),
            ("dns.yaml", &dns),
            ("np.yaml", &web_node_port),
        ],
        &AgentOptions {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            extra_args: vec!["--iface=eth0".into()],
            ..AgentOptions::default()
        },
    );
    assert!(
        node.ns.ip(&["link", "show", BRIDGE]).is_err(),
        "the agent made a bridge on a node whose CNI has none"
    );

    let web_vip = SocketAddrV4::new(VIP, 80);
    within(
        Duration::from_secs(5),
        "the client pod's namespace is found and its connections translated",
        || client.ns.run(|| http_get(web_vip)).is_ok(),
    );
    assert!(client.translated_at_connect(web_vip));
    let mut served = BTreeSet::new();
    for _ in 0..20 {
        let answer = client
            .ns
            .run(|| http_get(web_vip))
            .expect("TCP to the ClusterIP");
        assert_eq!(*answer.client_seen.ip(), client.addr, "no masquerade");
        served.insert(answer.server);
    }
    assert_eq!(
        served,
        addresses.iter().copied().collect(),
        "both backends serve"
    );

    let (answer, from) = client
        .ns
        .run(|| udp_request(SocketAddrV4::new(VIP, 53)))
        .expect("UDP to the ClusterIP");
    assert!(addresses.contains(&answer.server));
    assert_eq!(
        from,
        SocketAddr::V4(SocketAddrV4::new(VIP, 53)),
        "the reply comes from the ClusterIP, as the pod asked"
    );
    // From outside, through the uplink's programs: the node routes to the pods' veths and the
    // replies come back through it, masqueraded (externalTrafficPolicy Cluster).
    let node_port = SocketAddrV4::new(UPLINK_ADDRESS, 30080);
    let answers: Vec<_> = outside.run(|| {
        (0..10)
            .map(|_| http_get(node_port).expect("the NodePort from outside"))
            .collect()
    });
    assert_eq!(
        answers.iter().map(|a| a.server).collect::<BTreeSet<_>>(),
        addresses.iter().copied().collect()
    );
    assert!(
        answers
            .iter()
            .all(|a| *a.client_seen.ip() == node.gateway()),
        "masqueraded to the node: {answers:?}"
    );
    drop(agent);
}
