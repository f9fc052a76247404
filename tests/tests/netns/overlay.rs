//! The overlay on a cluster made of network namespaces: nodes on one underlay bridge, a real
//! etcd holding flannel's config and leases, a real `weft agent` per node, pods on every node.
//! Pods reach pods on other nodes (TCP and UDP, small and large), leases follow etcd, services
//! work across nodes, and a node set up exactly as flannel sets one up interoperates.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use weft::sources::flannel::{Lease, vtep_mac_for};
use weft_common::programs::XDP_UPLINK;
use weft_tests::{
    apps::{
        HttpConnection, http_get, receive_bulk, send_bulk, serve_http, serve_udp_echo, udp_echo,
        udp_request,
    },
    capture::{Capture, is_udp_to},
    cluster::{Agent, AgentOptions, BRIDGE, Node},
    netns::{require_root, unique},
    overlay::{
        CLUSTER_PREFIX as PREFIX, Cluster, Etcd, FlannelNode, POD_HTTP_PORT as HTTP_PORT,
        POD_UDP_PORT as UDP_PORT, Underlay, add_pods, cluster, cluster_network as network,
        cluster_options, cluster_with, cut_to_mtu_frames, network_config, node_address, node_on,
        start_nodes,
    },
    seed::{endpoint_slice, service},
    within,
};

#[test]
fn pods_on_every_node_reach_pods_on_every_other_node_over_tcp_and_udp() {
    let cluster = cluster(3, 2);
    let subnets: BTreeSet<Ipv4Net> = cluster.nodes.iter().map(Node::subnet).collect();
    assert_eq!(
        subnets.len(),
        3,
        "every node leased a subnet of its own: {subnets:?}"
    );
    assert!(
        subnets
            .iter()
            .all(|s| network().contains(s) && s.prefix_len() == 24)
    );
    assert_eq!(every_pod_reaches_every_other_nodes_pods(&cluster), 24);
    // Every node knows the other two, and nothing was dropped on the way.
    for agent in &cluster.agents {
        assert_eq!(
            agent
                .inspect("subnets")
                .lines()
                .filter(|l| l.starts_with("172.30."))
                .count(),
            2
        );
        let drops = agent.inspect("drops");
        assert!(drops.lines().skip(1).all(|l| l.ends_with(" 0")), "{drops}");
    }
    // The traffic resolved every node's neighbours; each agent picked the next hops up, and
    // encapsulates to them without a route lookup per packet.
    let macs: Vec<String> = cluster.nodes.iter().map(uplink_mac).collect();
    for (n, agent) in cluster.agents.iter().enumerate() {
        let others: BTreeSet<String> = (0..3)
            .filter(|m| *m != n)
            .map(|m| macs[m].clone())
            .collect();
        within(
            Duration::from_secs(5),
            "every agent knows the next hop to every other node",
            || {
                let hops: BTreeSet<String> = agent
                    .inspect("subnets")
                    .lines()
                    .filter(|l| l.starts_with("172.30."))
                    .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
                    .collect();
                hops == others
            },
        );
    }
}

/// Checks TCP and UDP from every pod to every pod on the other nodes, addresses unchanged;
/// returns how many pairs that was.
fn every_pod_reaches_every_other_nodes_pods(cluster: &Cluster) -> usize {
    let mut pairs = 0;
    for (from_node, from_pods) in cluster.pods.iter().enumerate() {
        for (to_node, to_pods) in cluster.pods.iter().enumerate() {
            if from_node == to_node {
                continue;
            }
            for from in from_pods {
                for to in to_pods {
                    let (tcp, (udp, udp_from)) = from.ns.run(|| {
                        let tcp = http_get(SocketAddrV4::new(to.addr, HTTP_PORT));
                        let udp = udp_request(SocketAddrV4::new(to.addr, UDP_PORT));
                        (
                            tcp,
                            udp.unwrap_or_else(|e| panic!("UDP {} -> {}: {e}", from.addr, to.addr)),
                        )
                    });
                    let tcp =
                        tcp.unwrap_or_else(|e| panic!("TCP {} -> {}: {e}", from.addr, to.addr));
                    assert_eq!(tcp.server, to.addr);
                    assert_eq!(
                        *tcp.client_seen.ip(),
                        from.addr,
                        "pod addresses cross the overlay unchanged"
                    );
                    assert_eq!(udp.server, to.addr);
                    assert_eq!(udp_from.ip(), std::net::IpAddr::V4(to.addr));
                    pairs += 1;
                }
            }
        }
    }
    pairs
}

/// The MAC of a node's uplink, as `inspect` prints MACs.
fn uplink_mac(node: &Node) -> String {
    let json = node.ns.ip(&["-j", "link", "show", "eth0"]).expect("eth0");
    let links: serde_json::Value = serde_json::from_str(&json).expect("ip's JSON");
    links[0]["address"].as_str().expect("a MAC").to_owned()
}

