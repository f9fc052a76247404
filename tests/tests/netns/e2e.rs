//! The Kubernetes sig-network e2e Service cases (`test/e2e/network/service.go` and
//! `loadbalancer.go`), each as its own test, on nodes made of network namespaces with real
//! agents and real traffic: a node on an underlay bridge (its uplink), pods on its bridge, a
//! client pod, and a client outside the cluster on the underlay. Test names follow the e2e
//! cases they stand for.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use weft_tests::{
    apps::{
        Answer, HttpConnection, Server, UdpFlow, http_get, http_status, serve_http, serve_udp,
        udp_exchange,
    },
    cluster::{Agent, AgentOptions, Node, Pod},
    netns::{Netns, require_root, unique},
    overlay::{Underlay, cluster, node_address},
    seed::{cluster_cidr, pod_subnet},
    within,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 20, 50);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 1, 10);
const NODE_PORT: u16 = 30080;

/// The address of backend pod `n` (from 0).
fn backend(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 20, 10 + n)
}

/// What each backend pod serves.
#[derive(Clone, Copy)]
struct Serving {
    http: &'static [u16],
    udp: &'static [u16],
}

const HTTP_80: Serving = Serving {
    http: &[80],
    udp: &[],
};

/// One node on an underlay with backends, a client pod and a client outside the cluster.
/// Fields drop top to bottom: the agent stops before the namespaces go.
struct Site {
    agent: Agent,
    client: Pod,
    outside: Netns,
    servers: Mutex<Vec<Server>>,
    _backends: Vec<Pod>,
    node: Node,
    _underlay: Underlay,
}

/// A site with `backends` pods serving `serving`, and an agent started on `manifests`.
fn site(backends: u8, serving: Serving, manifests: &str) -> Site {
    require_root();
    let underlay = Underlay::new(&unique("we2e"));
    let node = Node::new(&format!("{}n", underlay.ns.name()), pod_subnet());
    underlay.connect(&node.ns, NODE);
    let outside = Netns::create(&format!("{}o", underlay.ns.name())).expect("outside client");
    underlay.connect(&outside, OUTSIDE);
    let pods: Vec<Pod> = (0..backends).map(|n| node.add_pod(backend(n))).collect();
    let mut servers = Vec::new();
    for pod in &pods {
        servers.extend(serving.http.iter().map(|port| serve_http(&pod.ns, *port)));
        servers.extend(serving.udp.iter().map(|port| serve_udp(&pod.ns, *port)));
    }
    let agent = Agent::start(
        &node,
        &[("services.yaml", manifests)],
        &AgentOptions {
            cluster_cidr: Some(cluster_cidr()),
            extra_args: vec!["--iface=eth0".into()],
            ..AgentOptions::default()
        },
    );
    let client = node.add_pod(CLIENT);
    Site {
        agent,
        client,
        outside,
        servers: Mutex::new(servers),
        _backends: pods,
        node,
        _underlay: underlay,
    }
}

impl Site {
    fn apply(&self, manifests: &str) {
        self.agent.write_manifest("services.yaml", manifests);
    }

    /// The node's name in EndpointSlices (`nodeName`).
    fn node_name(&self) -> String {
        self.node.ns.name().to_owned()
    }
}

/// A Service manifest: `name` at VIP (unless `cluster_ip` says otherwise in `spec`), with
/// `spec` lines (indented by two spaces) after `type`, and its EndpointSlice with `slice`
/// (ports and endpoints lines).
fn manifest(name: &str, service_type: &str, spec: &str, slice: &str) -> String {
    let cluster_ip = if spec.contains("clusterIP:") {
        String::new()
    } else {
        format!("  clusterIP: {VIP}\n")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec:\n  \
         type: {service_type}\n{cluster_ip}{spec}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: e2e, \
         labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n{slice}"
    )
}

