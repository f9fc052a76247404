//! Capacity: an agent whose maps are too small for what it is asked to serve. What does not fit
//! is logged by name with the flag to raise and counted in `/metrics`, everything that fits
//! keeps answering, and what did not fit is programmed once space frees up. A conntrack table
//! far smaller than the connections opened through it evicts idle connections, never a live one.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use weft::datapath::{conntrack::Conntrack, maps::PinnedMaps};
use weft_common::maps::{ENDPOINTS_MAP, SERVICES_MAP};
use weft_tests::{
    apps::{Answer, HttpConnection, http_get},
    cluster::{Agent, ManifestNode, metric, scrape_metrics},
    seed::{self, BACKENDS, TARGET_PORT, endpoint_slice, service},
    within,
};

/// Service `s{i}` at 10.254.1.{i+1}:80, one file each.
fn frontend(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 254, 1, i as u8 + 1), 80)
}

fn manifest(i: usize, endpoints: &[Ipv4Addr]) -> (String, String) {
    let name = format!("s{i}");
    let text = format!(
        "{}---\n{}",
        service(&name, *frontend(i).ip(), 80, "TCP", TARGET_PORT),
        endpoint_slice(&name, "TCP", TARGET_PORT, endpoints)
    );
    (format!("{name}.yaml"), text)
}

/// Which of services `0..count` are in the maps, by `weft inspect services`.
fn programmed(agent: &Agent, count: usize) -> Vec<usize> {
    let table = agent.inspect("services");
    (0..count)
        .filter(|i| table.contains(&format!("{}", frontend(*i))))
        .collect()
}

/// The agent's log lines saying `entry` was not programmed.
fn not_programmed<'a>(log: &'a str, entry: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|line| line.contains("not programmed") && line.contains(&format!("\"{entry}")))
        .collect()
}

/// Every service in `fitted` answers from its own endpoints.
fn assert_answering(
    node: &ManifestNode,
    fitted: &[usize],
    endpoints: impl Fn(usize) -> Vec<Ipv4Addr>,
) {
    for i in fitted {
        let answers: Vec<Answer> = node.client.ns.run(|| {
            (0..6)
                .map(|_| http_get(frontend(*i)).unwrap_or_else(|e| panic!("s{i}, which fit: {e}")))
                .collect()
        });
        for answer in answers {
            assert!(
                endpoints(*i).contains(&answer.server),
                "s{i} answered from {}",
                answer.server
            );
        }
    }
}