/// 128 MiB from node 1's pod to node 2's, checked byte for byte; returns how many packets the
/// receiving pod's port sent it (the stack's path) and the mean frame node 2 got on the wire.
fn transfer_128_mib(cluster: &Cluster) -> (u64, f64) {
    let (sender, receiver) = (&cluster.pods[0][0], &cluster.pods[1][0]);
    let receiving_node = &cluster.nodes[1].ns;
    let wire = Underlay::port(2);
    let port_before = receiving_node.link_stats("veth1").expect("the pod's port");
    let wire_before = cluster.underlay.ns.link_stats(&wire).expect("the wire");
    const BYTES: u64 = 128 << 20;
    let receiving = receive_bulk(&receiver.ns, 9000);
    let started = Instant::now();
    let sent = sender
        .ns
        .run(|| send_bulk(SocketAddrV4::new(receiver.addr, 9000), BYTES))
        .expect("sending");
    let (received, digest) = receiving.join().expect("receiver").expect("receiving");
    let elapsed = started.elapsed();
    assert_eq!(received, BYTES);
    assert_eq!(digest, sent, "the bytes arrived unchanged");
    let port = receiving_node.link_stats("veth1").expect("the pod's port");
    let wire_after = cluster.underlay.ns.link_stats(&wire).expect("the wire");
    let frame = (wire_after.tx_bytes - wire_before.tx_bytes) as f64
        / (wire_after.tx_packets - wire_before.tx_packets) as f64;
    eprintln!(
        "128 MiB pod to pod across the overlay in {elapsed:?} ({:.2} Gbit/s), {frame:.0} bytes \
         per frame on the wire",
        BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    );
    for agent in &cluster.agents {
        let drops = agent.inspect("drops");
        assert!(drops.lines().skip(1).all(|l| l.ends_with(" 0")), "{drops}");
    }
    (port.tx_packets - port_before.tx_packets, frame)
}

#[test]
fn a_large_tcp_transfer_crosses_the_overlay_intact_on_every_path() {
    // Default: decapsulated straight into the pod (its port never sends it a thing but the
    // odd ARP), GSO super-packets on the wire, no XDP on a veth uplink.
    let fast = cluster(2, 1);
    let (through_port, frame) = transfer_128_mib(&fast);
    assert!(
        through_port < 50,
        "{through_port} packets went through the bridge"
    );
    assert!(
        frame > 10_000.0,
        "super-packets on the wire, not {frame:.0}-byte frames"
    );
    assert!(
        fast.agents.iter().all(|agent| !has_xdp_filter(agent)),
        "no XDP on a veth uplink"
    );
    drop(fast);

    // The stack routes it: through the bridge and the pod's port; GSO aggregates by way of the
    // VXLAN device (what the kernel decapsulated passed tc_from_tunnel).
    let kernel = cluster_with_args(&["--host-routing=kernel"]);
    let (through_port, _) = transfer_128_mib(&kernel);
    assert!(
        through_port > 100,
        "only {through_port} packets through the bridge"
    );
    let device = kernel.nodes[1]
        .ns
        .link_stats("weft-vxlan")
        .expect("the VXLAN device");
    assert!(device.rx_packets > 100, "{device:?}");
    drop(kernel);

    // No VXLAN device: everything is decapsulated in TC.
    let bare = cluster_with_args(&["--vxlan-device=off"]);
    assert!(bare.nodes[1].ns.link_stats("weft-vxlan").is_err());
    transfer_128_mib(&bare);
    drop(bare);

    // MTU frames on the wire, aggregated by GRO on the receiving uplink (a physical NIC's
    // view): the VXLAN device's socket makes GRO take the tunnel's frames apart and join them.
    let nic = cluster(2, 1);
    cut_to_mtu_frames(&nic.underlay, &nic.nodes[0].ns, &nic.nodes[1].ns).expect("ethtool");
    let (_, frame) = transfer_128_mib(&nic);
    assert!(
        frame < 1_600.0,
        "MTU frames on the wire, not {frame:.0} bytes"
    );
}

/// A two-node cluster (a pod each) whose agents get `args`.
fn cluster_with_args(args: &[&str]) -> Cluster {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    cluster_with(Etcd::start, &network_config(network()), 2, 1, |etcd| {
        AgentOptions {
            extra_args: args,
            ..cluster_options(etcd)
        }
    })
}

#[test]
fn a_restarted_agent_keeps_its_subnet_and_the_overlay_keeps_working() {
    let mut cluster = cluster(2, 1);
    let before = cluster.nodes[1].subnet();
    cluster.agents[1].restart();
    assert_eq!(cluster.agents[1].leased_subnet(), before);
    assert_eq!(
        cluster.etcd.keys(&format!("{PREFIX}/subnets/")).len(),
        2,
        "no second lease was taken"
    );
    let (from, to) = (&cluster.pods[0][0], &cluster.pods[1][0]);
    let answer = from
        .ns
        .run(|| http_get(SocketAddrV4::new(to.addr, HTTP_PORT)))
        .expect("across after restart");
    assert_eq!(answer.server, to.addr);
    // The restarted agent kept its VXLAN device; `weft cleanup` takes it away with the rest.
    let device = |cluster: &Cluster| cluster.nodes[1].ns.link_stats("weft-vxlan").is_ok();
    assert!(device(&cluster));
    cluster.agents[1].stop();
    cluster.agents[1].cleanup().expect("weft cleanup");
    assert!(!device(&cluster), "cleanup removes weft-vxlan");
}

/// As flanneld: a node whose lease etcd lost while it was down (it expired) claims the subnet
/// its `subnet.env` names again, so its bridge and its pods keep their addresses.
#[test]
fn a_node_whose_lease_expired_while_it_was_down_takes_its_previous_subnet_again() {
    let mut cluster = cluster(2, 1);
    let before = cluster.nodes[1].subnet();
    let key = format!(
        "{PREFIX}/subnets/{}-{}",
        before.network(),
        before.prefix_len()
    );
    assert!(cluster.agents[1].stop().success());
    cluster.etcd.delete(&key);
    cluster.agents[1].start_again();
    assert_eq!(cluster.agents[1].leased_subnet(), before);
    assert_eq!(every_pod_reaches_every_other_nodes_pods(&cluster), 2);

    // Had another node taken the subnet meanwhile, the node gets another one, and its bridge,
    // still addressed for the old one, is refused by name rather than failing a route later.
    assert!(cluster.agents[1].stop().success());
    cluster.etcd.put(
        &key,
        r#"{"PublicIP":"192.168.50.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:fe:c0:a8:32:63"}}"#,
    );
    cluster.agents[1].launch_again();
    within(Duration::from_secs(10), "the agent stops", || {
        cluster.agents[1].exited()
    });
    let log = cluster.agents[1].log();
    assert!(
        log.contains("it was made for another subnet") && log.contains("ip link delete cni0"),
        "{log}"
    );
    assert_eq!(
        cluster.agents[1].leased_subnet(),
        before,
        "refused before subnet.env was rewritten, so it still names the subnet the bridge is for"
    );
}

