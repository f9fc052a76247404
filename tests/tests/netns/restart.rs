//! Agent restarts and upgrades under traffic: the node keeps forwarding while no agent runs,
//! and the next agent takes over its pinned maps and attachments in place. Connections tried
//! and failed are counted across the whole disruption; the tests print the tallies.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use weft::datapath::links::LINKS_DIR;
use weft_tests::{
    apps::{HttpConnection, UdpFlow, http_get},
    cluster::{Agent, Pod},
    overlay::{Cluster, POD_HTTP_PORT, POD_UDP_PORT, cluster},
    seed::{endpoint_slice, service},
    within,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 60, 10);
const HTTP: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
/// Long-lived connections, each sending a request every 10 ms throughout.
const STREAMS: usize = 3;

/// What one kind of traffic tried and how much of it failed.
#[derive(Debug)]
struct Tally {
    tried: u64,
    failed: u64,
    /// The first failure, and when the attempt began (since the traffic started).
    first_error: Option<(String, Duration)>,
    started: Instant,
}

impl Tally {
    fn new(started: Instant) -> Self {
        Self {
            tried: 0,
            failed: 0,
            first_error: None,
            started,
        }
    }

    fn record<T>(&mut self, attempt: impl FnOnce() -> std::io::Result<T>) -> bool {
        let began = self.started.elapsed();
        self.tried += 1;
        match attempt() {
            Ok(_) => true,
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert((e.to_string(), began));
                false
            }
        }
    }
}

/// The traffic's results across one disruption.
#[derive(Debug)]
struct Outcome {
    service_streams: Tally,
    service_connections: Tally,
    pod_streams: Tally,
    pod_connections: Tally,
    udp_answers: usize,
    udp_longest_silence: Duration,
}

impl Outcome {
    fn assert_undisturbed(&self) {
        eprintln!("{self:#?}");
        for (what, tally) in [
            (
                "requests on established service connections",
                &self.service_streams,
            ),
            (
                "new connections to the ClusterIP",
                &self.service_connections,
            ),
            (
                "requests on established cross-node pod connections",
                &self.pod_streams,
            ),
            ("new cross-node pod connections", &self.pod_connections),
        ] {
            assert!(
                tally.tried >= 50,
                "too little traffic to judge: {what} {tally:?}"
            );
            assert_eq!(tally.failed, 0, "{what} failed: {tally:?}");
        }
        assert!(self.udp_answers >= 50, "the UDP flow hardly ran: {self:?}");
        assert!(
            self.udp_longest_silence < Duration::from_secs(1),
            "the UDP flow went unanswered for {:?}",
            self.udp_longest_silence
        );
    }
}

/// A 2-node overlay cluster with one service (TCP and UDP) whose endpoints are a pod on the
/// client's node and the first pod of the other node. The client is node 1's first pod; the
/// other node's second pod, no endpoint, takes the direct traffic. (Direct connections to an
/// endpoint would now and then take the local port of a service connection to the same
/// endpoint, a clash weft does not resolve: see `overlay.rs`.)
fn service_cluster() -> Cluster {
    let cluster = cluster(2, 2);
    let backends = [cluster.pods[0][1].addr, cluster.pods[1][0].addr];
    let manifest = format!(
        "{}---\n{}---\n{}---\n{}",
        service("web", VIP, HTTP.port(), "TCP", POD_HTTP_PORT),
        endpoint_slice("web", "TCP", POD_HTTP_PORT, &backends),
        service("dns", VIP, DNS.port(), "UDP", POD_UDP_PORT),
        endpoint_slice("dns", "UDP", POD_UDP_PORT, &backends),
    );
    for agent in &cluster.agents {
        agent.write_manifest("web.yaml", &manifest);
    }
    let client = &cluster.pods[0][0];
    within(
        Duration::from_secs(10),
        "the client reaches the service",
        || client.ns.run(|| http_get(HTTP).is_ok()),
    );
    cluster
}

/// Runs traffic from the client — established connections and new ones, to the ClusterIP and
/// straight to a pod on the other node, plus a UDP flow to the ClusterIP — around `disrupt`.
fn under_traffic(cluster: &mut Cluster, disrupt: impl FnOnce(&mut [Agent], Instant)) -> Outcome {
    let client: &Pod = &cluster.pods[0][0];
    let remote_pod = SocketAddrV4::new(cluster.pods[1][1].addr, POD_HTTP_PORT);
    let stop = AtomicBool::new(false);
    let udp = UdpFlow::start(&client.ns, DNS);
    let started = Instant::now();
    let outcome = thread::scope(|scope| {
        let streams = |target: SocketAddrV4| {
            let (ns, stop) = (&client.ns, &stop);
            scope.spawn(move || {
                ns.enter().expect("entering the client");
                let mut tally = Tally::new(started);
                let mut open: Vec<HttpConnection> = (0..STREAMS)
                    .map(|_| HttpConnection::open(target).expect("opening a stream"))
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    // A broken stream is counted once and not used again.
                    open.retain_mut(|connection| tally.record(|| connection.request()));
                    thread::sleep(Duration::from_millis(10));
                }
                tally
            })
        };
        let connections = |target: SocketAddrV4| {
            let (ns, stop) = (&client.ns, &stop);
            scope.spawn(move || {
                ns.enter().expect("entering the client");
                let mut tally = Tally::new(started);
                while !stop.load(Ordering::Relaxed) {
                    tally.record(|| http_get(target));
                    thread::sleep(Duration::from_millis(5));
                }
                tally
            })
        };
        let workers = [
            streams(HTTP),
            connections(HTTP),
            streams(remote_pod),
            connections(remote_pod),
        ];
        thread::sleep(Duration::from_secs(1));
        disrupt(&mut cluster.agents, started);
        thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let [
            service_streams,
            service_connections,
            pod_streams,
            pod_connections,
        ] = workers.map(|worker| worker.join().expect("a traffic thread panicked"));
        Outcome {
            service_streams,
            service_connections,
            pod_streams,
            pod_connections,
            udp_answers: udp.answered(),
            udp_longest_silence: udp.longest_silence(),
        }
    });
    drop(udp);
    outcome
}

