//! The overlay against etcd, on namespace clusters with a real etcd: etcd over TLS with client
//! certificates (and agents it must refuse).

use std::{collections::BTreeMap, net::SocketAddrV4, thread, time::Duration};

use rcgen::ExtendedKeyUsagePurpose;
use weft::flannel::subnet_key;
use weft_tests::{
    apps::http_get,
    cluster::{Agent, AgentOptions, Node},
    overlay::{
        CLUSTER_PREFIX as PREFIX, Etcd, POD_HTTP_PORT as HTTP_PORT, cluster_on, cluster_options,
        node_address,
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
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:fe:c0:a8:32:{n:02x}"}}}}"#,
        node_address(n)
    )
}

#[test]
fn agents_take_their_leases_over_tls_and_agents_without_a_good_certificate_do_not() {
    let cluster = cluster_on(Etcd::start_tls, 2, 1);
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