#[test]
fn a_lease_deleted_from_etcd_withdraws_that_nodes_route_within_a_second() {
    let cluster = cluster(3, 1);
    let gone = cluster.nodes[2].subnet();
    let key = format!("{PREFIX}/subnets/{}-{}", gone.network(), gone.prefix_len());
    let (from, to) = (&cluster.pods[0][0], &cluster.pods[2][0]);
    from.ns
        .run(|| http_get(SocketAddrV4::new(to.addr, HTTP_PORT)))
        .expect("reachable while leased");
    cluster.etcd.delete(&key);
    within(Duration::from_secs(1), "node 1 forgets the subnet", || {
        !cluster.agents[0]
            .inspect("subnets")
            .contains(&gone.to_string())
    });
    // Traffic to it is now refused on node 1 (counted), not sent to a node without a lease.
    assert!(
        from.ns
            .run(|| http_get(SocketAddrV4::new(to.addr, HTTP_PORT)))
            .is_err()
    );
    assert!(
        cluster.agents[0]
            .inspect("drops")
            .lines()
            .any(|l| l.starts_with("no_lease_for_destination") && !l.ends_with(" 0")),
        "{}",
        cluster.agents[0].inspect("drops")
    );
    // The other node is unaffected.
    let other = &cluster.pods[1][0];
    from.ns
        .run(|| http_get(SocketAddrV4::new(other.addr, HTTP_PORT)))
        .expect("node 2 still reachable");
}

