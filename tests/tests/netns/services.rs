//! The seed scenario on a node made of network namespaces, with a real `weft agent`: the nginx
//! Service (10.254.40.119:4432 -> :80 on 172.30.20.6/.7/.8) served to a client pod, to the node
//! itself, to a backend hairpinning through its own service, over TCP and UDP, while services and
//! endpoints change.
//!
//! A TCP client only completes its handshake when replies come from the address it connected
//! to, and a UDP client reports where each answer came from, so every successful exchange below
//! proves the reverse NAT as well as the forward one.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use weft_tests::{
    apps::{Answer, HttpConnection, Server, UdpFlow, http_get, serve_http, serve_udp, udp_request},
    cluster::{Agent, AgentOptions, Node, Pod},
    netns::{require_root, unique},
    seed::{
        self, BACKENDS, TARGET_PORT, cluster_cidr, endpoint_slice, nginx_manifest, pod_subnet,
        service,
    },
    within,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 20, 9);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 10);
const DNS_PORT: u16 = 53;
const DNS_TARGET_PORT: u16 = 5353;

/// The seed node: three backends serving HTTP on :80 and UDP on :5353, an agent serving the
/// nginx Service, and a client pod created after the agent (so its port is picked up live).
/// Fields drop top to bottom: the agent stops before the namespaces go.
struct SeedNode {
    agent: Agent,
    client: Pod,
    _servers: Vec<Server>,
    backends: Vec<Pod>,
    node: Node,
}

fn dns_manifest(endpoints: &[Ipv4Addr]) -> String {
    format!(
        "{}---\n{}",
        service("dns", DNS_VIP, DNS_PORT, "UDP", DNS_TARGET_PORT),
        endpoint_slice("dns", "UDP", DNS_TARGET_PORT, endpoints)
    )
}

fn seed_node(extra_manifests: &[(&str, &str)]) -> SeedNode {
    seed_node_with(extra_manifests, true, |_| {})
}

/// The seed node, with the bridge's netfilter hooks (`br_netfilter`, as kubeadm nodes have it)
/// on or off.
/// `before_agent` runs once the node and its backends exist, before the agent starts.
fn seed_node_with(
    extra_manifests: &[(&str, &str)],
    bridge_netfilter: bool,
    before_agent: impl FnOnce(&Node),
) -> SeedNode {
    require_root();
    let node = Node::new(&unique("wsvc"), pod_subnet());
    node.set_bridge_netfilter(bridge_netfilter);
    let backends: Vec<Pod> = BACKENDS.iter().map(|ip| node.add_pod(*ip)).collect();
    let mut servers = Vec::new();
    for pod in &backends {
        servers.push(serve_http(&pod.ns, TARGET_PORT));
        servers.push(serve_udp(&pod.ns, DNS_TARGET_PORT));
    }
    let nginx = nginx_manifest(&BACKENDS);
    let mut manifests = vec![("nginx.yaml", nginx.as_str())];
    manifests.extend_from_slice(extra_manifests);
    let options = AgentOptions {
        cluster_cidr: Some(cluster_cidr()),
        ..AgentOptions::default()
    };
    before_agent(&node);
    let agent = Agent::start(&node, &manifests, &options);
    let client = node.add_pod(CLIENT);
    // The agent attaches reverse NAT to the client's port when it sees it join the bridge.
    wait_until("the client pod reaches the VIP", || {
        client.ns.run(|| http_get(seed::frontend()).is_ok())
    });
    SeedNode {
        agent,
        client,
        _servers: servers,
        backends,
        node,
    }
}

/// Polls `check` for up to 10 s.
fn wait_until(what: &str, check: impl FnMut() -> bool) {
    within(Duration::from_secs(10), what, check);
}

fn count_servers(answers: &[Answer]) -> BTreeMap<Ipv4Addr, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.server).or_default() += 1;
    }
    counts
}

