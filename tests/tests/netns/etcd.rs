//! The overlay against etcd's failures, on namespace clusters with a real etcd: etcd over TLS
//! with client certificates (and agents it must refuse), etcd gone for a minute under traffic,
//! an agent cut off from etcd while the leases change, and etcd back with an empty data
//! directory.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use rcgen::ExtendedKeyUsagePurpose;
use weft::sources::flannel::subnet_key;
use weft_tests::{
    apps::{TcpFlow, UdpFlow, http_get},
    cluster::{Agent, AgentOptions, Node},
    overlay::{
        CLUSTER_PREFIX as PREFIX, Cluster, Etcd, EtcdPartition, KeyLease,
        POD_HTTP_PORT as HTTP_PORT, POD_UDP_PORT as UDP_PORT, cluster, cluster_network, cluster_on,
        cluster_options, network_config, node_address,
    },
    pki::Ca,
    within,
};

/// Every lease key under the cluster's prefix, with its value.
fn leases(etcd: &Etcd) -> BTreeMap<String, String> {
    etcd.keys(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .map(|key| {
            let value = etcd.get(&key).expect("a lease value");
            (key, value)
        })
        .collect()
}

/// The lease flannel writes for node `n` (weft derives the VtepMAC from the PublicIP), spelled
/// out here rather than taken from weft's own serializer.
fn flannel_lease(n: u8) -> String {
    format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:fe:c0:a8:32:{n:02x}"}}}}"#,
        node_address(n)
    )
}

/// The etcd lease `key` is bound to, which it must have.
fn bound(etcd: &Etcd, key: &str) -> KeyLease {
    etcd.lease_of(key)
        .unwrap_or_else(|| panic!("{key} is bound to an etcd lease"))
}

/// Every agent's log, for a failure message.
fn logs(cluster: &Cluster) -> String {
    cluster
        .agents
        .iter()
        .map(Agent::log)
        .collect::<Vec<_>>()
        .join("\n")
}

fn subnets_of(agent: &Agent) -> String {
    agent.inspect("subnets")
}

#[test]
fn agents_take_their_leases_over_tls_and_agents_without_a_good_certificate_do_not() {
    let cluster = cluster_on(Etcd::start_tls, 2, 1, None);
    let tls = cluster.etcd.tls().expect("a TLS etcd");
    // Read back over TLS with a client certificate: both leases, in flannel's format.
    let held = leases(&cluster.etcd);
    assert_eq!(held.len(), 2, "{held:?}");
    for (n, node) in cluster.nodes.iter().enumerate() {
        let key = subnet_key(PREFIX, &node.subnet());
        assert_eq!(held.get(&key), Some(&flannel_lease(n as u8 + 1)));
    }
    // And the overlay carries traffic.
    let (from, to) = (&cluster.pods[0][0], &cluster.pods[1][0]);
    let answer = from
        .ns
        .run(|| http_get(SocketAddrV4::new(to.addr, HTTP_PORT)))
        .expect("pod to pod across the overlay");
    assert_eq!(answer.server, to.addr);
    // Agents that etcd must turn away: the right CA but no client certificate, and a client
    // certificate from a CA etcd does not trust.
    let strangers = tempfile::tempdir().expect("a directory");
    let foreign = Ca::new("not etcd's CA").issue(
        strangers.path(),
        "stranger",
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    );
    let refused = [
        vec![format!("--etcd-cafile={}", tls.ca.display())],
        vec![
            format!("--etcd-cafile={}", tls.ca.display()),
            format!("--etcd-certfile={}", foreign.cert.display()),
            format!("--etcd-keyfile={}", foreign.key.display()),
        ],
    ];
    let nodes: Vec<Node> = (3..=4)
        .map(|n| {
            Node::on_underlay(
                &format!("{}n{n}", cluster.underlay.ns.name()),
                &cluster.underlay,
                node_address(n),
            )
        })
        .collect();
    let agents: Vec<Agent> = nodes
        .iter()
        .zip(refused)
        .map(|(node, flags)| {
            let options = AgentOptions {
                extra_args: flags,
                ..cluster_options(&cluster.etcd)
            };
            Agent::launch(node, &[], &options)
        })
        .collect();
    for agent in &agents {
        within(
            Duration::from_secs(20),
            "the agent logs why etcd refused it",
            || {
                agent.messages().iter().any(|m| {
                    m.starts_with("cannot read the network config: etcd request failed")
                        && m.contains("TLS with etcd failed")
                })
            },
        );
    }
    // Long enough for a lease to have been taken, had etcd let them in.
    thread::sleep(Duration::from_secs(3));
    let after = leases(&cluster.etcd);
    assert_eq!(after, held, "no lease for a refused agent");
    for agent in &agents {
        assert!(
            !agent.messages().iter().any(|m| m == "ready"),
            "{}",
            agent.log()
        );
        eprintln!(
            "refused agent logged: {}",
            agent
                .messages()
                .iter()
                .find(|m| m.contains("TLS with etcd failed"))
                .expect("the error")
        );
    }
    drop(agents);

    // A CA file that cannot be read stops the agent at once, naming the file.
    let mut missing = Agent::launch(
        &nodes[0],
        &[],
        &AgentOptions {
            extra_args: vec!["--etcd-cafile=/nonexistent/ca.pem".into()],
            ..cluster_options(&cluster.etcd)
        },
    );
    within(Duration::from_secs(10), "the agent exits", || {
        missing.exited()
    });
    assert!(
        missing
            .log()
            .contains("cannot read --etcd-cafile /nonexistent/ca.pem"),
        "{}",
        missing.log()
    );
}