/// flannel's reservation practice and a stale lease from elsewhere, on real etcd: node 1 has a
/// reservation with only its PublicIP (and a `cni0` made for it beforehand), node 3 an old
/// leased entry carrying a foreign VtepMAC, node 2 entries of the wrong length. Node 2 starts
/// first and sees node 1's reservation as no peer yet.
#[test]
fn a_reservation_and_a_stale_lease_are_taken_and_rewritten_as_flanneld_does() {
    require_root();
    let underlay = Underlay::new(&unique("wresv"));
    let etcd = Etcd::start(&underlay);
    etcd.put(&format!("{PREFIX}/config"), &network_config(network()));
    let key = |subnet: &str| format!("{PREFIX}/subnets/{subnet}");
    let (reserved, stale) = (key("172.30.20.0-24"), key("172.30.83.0-24"));
    etcd.put(
        &reserved,
        &format!(r#"{{"PublicIP":"{}"}}"#, node_address(1)),
    );
    // Node 1 also has an old leased entry: once it takes its reservation, that one goes (it
    // would route a second subnet to the node).
    let old_lease = key("172.30.21.0-24");
    etcd.ctl(&[
        "put",
        &format!("--lease={:x}", etcd.grant(3_600)),
        &old_lease,
        &format!(r#"{{"PublicIP":"{}"}}"#, node_address(1)),
    ])
    .expect("writing node 1's old lease");
    let stale_lease = etcd.grant(3_600);
    etcd.ctl(&[
        "put",
        &format!("--lease={stale_lease:x}"),
        &stale,
        &format!(
            r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:00"}}}}"#,
            node_address(3)
        ),
    ])
    .expect("writing the stale lease");
    // Node 2: entries with its PublicIP that the config does not allow (a /25 in a network of
    // /24s): the leased one is deleted, as flanneld does; the reservation is left alone.
    let (unfit_lease, unfit_reservation) = (key("172.30.50.0-25"), key("172.30.60.0-25"));
    let node_2 = format!(r#"{{"PublicIP":"{}"}}"#, node_address(2));
    etcd.ctl(&[
        "put",
        &format!("--lease={:x}", etcd.grant(3_600)),
        &unfit_lease,
        &node_2,
    ])
    .expect("writing the unfit lease");
    etcd.put(&unfit_reservation, &node_2);
    let nodes: Vec<Node> = (1..=3).map(|n| node_on(&underlay, n)).collect();
    for args in [
        &["link", "add", "name", BRIDGE, "type", "bridge"][..],
        &["addr", "add", "172.30.20.1/24", "dev", BRIDGE],
    ] {
        nodes[0].ns.ip(args).expect("the operator's cni0");
    }
    let options = cluster_options(&etcd);
    let own_lease = |n: u8| Lease {
        public_ip: node_address(n),
        vni: 1,
        vtep_mac: vtep_mac_for(node_address(n)),
    };
    let not_yet = |agent: &Agent| {
        agent
            .messages()
            .iter()
            .filter(|m| m.starts_with("not a peer yet"))
            .count()
    };

    let second = Agent::join(&nodes[1], &[], &options);
    assert!(!second.inspect("subnets").contains("172.30.20.0/24"));
    assert_eq!(etcd.get(&unfit_lease), None);
    assert_eq!(etcd.get(&unfit_reservation), Some(node_2.clone()));
    assert_eq!(
        not_yet(&second),
        2,
        "node 1's two entries: {:?}",
        second.messages()
    );

    let first = Agent::join(&nodes[0], &[], &options);
    assert_eq!(first.leased_subnet().to_string(), "172.30.20.0/24");
    assert_eq!(
        etcd.get(&old_lease),
        None,
        "node 1's other lease is deleted"
    );
    assert_eq!(
        etcd.lease_of(&reserved),
        None,
        "the reservation keeps no TTL"
    );
    let value = etcd.get(&reserved).expect("the reservation is kept");
    assert_eq!(Lease::parse(&value), Ok(own_lease(1)), "{value}");
    let device = nodes[0]
        .ns
        .ip(&["-j", "link", "show", "weft-vxlan"])
        .expect("weft-vxlan");
    assert!(
        device.contains(&own_lease(1).vtep_mac.to_string()),
        "{device}"
    );
    within(
        Duration::from_secs(1),
        "node 2 takes node 1 as a peer once it fills its reservation in",
        || second.inspect("subnets").contains("172.30.20.0/24"),
    );

    let third = Agent::join(&nodes[2], &[], &options);
    assert_eq!(third.leased_subnet().to_string(), "172.30.83.0/24");
    let value = etcd.get(&stale).expect("the lease is kept");
    assert_eq!(Lease::parse(&value), Ok(own_lease(3)), "{value}");
    let lease = etcd.lease_of(&stale).expect("a leased key stays leased");
    assert_ne!(lease.id, stale_lease, "bound to a fresh etcd lease");
    assert_eq!(lease.granted, 24 * 3600, "flannel's 24 hours: {lease:?}");
    assert_eq!(
        etcd.keys(&format!("{PREFIX}/subnets/")).len(),
        4,
        "the reservations kept, node 2's subnet claimed, nothing else"
    );

    let (pods, servers) = add_pods(&nodes, 1);
    let mut cluster = Cluster {
        agents: vec![first, second, third],
        servers,
        pods,
        nodes,
        etcd,
        underlay,
    };
    assert_eq!(every_pod_reaches_every_other_nodes_pods(&cluster), 6);
    assert_eq!(not_yet(&cluster.agents[1]), 2, "each said once");

    // Restarted after someone wrote other attributes into its reservation (another VNI and
    // VtepMAC, still no TTL): it takes it again and writes its own back.
    assert!(cluster.agents[0].stop().success());
    cluster.etcd.put(
        &reserved,
        &format!(
            r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":7,"VtepMAC":"02:00:00:00:00:01"}}}}"#,
            node_address(1)
        ),
    );
    cluster.agents[0].start_again();
    assert_eq!(
        cluster.agents[0].leased_subnet().to_string(),
        "172.30.20.0/24"
    );
    assert_eq!(cluster.etcd.lease_of(&reserved), None);
    assert_eq!(
        cluster
            .etcd
            .get(&reserved)
            .map(|value| Lease::parse(&value)),
        Some(Ok(own_lease(1)))
    );
    assert_eq!(every_pod_reaches_every_other_nodes_pods(&cluster), 6);
}

/// Path MTU discovery through a service: a hop of smaller MTU on the endpoint's node (a route
/// of MTU 1000 to the endpoint, kernel routing) answers the client's full-size segments with
/// "fragmentation needed", quoting the endpoint's address. Translated back to the ClusterIP on
/// the client's node, the error reaches the client's socket, which lowers its segment size: the
/// transfer completes (untranslated, the socket ignores it and the transfer stalls).
#[test]
fn a_pod_learns_the_path_mtu_through_a_service_connection() {
    const PORT: u16 = 9300;
    let cluster = cluster_with_args(&["--host-routing=kernel"]);
    let (client, endpoint) = (&cluster.pods[0][0], &cluster.pods[1][0]);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 30), PORT);
    cluster.agents[0].write_manifest(
        "bulk.yaml",
        &format!(
            "{}---\n{}",
            service("bulk", *vip.ip(), PORT, "TCP", PORT),
            endpoint_slice("bulk", "TCP", PORT, &[endpoint.addr])
        ),
    );
    within(Duration::from_secs(5), "node 1 serves the service", || {
        cluster.agents[0].inspect("services").contains("bulk")
    });
    let route = format!("{}/32", endpoint.addr);
    cluster.nodes[1]
        .ns
        .ip(&["route", "add", &route, "dev", BRIDGE, "mtu", "1000"])
        .expect("the smaller hop");
    let receiver = receive_bulk(&endpoint.ns, PORT);
    let sent = client
        .ns
        .run(|| send_bulk(vip, 8 << 20))
        .expect("the transfer completes");
    let (received, digest) = receiver.join().expect("receiver thread").expect("received");
    assert_eq!((received, digest), (8 << 20, sent));
    let drops = cluster.agents[0].inspect("drops");
    assert!(drops.lines().skip(1).all(|l| l.ends_with(" 0")), "{drops}");
}

/// 8 KiB UDP requests to a ClusterIP whose endpoint is on another node, echoed: both ways the
/// datagram crosses the overlay in fragments (pod MTU 1450), and it must arrive whole, from
/// the ClusterIP, with eBPF host routing and with the kernel's.
#[test]
fn an_8_kib_udp_request_to_a_cluster_ip_across_the_overlay_is_answered_whole() {
    const PORT: u16 = 9400;
    for routing in ["--host-routing=ebpf", "--host-routing=kernel"] {
        let cluster = cluster_with_args(&[routing]);
        let (client, endpoint) = (&cluster.pods[0][0], &cluster.pods[1][0]);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 40), PORT);
        cluster.agents[0].write_manifest(
            "echo.yaml",
            &format!(
                "{}---\n{}",
                service("echo", *vip.ip(), PORT, "UDP", PORT),
                endpoint_slice("echo", "UDP", PORT, &[endpoint.addr])
            ),
        );
        let _echo = serve_udp_echo(&endpoint.ns, PORT);
        within(Duration::from_secs(5), "node 1 serves the service", || {
            client.ns.run(|| udp_echo(vip, b"ping")).is_ok()
        });
        for n in 0..50u32 {
            let request: Vec<u8> = (0..8192u32).map(|i| (i * 31 + n) as u8).collect();
            let answer = client
                .ns
                .run(|| udp_echo(vip, &request))
                .unwrap_or_else(|e| panic!("{routing}: request {n} unanswered: {e}"));
            assert!(answer == request, "{routing}: answer {n} differs");
        }
        let drops = cluster.agents[0].inspect("drops");
        assert!(
            drops.lines().skip(1).all(|l| l.ends_with(" 0")),
            "{routing}: {drops}"
        );
    }
}

