//! flannel's kube subnet manager mode (`--kube-subnet-mgr`, kube-flannel.yml's default): no
//! etcd, the Node objects in the (test) API server are the only state. Two weft nodes and a node
//! set up exactly as flanneld sets one up in this mode find each other through their Nodes'
//! annotations, traffic crosses both ways, and the annotations weft writes are flannel's.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use weft_tests::{
    apiserver::{ApiServer, Kind},
    apps::{http_get, serve_http, serve_udp, udp_request},
    cluster::{Agent, AgentOptions, Node},
    netns::{require_root, unique},
    overlay::{
        FlannelNode, POD_HTTP_PORT as HTTP_PORT, POD_UDP_PORT as UDP_PORT, Underlay,
        cluster_network, node_address, node_on,
    },
    within,
};

const PREFIX: &str = "flannel.alpha.coreos.com";

/// kube-flannel.yml's `net-conf.json`, on the test cluster's Network.
fn kube_flannel_net_conf() -> String {
    format!(
        r#"{{
  "Network": "{}",
  "EnableNFTables": false,
  "Backend": {{
    "Type": "vxlan"
  }}
}}"#,
        cluster_network()
    )
}

fn pod_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(172, 30, 10 + n, 0), 24).expect("a /24")
}

/// A registered Node with its podCIDR allocated, Ready, and `NetworkUnavailable` as a cloud
/// route controller leaves it until the network plugin says otherwise.
fn registered_node(name: &str, cidr: Ipv4Net, annotations: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "annotations": annotations},
           "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]},
           "status": {"conditions": [
               {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"},
               {"type": "Ready", "status": "True", "reason": "KubeletReady"}]}})
}

/// The annotations flanneld (vxlan) writes on its Node.
fn flannel_annotations(flannel: &FlannelNode) -> BTreeMap<String, String> {
    [
        ("backend-data", flannel.backend_data()),
        ("backend-type", "vxlan".to_owned()),
        ("kube-subnet-manager", "true".to_owned()),
        ("public-ip", flannel.public_ip.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("{PREFIX}/{key}"), value))
    .collect()
}

fn annotations_of(api: &ApiServer, name: &str) -> BTreeMap<String, String> {
    let node = api.get(Kind::Node, "", name).expect("the Node");
    serde_json::from_value(node["metadata"]["annotations"].clone()).unwrap_or_default()
}