/// The pods of a two-node cluster with one pod per node.
fn pods(cluster: &Cluster) -> (&weft_tests::cluster::Pod, &weft_tests::cluster::Pod) {
    (&cluster.pods[0][0], &cluster.pods[1][0])
}

#[test]
fn forwarding_continues_while_etcd_is_down_for_a_minute_and_the_agents_resync_after() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let mut cluster = cluster(2, 1);
    let (one, two) = pods(&cluster);
    let streams = [
        TcpFlow::start(&one.ns, &two.ns, two.addr, 9100),
        TcpFlow::start(&two.ns, &one.ns, one.addr, 9101),
    ];
    let flows = [
        UdpFlow::start(&one.ns, SocketAddrV4::new(two.addr, UDP_PORT)),
        UdpFlow::start(&two.ns, SocketAddrV4::new(one.addr, UDP_PORT)),
    ];
    let held = leases(&cluster.etcd);
    let bindings: Vec<KeyLease> = held.keys().map(|key| bound(&cluster.etcd, key)).collect();
    thread::sleep(Duration::from_secs(2));

    let resumed_before: Vec<usize> = cluster.agents.iter().map(resumptions).collect();
    cluster.etcd.stop();
    let stopped = Instant::now();
    within(
        Duration::from_secs(5),
        "the agents notice etcd is gone",
        || {
            cluster.agents.iter().all(|agent| {
                agent
                    .messages()
                    .iter()
                    .any(|m| m.starts_with("lease watch interrupted"))
            })
        },
    );
    thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
    let outage = stopped.elapsed();
    // Traffic flowed the whole time on the last known leases.
    for flow in &flows {
        assert!(
            flow.longest_silence() < Duration::from_secs(1),
            "UDP was lost for {:?} while etcd was down",
            flow.longest_silence()
        );
    }
    cluster.etcd.resume();
    let back = Instant::now();
    // Typically within milliseconds (a re-list in flight while etcd starts is answered once it
    // serves). The bound is what the client guarantees: a connection that answers nothing is
    // given up after its keep-alive (10 s + 5 s), then one retry (1 s), a connection (3 s) and
    // a request (5 s): 24 s.
    within(
        Duration::from_secs(30),
        "both agents' lease watches resume",
        || {
            cluster
                .agents
                .iter()
                .zip(&resumed_before)
                .all(|(agent, before)| resumptions(agent) > *before)
        },
    );
    let resynced = back.elapsed();
    // The watch is live again: a node that joins now (a lease written by hand) reaches both.
    let newcomer: Ipv4Net = "172.30.250.0/24".parse().expect("a subnet");
    let newcomer_key = subnet_key(PREFIX, &newcomer);
    cluster.etcd.put(
        &newcomer_key,
        r#"{"PublicIP":"192.168.50.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:fe:c0:a8:32:63"}}"#,
    );
    within(
        Duration::from_secs(2),
        "both agents see a lease written after etcd came back",
        || {
            cluster
                .agents
                .iter()
                .all(|agent| subnets_of(agent).contains("172.30.250.0/24"))
        },
    );
    cluster.etcd.delete(&newcomer_key);
    // The nodes kept their leases: the same values on the same etcd leases, still alive.
    let kept = leases(&cluster.etcd);
    let kept: BTreeMap<_, _> = kept
        .into_iter()
        .filter(|(key, _)| *key != newcomer_key)
        .collect();
    assert_eq!(kept, held);
    for (key, before) in held.keys().zip(bindings) {
        let now = bound(&cluster.etcd, key);
        assert_eq!((now.id, now.granted), (before.id, before.granted), "{key}");
        assert!(now.remaining > 0, "{key}");
    }

    let udp: Vec<(usize, Duration)> = flows
        .iter()
        .map(|flow| (flow.answered(), flow.longest_silence()))
        .collect();
    drop(flows);
    let reports: Vec<_> = streams
        .into_iter()
        .map(|stream| stream.finish().expect("the stream survived the outage"))
        .collect();
    for report in &reports {
        assert!(report.sent > 0);
        assert_eq!(report.received, report.sent, "{report:?}");
        assert!(report.longest_stall < Duration::from_secs(1), "{report:?}");
    }
    for (answered, silence) in &udp {
        assert!(
            *silence < Duration::from_secs(1),
            "UDP lost for {silence:?}"
        );
        assert!(*answered > 0);
    }
    eprintln!(
        "etcd down {outage:?}; watches resumed {resynced:?} after it came back; \
         TCP streams broken: 0 of {}, longest stall {:?}; UDP answers {:?}, longest silence {:?}",
        reports.len(),
        reports
            .iter()
            .map(|r| r.longest_stall)
            .max()
            .unwrap_or_default(),
        udp.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        udp.iter().map(|(_, s)| *s).max().unwrap_or_default(),
    );
}

