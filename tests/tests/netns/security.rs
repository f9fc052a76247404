//! Security. Least privilege: agents whose capability bounding set holds only CAP_BPF,
//! CAP_NET_ADMIN and CAP_PERFMON (what the DaemonSet grants) run the whole dataplane — overlay,
//! services, a restart that swaps programs into pinned links, `weft trace` — while none of the
//! three can be done without, and the pin directory is root-only. And VXLAN from a node that
//! holds no lease is dropped, sent by the real kernel VXLAN device of such a node.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    time::{Duration, Instant},
};

use weft::sources::flannel::{Lease, parse_subnet_key};
use weft_tests::{
    apps::{http_get, udp_exchange, udp_exchange_with},
    cluster::{Agent, Node},
    overlay::{
        CLUSTER_PREFIX, Etcd, FlannelNode, POD_HTTP_PORT, POD_UDP_PORT, Underlay, cluster,
        cluster_network, cluster_on, cluster_options, network_config, node_address,
    },
    seed::{endpoint_slice, service},
    within,
};

/// What the DaemonSet adds after dropping ALL (`deploy/base/daemonset.yaml`).
const NEEDED: [&str; 3] = ["bpf", "net_admin", "perfmon"];
/// Their bits in `/proc/<pid>/status` (`linux/capability.h`).
const NEEDED_BITS: u64 = 1 << 12 | 1 << 38 | 1 << 39;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 62, 10);

/// An agent process's effective and bounding capability sets.
fn capabilities(agent: &Agent) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let set = |field: &str| {
        let hex = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in {status}"));
        u64::from_str_radix(hex.trim(), 16).expect("a hex capability set")
    };
    (set("CapEff:"), set("CapBnd:"))
}