/// Endpoint lines for ready backends `0..count` on `node`.
fn endpoints(count: u8, node: &str) -> String {
    let mut lines = String::from("endpoints:\n");
    for n in 0..count {
        lines.push_str(&format!(
            "- {{addresses: [\"{}\"], nodeName: {node}}}\n",
            backend(n)
        ));
    }
    lines
}

/// The ClusterIP (80 -> 80) and NodePort service `web` over backends `0..count`.
fn web(site_node: &str, service_type: &str, extra: &str, count: u8) -> String {
    let node_port = if service_type == "ClusterIP" {
        String::new()
    } else {
        format!(", nodePort: {NODE_PORT}")
    };
    manifest(
        "web",
        service_type,
        &format!("  ports: [{{port: 80, targetPort: 80{node_port}}}]\n{extra}"),
        &format!("ports: [{{port: 80}}]\n{}", endpoints(count, site_node)),
    )
}

fn frontend() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, NODE_PORT)
}

/// The servers that answer `requests` requests to `target`, each on a new connection, from
/// inside `ns`.
fn servers(ns: &Netns, target: SocketAddrV4, requests: usize) -> Vec<Ipv4Addr> {
    ns.run(|| {
        (0..requests)
            .map(|i| {
                http_get(target)
                    .unwrap_or_else(|e| panic!("request {i} to {target}: {e}"))
                    .server
            })
            .collect()
    })
}

fn distinct(servers: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    servers.iter().copied().collect()
}

/// Waits until requests to `target` from `ns` are served (a change reached the dataplane).
fn served(ns: &Netns, target: SocketAddrV4, what: &str) {
    within(Duration::from_secs(10), what, || {
        ns.run(|| http_get(target).is_ok())
    });
}

#[test]
fn should_serve_a_basic_endpoint_from_pods() {
    let site = site(2, HTTP_80, "");
    site.apply(&web(&site.node_name(), "ClusterIP", "", 1));
    served(&site.client.ns, frontend(), "the service with one endpoint");
    assert_eq!(
        distinct(&servers(&site.client.ns, frontend(), 10)),
        [backend(0)].into()
    );
    // A second endpoint joins; then the first leaves.
    site.apply(&web(&site.node_name(), "ClusterIP", "", 2));
    within(Duration::from_secs(5), "both endpoints serve", || {
        distinct(&servers(&site.client.ns, frontend(), 20)).len() == 2
    });
    let only_second = manifest(
        "web",
        "ClusterIP",
        "  ports: [{port: 80, targetPort: 80}]\n",
        &format!(
            "ports: [{{port: 80}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
            backend(1)
        ),
    );
    site.apply(&only_second);
    within(Duration::from_secs(5), "only the second serves", || {
        distinct(&servers(&site.client.ns, frontend(), 10)) == [backend(1)].into()
    });
}