/// How many times the agent's lease watch resumed after an interruption.
fn resumptions(agent: &Agent) -> usize {
    agent
        .messages()
        .iter()
        .filter(|m| *m == "lease watch resumed")
        .count()
}

#[test]
fn an_agent_cut_off_from_etcd_picks_up_the_leases_that_changed_meanwhile() {
    let cluster = cluster(2, 1);
    // A node that leaves while node 1 is cut off: its lease is there before, gone after.
    let leaving: Ipv4Net = "172.30.251.0/24".parse().expect("a subnet");
    let leaving_key = subnet_key(PREFIX, &leaving);
    cluster.etcd.put(
        &leaving_key,
        r#"{"PublicIP":"192.168.50.98","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:fe:c0:a8:32:62"}}"#,
    );
    within(
        Duration::from_secs(2),
        "node 1 sees the leaving node",
        || subnets_of(&cluster.agents[0]).contains("172.30.251.0/24"),
    );

    let cut_off = EtcdPartition::cut(&cluster.nodes[0].ns);
    let cut = Instant::now();
    // Its watch connection goes silent; the keepalive notices and the agent keeps re-listing.
    within(
        Duration::from_secs(30),
        "node 1 notices etcd is unreachable",
        || {
            cluster.agents[0]
                .messages()
                .iter()
                .any(|m| m.starts_with("lease watch interrupted"))
        },
    );
    let noticed = cut.elapsed();
    // Meanwhile a third node joins and the leaving one goes.
    let third = Node::on_underlay(
        &format!("{}n3", cluster.underlay.ns.name()),
        &cluster.underlay,
        node_address(3),
    );
    let third_agent = Agent::join(&third, &[], &cluster_options(&cluster.etcd));
    let third_subnet = third.subnet().to_string();
    let third_pod = third.add_pod(third.pod_address(1));
    let _server = weft_tests::apps::serve_http(&third_pod.ns, HTTP_PORT);
    cluster.etcd.delete(&leaving_key);
    within(
        Duration::from_secs(2),
        "node 2 follows both changes",
        || {
            let known = subnets_of(&cluster.agents[1]);
            known.contains(&third_subnet) && !known.contains("172.30.251.0/24")
        },
    );
    thread::sleep(Duration::from_secs(3));
    let known = subnets_of(&cluster.agents[0]);
    assert!(
        !known.contains(&third_subnet) && known.contains("172.30.251.0/24"),
        "node 1 is really cut off: it still has the old leases\n{known}"
    );
    assert!(
        !cluster.agents[0]
            .messages()
            .iter()
            .any(|m| m == "lease watch resumed")
    );

    drop(cut_off);
    let lifted = Instant::now();
    within(
        Duration::from_secs(30),
        "node 1 picks up the changes once it reaches etcd again",
        || {
            let known = subnets_of(&cluster.agents[0]);
            known.contains(&third_subnet) && !known.contains("172.30.251.0/24")
        },
    );
    let caught_up = lifted.elapsed();
    // Traffic between node 1 and the newcomer, both ways.
    let one = &cluster.pods[0][0];
    let there = one
        .ns
        .run(|| http_get(SocketAddrV4::new(third_pod.addr, HTTP_PORT)))
        .expect("node 1's pod reaches the new node's pod");
    assert_eq!(there.server, third_pod.addr);
    let back = third_pod
        .ns
        .run(|| http_get(SocketAddrV4::new(one.addr, HTTP_PORT)))
        .expect("the new node's pod reaches node 1's pod");
    assert_eq!(*back.client_seen.ip(), third_pod.addr);
    // Node 1 kept its lease throughout.
    assert_eq!(
        cluster
            .etcd
            .get(&subnet_key(PREFIX, &cluster.nodes[0].subnet())),
        Some(flannel_lease(1))
    );
    eprintln!(
        "node 1 noticed the partition after {noticed:?}; caught up {caught_up:?} after it was lifted"
    );
    drop(third_agent);
}