#[test]
fn seed_scenario_spreads_300_connections_over_the_three_backends() {
    let seed = seed_node(&[]);
    let answers: Vec<Answer> = seed.client.ns.run(|| {
        (0..300)
            .map(|i| {
                http_get(seed::frontend())
                    .unwrap_or_else(|e| panic!("connection {i} to the VIP: {e}"))
            })
            .collect()
    });
    let counts = count_servers(&answers);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        BACKENDS.to_vec(),
        "{counts:?}"
    );
    // Each count is binomial(300, 1/3): 100 +- 8.2; 60..140 is beyond 4.8 sigma.
    for (backend, count) in &counts {
        assert!(
            (60..=140).contains(count),
            "{backend} answered {count} of 300: {counts:?}"
        );
    }
    // No masquerade for an in-cluster client: backends see the pod's own address.
    assert!(
        answers.iter().all(|a| *a.client_seen.ip() == CLIENT),
        "source preserved"
    );
    let table = seed.agent.inspect("services");
    assert!(
        table.contains("default/nginx") && table.contains("10.254.40.119:4432"),
        "{table}"
    );
}

#[test]
fn a_long_lived_connection_keeps_its_backend_while_another_service_comes_and_goes() {
    let seed = seed_node(&[]);
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 254, 50, 1), 8080);
    let other_manifest = format!(
        "{}---\n{}",
        service("other", *other.ip(), other.port(), "TCP", TARGET_PORT),
        endpoint_slice("other", "TCP", TARGET_PORT, &BACKENDS[..2])
    );
    seed.client.ns.run(|| {
        let mut long_lived = HttpConnection::open(seed::frontend()).expect("connecting to the VIP");
        let backend = long_lived.request().expect("first request").server;
        seed.agent.write_manifest("other.yaml", &other_manifest);
        wait_until("the new service answers", || http_get(other).is_ok());
        assert_eq!(
            long_lived.request().expect("request after the add").server,
            backend
        );
        seed.agent.remove_manifest("other.yaml");
        wait_until("the service is gone", || {
            !seed.agent.inspect("services").contains("default/other")
        });
        assert_eq!(
            long_lived
                .request()
                .expect("request after the removal")
                .server,
            backend
        );
        assert_eq!(
            long_lived.peer().expect("peer").to_string(),
            seed::frontend().to_string()
        );
    });
}

#[test]
fn a_udp_service_works_both_ways() {
    let dns = dns_manifest(&BACKENDS[..2]);
    let seed = seed_node(&[("dns.yaml", &dns)]);
    let vip = SocketAddrV4::new(DNS_VIP, DNS_PORT);
    let answers: Vec<Answer> = seed.client.ns.run(|| {
        (0..40)
            .map(|i| {
                let (answer, from) =
                    udp_request(vip).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
                assert_eq!(
                    from.to_string(),
                    vip.to_string(),
                    "the answer comes from the VIP"
                );
                answer
            })
            .collect()
    });
    let counts = count_servers(&answers);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        BACKENDS[..2].to_vec(),
        "{counts:?}"
    );
    assert!(
        answers.iter().all(|a| *a.client_seen.ip() == CLIENT),
        "source preserved"
    );
}

/// Hairpin through the solo service (10.254.60.1:80 -> .6 only), with the bridge's netfilter
/// hooks on or off: the reply takes a different path through the node in each case.
fn hairpin(bridge_netfilter: bool) {
    let solo = SocketAddrV4::new(Ipv4Addr::new(10, 254, 60, 1), 80);
    let manifest = format!(
        "{}---\n{}",
        service("solo", *solo.ip(), solo.port(), "TCP", TARGET_PORT),
        endpoint_slice("solo", "TCP", TARGET_PORT, &BACKENDS[..1])
    );
    let seed = seed_node_with(&[("solo.yaml", &manifest)], bridge_netfilter, |_| {});
    let backend = &seed.backends[0];
    let answer = backend
        .ns
        .run(|| http_get(solo))
        .expect("the backend reaches itself via the VIP");
    assert_eq!(answer.server, backend.addr);
    // Masqueraded to the node's bridge address, or the backend would drop its own address as a
    // martian source.
    assert_eq!(
        *answer.client_seen.ip(),
        seed.node.gateway(),
        "hairpin traffic is masqueraded"
    );
    let conntrack = seed.agent.inspect("conntrack");
    assert!(
        conntrack
            .lines()
            .any(|l| l.contains("10.254.60.1:80") && l.split_whitespace().nth(6) == Some("yes")),
        "{conntrack}"
    );
}

#[test]
fn hairpin_a_backend_reaches_itself_through_its_service_with_br_netfilter() {
    hairpin(true);
}

#[test]
fn hairpin_a_backend_reaches_itself_through_its_service_without_br_netfilter() {
    hairpin(false);
}

