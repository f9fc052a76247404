//! `BPF_PROG_TEST_RUN` fixtures for kube-proxy's semantics beyond a plain ClusterIP: NodePorts
//! reached from outside (the uplink's TC ingress) and their replies restored on the way out
//! (its TC egress), `externalTrafficPolicy: Local`, `internalTrafficPolicy: Local`,
//! load-balancer source ranges, ClientIP session affinity and SCTP. Maps are filled by the
//! agent's own model and reconciler from manifests, as in `run.rs`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use weft_common::programs::{FROM_PODS, FROM_UPLINK, TO_POD, TO_UPLINK};
use weft_common::{MASQUERADE_MARK, drop_reason::DropReason};
use weft_tests::{
    harness::{Datapath, VERDICT_DROP, VERDICT_PASS},
    packet::{ACK, SYN, icmp_error, icmp_errors, parse, parse_icmp_error, sctp, tcp},
    seed::cluster_cidr,
};

const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 20);
/// This node's endpoint and another node's.
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(172, 30, 20, 6);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(172, 30, 44, 7);
const TARGET: u16 = 8080;

/// Service `web` (port 80 -> 8080, NodePort 30080) with `extra` lines in its spec (indented by
/// two spaces) and `status`, and an EndpointSlice with `endpoints` as (address, node).
fn web(kind: &str, extra: &str, status: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         type: {kind}\n  clusterIP: {CLUSTER_IP}\n  \
         ports: [{{port: 80, targetPort: {TARGET}, nodePort: 30080}}]\n{extra}{status}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, \
         labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: {TARGET}}}]\nendpoints:\n"
    );
    for (address, node) in endpoints {
        text.push_str(&format!(
            "- {{addresses: [\"{address}\"], nodeName: {node}}}\n"
        ));
    }
    text
}

fn both_nodes() -> Vec<(Ipv4Addr, &'static str)> {
    vec![(LOCAL_POD, "node-a"), (REMOTE_POD, "node-b")]
}

/// A datapath on node `node-a`, whose NodePorts listen on NODE_ADDRESS.
fn node_a(manifests: &str) -> Datapath {
    let mut datapath = Datapath::new(manifests, Some(cluster_cidr()));
    datapath.set_node(|node| {
        node.name = Some("node-a".into());
        node.node_port_addresses = [NODE_ADDRESS].into();
    });
    datapath
}

fn outside(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 100), port)
}

fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE_ADDRESS, 30080)
}

fn endpoint(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, TARGET)
}

/// Opens `count` connections from `client`'s address (ports from `first_port`) to `frontend`
/// through `program`, asserting each is translated with `mark`; returns the endpoints reached.
fn connect(
    datapath: &mut Datapath,
    program: &str,
    client: Ipv4Addr,
    first_port: u16,
    frontend: SocketAddrV4,
    count: u16,
    mark: u32,
) -> BTreeSet<SocketAddrV4> {
    (0..count)
        .map(|i| {
            let input = tcp(SocketAddrV4::new(client, first_port + i), frontend, SYN).build();
            let run = datapath.run(program, &input, 0);
            assert_eq!(run.verdict, VERDICT_PASS, "connection {i} to {frontend}");
            assert_eq!(run.mark, mark, "connection {i} to {frontend}: mark");
            let output = parse(&run.output);
            assert!(output.ip_checksum_ok && output.l4_checksum_ok);
            output.dst
        })
        .collect()
}