#[test]
fn agents_started_at_the_same_moment_take_different_subnets() {
    require_root();
    let underlay = Underlay::new(&unique("wrace"));
    let etcd = Etcd::start(&underlay);
    // Exactly three subnets for three nodes racing for them.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.99.0.0/16","SubnetLen":24,"SubnetMin":"10.99.1.0","SubnetMax":"10.99.3.0","Backend":{"Type":"vxlan"}}"#,
    );
    let (_nodes, agents) = start_nodes(&underlay, &etcd, 3, None);
    let subnets: BTreeSet<String> = agents
        .iter()
        .map(|agent| agent.leased_subnet().to_string())
        .collect();
    assert_eq!(
        subnets,
        ["10.99.1.0/24", "10.99.2.0/24", "10.99.3.0/24"]
            .map(String::from)
            .into()
    );
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).len(), 3);
    drop(agents);
}

#[test]
fn services_work_across_nodes_with_replies_restored_and_masquerade_applied() {
    let mut cluster = cluster(3, 1);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 40, 119), 4432);
    let backends = [cluster.pods[1][0].addr, cluster.pods[2][0].addr];
    let manifest = format!(
        "{}---\n{}",
        service("nginx", *vip.ip(), vip.port(), "TCP", HTTP_PORT),
        endpoint_slice("nginx", "TCP", HTTP_PORT, &backends)
    );
    let client = &cluster.pods[0][0];
    cluster.agents[0].write_manifest("nginx.yaml", &manifest);
    within(Duration::from_secs(5), "node 1 serves the service", || {
        client.ns.run(|| http_get(vip)).is_ok()
    });
    let answers: Vec<_> = client
        .ns
        .run(|| (0..60).map(|_| http_get(vip).expect("request")).collect());
    let servers: BTreeSet<Ipv4Addr> = answers.iter().map(|a| a.server).collect();
    assert_eq!(servers, backends.into(), "both remote backends serve");
    assert!(
        answers.iter().all(|a| *a.client_seen.ip() == client.addr),
        "no masquerade for an in-cluster client"
    );
    // The node itself, through its socket hooks: its traffic enters the overlay from its pod
    // gateway address.
    let from_node = cluster.nodes[0]
        .ns
        .run(|| HttpConnection::open(vip).and_then(|mut c| c.request()))
        .expect("node");
    assert_eq!(*from_node.client_seen.ip(), cluster.nodes[0].gateway());
    // With a --cluster-cidr that leaves the pods out, the client counts as off-cluster: its
    // traffic is masqueraded to node 1's pod gateway address as it enters the overlay (flannel's
    // nodes use `flannel.1`'s address alike), the remote backend answers through the overlay,
    // and node 1 undoes both translations.
    cluster.agents[0].restart_with(&["--cluster-cidr=10.0.0.0/8"]);
    let client = &cluster.pods[0][0];
    within(Duration::from_secs(5), "node 1 serves again", || {
        client.ns.run(|| http_get(vip)).is_ok()
    });
    let answers: Vec<_> = client
        .ns
        .run(|| (0..20).map(|_| http_get(vip).expect("request")).collect());
    assert!(answers.iter().all(|a| backends.contains(&a.server)));
    let gateway = cluster.nodes[0].gateway();
    assert!(
        answers.iter().all(|a| *a.client_seen.ip() == gateway),
        "masqueraded to the node's pod gateway address: {answers:?}"
    );
}

/// What identifies VXLAN as Linux sends it, read from a captured frame.
#[derive(Debug, PartialEq, Eq)]
struct VxlanShape {
    outer_header_len: usize,
    ttl: u8,
    dont_fragment: bool,
    udp_checksum: u16,
    flags: u8,
    reserved: [u8; 4],
    vni: u32,
    inner_ethertype: u16,
}

/// A captured VXLAN frame: outer source and destination, UDP ports, inner MACs, inner IPv4
/// addresses, and its shape.
struct Vxlan {
    outer: (Ipv4Addr, Ipv4Addr),
    ports: (u16, u16),
    inner_macs: ([u8; 6], [u8; 6]),
    inner: (Ipv4Addr, Ipv4Addr),
    /// The inner TCP/UDP ports.
    inner_ports: (u16, u16),
    shape: VxlanShape,
}

fn parse_vxlan(frame: &[u8]) -> Vxlan {
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let udp = &ip[header_len..];
    let vxlan = &udp[8..16];
    let inner = &udp[16..];
    let inner_ip = &inner[14..];
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Vxlan {
        outer: (addr(&ip[12..16]), addr(&ip[16..20])),
        ports: (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        ),
        inner_macs: (
            inner[0..6].try_into().unwrap(),
            inner[6..12].try_into().unwrap(),
        ),
        inner: (addr(&inner_ip[12..16]), addr(&inner_ip[16..20])),
        inner_ports: {
            let l4 = &inner_ip[usize::from(inner_ip[0] & 0x0f) * 4..];
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        },
        shape: VxlanShape {
            outer_header_len: header_len,
            ttl: ip[8],
            dont_fragment: ip[6] & 0x40 != 0,
            udp_checksum: u16::from_be_bytes([udp[6], udp[7]]),
            flags: vxlan[0],
            reserved: [vxlan[1], vxlan[2], vxlan[3], vxlan[7]],
            vni: u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
            inner_ethertype: u16::from_be_bytes([inner[12], inner[13]]),
        },
    }
}