/// A dual-stack Service on a cluster whose first family is IPv6 (`clusterIP` IPv6, its IPv4
/// address second in `clusterIPs`) is served on its IPv4 ClusterIP from its IPv4 EndpointSlice,
/// as kube-proxy's IPv4 proxier serves it; the IPv6 slice beside it is left alone.
#[test]
fn a_dual_stack_service_with_ipv6_first_is_served_on_its_ipv4_cluster_ip() {
    let site = site(2, HTTP_80, "");
    let dual_stack = manifest(
        "web",
        "ClusterIP",
        &format!(
            "  clusterIP: \"fd00:10:96::7\"\n  clusterIPs: [\"fd00:10:96::7\", \"{VIP}\"]\n  \
             ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: PreferDualStack\n  \
             ports: [{{port: 80, targetPort: 80}}]\n"
        ),
        &format!("ports: [{{port: 80}}]\n{}", endpoints(2, &site.node_name())),
    );
    let ipv6_slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: \
                      {name: web-6, namespace: e2e, labels: {kubernetes.io/service-name: web}}\n\
                      addressType: IPv6\nports: [{port: 80}]\n\
                      endpoints: [{addresses: [\"fd00:10:244::5\"]}]\n";
    site.apply(&format!("{dual_stack}{ipv6_slice}"));
    served(
        &site.client.ns,
        frontend(),
        "the dual-stack service on its IPv4 ClusterIP",
    );
    assert_eq!(
        distinct(&servers(&site.client.ns, frontend(), 20)),
        [backend(0), backend(1)].into()
    );
}

#[test]
fn should_serve_multiport_endpoints_from_pods() {
    let site = site(
        2,
        Serving {
            http: &[8080, 8081],
            udp: &[],
        },
        "",
    );
    // Named target ports, resolved through the EndpointSlice's port names, as kube-proxy does.
    let multiport = manifest(
        "multi",
        "ClusterIP",
        "  ports: [{name: portname1, port: 80, targetPort: svc1}, \
         {name: portname2, port: 81, targetPort: svc2}]\n",
        &format!(
            "ports: [{{name: portname1, port: 8080}}, {{name: portname2, port: 8081}}]\n{}",
            endpoints(2, &site.node_name())
        ),
    );
    site.apply(&multiport);
    served(&site.client.ns, frontend(), "port 80");
    for (port, target) in [(80, 8080), (81, 8081)] {
        let answers: Vec<Answer> = site.client.ns.run(|| {
            (0..20)
                .map(|_| http_get(SocketAddrV4::new(VIP, port)).expect("request"))
                .collect()
        });
        let reached: BTreeSet<Ipv4Addr> = answers.iter().map(|a| a.server).collect();
        assert_eq!(reached, [backend(0), backend(1)].into(), "port {port}");
        assert!(
            answers.iter().all(|a| a.server_port == target),
            "port {port} reaches the listener on its named target port {target}"
        );
    }
}

#[test]
fn should_be_able_to_create_a_functioning_nodeport_service() {
    let site = site(2, HTTP_80, "");
    site.apply(&web(&site.node_name(), "NodePort", "", 2));
    served(&site.outside, node_port(), "the NodePort from outside");
    // From outside the cluster: masqueraded (externalTrafficPolicy Cluster), spread.
    let answers: Vec<Answer> = site.outside.run(|| {
        (0..20)
            .map(|_| http_get(node_port()).expect("request"))
            .collect()
    });
    assert_eq!(
        answers
            .iter()
            .map(|a| a.server)
            .collect::<BTreeSet<_>>()
            .len(),
        2
    );
    assert!(
        answers
            .iter()
            .all(|a| *a.client_seen.ip() == site.node.gateway()),
        "masqueraded to the node: {answers:?}"
    );
    // From the node itself and from a pod, on the node's address.
    assert!(site.node.ns.run(|| http_get(node_port())).is_ok());
    assert!(site.client.ns.run(|| http_get(node_port())).is_ok());
    // And the ClusterIP of the same service.
    assert!(site.client.ns.run(|| http_get(frontend())).is_ok());
}

/// `sessionAffinity: ClientIP` lines.
fn affinity(timeout: u32) -> String {
    format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n"
    )
}

/// Checks that a client is held to one endpoint: `requests` requests all land on one.
fn held(ns: &Netns, target: SocketAddrV4, requests: usize) -> Ipv4Addr {
    let reached = distinct(&servers(ns, target, requests));
    assert_eq!(reached.len(), 1, "affinity holds: {reached:?}");
    *reached.first().expect("one")
}

/// Checks that once `timeout` passes without a connection the client is picked afresh: after
/// a pause longer than the timeout, another endpoint is eventually reached (each time with odds
/// 2/3, so 8 pauses all keeping it has odds of 1 in 6561).
fn released_after(ns: &Netns, target: SocketAddrV4, timeout: Duration, first: Ipv4Addr) {
    for _ in 0..8 {
        thread::sleep(timeout + Duration::from_millis(300));
        if held(ns, target, 3) != first {
            return;
        }
    }
    panic!("the client stayed on {first} after every timeout");
}

#[test]
fn should_have_session_affinity_work_for_service_with_type_clusterip() {
    let site = site(3, HTTP_80, "");
    site.apply(&web(&site.node_name(), "ClusterIP", &affinity(10_800), 3));
    served(&site.client.ns, frontend(), "the service");
    held(&site.client.ns, frontend(), 30);
}

#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_clusterip() {
    let site = site(3, HTTP_80, "");
    site.apply(&web(&site.node_name(), "ClusterIP", &affinity(2), 3));
    served(&site.client.ns, frontend(), "the service");
    let first = held(&site.client.ns, frontend(), 15);
    released_after(&site.client.ns, frontend(), Duration::from_secs(2), first);
}

#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() {
    let site = site(3, HTTP_80, "");
    switch_affinity(&site, "ClusterIP", &site.client.ns, frontend());
}