#[test]
fn the_node_itself_reaches_the_vip() {
    let dns = dns_manifest(&BACKENDS);
    let seed = seed_node(&[("dns.yaml", &dns)]);
    let answers: Vec<Answer> = seed.node.ns.run(|| {
        (0..30)
            .map(|i| {
                let mut connection = HttpConnection::open(seed::frontend())
                    .unwrap_or_else(|e| panic!("node connection {i}: {e}"));
                // getpeername shows the service the application asked for, not the backend.
                assert_eq!(
                    connection.peer().unwrap().to_string(),
                    seed::frontend().to_string()
                );
                connection.request().expect("request from the node")
            })
            .collect()
    });
    let counts = count_servers(&answers);
    assert!(
        counts.keys().all(|server| BACKENDS.contains(server)),
        "{counts:?}"
    );
    assert!(
        counts.len() > 1,
        "30 connections from the node all went to one backend: {counts:?}"
    );
    let (answer, from) = seed
        .node
        .ns
        .run(|| udp_request(SocketAddrV4::new(DNS_VIP, DNS_PORT)))
        .expect("a datagram from the node");
    assert_eq!(
        from.to_string(),
        format!("{DNS_VIP}:{DNS_PORT}"),
        "recvfrom shows the VIP"
    );
    assert!(BACKENDS.contains(&answer.server));
}

#[test]
fn removing_a_backend_stops_new_connections_to_it_within_a_second() {
    let seed = seed_node(&[]);
    let removed = BACKENDS[2];
    seed.agent
        .write_manifest("nginx.yaml", &nginx_manifest(&BACKENDS[..2]));
    thread::sleep(Duration::from_secs(1));
    let answers: Vec<Answer> = seed.client.ns.run(|| {
        (0..90)
            .map(|_| http_get(seed::frontend()).expect("request"))
            .collect()
    });
    let counts = count_servers(&answers);
    assert!(
        !counts.contains_key(&removed),
        "new connections still reach {removed}: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[test]
fn a_pinned_map_of_another_layout_is_recreated_with_a_log_line() {
    // What an older weft might have left: the service map pinned with other key/value sizes.
    let seed = seed_node_with(&[], true, |node| {
        let pin_dir = Agent::pin_dir_for(node);
        std::fs::create_dir_all(&pin_dir).expect("the pin directory");
        let pin = pin_dir.join(weft_common::maps::SERVICES_MAP.name());
        weft_tests::netns::run(
            "bpftool",
            &[
                "map",
                "create",
                &pin.display().to_string(),
                "type",
                "hash",
                "key",
                "4",
                "value",
                "4",
                "entries",
                "8",
                "name",
                "weft_svc_v2",
            ],
        )
        .expect("bpftool map create");
    });
    let log = seed.agent.log();
    assert!(
        log.contains("pinned map does not match this weft build; recreating it empty"),
        "{log}"
    );
    // Recreated with this build's layout and filled: the service answers.
    seed.client
        .ns
        .run(|| http_get(seed::frontend()))
        .expect("the service works on the recreated maps");
}

#[test]
fn sigterm_leaves_the_node_forwarding_and_cleanup_takes_the_dataplane_away() {
    let mut seed = seed_node(&[]);
    let nft_table = |node: &Node| node.ns.exec("nft", &["list", "table", "ip", "weft"]);
    let mut open = seed
        .client
        .ns
        .run(|| HttpConnection::open(seed::frontend()))
        .expect("a connection through the VIP");
    let status = seed.agent.stop();
    assert!(
        status.success(),
        "SIGTERM is a clean exit: {status}\n{}",
        seed.agent.log()
    );
    // With no agent running, the node goes on translating: the programs, the maps and the
    // masquerade table all stay, for the connections it carries and for new ones.
    open.request()
        .expect("the open connection still works after the agent stopped");
    seed.client
        .ns
        .run(|| http_get(seed::frontend()))
        .expect("a new connection through the VIP with no agent running");
    let rules = nft_table(&seed.node).expect("the weft table stays");
    assert!(rules.contains("masquerade fully-random"), "{rules}");
    let table = seed.agent.inspect("backends");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("default/nginx"))
            .count(),
        3,
        "{table}"
    );

    seed.agent.cleanup().expect("weft cleanup");
    assert!(nft_table(&seed.node).is_err(), "cleanup removes the table");
    assert!(
        !seed.agent.pin_dir().exists(),
        "cleanup removes the pins, links and maps alike"
    );
    assert!(
        seed.client.ns.run(|| http_get(seed::frontend())).is_err(),
        "with the programs detached, nothing answers on the VIP"
    );
    seed.agent
        .cleanup()
        .expect("weft cleanup again finds nothing and succeeds");
}