fn mac(text: &str) -> [u8; 6] {
    text.parse::<weft::sources::flannel::Mac>()
        .expect("a MAC")
        .0
}

/// flannel's dual-stack network (`EnableIPv6`), of which weft serves the IPv4 half: the
/// flannel node's lease is flannel's dual-stack key and JSON; weft's stay IPv4-only, which
/// flanneld reads as nodes without IPv6, and weft says so. TCP crosses both ways, weft's VXLAN
/// shaped as Linux's.
#[test]
fn a_dual_stack_flannel_node_and_weft_nodes_exchange_tcp_both_ways_over_plain_linux_vxlan() {
    let config = format!(
        r#"{{"EnableIPv6":true,"Network":"{}","IPv6Network":"fc00:30::/48","SubnetLen":24,"Backend":{{"Type":"vxlan"}}}}"#,
        network()
    );
    let cluster = cluster_with(Etcd::start, &config, 3, 1, cluster_options);
    let used: BTreeSet<Ipv4Net> = cluster.nodes.iter().map(Node::subnet).collect();
    let third = (200..=255u8)
        .find(|third| !used.contains(&Ipv4Net::new(Ipv4Addr::new(172, 30, *third, 0), 24).unwrap()))
        .expect("a free subnet");
    let subnet = Ipv4Net::new(Ipv4Addr::new(172, 30, third, 0), 24).unwrap();
    // The fourth node joins as flannel would: its own lease, then routes for everyone else's.
    let flannel = FlannelNode::set_up(
        &format!("{}f", cluster.underlay.ns.name()),
        &cluster.underlay,
        node_address(4),
        subnet,
    );
    cluster.etcd.put(
        &format!("{PREFIX}/subnets/172.30.{third}.0-24&fc00:30:0:{third:x}::-64"),
        &format!(
            r#"{{"PublicIP":"{}","PublicIPv6":"fd00:1::4","BackendType":"vxlan","BackendData":{},"BackendV6Data":{{"VNI":1,"VtepMAC":"a2:1b:5e:00:00:04"}}}}"#,
            node_address(4),
            flannel.backend_data()
        ),
    );
    let mut weft_vteps = Vec::new();
    for key in cluster.etcd.keys(&format!("{PREFIX}/subnets/")) {
        let remote = weft::sources::flannel::parse_subnet_key(PREFIX, &key).expect("a lease key");
        if remote == subnet {
            continue;
        }
        let value = cluster.etcd.get(&key).expect("lease value");
        assert!(
            !key.contains('&') && value.contains(r#""PublicIPv6":null"#),
            "weft's lease is IPv4-only: {key} {value}"
        );
        let lease = Lease::parse(&value).expect("flannel's JSON");
        flannel.add_remote(remote, lease.public_ip, &lease.vtep_mac.to_string());
        weft_vteps.push((lease.public_ip, lease.vtep_mac.0));
    }
    assert!(
        cluster.agents[0]
            .log()
            .contains("enables IPv6 (IPv6Network fc00:30::/48, /64 per node)"),
        "the agent says it serves the IPv4 half only"
    );
    let flannel_pod = flannel.node.add_pod(flannel.node.pod_address(1));
    let _flannel_server = serve_http(&flannel_pod.ns, HTTP_PORT);
    let weft_pod = &cluster.pods[0][0];
    within(
        Duration::from_secs(2),
        "weft node 1 learns the flannel node's lease",
        || {
            cluster.agents[0]
                .inspect("subnets")
                .contains(&subnet.to_string())
        },
    );

    let capture = Capture::start(&flannel.node.ns, |frame| is_udp_to(frame, 8472));
    let there = weft_pod
        .ns
        .run(|| http_get(SocketAddrV4::new(flannel_pod.addr, HTTP_PORT)))
        .expect("weft pod -> flannel pod");
    assert_eq!(
        (there.server, *there.client_seen.ip()),
        (flannel_pod.addr, weft_pod.addr)
    );
    let back = flannel_pod
        .ns
        .run(|| http_get(SocketAddrV4::new(weft_pod.addr, HTTP_PORT)))
        .expect("flannel pod -> weft pod");
    assert_eq!(
        (back.server, *back.client_seen.ip()),
        (weft_pod.addr, flannel_pod.addr)
    );
    let frames: Vec<Vxlan> = capture
        .finish()
        .iter()
        .map(|frame| parse_vxlan(frame))
        .collect();

    let from_weft: Vec<&Vxlan> = frames
        .iter()
        .filter(|f| f.outer == (node_address(1), node_address(4)))
        .collect();
    let from_kernel: Vec<&Vxlan> = frames
        .iter()
        .filter(|f| f.outer == (node_address(4), node_address(1)))
        .collect();
    assert!(
        !from_weft.is_empty() && !from_kernel.is_empty(),
        "both directions were captured"
    );
    let (weft_public, weft_vtep) = weft_vteps
        .iter()
        .find(|(ip, _)| *ip == node_address(1))
        .copied()
        .expect("node 1's lease");
    assert_eq!(weft_public, node_address(1));
    for frame in &from_weft {
        // Addressed as flannel.1 expects: to its VtepMAC, from the VtepMAC in our lease.
        assert_eq!(frame.inner_macs, (mac(&flannel.vtep_mac), weft_vtep));
        assert_eq!(frame.ports.1, 8472);
        assert!(
            (32768..61000).contains(&frame.ports.0),
            "source port {} is in Linux's range",
            frame.ports.0
        );
        assert_eq!(frame.inner.0, weft_pod.addr);
        assert_eq!(frame.inner.1, flannel_pod.addr);
    }
    // The shape of every frame weft sent is the shape of what the kernel's own VXLAN sent back,
    // but for one field: Linux checksums the outer UDP header unless told not to, weft sends 0,
    // as RFC 7348 recommends (receivers must accept it; the flannel node just did).
    let kernel_shape = &from_kernel[0].shape;
    assert_eq!(kernel_shape.vni, 1);
    for frame in &from_weft {
        assert_eq!(frame.shape.udp_checksum, 0);
        let comparable = VxlanShape {
            udp_checksum: kernel_shape.udp_checksum,
            ..frame.shape
        };
        assert_eq!(
            comparable, *kernel_shape,
            "weft's VXLAN differs from Linux's"
        );
    }
    // Each flow keeps one source port (Linux spreads flows, not packets): two connections
    // crossed here, ours and the replies of the flannel pod's.
    let mut port_of_flow = std::collections::BTreeMap::new();
    for frame in &from_weft {
        let port = *port_of_flow
            .entry((frame.inner, frame.inner_ports))
            .or_insert(frame.ports.0);
        assert_eq!(port, frame.ports.0, "a flow changed its outer source port");
    }
    assert_eq!(port_of_flow.len(), 2, "{port_of_flow:?}");
}

/// A pod's kernel may give a connection to a ClusterIP and a direct connection to the endpoint
/// behind it the same local port, as their destinations differ; translated per packet, the two
/// would be one tuple on the wire, and the second to open would never complete. A port range of
/// 64 makes the kernel share ports between the two destinations all the time. Translated at
/// `connect()`, the kernel picks the port knowing the endpoint, and nothing is moved per packet.
#[test]
fn service_and_direct_connections_from_one_pod_to_one_endpoint_never_share_a_tuple() {
    let cluster = cluster(2, 1);
    let run = interleave_service_and_direct_connections(&cluster, true, 1000);
    assert!(
        run.failures.is_empty(),
        "{} of 2000 connections failed: {:?}",
        run.failures.len(),
        run.failures
    );
    assert_eq!(run.moved, 0, "the socket path needs no per-packet moves");
}

/// The same traffic translated per packet (`--socket-lb=host-only`): the second connection to
/// open on a tuple has its client port moved, as netfilter's NAT does, whichever came first
/// (a direct connection onto a service connection's tuple: conntrack knows it; a service
/// connection onto a direct one's: the pod's socket table does). Before weft moved ports, the
/// first failure came within 10 rounds.
#[test]
fn per_packet_translation_moves_clashing_client_ports() {
    let cluster = cluster_with_args(&["--socket-lb=host-only"]);
    let run = interleave_service_and_direct_connections(&cluster, false, 1000);
    assert!(
        run.failures.is_empty(),
        "{} of 2000 connections failed: {:?}",
        run.failures.len(),
        run.failures
    );
    assert!(
        run.moved > 0,
        "with 64 ports, some connections must have clashed and been moved"
    );
    eprintln!(
        "per packet: up to {} moved connections tracked at once",
        run.moved
    );
}

/// The order the interleaved run above may not produce: a direct connection first, untracked,
/// then a service connection from its port to its endpoint. Only the pod's socket table knows
/// the tuple is taken; the service connection is moved, and both work.
#[test]
fn a_service_connection_from_the_port_of_a_direct_one_is_moved() {
    let cluster = cluster_with_args(&["--socket-lb=host-only"]);
    let client = &cluster.pods[0][0];
    let backend = SocketAddrV4::new(cluster.pods[1][0].addr, HTTP_PORT);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 7, 18), 80);
    let manifest = format!(
        "{}---\n{}",
        service("first", *vip.ip(), vip.port(), "TCP", HTTP_PORT),
        endpoint_slice("first", "TCP", HTTP_PORT, &[*backend.ip()])
    );
    cluster.agents[0].write_manifest("first.yaml", &manifest);
    within(Duration::from_secs(5), "node 1 serves the service", || {
        client.ns.run(|| http_get(vip)).is_ok()
    });
    let local = SocketAddrV4::new(client.addr, 45_000);
    client.ns.run(|| {
        let mut direct = HttpConnection::open_from(local, backend).expect("the direct connection");
        let seen = direct.request().expect("the direct connection answers");
        assert_eq!(
            seen.client_seen, local,
            "a direct connection keeps its port"
        );
        let mut service = HttpConnection::open_from(local, vip)
            .expect("the service connection from the same port completes");
        let seen = service.request().expect("the service connection answers");
        assert_eq!(*seen.client_seen.ip(), client.addr);
        assert_ne!(
            seen.client_seen.port(),
            local.port(),
            "the endpoint sees the service connection from another port"
        );
        direct
            .request()
            .expect("the direct connection still answers, untouched by the service's");
        service.request().expect("and so does the service's");
    });
    let moved = cluster.agents[0].inspect("conntrack");
    assert!(moved.contains("to :"), "{moved}");
}