#[test]
fn should_have_session_affinity_work_for_nodeport_service() {
    let site = site(3, HTTP_80, "");
    site.apply(&web(&site.node_name(), "NodePort", &affinity(10_800), 3));
    served(&site.outside, node_port(), "the NodePort");
    held(&site.outside, node_port(), 30);
}

#[test]
fn should_have_session_affinity_timeout_work_for_nodeport_service() {
    let site = site(3, HTTP_80, "");
    site.apply(&web(&site.node_name(), "NodePort", &affinity(2), 3));
    served(&site.outside, node_port(), "the NodePort");
    let first = held(&site.outside, node_port(), 15);
    released_after(&site.outside, node_port(), Duration::from_secs(2), first);
}

#[test]
fn should_be_able_to_switch_session_affinity_for_nodeport_service() {
    let site = site(3, HTTP_80, "");
    switch_affinity(&site, "NodePort", &site.outside, node_port());
}

/// No affinity: spread; affinity on: held; off again: spread.
fn switch_affinity(site: &Site, service_type: &str, ns: &Netns, target: SocketAddrV4) {
    let node = site.node_name();
    site.apply(&web(&node, service_type, "", 3));
    served(ns, target, "the service");
    assert!(
        distinct(&servers(ns, target, 30)).len() > 1,
        "spread without affinity"
    );
    site.apply(&web(&node, service_type, &affinity(10_800), 3));
    within(Duration::from_secs(5), "affinity switched on", || {
        distinct(&servers(ns, target, 20)).len() == 1
    });
    site.apply(&web(&node, service_type, "", 3));
    within(Duration::from_secs(5), "affinity switched off", || {
        distinct(&servers(ns, target, 30)).len() > 1
    });
}

#[test]
fn should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node()
 {
    let site = site(2, HTTP_80, "");
    let external = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80);
    site.apply(&web(
        &site.node_name(),
        "ClusterIP",
        &format!("  externalIPs: [{}]\n", external.ip()),
        2,
    ));
    // No node has the address; pods reach it through their node's datapath.
    served(&site.client.ns, external, "the external IP from a pod");
    // A client outside that routes the address to the node reaches it too, masqueraded.
    site.outside
        .ip(&[
            "route",
            "add",
            &external.ip().to_string(),
            "via",
            &NODE.to_string(),
        ])
        .expect("routing the external IP to the node");
    let answer = site
        .outside
        .run(|| http_get(external))
        .expect("from outside");
    assert_eq!(*answer.client_seen.ip(), site.node.gateway());
}

#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    let site = site(
        2,
        Serving {
            http: &[80],
            udp: &[80],
        },
        "",
    );
    let both = manifest(
        "dual",
        "ClusterIP",
        "  ports: [{name: tcp, port: 80, protocol: TCP}, {name: udp, port: 80, protocol: UDP}]\n",
        &format!(
            "ports: [{{name: tcp, port: 80, protocol: TCP}}, {{name: udp, port: 80, protocol: UDP}}]\n{}",
            endpoints(2, &site.node_name())
        ),
    );
    site.apply(&both);
    served(&site.client.ns, frontend(), "TCP on port 80");
    let udp: BTreeSet<Ipv4Addr> = site.client.ns.run(|| {
        (0..20)
            .map(|_| udp_exchange(frontend()).expect("UDP on port 80").server)
            .collect()
    });
    assert_eq!(udp, [backend(0), backend(1)].into());
}