#[test]
fn a_node_port_from_outside_is_masqueraded_and_its_replies_restored_on_the_way_out() {
    let mut datapath = node_a(&web("NodePort", "", "", &both_nodes()));
    let reached = connect(
        &mut datapath,
        FROM_UPLINK,
        *outside(0).ip(),
        40000,
        node_port(),
        40,
        MASQUERADE_MARK,
    );
    assert_eq!(
        reached,
        [endpoint(LOCAL_POD), endpoint(REMOTE_POD)].into(),
        "externalTrafficPolicy Cluster spreads over every node's endpoints"
    );
    // The reply of the first connection leaves through the uplink with the NodePort as source.
    let client = outside(40000);
    let used = parse(
        &datapath
            .run(FROM_UPLINK, &tcp(client, node_port(), ACK).build(), 0)
            .output,
    )
    .dst;
    let reply = tcp(used, client, SYN | ACK).payload(b"hi").build();
    let run = datapath.run(TO_UPLINK, &reply, 0);
    assert_eq!(run.verdict, VERDICT_PASS);
    let restored = parse(&run.output);
    assert_eq!((restored.src, restored.dst), (node_port(), client));
    assert!(restored.ip_checksum_ok && restored.l4_checksum_ok);
    // Traffic the node merely routes is not touched on the way out.
    let routed = tcp(endpoint(LOCAL_POD), outside(9), ACK).build();
    assert_eq!(datapath.run(TO_UPLINK, &routed, 0).output, routed);
    // The ClusterIP reached from outside is masqueraded too (an off-cluster client).
    connect(
        &mut datapath,
        FROM_UPLINK,
        *outside(0).ip(),
        41000,
        SocketAddrV4::new(CLUSTER_IP, 80),
        1,
        MASQUERADE_MARK,
    );
    assert!(datapath.drops().is_empty());
}

#[test]
fn external_local_policy_keeps_outside_clients_on_this_node_with_their_address() {
    let local = "  externalTrafficPolicy: Local\n";
    let mut datapath = node_a(&web("NodePort", local, "", &both_nodes()));
    let from_outside = connect(
        &mut datapath,
        FROM_UPLINK,
        *outside(0).ip(),
        40000,
        node_port(),
        30,
        0,
    );
    assert_eq!(from_outside, [endpoint(LOCAL_POD)].into());
    // Pods (here and on other nodes) are short-circuited to every endpoint, as kube-proxy does.
    let another_nodes_pod = Ipv4Addr::new(172, 30, 44, 9);
    let from_pods = connect(
        &mut datapath,
        FROM_UPLINK,
        another_nodes_pod,
        40000,
        node_port(),
        40,
        0,
    );
    assert_eq!(
        from_pods,
        [endpoint(LOCAL_POD), endpoint(REMOTE_POD)].into()
    );
    let local_pod = Ipv4Addr::new(172, 30, 20, 9);
    let from_local_pods = connect(
        &mut datapath,
        FROM_PODS,
        local_pod,
        40000,
        node_port(),
        40,
        0,
    );
    assert_eq!(from_local_pods.len(), 2);
    // No endpoint here: outside clients are dropped (not rejected); pods still get through.
    datapath.set_manifests(&web("NodePort", local, "", &[(REMOTE_POD, "node-b")]));
    let run = datapath.run(
        FROM_UPLINK,
        &tcp(outside(45000), node_port(), SYN).build(),
        0,
    );
    assert_eq!(run.verdict, VERDICT_DROP);
    assert_eq!(datapath.drops(), [(DropReason::NoLocalEndpoints, 1)].into());
    let reached = connect(
        &mut datapath,
        FROM_PODS,
        local_pod,
        45000,
        node_port(),
        1,
        0,
    );
    assert_eq!(reached, [endpoint(REMOTE_POD)].into());
}

#[test]
fn internal_local_policy_confines_the_cluster_ip_to_this_nodes_endpoints() {
    let local = "  internalTrafficPolicy: Local\n";
    let mut datapath = node_a(&web("ClusterIP", local, "", &both_nodes()));
    let pod = Ipv4Addr::new(172, 30, 20, 9);
    let frontend = SocketAddrV4::new(CLUSTER_IP, 80);
    let reached = connect(&mut datapath, FROM_PODS, pod, 40000, frontend, 30, 0);
    assert_eq!(reached, [endpoint(LOCAL_POD)].into());
    datapath.set_manifests(&web("ClusterIP", local, "", &[(REMOTE_POD, "node-b")]));
    let run = datapath.run(
        FROM_PODS,
        &tcp(SocketAddrV4::new(pod, 41000), frontend, SYN).build(),
        0,
    );
    assert_eq!(run.verdict, VERDICT_DROP, "no local endpoint: dropped");
    assert_eq!(datapath.drops(), [(DropReason::NoLocalEndpoints, 1)].into());
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let load_balancer = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 100), 80);
    let ranges = "  loadBalancerSourceRanges: [192.168.50.0/28, 203.0.113.7/32]\n";
    let status = "status: {loadBalancer: {ingress: [{ip: 192.0.2.100}]}}\n";
    let mut datapath = node_a(&web("LoadBalancer", ranges, status, &both_nodes()));
    for (client, allowed) in [
        (Ipv4Addr::new(192, 168, 50, 10), true),
        (Ipv4Addr::new(203, 0, 113, 7), true),
        (Ipv4Addr::new(192, 168, 50, 100), false),
        (Ipv4Addr::new(203, 0, 113, 8), false),
    ] {
        let run = datapath.run(
            FROM_UPLINK,
            &tcp(SocketAddrV4::new(client, 40000), load_balancer, SYN).build(),
            0,
        );
        if allowed {
            assert_eq!(run.verdict, VERDICT_PASS, "{client}");
            assert_eq!(run.mark, MASQUERADE_MARK, "{client}");
        } else {
            assert_eq!(run.verdict, VERDICT_DROP, "{client}");
        }
    }
    assert_eq!(
        datapath.drops(),
        [(DropReason::SourceRangeDenied, 2)].into()
    );
    // The ranges guard the load balancer's address only, not the NodePort or the ClusterIP.
    connect(
        &mut datapath,
        FROM_UPLINK,
        Ipv4Addr::new(192, 168, 50, 100),
        41000,
        node_port(),
        1,
        MASQUERADE_MARK,
    );
}