#[test]
fn services_beyond_max_services_are_named_counted_and_programmed_once_space_frees_up() {
    const SERVICES: usize = 6;
    const LIMIT: usize = 4;
    let endpoints = |i: usize| vec![BACKENDS[i % BACKENDS.len()]];
    let manifests: Vec<_> = (0..SERVICES).map(|i| manifest(i, &endpoints(i))).collect();
    let node = ManifestNode::start(&manifests, &["--max-services=4"]);

    let fitted = programmed(&node.agent, SERVICES);
    assert_eq!(fitted.len(), LIMIT, "{}", node.agent.inspect("services"));
    assert_answering(&node, &fitted, endpoints);
    let log = node.agent.log();
    let left_out: Vec<usize> = (0..SERVICES).filter(|i| !fitted.contains(i)).collect();
    for i in &left_out {
        let lines = not_programmed(&log, &format!("default/s{i}"));
        assert!(
            lines
                .iter()
                .any(|line| line.contains("raise --max-services")),
            "no line names s{i} and the flag to raise:\n{log}"
        );
        eprintln!("s{i}: {}", lines[0]);
    }
    let scrape = scrape_metrics(&node.node);
    let gauge =
        |sample: &str| metric(&scrape, sample).unwrap_or_else(|| panic!("{sample} in:\n{scrape}"));
    assert_eq!(gauge("weft_not_programmed_entries"), left_out.len() as f64);
    assert_eq!(
        gauge(&format!("weft_map_entries{{map=\"{SERVICES_MAP}\"}}")),
        LIMIT as f64
    );
    assert_eq!(
        gauge(&format!("weft_map_capacity{{map=\"{SERVICES_MAP}\"}}")),
        LIMIT as f64
    );
    // kube-proxy's names, as its dashboards read them: every Service counted as a change, a
    // pass timed and stamped, the process's own figures.
    assert!(gauge("kubeproxy_sync_proxy_rules_service_changes_total") >= SERVICES as f64);
    assert!(gauge("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert!(gauge("process_resident_memory_bytes") > 1e6);
    assert!(gauge("process_start_time_seconds") > 1.7e9);

    // One service goes: one left out takes its place on the next retry (every 5 s).
    node.agent.remove_manifest(&format!("s{}.yaml", fitted[0]));
    within(
        Duration::from_secs(15),
        "a left-out service is programmed",
        || {
            programmed(&node.agent, SERVICES).len() == LIMIT
                && metric(&scrape_metrics(&node.node), "weft_not_programmed_entries") == Some(1.0)
        },
    );
    let now = programmed(&node.agent, SERVICES);
    assert_answering(&node, &now, endpoints);
}

#[test]
fn endpoints_beyond_max_endpoints_leave_whole_services_out_not_half_written_ones() {
    const SERVICES: usize = 4;
    // Three endpoints each: two services fit in eight slots, a third does not.
    let manifests: Vec<_> = (0..SERVICES).map(|i| manifest(i, &BACKENDS)).collect();
    let node = ManifestNode::start(&manifests, &["--max-endpoints=8"]);

    let fitted = programmed(&node.agent, SERVICES);
    assert_eq!(fitted.len(), 2, "{}", node.agent.inspect("services"));
    assert_answering(&node, &fitted, |_| BACKENDS.to_vec());
    // Each service that fit answers from all three endpoints: none was cut short.
    for i in &fitted {
        let servers: std::collections::BTreeSet<Ipv4Addr> = node.client.ns.run(|| {
            (0..30)
                .filter_map(|_| http_get(frontend(*i)).ok())
                .map(|a| a.server)
                .collect()
        });
        assert_eq!(servers, BACKENDS.into(), "s{i}");
    }
    let log = node.agent.log();
    for i in (0..SERVICES).filter(|i| !fitted.contains(i)) {
        let lines = not_programmed(&log, &format!("default/s{i}"));
        assert!(
            lines
                .iter()
                .any(|line| line.contains("raise --max-endpoints")),
            "no line names s{i} and the flag to raise:\n{log}"
        );
        eprintln!("s{i}: {}", lines[0]);
        // Left out whole: no frontend leads to a partial endpoint set.
        assert!(
            node.client.ns.run(|| http_get(frontend(i)).is_err()),
            "s{i} answers"
        );
    }
    let scrape = scrape_metrics(&node.node);
    assert_eq!(
        metric(&scrape, "weft_not_programmed_entries"),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        metric(
            &scrape,
            &format!("weft_map_capacity{{map=\"{ENDPOINTS_MAP}\"}}")
        ),
        Some(8.0)
    );
}

#[test]
fn a_live_connection_survives_a_conntrack_table_churned_many_times_over() {
    // 64 entries: 32 connections. 400 short connections churn the table twelve times over,
    // while the live connection carries a request after every fourth of them: it is always
    // among the most recently used of the table's 64 entries, so LRU must evict others.
    const CT_ENTRIES: usize = 64;
    const SHORT: usize = 400;
    const EVERY: usize = 4;
    let nginx = seed::nginx_manifest(&BACKENDS);
    let node = ManifestNode::start(
        &[("nginx.yaml", &nginx)],
        &[&format!("--ct-entries={CT_ENTRIES}")],
    );
    within(Duration::from_secs(10), "the client reaches nginx", || {
        node.client.ns.run(|| http_get(seed::frontend()).is_ok())
    });
    let (live, failed) = node.client.ns.run(|| {
        let mut connection = HttpConnection::open(seed::frontend()).expect("the live connection");
        let mut live: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        let mut failed = Vec::new();
        for i in 0..SHORT {
            if let Err(e) = http_get(seed::frontend()) {
                failed.push(format!("short connection {i}: {e}"));
            }
            if i % EVERY == 0 {
                let answer = connection.request().unwrap_or_else(|e| {
                    panic!("the live connection broke after {i} short ones: {e}")
                });
                *live.entry(answer.server).or_default() += 1;
            }
        }
        (live, failed)
    });
    assert_eq!(
        live.len(),
        1,
        "the live connection kept one endpoint: {live:?}"
    );
    assert!(failed.is_empty(), "{failed:?}");
    let entries = Conntrack::open(&mut PinnedMaps::new(node.agent.pin_dir()))
        .expect("the pinned conntrack map")
        .entries()
        .expect("its entries");
    assert!(entries.len() <= CT_ENTRIES, "{} entries", entries.len());
    eprintln!(
        "{SHORT} short connections through a {CT_ENTRIES}-entry table ({} entries at the end) \
         beside one live connection",
        entries.len()
    );
}