#[test]
fn an_etcd_back_with_an_empty_data_directory_gets_every_nodes_lease_back() {
    let mut cluster = cluster(2, 1);
    let held = leases(&cluster.etcd);
    assert_eq!(held.len(), 2);
    cluster.etcd.stop();
    cluster.etcd.wipe();
    cluster.etcd.resume();
    let back = Instant::now();
    let config_key = format!("{PREFIX}/config");
    assert_eq!(cluster.etcd.get(&config_key), None, "the data is gone");
    // The operator puts the network config back; the nodes put back their own leases.
    cluster
        .etcd
        .put(&config_key, &network_config(cluster_network()));
    // Generous: this bounds the wait, it does not time the agents.
    let deadline = back + Duration::from_secs(60);
    while leases(&cluster.etcd).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the nodes did not re-create their leases within a minute; their logs:\n{}",
            logs(&cluster)
        );
        thread::sleep(Duration::from_millis(20));
    }
    let recreated = back.elapsed();
    // The same subnets, in flannel's exact format, bound to fresh 24-hour etcd leases.
    let again = leases(&cluster.etcd);
    assert_eq!(again, held);
    for (n, node) in cluster.nodes.iter().enumerate() {
        let key = subnet_key(PREFIX, &node.subnet());
        assert_eq!(again[&key], flannel_lease(n as u8 + 1));
        let lease = bound(&cluster.etcd, &key);
        assert_eq!(lease.granted, 24 * 3600, "{key}");
        assert!(lease.remaining > 24 * 3600 - 120, "{key}: {lease:?}");
    }
    // And the overlay works again.
    let (one, two) = pods(&cluster);
    within(
        Duration::from_secs(5),
        "pods reach each other again",
        || {
            one.ns
                .run(|| http_get(SocketAddrV4::new(two.addr, HTTP_PORT)))
                .is_ok()
                && two
                    .ns
                    .run(|| http_get(SocketAddrV4::new(one.addr, HTTP_PORT)))
                    .is_ok()
        },
    );
    assert!(
        cluster
            .agents
            .iter()
            .all(|agent| agent.messages().iter().any(|m| m == "re-created the lease")),
        "each agent re-created its own lease"
    );
    eprintln!("both leases re-created {recreated:?} after etcd came back empty");
}