#[test]
fn client_ip_affinity_holds_a_client_to_its_endpoint_until_the_timeout_or_its_departure() {
    let backends = [
        (Ipv4Addr::new(172, 30, 20, 6), "node-a"),
        (Ipv4Addr::new(172, 30, 20, 7), "node-a"),
        (Ipv4Addr::new(172, 30, 20, 8), "node-a"),
    ];
    let affinity = "  sessionAffinity: ClientIP\n  \
                    sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    let mut datapath = node_a(&web("ClusterIP", affinity, "", &backends));
    let frontend = SocketAddrV4::new(CLUSTER_IP, 80);
    let clients: Vec<Ipv4Addr> = (10..20).map(|i| Ipv4Addr::new(172, 30, 20, i)).collect();
    let held: Vec<SocketAddrV4> = clients
        .iter()
        .map(|client| {
            let reached = connect(&mut datapath, FROM_PODS, *client, 40000, frontend, 20, 0);
            assert_eq!(reached.len(), 1, "{client} is held to one endpoint");
            *reached.first().unwrap()
        })
        .collect();
    assert!(
        held.iter().collect::<BTreeSet<_>>().len() > 1,
        "different clients are spread: {held:?}"
    );
    // An endpoint that leaves releases its clients at once, to another endpoint they keep.
    let first = held[0];
    let remaining: Vec<_> = backends
        .iter()
        .copied()
        .filter(|(ip, _)| endpoint(*ip) != first)
        .collect();
    datapath.set_manifests(&web("ClusterIP", affinity, "", &remaining));
    let moved = connect(&mut datapath, FROM_PODS, clients[0], 41000, frontend, 20, 0);
    assert_eq!(moved.len(), 1);
    assert!(!moved.contains(&first));
    // After the timeout without a new connection, each client is picked afresh: all ten keeping
    // their endpoint has odds of (1/2)^10 or less.
    datapath.set_manifests(&web("ClusterIP", affinity, "", &backends));
    let before: Vec<_> = clients
        .iter()
        .map(|client| connect(&mut datapath, FROM_PODS, *client, 42000, frontend, 1, 0))
        .collect();
    std::thread::sleep(Duration::from_millis(1300));
    let after: Vec<_> = clients
        .iter()
        .map(|client| connect(&mut datapath, FROM_PODS, *client, 43000, frontend, 1, 0))
        .collect();
    assert_ne!(
        before, after,
        "no client was picked afresh after the timeout"
    );
}