/// One pinned attachment of an agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Attachment {
    pin: String,
    link: u32,
    program: u32,
    /// The program's tag: a hash of its instructions.
    tag: u64,
}

fn attachments(agent: &Agent) -> Vec<Attachment> {
    let dir = agent.pin_dir().join(LINKS_DIR);
    let mut found: Vec<Attachment> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a pin").path();
            let link = FdLink::from(PinnedLink::from_pin(&path).expect("a pinned link"));
            let info = link.info().expect("link info");
            Attachment {
                pin: name(&path),
                link: info.id(),
                program: info.program_id(),
                tag: tag(info.program_id()),
            }
        })
        .collect();
    found.sort();
    found
}

fn name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// Asserts the agents' attachments are the same links as `before` (swapped in place, never
/// detached and attached again), now running other programs. Returns the programs' tags,
/// before and after.
fn assert_swapped_in_place(
    before: &[Vec<Attachment>],
    agents: &[Agent],
) -> Vec<(String, [u64; 2])> {
    let mut tags = Vec::new();
    for (agent, before) in agents.iter().zip(before) {
        let after = attachments(agent);
        let links = |list: &[Attachment]| -> Vec<(String, u32)> {
            list.iter().map(|a| (a.pin.clone(), a.link)).collect()
        };
        assert_eq!(
            links(&after),
            links(before),
            "the same links, kept in place"
        );
        // Every program of the dataplane is attached somewhere: the uplink (TC both ways and
        // XDP), the pods' ports (two each) and the cgroup (four hooks).
        assert!(after.len() >= 3 + 2 * 2 + 4, "{after:?}");
        for (old, new) in before.iter().zip(&after) {
            assert_ne!(
                old.program, new.program,
                "{} runs the new agent's program",
                old.pin
            );
            tags.push((old.pin.clone(), [old.tag, new.tag]));
        }
    }
    tags
}

fn tag(program: u32) -> u64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == program)
        .map(|info| info.tag())
        .unwrap_or_else(|| panic!("program {program} is not loaded"))
}

fn leases(cluster: &Cluster) -> Vec<String> {
    cluster
        .etcd
        .keys(&format!("{}/subnets/", weft_tests::overlay::CLUSTER_PREFIX))
}

#[test]
fn killing_and_restarting_every_agent_under_traffic_loses_nothing() {
    let mut cluster = service_cluster();
    let before: Vec<_> = cluster.agents.iter().map(attachments).collect();
    let leases_before = leases(&cluster);
    let outcome = under_traffic(&mut cluster, |agents, started| {
        for agent in agents {
            // SIGKILL: the agent tidies nothing; what it put in the kernel carries on alone.
            let from = started.elapsed();
            agent.kill_and_restart();
            eprintln!(
                "agent killed at {from:?}, ready again at {:?}",
                started.elapsed()
            );
        }
    });
    outcome.assert_undisturbed();
    let tags = assert_swapped_in_place(&before, &cluster.agents);
    assert!(
        tags.iter().all(|(_, [old, new])| old == new),
        "a restart loads the same build: {tags:?}"
    );
    assert_eq!(leases(&cluster), leases_before, "every node kept its lease");
    for agent in &cluster.agents {
        assert!(
            !agent.log().contains("recreating it empty"),
            "no map was recreated on restart:\n{}",
            agent.log()
        );
    }
}

/// The other build of the eBPF programs `cargo xtask test` makes for this test: the same
/// source compiled at another optimisation level, so every program's instructions differ.
fn upgrade_object() -> PathBuf {
    let path = std::env::var_os("WEFT_UPGRADE_OBJECT")
        .map(PathBuf::from)
        .expect(
            "WEFT_UPGRADE_OBJECT names another build of the eBPF object; `cargo xtask test` \
         builds one (`cargo xtask upgrade-object` alone)",
        );
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

#[test]
fn upgrading_every_agent_to_another_build_under_traffic_loses_nothing() {
    let object = upgrade_object();
    let mut cluster = service_cluster();
    let before: Vec<_> = cluster.agents.iter().map(attachments).collect();
    let outcome = under_traffic(&mut cluster, |agents, started| {
        for agent in agents {
            // A rolling update: SIGTERM, then the new version on the same node.
            let from = started.elapsed();
            agent.restart_with(&[&format!("--bpf-object={}", object.display())]);
            eprintln!(
                "agent stopped at {from:?}, upgraded and ready at {:?}",
                started.elapsed()
            );
        }
    });
    outcome.assert_undisturbed();
    let tags = assert_swapped_in_place(&before, &cluster.agents);
    // The packet programs (TC and XDP) are the other build's instructions. The socket hooks are
    // reloaded too (new program ids, asserted above) but compile to the same instructions for
    // BPF CPU v2 as for the generic one, so their tags stay.
    let packet_programs: Vec<_> = tags
        .iter()
        .filter(|(pin, _)| pin.starts_with("tc_") || pin.starts_with("xdp_"))
        .collect();
    assert!(packet_programs.len() >= 2 * (3 + 2 * 2), "{tags:?}");
    assert!(
        packet_programs.iter().all(|(_, [old, new])| old != new),
        "every packet program is the other build's: {tags:?}"
    );
}
