//! `weft trace` against running agents: probes built and run through each node's live programs
//! and maps, explained, and the conntrack entries they made taken back.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::Value;
use weft_tests::{
    apps::http_get,
    cluster::Agent,
    overlay::{Cluster, POD_HTTP_PORT, POD_UDP_PORT, cluster, node_address},
    seed::{endpoint_slice, service},
    within,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 254, 61, 10);
const SOLO: Ipv4Addr = Ipv4Addr::new(10, 254, 61, 11);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 254, 61, 12);

/// Two nodes of two pods. `web` (TCP 80, UDP 53) leads to one pod of node 1 and both of node 2;
/// `solo` leads to node 1's first pod only (the client of most probes); `empty` has no endpoints.
fn traced_cluster() -> Cluster {
    let cluster = cluster(2, 2);
    let web = [
        cluster.pods[0][1].addr,
        cluster.pods[1][0].addr,
        cluster.pods[1][1].addr,
    ];
    let manifest = [
        service("web", WEB, 80, "TCP", POD_HTTP_PORT),
        endpoint_slice("web", "TCP", POD_HTTP_PORT, &web),
        service("dns", WEB, 53, "UDP", POD_UDP_PORT),
        endpoint_slice("dns", "UDP", POD_UDP_PORT, &web),
        service("solo", SOLO, 80, "TCP", POD_HTTP_PORT),
        endpoint_slice("solo", "TCP", POD_HTTP_PORT, &[cluster.pods[0][0].addr]),
        service("empty", EMPTY, 80, "TCP", POD_HTTP_PORT),
        endpoint_slice("empty", "TCP", POD_HTTP_PORT, &[]),
    ]
    .join("---\n");
    for agent in &cluster.agents {
        agent.write_manifest("services.yaml", &manifest);
    }
    let client = &cluster.pods[0][0];
    within(
        std::time::Duration::from_secs(10),
        "the client reaches the service",
        || {
            client
                .ns
                .run(|| http_get(std::net::SocketAddrV4::new(WEB, 80)).is_ok())
        },
    );
    cluster
}

fn trace(agent: &Agent, from: Ipv4Addr, to: &str) -> Value {
    agent
        .trace(&[&format!("--from={from}"), &format!("--to={to}")])
        .unwrap_or_else(|e| panic!("weft trace --from {from} --to {to}: {e}"))
}

fn text(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {value:#}"))
        .to_owned()
}

/// The programs a trace ran, in order.
fn programs(report: &Value) -> Vec<String> {
    report["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|hop| text(hop, "program"))
        .collect()
}

/// The changes of the hop run by `program`.
/// The change of kind `kind` the hop of `program` made.
fn change<'a>(report: &'a Value, program: &str, kind: &str) -> &'a Value {
    changes(report, program)
        .iter()
        .find(|change| change["change"] == kind)
        .unwrap_or_else(|| panic!("no {kind} change by {program} in {report:#}"))
}

fn changes<'a>(report: &'a Value, program: &str) -> &'a Vec<Value> {
    report["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .find(|hop| hop["program"] == program)
        .unwrap_or_else(|| panic!("no {program} hop in {report:#}"))["changes"]
        .as_array()
        .expect("changes")
}

#[test]
fn a_probe_to_a_cluster_ip_names_the_service_the_backend_and_the_node_it_goes_to() {
    let cluster = traced_cluster();
    let node1 = &cluster.agents[0];
    let client = cluster.pods[0][0].addr;
    let local: BTreeSet<String> = [format!("{}:{POD_HTTP_PORT}", cluster.pods[0][1].addr)].into();
    let remote: BTreeSet<String> = cluster.pods[1]
        .iter()
        .map(|pod| format!("{}:{POD_HTTP_PORT}", pod.addr))
        .collect();
    let conntrack_before = node1.inspect("conntrack");
    let mut chosen = BTreeSet::new();
    for _ in 0..24 {
        let report = trace(node1, client, &format!("{WEB}:80/tcp"));
        assert!(
            text(&report, "service").starts_with("default/web"),
            "{report:#}"
        );
        assert!(
            text(&report, "entry").contains("tc_from_pods"),
            "{report:#}"
        );
        let dnat = change(&report, "tc_from_pods", "destination");
        assert_eq!(dnat["from"], format!("{WEB}:80"));
        let backend = text(dnat, "to");
        let result = text(&report, "result");
        if remote.contains(&backend) {
            // Translated and encapsulated at the pod's port, and sent to the uplink from there.
            assert_eq!(programs(&report), ["tc_from_pods"]);
            let encap = change(&report, "tc_from_pods", "encapsulated");
            assert_eq!(encap["outer_dst"], node_address(2).to_string());
            assert_eq!(encap["outer_src"], node_address(1).to_string());
            assert_eq!((&encap["port"], &encap["vni"]), (&8472.into(), &1.into()));
            assert_eq!(
                result,
                format!(
                    "sent to node {} over VXLAN, backend {backend}",
                    node_address(2)
                )
            );
        } else {
            assert!(local.contains(&backend), "{backend} is no endpoint");
            assert_eq!(programs(&report), ["tc_from_pods", "tc_to_pod"]);
            assert_eq!(result, format!("delivered to local pod {backend}"));
        }
        chosen.insert(backend);
    }
    // 24 probes leave no endpoint out but by a chance of 3 * (2/3)^24 (2e-4).
    assert_eq!(chosen.len(), 3, "{chosen:?}");
    assert_eq!(
        node1.inspect("conntrack"),
        conntrack_before,
        "the probes' conntrack entries are taken back"
    );

    let udp = trace(node1, client, &format!("{WEB}:53/udp"));
    assert!(text(&udp, "service").starts_with("default/dns"), "{udp:#}");
    change(&udp, "tc_from_pods", "destination");
}