#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let site = site(2, HTTP_80, "");
    site.apply(&web(&site.node_name(), "ClusterIP", "", 2));
    served(&site.client.ns, frontend(), "the service");
    let answers: Vec<Answer> = site.client.ns.run(|| {
        (0..10)
            .map(|_| http_get(frontend()).expect("request"))
            .collect()
    });
    assert!(
        answers.iter().all(|a| *a.client_seen.ip() == CLIENT),
        "{answers:?}"
    );
}

#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    let site = site(
        0,
        HTTP_80,
        &manifest(
            "empty",
            "NodePort",
            &format!(
                "  ports: [{{name: tcp, port: 80, nodePort: {NODE_PORT}}}, \
                 {{name: udp, port: 80, protocol: UDP}}]\n"
            ),
            "ports: [{name: tcp, port: 80}, {name: udp, port: 80, protocol: UDP}]\nendpoints: []\n",
        ),
    );
    let refused_fast = |ns: &Netns, what: &str, attempt: &(dyn Fn() -> io::Result<()> + Sync)| {
        let started = Instant::now();
        let outcome = ns.run(attempt);
        let error = outcome.expect_err(what);
        assert_eq!(
            error.kind(),
            io::ErrorKind::ConnectionRefused,
            "{what}: {error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: refused at once"
        );
    };
    let tcp = || HttpConnection::open(frontend()).map(drop);
    refused_fast(&site.client.ns, "TCP from a pod", &tcp);
    refused_fast(&site.client.ns, "UDP from a pod", &|| {
        udp_exchange(frontend()).map(drop)
    });
    refused_fast(&site.node.ns, "TCP from the node", &tcp);
    refused_fast(&site.outside, "the NodePort from outside", &|| {
        HttpConnection::open(node_port()).map(drop)
    });
}

#[test]
fn should_be_able_to_up_and_down_services() {
    let site = site(2, HTTP_80, "");
    let node = site.node_name();
    let second_vip = Ipv4Addr::new(10, 254, 1, 20);
    let second = manifest(
        "second",
        "ClusterIP",
        &format!("  clusterIP: {second_vip}\n  ports: [{{port: 80}}]\n"),
        &format!("ports: [{{port: 80}}]\n{}", endpoints(2, &node)),
    );
    site.apply(&format!("{}---\n{second}", web(&node, "ClusterIP", "", 2)));
    let second_frontend = SocketAddrV4::new(second_vip, 80);
    served(&site.client.ns, frontend(), "web");
    served(&site.client.ns, second_frontend, "second");
    // Down: web goes, second stays.
    site.apply(&second);
    within(Duration::from_secs(5), "web is gone", || {
        !site.agent.inspect("services").contains("e2e/web")
    });
    assert_eq!(servers(&site.client.ns, second_frontend, 10).len(), 10);
    // Up again.
    site.apply(&format!("{}---\n{second}", web(&node, "ClusterIP", "", 2)));
    served(&site.client.ns, frontend(), "web again");
    assert_eq!(servers(&site.client.ns, second_frontend, 10).len(), 10);
}

#[test]
fn should_work_after_the_service_has_been_recreated() {
    let site = site(2, HTTP_80, "");
    site.apply(&web(&site.node_name(), "ClusterIP", "", 2));
    served(&site.client.ns, frontend(), "the service");
    site.apply("");
    within(Duration::from_secs(5), "the service is deleted", || {
        !site.agent.inspect("services").contains("e2e/web")
    });
    // Recreated with a new ClusterIP, as the API would allocate.
    let recreated = web(&site.node_name(), "ClusterIP", "", 2)
        .replace(&format!("clusterIP: {VIP}"), "clusterIP: 10.254.1.99");
    site.apply(&recreated);
    served(
        &site.client.ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 254, 1, 99), 80),
        "the recreated service",
    );
}