fn condition(api: &ApiServer, name: &str, kind: &str) -> Value {
    let node = api.get(Kind::Node, "", name).expect("the Node");
    node["status"]["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == kind))
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn weft_nodes_and_a_flannel_node_share_the_overlay_through_node_annotations_alone() {
    require_root();
    let api = ApiServer::new();
    let underlay = Underlay::new(&unique("wksm"));
    let dir = tempfile::tempdir().expect("a directory for net-conf.json");
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, kube_flannel_net_conf()).expect("writing net-conf.json");

    // The flannel node: its devices as flanneld makes them, its lease in its Node's annotations.
    let flannel = FlannelNode::set_up(
        &format!("{}f", underlay.ns.name()),
        &underlay,
        node_address(3),
        pod_cidr(3),
    );
    let flannel_name = flannel.node.ns.name().to_owned();
    api.apply(registered_node(
        &flannel_name,
        pod_cidr(3),
        &flannel_annotations(&flannel),
    ));

    let nodes: Vec<Node> = (1..=2).map(|n| node_on(&underlay, n)).collect();
    let mut agents = Vec::new();
    for (n, node) in (1u8..).zip(&nodes) {
        node.set_subnet(pod_cidr(n));
        // kubelet's own annotation, which must survive weft's patches.
        let kubelet = BTreeMap::from([("node.alpha.kubernetes.io/ttl".to_owned(), "0".to_owned())]);
        api.apply(registered_node(node.ns.name(), pod_cidr(n), &kubelet));
        let state = tempfile::tempdir().expect("agent state");
        let options = AgentOptions {
            kubeconfig: Some(api.listen_in(&node.ns, state.path())),
            net_conf: Some(net_conf.clone()),
            ..AgentOptions::default()
        };
        agents.push((Agent::start(node, &[], &options), state));
    }

    // What weft wrote is what flanneld writes: the same keys, the same JSON, through the status
    // subresource (the fake refuses a patch of the Node itself, as weft's RBAC does).
    for (n, node) in (1u8..).zip(&nodes) {
        let written = annotations_of(&api, node.ns.name());
        assert_eq!(written["node.alpha.kubernetes.io/ttl"], "0");
        assert_eq!(written[&format!("{PREFIX}/kube-subnet-manager")], "true");
        assert_eq!(written[&format!("{PREFIX}/backend-type")], "vxlan");
        assert_eq!(
            written[&format!("{PREFIX}/public-ip")],
            node_address(n).to_string()
        );
        let data: Value = serde_json::from_str(&written[&format!("{PREFIX}/backend-data")])
            .expect("backend-data is JSON");
        assert_eq!(data["VNI"], 1);
        let vtep_mac = data["VtepMAC"].as_str().expect("a VtepMAC");
        assert_eq!(
            written[&format!("{PREFIX}/backend-data")],
            format!(r#"{{"VNI":1,"VtepMAC":"{vtep_mac}"}}"#),
            "byte for byte as flannel marshals it"
        );
        assert_eq!(written.len(), 5, "{written:?}");
        let unavailable = condition(&api, node.ns.name(), "NetworkUnavailable");
        assert_eq!(
            (&unavailable["status"], &unavailable["reason"]),
            (&json!("False"), &json!("WeftIsUp"))
        );
        assert_eq!(
            condition(&api, node.ns.name(), "Ready")["status"],
            "True",
            "the other conditions stay"
        );
        // The flannel node learns the weft node from its Node, as flanneld would.
        flannel.add_remote(pod_cidr(n), node_address(n), vtep_mac);
    }
    assert!(api.requests(Kind::Node, "patch") >= 4);

    for (n, (agent, _)) in (1u8..).zip(&agents) {
        within(
            Duration::from_secs(5),
            "every weft node routes both other nodes' subnets",
            || {
                let subnets = agent.inspect("subnets");
                [1, 2, 3]
                    .into_iter()
                    .filter(|other| *other != n)
                    .all(|other| subnets.contains(&pod_cidr(other).to_string()))
            },
        );
    }

    // Traffic, TCP and UDP, among all three nodes' pods.
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for node in nodes.iter().chain([&flannel.node]) {
        let pod = node.add_pod(node.pod_address(1));
        servers.push(serve_http(&pod.ns, HTTP_PORT));
        servers.push(serve_udp(&pod.ns, UDP_PORT));
        pods.push(pod);
    }
    for from in &pods {
        for to in &pods {
            if from.addr == to.addr {
                continue;
            }
            let (tcp, udp) = from.ns.run(|| {
                (
                    http_get(SocketAddrV4::new(to.addr, HTTP_PORT)),
                    udp_request(SocketAddrV4::new(to.addr, UDP_PORT)),
                )
            });
            let tcp = tcp.unwrap_or_else(|e| panic!("TCP {} -> {}: {e}", from.addr, to.addr));
            assert_eq!((tcp.server, *tcp.client_seen.ip()), (to.addr, from.addr));
            let (udp, _) = udp.unwrap_or_else(|e| panic!("UDP {} -> {}: {e}", from.addr, to.addr));
            assert_eq!(udp.server, to.addr);
        }
    }

    // Settled agents write nothing more: their own patches do not look like drift to them.
    let settled = api.requests(Kind::Node, "patch");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        api.requests(Kind::Node, "patch"),
        settled,
        "no patches once the leases are published"
    );

    // Annotations someone strips from a weft node's Node are written again.
    let first = nodes[0].ns.name();
    let mut stripped = api.get(Kind::Node, "", first).expect("the Node");
    stripped["metadata"]["annotations"] = json!({"node.alpha.kubernetes.io/ttl": "0"});
    api.apply(stripped);
    within(
        Duration::from_secs(10),
        "weft writes its stripped annotations again",
        || annotations_of(&api, first).contains_key(&format!("{PREFIX}/kube-subnet-manager")),
    );

    // A Node deleted from the cluster is no peer any more.
    api.delete(Kind::Node, "", &flannel_name);
    for (agent, _) in &agents {
        within(
            Duration::from_secs(5),
            "the deleted Node's route is withdrawn",
            || !agent.inspect("subnets").contains(&pod_cidr(3).to_string()),
        );
    }
    drop(servers);
}

/// kube-flannel's dual-stack `net-conf.json` is refused at start, saying why: flanneld with
/// `EnableIPv6` cannot read a Node without IPv6 annotations, which weft does not publish yet,
/// so serving the IPv4 half alone would cut this node off from flannel nodes altogether.
#[test]
fn a_dual_stack_net_conf_is_refused_at_start_saying_why() {
    let dir = tempfile::tempdir().expect("a directory for net-conf.json");
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(
        &net_conf,
        format!(
            r#"{{"Network":"{}","EnableIPv6":true,"IPv6Network":"fc00:30::/48","Backend":{{"Type":"vxlan"}}}}"#,
            cluster_network()
        ),
    )
    .expect("writing net-conf.json");
    let output = std::process::Command::new(weft_tests::cluster::weft_binary())
        .args(["agent", "--kube-subnet-mgr", "--hostname-override=n1"])
        .arg(format!("--net-config-path={}", net_conf.display()))
        .arg(format!(
            "--kubeconfig={}",
            dir.path().join("kubeconfig").display()
        ))
        .output()
        .expect("running weft agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("enables IPv6 (IPv6Network fc00:30::/48), which weft does not serve yet")
            && stderr.contains("Keep flanneld on dual-stack clusters"),
        "{stderr}"
    );
}