#[test]
fn hairpin_no_endpoints_and_plain_pod_traffic_are_explained() {
    let cluster = traced_cluster();
    let node1 = &cluster.agents[0];
    let client = cluster.pods[0][0].addr;

    // The client is the service's only endpoint: the masquerade mark makes its reply come back
    // through the node.
    let hairpin = trace(node1, client, &format!("{SOLO}:80/tcp"));
    let marks: Vec<&Value> = changes(&hairpin, "tc_from_pods")
        .iter()
        .filter(|change| change["change"] == "mark")
        .collect();
    assert_eq!(marks.len(), 1, "{hairpin:#}");
    assert_eq!(marks[0]["set"], 0x4000);
    assert!(
        text(&hairpin, "result").ends_with("masqueraded to the node's address by nftables"),
        "{hairpin:#}"
    );

    // No endpoints: rejected in place with a reset, and counted.
    let empty = trace(node1, client, &format!("{EMPTY}:80/tcp"));
    assert!(
        text(&empty, "service").contains("connections are rejected"),
        "{empty:#}"
    );
    assert_eq!(programs(&empty), ["tc_from_pods"]);
    assert_eq!(
        text(&empty, "result"),
        "rejected: a TCP reset sent back to the client"
    );
    assert_eq!(
        empty["hops"][0]["drops"],
        serde_json::json!(["no_endpoints"])
    );

    // Straight to a pod of the other node: no service, no NAT, encapsulated to that node at
    // the pod's port.
    let target = cluster.pods[1][0].addr;
    let direct = trace(node1, client, &format!("{target}:{POD_HTTP_PORT}/tcp"));
    assert!(direct["service"].is_null(), "{direct:#}");
    let kinds: Vec<&Value> = changes(&direct, "tc_from_pods")
        .iter()
        .map(|change| &change["change"])
        .collect();
    assert_eq!(kinds, ["encapsulated"], "{direct:#}");
    assert_eq!(
        text(&direct, "result"),
        format!("sent to node {} over VXLAN", node_address(2))
    );

    // The same flow seen from the receiving node: VXLAN from node 1 taken apart and delivered
    // straight into the pod, once the node has learned where the pod is from a frame it sent.
    let node2 = &cluster.agents[1];
    cluster.pods[1][0].ns.run(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket");
        socket
            .send_to(b"hello", (cluster.nodes[1].gateway(), 9))
            .expect("a datagram to the gateway");
    });
    let arriving = trace(node2, client, &format!("{target}:{POD_HTTP_PORT}/tcp"));
    assert!(
        text(&arriving, "entry").contains(&format!("as VXLAN from node {}", node_address(1))),
        "{arriving:#}"
    );
    assert_eq!(programs(&arriving), ["tc_from_uplink"]);
    change(&arriving, "tc_from_uplink", "decapsulated");
    assert_eq!(
        text(&arriving, "result"),
        format!("delivered straight into local pod {target}:{POD_HTTP_PORT}")
    );
}

#[test]
fn bad_arguments_get_a_message_that_says_what_is_expected() {
    let cluster = traced_cluster();
    let node1 = &cluster.agents[0];
    let error = node1
        .trace(&["--from=10.1.1.1", &format!("--to={WEB}:80")])
        .expect_err("no protocol");
    assert!(
        error.to_string().contains("is not IP:port/protocol"),
        "{error}"
    );
    let error = node1
        .trace(&["--from=10.1.1.1", &format!("--to={WEB}:80/icmp")])
        .expect_err("not tcp or udp");
    assert!(error.to_string().contains("is not tcp or udp"), "{error}");
}

/// A refused command prints its error and causes, and no stack backtrace even where a user's
/// environment sets `RUST_BACKTRACE` (for panics); `RUST_LIB_BACKTRACE=1` asks for one.
#[test]
fn a_refused_inspect_prints_its_causes_without_a_backtrace_unless_asked() {
    let missing = tempfile::tempdir().expect("a temp dir");
    let pin_dir = format!("--pin-dir={}", missing.path().join("none").display());
    let inspect = |lib_backtrace: Option<&str>| {
        let mut command = std::process::Command::new(weft_tests::cluster::weft_binary());
        command
            .args(["inspect", "services", &pin_dir])
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(value) = lib_backtrace {
            command.env("RUST_LIB_BACKTRACE", value);
        }
        let output = command.output().expect("running weft inspect");
        assert!(
            !output.status.success(),
            "inspect of a missing pin dir fails"
        );
        String::from_utf8(output.stderr).expect("UTF-8")
    };
    let plain = inspect(None);
    assert!(
        plain.starts_with("Error: reading the map weft_svc_v2 pinned in")
            && plain.contains("Caused by:"),
        "{plain}"
    );
    assert!(!plain.contains("backtrace"), "{plain}");
    let asked = inspect(Some("1"));
    assert!(asked.contains("Stack backtrace:"), "{asked}");
}