/// What [`interleave_service_and_direct_connections`] saw.
struct Interleaved {
    failures: Vec<String>,
    /// The most connections conntrack showed with a moved client port at once (sampled).
    moved: usize,
}

/// Opens `rounds` pairs of connections from the first pod of node 1: one to a ClusterIP whose
/// only endpoint is the first pod of node 2, one straight to that pod; keeps the last 16 open
/// (closed with a reset, so the narrow port range is not held in TIME_WAIT).
fn interleave_service_and_direct_connections(
    cluster: &Cluster,
    socket_lb: bool,
    rounds: usize,
) -> Interleaved {
    let client = &cluster.pods[0][0];
    let backend = SocketAddrV4::new(cluster.pods[1][0].addr, HTTP_PORT);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 7, 17), 80);
    let manifest = format!(
        "{}---\n{}",
        service("clash", *vip.ip(), vip.port(), "TCP", HTTP_PORT),
        endpoint_slice("clash", "TCP", HTTP_PORT, &[*backend.ip()])
    );
    let agent = &cluster.agents[0];
    agent.write_manifest("clash.yaml", &manifest);
    within(Duration::from_secs(5), "node 1 serves the service", || {
        client.ns.run(|| http_get(vip)).is_ok()
    });
    assert_eq!(
        client.translated_at_connect(vip),
        socket_lb,
        "the pod's sockets are translated at connect() exactly when the socket LB covers pods"
    );
    client
        .ns
        .exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=40000 40063"],
        )
        .expect("narrowing the pod's port range");
    let moved_now = || {
        agent
            .inspect("conntrack")
            .lines()
            .filter(|row| row.contains("to :"))
            .count()
    };
    client.ns.run(|| {
        let mut open = std::collections::VecDeque::new();
        let mut run = Interleaved {
            failures: Vec::new(),
            moved: 0,
        };
        for round in 0..rounds {
            for target in [vip, backend] {
                match connect_closing_with_reset(target) {
                    Ok(stream) => open.push_back(stream),
                    Err(e) => run.failures.push(format!("round {round}, {target}: {e}")),
                }
                if open.len() > 16 {
                    open.pop_front();
                }
            }
            if round % 100 == 99 {
                run.moved = run.moved.max(moved_now());
            }
        }
        run
    })
}