#[test]
fn a_failing_test_still_removes_its_namespaces_and_pins() {
    require_root();
    let name = unique("wfail");
    let pin_dir = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let node = Node::new(&name, pod_subnet());
        let _pod = node.add_pod(BACKENDS[0]);
        let agent = Agent::start(
            &node,
            &[("nginx.yaml", &nginx_manifest(&BACKENDS))],
            &AgentOptions::default(),
        );
        *pin_dir.lock().unwrap() = Some(agent.pin_dir().to_owned());
        panic!("a test failing halfway");
    });
    assert!(outcome.is_err());
    let namespaces = weft_tests::netns::run("ip", &["netns", "list"]).expect("ip netns list");
    assert!(
        !namespaces.contains(&name),
        "namespaces left behind:\n{namespaces}"
    );
    let pin_dir = pin_dir.into_inner().unwrap().expect("the agent started");
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

/// A flow that never pauses keeps its conntrack entry alive forever; when its endpoint leaves
/// the service, weft purges the entry (kube-proxy's stale-UDP clean-up) and the next datagram
/// picks a live endpoint, for a pod client and for a socket of the node itself.
#[test]
fn a_continuous_udp_flow_moves_off_an_endpoint_that_left_its_service() {
    let dns = dns_manifest(&BACKENDS);
    let seed = seed_node(&[("dns.yaml", &dns)]);
    let vip = SocketAddrV4::new(DNS_VIP, DNS_PORT);
    let from_pod = UdpFlow::start(&seed.client.ns, vip);
    let from_node = UdpFlow::start(&seed.node.ns, vip);
    wait_until("both flows are answered", || {
        from_pod.last().is_some() && from_node.last().is_some()
    });
    // Take away both flows' endpoints (if they share one, a single removal does).
    let mut removed = vec![from_pod.last().unwrap(), from_node.last().unwrap()];
    removed.dedup();
    let kept: Vec<Ipv4Addr> = BACKENDS
        .iter()
        .copied()
        .filter(|b| !removed.contains(b))
        .collect();
    seed.agent.write_manifest("dns.yaml", &dns_manifest(&kept));
    wait_until("the pod's flow is answered by a remaining endpoint", || {
        from_pod.last().is_some_and(|server| kept.contains(&server))
    });
    wait_until(
        "the node's flow is answered by a remaining endpoint",
        || {
            from_node
                .last()
                .is_some_and(|server| kept.contains(&server))
        },
    );
    assert!(
        seed.agent.log().contains("purged UDP flows"),
        "{}",
        seed.agent.log()
    );
}

#[test]
fn a_restarted_agent_adopts_its_maps_and_an_idle_connection_keeps_its_endpoint() {
    let mut seed = seed_node(&[]);
    let (mut connection, before) = seed.client.ns.run(|| {
        let mut connection = HttpConnection::open(seed::frontend()).expect("connecting");
        let answer = connection.request().expect("first request");
        (connection, answer.server)
    });
    seed.agent.restart();
    let after = seed
        .client
        .ns
        .run(|| connection.request())
        .expect("request after the restart");
    assert_eq!(
        after.server, before,
        "the pinned conntrack entry kept the connection's endpoint"
    );
    // The restarted agent rewrote no service: it was already in the maps it adopted. (Pods
    // found since the first agent's last look at the bridge may be added.)
    let log = seed.agent.log();
    let second_start = log
        .rfind("stopping")
        .expect("the first agent logged its stop");
    assert!(
        log[second_start..]
            .lines()
            .filter(|line| line.contains("reconciled the maps"))
            .all(|line| ["added", "updated", "removed"]
                .iter()
                .all(|field| line.contains(&format!("\"{field}\":0")))),
        "the restart rewrote maps it should have adopted:\n{log}"
    );
    // And new connections still work.
    seed.client
        .ns
        .run(|| http_get(seed::frontend()))
        .expect("a new connection after the restart");
}