/// Asserts `dir` and everything pinned in it are root's alone.
fn assert_root_only(dir: &Path) {
    for entry in walk(dir) {
        let meta = fs::metadata(&entry).expect("pin metadata");
        assert_eq!(meta.uid(), 0, "{} is root's", entry.display());
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{} is {mode:o}: no group or other access",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = vec![dir.to_owned()];
    for entry in fs::read_dir(dir).expect("pin directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[test]
fn agents_with_only_bpf_net_admin_and_perfmon_run_the_whole_dataplane() {
    let mut cluster = cluster_on(Etcd::start, 2, 2, Some(&NEEDED));
    for agent in &cluster.agents {
        assert_eq!(
            capabilities(agent),
            (NEEDED_BITS, NEEDED_BITS),
            "the agent holds exactly CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
    }
    let backends: Vec<Ipv4Addr> = cluster.pods[1].iter().map(|pod| pod.addr).collect();
    let manifest = [
        service("web", VIP, 80, "TCP", POD_HTTP_PORT),
        endpoint_slice("web", "TCP", POD_HTTP_PORT, &backends),
        service("dns", VIP, 53, "UDP", POD_UDP_PORT),
        endpoint_slice("dns", "UDP", POD_UDP_PORT, &backends),
    ]
    .join("---\n");
    for agent in &cluster.agents {
        agent.write_manifest("services.yaml", &manifest);
    }
    let serves = |cluster: &weft_tests::overlay::Cluster| {
        let client = &cluster.pods[0][0];
        let direct = SocketAddrV4::new(cluster.pods[1][0].addr, POD_HTTP_PORT);
        within(
            Duration::from_secs(10),
            "ClusterIP (TCP and UDP) and cross-node pod traffic",
            || {
                client.ns.run(|| {
                    http_get(SocketAddrV4::new(VIP, 80)).is_ok()
                        && udp_exchange(SocketAddrV4::new(VIP, 53)).is_ok()
                        && http_get(direct).is_ok()
                })
            },
        );
    };
    serves(&cluster);
    // `weft trace` works with the same three (it opens pinned programs; it never needs
    // CAP_SYS_ADMIN to look one up by id).
    let probe = cluster.agents[0]
        .trace(&[
            &format!("--from={}", cluster.pods[0][0].addr),
            &format!("--to={VIP}:80/tcp"),
        ])
        .expect("weft trace with the agent's capabilities");
    assert!(
        probe["result"]
            .as_str()
            .is_some_and(|result| result.starts_with("sent to node 192.168.50.2 over VXLAN")),
        "{probe:#}"
    );

    for agent in &cluster.agents {
        assert_root_only(agent.pin_dir());
    }
    // A pin directory someone opened up is made root-only again by the next agent, which still
    // holds only the three capabilities and swaps its programs into the pinned links.
    let agent = &mut cluster.agents[0];
    fs::set_permissions(agent.pin_dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.kill_and_restart();
    assert_eq!(capabilities(agent), (NEEDED_BITS, NEEDED_BITS));
    assert_root_only(agent.pin_dir());
    serves(&cluster);
}

#[test]
fn without_any_one_of_the_three_the_agent_stops_and_says_what_failed() {
    weft_tests::netns::require_root();
    let underlay = Underlay::new(&weft_tests::netns::unique("wcap"));
    let etcd = Etcd::start(&underlay);
    etcd.put(
        &format!("{CLUSTER_PREFIX}/config"),
        &network_config(cluster_network()),
    );
    let node = Node::on_underlay(
        &format!("{}n1", underlay.ns.name()),
        &underlay,
        node_address(1),
    );
    for missing in NEEDED {
        let capabilities: Vec<String> = NEEDED
            .iter()
            .filter(|c| **c != missing)
            .map(|c| (*c).to_owned())
            .collect();
        let options = weft_tests::cluster::AgentOptions {
            capabilities: Some(capabilities),
            ..cluster_options(&etcd)
        };
        let mut agent = Agent::launch(&node, &[], &options);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.exited() {
            assert!(
                Instant::now() < deadline,
                "an agent without CAP_{} keeps running; its log:\n{}",
                missing.to_uppercase(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = agent.log();
        eprintln!("without CAP_{}:\n{log}", missing.to_uppercase());
        let cap = format!("CAP_{}", missing.to_uppercase());
        assert!(
            log.contains(&format!("Error: weft needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN for the first and last) and lacks {cap};")),
            "the agent without {cap} names it:\n{log}"
        );
        assert!(
            agent.pin_dir().read_dir().is_err(),
            "nothing was pinned before the check"
        );
        drop(agent);
    }
}

/// The VXLAN-from-a-stranger drop counter, as `weft inspect drops` shows it.
fn unknown_source_drops(agent: &Agent) -> u64 {
    agent
        .inspect("drops")
        .lines()
        .find_map(|line| line.strip_prefix("vxlan_unknown_source"))
        .and_then(|count| count.trim().parse().ok())
        .expect("a vxlan_unknown_source row")
}

#[test]
fn vxlan_from_a_node_without_a_lease_is_dropped_until_it_holds_one() {
    const ELSEWHERE: &str = "/another-cluster/network";
    let cluster = cluster(1, 1);
    let agent = &cluster.agents[0];
    let subnet = agent.leased_subnet();
    let lease_key = |prefix: &str, subnet: ipnet::Ipv4Net| {
        format!(
            "{prefix}/subnets/{}-{}",
            subnet.network(),
            subnet.prefix_len()
        )
    };
    let own = Lease::parse(
        &cluster
            .etcd
            .get(&lease_key(CLUSTER_PREFIX, subnet))
            .expect("the node's lease"),
    )
    .expect("flannel's JSON");
    // A node that speaks flannel's VXLAN to this one, but whose lease is under another
    // cluster's prefix: weft never learns it.
    let stranger_subnet: ipnet::Ipv4Net = if subnet.network().octets()[2] == 250 {
        "172.30.251.0/24"
    } else {
        "172.30.250.0/24"
    }
    .parse()
    .expect("a subnet");
    let stranger = FlannelNode::new(
        &format!("{}s", cluster.underlay.ns.name()),
        &cluster.underlay,
        node_address(9),
        stranger_subnet,
        &cluster.etcd,
        ELSEWHERE,
    );
    stranger.add_remote(subnet, own.public_ip, &own.vtep_mac.to_string());
    let pod = stranger.node.add_pod(stranger.node.pod_address(1));
    let target = SocketAddrV4::new(cluster.pods[0][0].addr, POD_UDP_PORT);

    let before = unknown_source_drops(agent);
    for _ in 0..3 {
        let answer = pod.ns.run(|| udp_exchange(target));
        assert!(
            answer.is_err(),
            "a stranger's VXLAN got through: {answer:?}"
        );
    }
    let dropped = unknown_source_drops(agent) - before;
    assert!(dropped >= 3, "{dropped} drops counted for 3 datagrams");

    // Fragmented VXLAN (the stranger's uplink narrowed to 1400 bytes under a full 1450-byte
    // inner packet) passes the uplink's TC hook, which cannot judge fragments; the kernel
    // reassembles it for the node's VXLAN device, whose hook drops it all the same.
    stranger
        .node
        .ns
        .ip(&["link", "set", "eth0", "mtu", "1400"])
        .expect("a narrower uplink on the stranger");
    let big = [b'x'; 1450 - 28];
    let before = unknown_source_drops(agent);
    let answer = pod.ns.run(|| udp_exchange_with(target, &big));
    assert!(answer.is_err(), "fragmented VXLAN got through: {answer:?}");
    assert!(
        unknown_source_drops(agent) > before,
        "the VXLAN device's hook counted it"
    );

    // The same node, its lease put where weft watches, is a member and is answered.
    let lease = cluster
        .etcd
        .get(&lease_key(ELSEWHERE, stranger_subnet))
        .expect("the stranger's lease");
    let member_key = lease_key(CLUSTER_PREFIX, stranger_subnet);
    assert_eq!(
        parse_subnet_key(CLUSTER_PREFIX, &member_key),
        Some(stranger_subnet)
    );
    cluster.etcd.put(&member_key, &lease);
    within(
        Duration::from_secs(10),
        "the node answers once the stranger holds a lease",
        || pod.ns.run(|| udp_exchange(target).is_ok()),
    );
    pod.ns
        .run(|| udp_exchange_with(target, &big))
        .expect("a member's fragmented VXLAN, reassembled and decapsulated by the kernel");
}