/// A TCP connection to `target` that a close resets (SO_LINGER 0); gives up after 2 s.
fn connect_closing_with_reset(target: SocketAddrV4) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{setsockopt, sockopt};
    let stream = std::net::TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))?;
    setsockopt(
        &stream,
        sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    Ok(stream)
}

/// ClientIP affinity is keyed by the pod's address whichever path translates: a pod held to an
/// endpoint by connections translated at `connect()` stays on it when the node switches to
/// per-packet translation (`--socket-lb=host-only`; the affinity map is pinned across the
/// restart). Had the socket path used the node as the client, the packet path would find no
/// affinity for the pod and spread its connections over the three endpoints.
#[test]
fn a_pods_session_affinity_is_the_same_on_the_socket_and_the_packet_path() {
    let mut cluster = cluster(2, 3);
    let client = &cluster.pods[0][0];
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 7, 18), 80);
    let endpoints: Vec<Ipv4Addr> = cluster.pods[1].iter().map(|pod| pod.addr).collect();
    let manifest = format!(
        "{}  sessionAffinity: ClientIP\n---\n{}",
        service("sticky", *vip.ip(), vip.port(), "TCP", HTTP_PORT),
        endpoint_slice("sticky", "TCP", HTTP_PORT, &endpoints)
    );
    cluster.agents[0].write_manifest("sticky.yaml", &manifest);
    let servers = |requests: usize| -> BTreeSet<Ipv4Addr> {
        client.ns.run(|| {
            (0..requests)
                .map(|_| http_get(vip).expect("a request to the service").server)
                .collect()
        })
    };
    within(
        Duration::from_secs(5),
        "the pod's sockets are translated at connect()",
        || client.translated_at_connect(vip),
    );
    let socket_path = servers(20);
    assert_eq!(socket_path.len(), 1, "{socket_path:?}");
    let agent = &mut cluster.agents[0];
    agent.restart_with(&["--socket-lb=host-only"]);
    let packet_path = servers(20);
    assert_eq!(packet_path, socket_path);
}

/// Whether `agent` has the XDP filter pinned on some device.
fn has_xdp_filter(agent: &weft_tests::cluster::Agent) -> bool {
    agent
        .pin_dir()
        .join("links")
        .read_dir()
        .expect("link pins")
        .any(|pin| {
            pin.expect("a pin")
                .file_name()
                .to_string_lossy()
                .starts_with(XDP_UPLINK)
        })
}

#[test]
fn xdp_on_a_veth_uplink_is_left_off_unless_asked_for_as_it_costs_the_peer_its_offloads() {
    let segmentation = |cluster: &Cluster| {
        let features = cluster
            .underlay
            .ns
            .exec("ethtool", &["-k", &Underlay::port(1)])
            .expect("ethtool");
        features
            .lines()
            .find(|line| line.starts_with("tcp-segmentation-offload:"))
            .map(str::to_owned)
            .expect("a TSO line")
    };
    let auto = cluster(2, 1);
    assert!(auto.agents.iter().all(|agent| !has_xdp_filter(agent)));
    assert_eq!(segmentation(&auto), "tcp-segmentation-offload: on");
    drop(auto);

    let native = cluster_with_args(&["--xdp=native"]);
    assert!(native.agents.iter().all(has_xdp_filter));
    // What `--xdp=auto` spares a veth uplink: its peer cannot segment any more
    // (`veth_fix_features`), so every super-packet is cut to MTU frames before the node.
    assert!(
        segmentation(&native).starts_with("tcp-segmentation-offload: off"),
        "{}",
        segmentation(&native)
    );
    let (from, to) = (&native.pods[0][0], &native.pods[1][0]);
    let answer = from
        .ns
        .run(|| http_get(SocketAddrV4::new(to.addr, HTTP_PORT)))
        .expect("across with the XDP filter on");
    assert_eq!(answer.server, to.addr);
}