#[test]
fn should_implement_service_kubernetes_io_headless_and_service_proxy_name() {
    let site = site(2, HTTP_80, "");
    let node = site.node_name();
    let labelled = |name: &str, ip: &str, label: &str| {
        manifest(
            name,
            "ClusterIP",
            &format!("  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"),
            &format!("ports: [{{port: 80}}]\n{}", endpoints(2, &node)),
        )
        .replacen(
            &format!("metadata: {{name: {name}, namespace: e2e}}"),
            &format!("metadata: {{name: {name}, namespace: e2e, labels: {{{label}}}}}"),
            1,
        )
    };
    let proxied_elsewhere = labelled(
        "elsewhere",
        "10.254.1.30",
        "service.kubernetes.io/service-proxy-name: foo-bar",
    );
    let headless = labelled(
        "headless",
        "10.254.1.31",
        "service.kubernetes.io/headless: \"\"",
    );
    let plain = web(&node, "ClusterIP", "", 2);
    site.apply(&format!("{plain}---\n{proxied_elsewhere}---\n{headless}"));
    served(&site.client.ns, frontend(), "the plain service");
    let services = site.agent.inspect("services");
    assert!(!services.contains("e2e/elsewhere") && !services.contains("e2e/headless"));
    for ip in ["10.254.1.30", "10.254.1.31"] {
        let target = SocketAddrV4::new(ip.parse().unwrap(), 80);
        assert!(
            site.client.ns.run(|| http_get(target)).is_err(),
            "{target} is not proxied"
        );
    }
    // Without the label, the service is proxied.
    let plain_again = labelled("elsewhere", "10.254.1.30", "app: web");
    site.apply(&format!("{plain}---\n{plain_again}"));
    served(
        &site.client.ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 254, 1, 30), 80),
        "the unlabelled service",
    );
}

#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints() {
    let site = site(2, HTTP_80, "");
    let node = site.node_name();
    let with_conditions = |first: &str, second: &str| {
        manifest(
            "web",
            "ClusterIP",
            "  ports: [{port: 80}]\n",
            &format!(
                "ports: [{{port: 80}}]\nendpoints:\n\
                 - {{addresses: [\"{}\"], nodeName: {node}, conditions: {first}}}\n\
                 - {{addresses: [\"{}\"], nodeName: {node}, conditions: {second}}}\n",
                backend(0),
                backend(1)
            ),
        )
    };
    let terminating_serving = "{ready: false, serving: true, terminating: true}";
    let terminating_done = "{ready: false, serving: false, terminating: true}";
    // Nothing ready: the one still serving while terminating takes the traffic.
    site.apply(&with_conditions(terminating_serving, terminating_done));
    served(&site.client.ns, frontend(), "the terminating endpoint");
    assert_eq!(
        distinct(&servers(&site.client.ns, frontend(), 10)),
        [backend(0)].into()
    );
    // A ready endpoint wins over a terminating one.
    site.apply(&with_conditions(terminating_serving, "{ready: true}"));
    within(
        Duration::from_secs(5),
        "the ready endpoint takes over",
        || distinct(&servers(&site.client.ns, frontend(), 10)) == [backend(1)].into(),
    );
}

/// The UDP service `dns` (port 53 -> 53, NodePort 30053) on the backends in `pods`.
fn dns(node: &str, pods: &[u8]) -> String {
    let mut endpoints = String::from("endpoints:\n");
    for n in pods {
        endpoints.push_str(&format!(
            "- {{addresses: [\"{}\"], nodeName: {node}}}\n",
            backend(*n)
        ));
    }
    manifest(
        "dns",
        "NodePort",
        "  ports: [{port: 53, protocol: UDP, nodePort: 30053}]\n",
        &format!("ports: [{{port: 53, protocol: UDP}}]\n{endpoints}"),
    )
}