#[test]
fn sctp_is_translated_with_its_crc32c_updated() {
    let manifests = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: amf, namespace: default}}\n\
         spec: {{clusterIP: {CLUSTER_IP}, ports: [{{port: 38412, targetPort: 38413, protocol: SCTP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: amf-1, namespace: default, \
         labels: {{kubernetes.io/service-name: amf}}}}\naddressType: IPv4\n\
         ports: [{{port: 38413, protocol: SCTP}}]\nendpoints: [{{addresses: [\"{LOCAL_POD}\"]}}]\n"
    );
    let mut datapath = Datapath::new(&manifests, Some(cluster_cidr()));
    let client = SocketAddrV4::new(Ipv4Addr::new(172, 30, 20, 9), 36412);
    let frontend = SocketAddrV4::new(CLUSTER_IP, 38412);
    let backend = SocketAddrV4::new(LOCAL_POD, 38413);
    // An INIT chunk (type 1) with some parameters, and a bigger DATA-like payload.
    for chunks in [vec![1, 0, 0, 20, 0xde, 0xad, 0xbe, 0xef], vec![0x5a; 1200]] {
        let input = sctp(client, frontend, &chunks).build();
        let run = datapath.run(FROM_PODS, &input, 0);
        assert_eq!(run.verdict, VERDICT_PASS);
        let output = parse(&run.output);
        assert_eq!((output.src, output.dst), (client, backend));
        assert!(output.ip_checksum_ok, "IPv4 checksum");
        assert!(output.l4_checksum_ok, "CRC32c after the port rewrite");
        assert_eq!(output.payload, chunks);
        let reply = sctp(backend, client, &chunks).build();
        let restored = parse(&datapath.run(TO_POD, &reply, 0).output);
        assert_eq!((restored.src, restored.dst), (frontend, client));
        assert!(restored.l4_checksum_ok, "CRC32c of the reply");
    }
    // A CRC left for the device to compute (0) is left alone.
    let mut unfinished = sctp(client, frontend, &[1, 0, 0, 4]).build();
    unfinished[14 + 20 + 8..14 + 20 + 12].fill(0);
    let run = datapath.run(FROM_PODS, &unfinished, 0);
    assert_eq!(run.output[14 + 20 + 8..14 + 20 + 12], [0; 4]);
    assert_eq!(parse(&run.output).dst, backend);
    assert!(datapath.drops().is_empty());
}

/// Path MTU discovery with a client outside: a router's "fragmentation needed" about a reply
/// reaches the endpoint quoting the endpoint, and the endpoint's errors about the client's
/// packets leave quoting the NodePort, from the node's address.
#[test]
fn icmp_errors_about_a_node_port_connection_are_translated_both_ways() {
    let mut datapath = node_a(&web("NodePort", "", "", &[(LOCAL_POD, "node-a")]));
    let client = outside(45000);
    let sent = tcp(client, node_port(), SYN).build();
    let translated = datapath.run(FROM_UPLINK, &sent, 0).output;
    assert_eq!(parse(&translated).dst, endpoint(LOCAL_POD));
    let (_, too_big) = icmp_errors()[0];
    let router = Ipv4Addr::new(192, 168, 50, 254);

    let reply = tcp(node_port(), client, SYN | ACK).build();
    let input = icmp_error(router, NODE_ADDRESS, too_big, &reply, usize::MAX);
    let run = datapath.run(FROM_UPLINK, &input, 0);
    assert_eq!(run.verdict, VERDICT_PASS);
    let error = parse_icmp_error(&run.output);
    assert_eq!((error.from, error.to), (router, LOCAL_POD));
    assert_eq!(
        (error.quoted_src, error.quoted_dst),
        (endpoint(LOCAL_POD), client)
    );
    let sent_reply = tcp(endpoint(LOCAL_POD), client, SYN | ACK).build();
    assert_eq!(
        error.quoted_l4_checksum,
        Some(parse(&sent_reply).l4_checksum)
    );
    assert!(error.ip_checksum_ok && error.icmp_checksum_ok && error.quoted_ip_checksum_ok);

    let (_, unreachable) = icmp_errors()[1];
    let input = icmp_error(
        LOCAL_POD,
        *client.ip(),
        unreachable,
        &translated,
        usize::MAX,
    );
    let run = datapath.run(TO_UPLINK, &input, 0);
    assert_eq!(run.verdict, VERDICT_PASS);
    let error = parse_icmp_error(&run.output);
    assert_eq!((error.from, error.to), (NODE_ADDRESS, *client.ip()));
    assert_eq!((error.quoted_src, error.quoted_dst), (client, node_port()));
    assert_eq!(error.quoted_l4_checksum, Some(parse(&sent).l4_checksum));
    assert!(error.ip_checksum_ok && error.icmp_checksum_ok && error.quoted_ip_checksum_ok);
    assert!(datapath.drops().is_empty(), "{:?}", datapath.drops());
}