/// A server pod answering one flow is replaced by another: the flow moves to the new pod,
/// rather than sticking to a conntrack entry of the gone one (kube-proxy's old stale-UDP bug).
fn udp_flow_survives_the_server_pod_cycling(from_outside: bool) {
    const DNS: Serving = Serving {
        http: &[],
        udp: &[53],
    };
    let site = site(2, DNS, "");
    let node = site.node_name();
    site.apply(&dns(&node, &[0]));
    let (ns, target) = if from_outside {
        (&site.outside, SocketAddrV4::new(NODE, 30053))
    } else {
        (&site.client.ns, SocketAddrV4::new(VIP, 53))
    };
    let flow = UdpFlow::start(ns, target);
    within(Duration::from_secs(10), "the first pod answers", || {
        flow.last() == Some(backend(0))
    });
    // The first pod goes (its server stops, as a deleted pod's would) and the second replaces it.
    site.servers.lock().expect("servers").remove(0);
    site.apply(&dns(&node, &[1]));
    within(
        Duration::from_secs(3),
        "the flow reaches the new pod",
        || flow.last() == Some(backend(1)),
    );
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service() {
    udp_flow_survives_the_server_pod_cycling(false);
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() {
    udp_flow_survives_the_server_pod_cycling(true);
}

#[test]
fn should_preserve_source_ip_and_answer_health_checks_with_external_traffic_policy_local() {
    // Two overlay nodes: the only endpoint is on node 1.
    let cluster = cluster(2, 1);
    let outside = Netns::create(&format!("{}o", cluster.underlay.ns.name())).expect("outside");
    cluster.underlay.connect(&outside, OUTSIDE);
    let endpoint = cluster.pods[0][0].addr;
    let web = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: e2e}}\nspec:\n  \
         type: LoadBalancer\n  clusterIP: {VIP}\n  externalTrafficPolicy: Local\n  \
         healthCheckNodePort: 32000\n  ports: [{{port: 80, nodePort: {NODE_PORT}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: e2e, \
         labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 80}}]\n\
         endpoints: [{{addresses: [\"{endpoint}\"], nodeName: {}}}]\n",
        cluster.nodes[0].ns.name()
    );
    for agent in &cluster.agents {
        agent.write_manifest("web.yaml", &web);
    }
    let node_port_of = |n: u8| SocketAddrV4::new(node_address(n), NODE_PORT);
    served(
        &outside,
        node_port_of(1),
        "the NodePort of the node with the endpoint",
    );
    // The client's own address reaches the endpoint: no SNAT.
    let answer = outside.run(|| http_get(node_port_of(1))).expect("request");
    assert_eq!(
        (answer.server, *answer.client_seen.ip()),
        (endpoint, OUTSIDE)
    );
    // Node 2 has no endpoint: traffic from outside is dropped there.
    assert!(outside.run(|| http_get(node_port_of(2))).is_err());
    // A pod on node 2 is short-circuited to the endpoint on node 1.
    assert!(
        cluster.pods[1][0]
            .ns
            .run(|| http_get(node_port_of(2)))
            .is_ok()
    );
    // The health-check NodePort tells load balancers which node to use.
    let check = |n: u8| {
        outside
            .run(|| http_status(SocketAddrV4::new(node_address(n), 32000), "/"))
            .expect("health check")
    };
    let expected = |count: u32| {
        serde_json::json!({"service": {"namespace": "e2e", "name": "web"},
                           "localEndpoints": count, "serviceProxyHealthy": true})
    };
    within(Duration::from_secs(5), "health checks answer", || {
        outside
            .run(|| http_status(SocketAddrV4::new(node_address(1), 32000), "/"))
            .is_ok()
    });
    let (status, body) = check(1);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        expected(1)
    );
    let (status, body) = check(2);
    assert_eq!(status, 503);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        expected(0)
    );
    // kube-proxy's /healthz answers on every node.
    let (status, body) = outside
        .run(|| http_status(SocketAddrV4::new(node_address(2), 10256), "/healthz"))
        .expect("/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
}
