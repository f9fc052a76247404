//! `cargo xtask bench [--quick]`: weft against kube-proxy (iptables and nftables modes) and the
//! kernel's VXLAN device as flannel configures it, on namespace clusters built here, with the
//! same load through each, in one run. Prints one table and writes it, with the machine, the
//! date and the command, to the report file (and a plot of connect latency against the number
//! of services beside it). Nothing here asserts a figure.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::HashMap as BpfHashMap;
use ipnet::Ipv4Net;
use weft::{
    dataplane::{FROM_PODS, FROM_UPLINK, MapLimits, TC_FLOOR, TO_POD, TO_UPLINK, XDP_FLOOR},
    maps::open_pinned,
};
use weft_common::{
    ip_proto,
    maps::{SERVICES_MAP, ServiceKey, ServiceValue},
};
use weft_tests::{
    apiserver::{self, ApiServer},
    bench::{
        Better, Contender, Row, Samples, Series,
        load::{BenchServer, connect_rate, request_rate},
        machine,
        overlay::{self, Case, Testbed},
        peers::{
            self, BenchService, NFT_TABLE, iptables_ruleset, iptables_update, nft_ruleset,
            nft_update,
        },
        plot, quantile, table,
    },
    cluster::{Agent, AgentOptions, Node, Pod},
    harness::Datapath,
    netns::{require_root, unique},
    overlay_fixture::{self, REMOTE_IP, inner_frame, pod, uplink_namespace, vxlan_frame},
    packet::{ACK, SYN, parse, tcp},
};

/// Endpoints per service, as the issue's scale points have them.
const ENDPOINTS: usize = 10;
/// The port the bench servers listen on in every backend pod.
const TARGET_PORT: u16 = 8080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 200);

fn pod_subnet() -> Ipv4Net {
    "10.244.0.0/24".parse().expect("valid CIDR")
}

fn cluster_cidr() -> Ipv4Net {
    "10.244.0.0/16".parse().expect("valid CIDR")
}

fn backends() -> Vec<Ipv4Addr> {
    (0..ENDPOINTS)
        .map(|i| Ipv4Addr::new(10, 244, 0, 10 + u8::try_from(i).expect("few endpoints")))
        .collect()
}

/// How much of everything: `--quick` keeps the whole run near two minutes.
struct Plan {
    quick: bool,
    /// Service counts for the per-packet costs.
    packet_scales: &'static [usize],
    /// Service counts for the node figures (the last one also for programming and memory).
    node_scales: &'static [usize],
    /// Overlay nodes for the per-packet encapsulation costs.
    overlay_nodes: &'static [usize],
    /// Program runs averaged per per-packet figure.
    packet_runs: u16,
    /// Length of one load run.
    load: Duration,
    /// Repetitions of every figure (contenders in a rotating order).
    repeats: usize,
    /// Length of one throughput run, seconds.
    throughput_secs: u32,
    /// How long the underlay's frames are captured for their lengths.
    capture: Duration,
}

const FULL: Plan = Plan {
    quick: false,
    packet_scales: &[1, 1_000, 10_000, 100_000],
    node_scales: &[1, 1_000, 10_000],
    overlay_nodes: &[1, 250],
    packet_runs: 2_000,
    load: Duration::from_secs(3),
    repeats: 3,
    throughput_secs: 5,
    capture: Duration::from_secs(1),
};

const QUICK: Plan = Plan {
    quick: true,
    packet_scales: &[1, 1_000],
    node_scales: &[1, 1_000],
    overlay_nodes: &[1, 250],
    packet_runs: 300,
    load: Duration::from_millis(700),
    repeats: 2,
    throughput_secs: 1,
    capture: Duration::from_millis(300),
};

/// The rows of the report, found by figure and case.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        figure: &str,
        case: &str,
        unit: &'static str,
        better: Better,
        contender: Contender,
        value: f64,
    ) {
        let index = match self
            .rows
            .iter()
            .position(|r| r.figure == figure && r.case == case)
        {
            Some(index) => index,
            None => {
                self.rows.push(Row::new(figure, case, unit, better));
                self.rows.len() - 1
            }
        };
        self.rows[index].add(contender, value);
    }
}

fn main() -> anyhow::Result<()> {
    require_root();
    let mut args = std::env::args().skip(1);
    let mut plan = &FULL;
    let mut out = PathBuf::from("docs/benchmarks.md");
    let mut only: Option<String> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => plan = &QUICK,
            "--out" => out = args.next().context("--out needs a path")?.into(),
            "--only" => only = Some(args.next().context("--only needs a part")?),
            other => bail!("unknown argument {other}; use --quick, --only PART and --out FILE"),
        }
    }
    let runs = |part: &str| only.as_deref().is_none_or(|only| only == part);
    let started = Instant::now();
    let mut report = Report::default();
    if runs("packet") {
        eprintln!("bench: per-packet cost of each eBPF path (BPF_PROG_TEST_RUN)");
        packet_costs(plan, &mut report);
    }
    let mut latency = Vec::new();
    if runs("services") {
        eprintln!("bench: services on one node: weft, kube-proxy iptables, kube-proxy nftables");
        latency = node_figures(plan, &mut report)?;
    }
    if runs("overlay") {
        eprintln!("bench: pod-to-pod throughput across two nodes: weft, kernel VXLAN");
        throughput(plan, &mut report)?;
    }
    let table = table(&report.rows);
    println!("{table}");
    let svg = plot(
        "Connect latency p50, client pod to the last service's ClusterIP",
        "services installed (10 endpoints each)",
        "µs",
        &latency,
    );
    let svg_path = out.with_extension("svg");
    fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let document = document(plan, &table, &svg_path, started.elapsed());
    fs::write(&out, document).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "bench: done in {:.0} s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        out.display(),
        svg_path.display()
    );
    Ok(())
}

/// [`mean_ns`] of `program` on `frame` as if on device `ifindex` of `ns`.
fn mean_ns_in(
    ns: &weft_tests::netns::Netns,
    datapath: &mut Datapath,
    runs: u16,
    program: &str,
    frame: &[u8],
    ifindex: u32,
) -> f64 {
    ns.run(|| {
        mean_ns(runs, |_| {
            datapath.run_with(program, frame, 0, ifindex, 1).duration
        })
    })
}

/// The PublicIPs of the per-packet overlay's `nodes` remote nodes: node 2, then the others.
fn others_ips(nodes: usize) -> impl Iterator<Item = Ipv4Addr> {
    std::iter::once(REMOTE_IP).chain(
        (1..=255u8)
            .filter(|third| ![20, 44].contains(third))
            .take(nodes - 1)
            .map(|third| Ipv4Addr::new(192, 168, 51, third)),
    )
}

/// The mean of `runs` single runs, in nanoseconds: every run gets a fresh frame from `frame`,
/// since a program that rewrites the packet would see its own output on a repeated run.
fn mean_ns(runs: u16, mut one: impl FnMut(u16) -> Duration) -> f64 {
    let total: Duration = (0..runs).map(&mut one).sum();
    total.as_secs_f64() * 1e9 / f64::from(runs)
}

/// Figure 1: nanoseconds per packet of each path, from the kernel's own timing of
/// `BPF_PROG_TEST_RUN`, beside empty programs of the same hooks.
fn packet_costs(plan: &Plan, report: &mut Report) {
    const FIGURE: &str = "1 per packet";
    let ns_per = |report: &mut Report, case: &str, value: f64| {
        report.add(FIGURE, case, "ns", Better::Lower, Contender::Weft, value);
    };
    for &scale in plan.packet_scales {
        let services = peers::services(scale, &backends(), TARGET_PORT);
        let built = Instant::now();
        let limits = MapLimits {
            max_services: u32::try_from(scale * 2).expect("scale fits").max(1024),
            max_endpoints: u32::try_from(scale * ENDPOINTS * 2)
                .expect("scale fits")
                .max(4096),
            ..MapLimits::default()
        };
        let mut datapath =
            Datapath::with_limits(&peers::manifests(&services), Some(cluster_cidr()), limits);
        datapath.load_floor();
        eprintln!(
            "  {scale} services programmed in {:.1} s",
            built.elapsed().as_secs_f64()
        );
        let last = services.last().expect("at least one service");
        let vip = SocketAddrV4::new(last.vip, last.port);
        for _ in 0..plan.repeats {
            let client = |port: u16| SocketAddrV4::new(CLIENT, port);
            // A new connection each run: a conntrack miss, a choice, two entries written.
            let mut source = 10_000u16;
            let first = mean_ns(plan.packet_runs, |_| {
                source = source.wrapping_add(1).max(10_000);
                let frame = tcp(client(source), vip, SYN).build();
                datapath.run_with(FROM_PODS, &frame, 0, 0, 1).duration
            });
            ns_per(
                report,
                &format!("ClusterIP first packet (conntrack miss), {scale} services"),
                first,
            );
            // One established connection: a conntrack hit.
            let established = tcp(client(9_999), vip, SYN).build();
            let forward = datapath.run_with(FROM_PODS, &established, 0, 0, 1);
            let endpoint = parse(&forward.output).dst;
            let data = tcp(client(9_999), vip, ACK).build();
            let hit = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(FROM_PODS, &data, 0, 0, 1).duration
            });
            ns_per(
                report,
                &format!("ClusterIP established (conntrack hit), {scale} services"),
                hit,
            );
            let reply = tcp(endpoint, client(9_999), ACK).build();
            let reverse = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(TO_POD, &reply, 0, 0, 1).duration
            });
            ns_per(
                report,
                &format!("reverse NAT of a reply, {scale} services"),
                reverse,
            );
            let other_pod = tcp(client(9_998), SocketAddrV4::new(backends()[0], 22), ACK).build();
            let pass = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(FROM_PODS, &other_pod, 0, 0, 1).duration
            });
            ns_per(
                report,
                &format!("non-service packet, {scale} services"),
                pass,
            );
        }
    }
    // The overlay paths do not depend on the number of services; the encapsulations look the
    // destination's node up among the leases.
    let (ns, uplink) = uplink_namespace();
    let mut datapath = overlay_fixture::datapath(uplink);
    datapath.load_floor();
    let port = overlay_fixture::pod_port(&ns);
    let to_remote = tcp(pod(5, 20, 40_000), pod(5, 44, 80), ACK).build();
    let to_learned = inner_frame();
    let encapsulated = vxlan_frame(REMOTE_IP, 8472, 1, &to_learned, 0);
    let mut for_other_pod = to_learned.clone();
    for_other_pod[33] = 99;
    for_other_pod[24..26].fill(0);
    let sum = weft_tests::packet::checksum(&for_other_pod[14..34]);
    for_other_pod[24..26].copy_from_slice(&sum.to_be_bytes());
    let not_learned = vxlan_frame(REMOTE_IP, 8472, 1, &for_other_pod, 0);
    // The pod the VXLAN frames are for, learned on its port.
    datapath.add_peer_port(port);
    let hello = tcp(pod(5, 20, 40_000), pod(9, 20, 80), ACK).build();
    ns.run(|| datapath.run_on(FROM_PODS, &hello, port));
    for nodes in plan.overlay_nodes {
        // Node 2 holds 172.30.44.0/24 and this node 172.30.20.0/24; the others take the
        // rest of the Network.
        let others = (1..=255u8).filter(|third| ![20, 44].contains(third));
        datapath.set_leases(others.take(nodes - 1).map(|third| {
            (
                Ipv4Net::new(Ipv4Addr::new(172, 30, third, 0), 24).expect("a subnet"),
                weft::model::NodeLease {
                    public_ip: Ipv4Addr::new(192, 168, 51, third),
                    vtep_mac: [0x0e, 0xfe, 0, 0, 0, third],
                },
            )
        }));
        // Every node's next hop: looked up per packet, then resolved by the agent.
        let hops: std::collections::BTreeMap<Ipv4Addr, weft::model::NextHop> = others_ips(*nodes)
            .map(|ip| {
                let hop = weft::model::NextHop {
                    ifindex: uplink,
                    mac: overlay_fixture::NEXT_HOP_MAC,
                };
                (ip, hop)
            })
            .collect();
        for (next_hop, resolved) in [("route looked up", false), ("next hop resolved", true)] {
            datapath.set_next_hops(if resolved {
                hops.clone()
            } else {
                std::collections::BTreeMap::new()
            });
            for _ in 0..plan.repeats {
                let case = |what: &str| format!("{what}, {nodes} nodes, {next_hop}");
                let at_port = mean_ns_in(
                    &ns,
                    &mut datapath,
                    plan.packet_runs,
                    FROM_PODS,
                    &to_remote,
                    port,
                );
                ns_per(
                    report,
                    &case("VXLAN encapsulation at a pod's port (tc_from_pods, redirected)"),
                    at_port,
                );
                let encap = mean_ns_in(
                    &ns,
                    &mut datapath,
                    plan.packet_runs,
                    TO_UPLINK,
                    &to_remote,
                    uplink,
                );
                ns_per(
                    report,
                    &case("VXLAN encapsulation on the uplink's egress (tc_to_uplink)"),
                    encap,
                );
            }
        }
    }
    for _ in 0..plan.repeats {
        let into_pod = mean_ns_in(
            &ns,
            &mut datapath,
            plan.packet_runs,
            FROM_UPLINK,
            &encapsulated,
            uplink,
        );
        ns_per(
            report,
            "VXLAN decapsulation straight into a learned pod (tc_from_uplink)",
            into_pod,
        );
        let decap = mean_ns_in(
            &ns,
            &mut datapath,
            plan.packet_runs,
            FROM_UPLINK,
            &not_learned,
            uplink,
        );
        ns_per(
            report,
            "VXLAN decapsulation for the stack (tc_from_uplink)",
            decap,
        );
        let tc_floor = mean_ns(plan.packet_runs, |_| {
            datapath.run_with(TC_FLOOR, &to_remote, 0, 0, 1).duration
        });
        ns_per(report, "empty TC program (floor)", tc_floor);
        let xdp_floor = mean_ns(plan.packet_runs, |_| {
            datapath.run_xdp_repeated(XDP_FLOOR, &encapsulated, 1).2
        });
        ns_per(report, "empty XDP program (floor)", xdp_floor);
    }
}

/// One node serving the bench's services through one contender: ten backend pods and a client
/// pod on the bridge, netfilter on bridged traffic as on any kubeadm node. weft's agent watches
/// a Kubernetes API (the tests' list/watch server) for them, as in a cluster.
struct ServiceNode {
    contender: Contender,
    agent: Option<Agent>,
    api: Option<(ApiServer, PathBuf)>,
    client: Pod,
    _servers: Vec<BenchServer>,
    _backends: Vec<Pod>,
    node: Node,
    files: tempfile::TempDir,
}

impl ServiceNode {
    fn new(contender: Contender) -> Self {
        let node = Node::new(&unique("wbench"), pod_subnet());
        node.set_bridge_netfilter(true);
        // weft's agent turns forwarding on; the peers' nodes need it too (kubelet's job).
        node.ns
            .exec("sysctl", &["-w", "net.ipv4.ip_forward=1"])
            .expect("forwarding");
        let backends: Vec<Pod> = backends().into_iter().map(|ip| node.add_pod(ip)).collect();
        let servers = backends
            .iter()
            .map(|pod| BenchServer::start(&pod.ns, TARGET_PORT))
            .collect();
        let client = node.add_pod(CLIENT);
        Self {
            contender,
            agent: None,
            api: None,
            client,
            _servers: servers,
            _backends: backends,
            node,
            files: tempfile::tempdir().expect("a directory for rulesets"),
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.files.path().join(name);
        fs::write(&path, text).expect("writing a ruleset");
        path
    }

    /// Installs `services` from nothing and returns how long that took: the agent's start until
    /// it is ready (maps filled, programs attached), or the peer's ruleset load.
    fn program(&mut self, services: &[BenchService]) -> anyhow::Result<Duration> {
        let cidr = cluster_cidr();
        let ns = &self.node.ns;
        let took = match self.contender {
            Contender::Weft => {
                // Dropping the agent also removes its pins: the next one starts from nothing.
                self.agent = None;
                let (api, kubeconfig) = self.api.get_or_insert_with(|| {
                    let api = ApiServer::new();
                    api.apply(apiserver::node(self.node.ns.name(), pod_subnet()));
                    let kubeconfig = api.listen_in(&self.node.ns, self.files.path());
                    (api, kubeconfig)
                });
                for (index, service) in services.iter().enumerate() {
                    api.apply(api_service(index, service));
                    api.apply(api_slice(index, service));
                }
                let options = AgentOptions {
                    cluster_cidr: Some(cidr),
                    kubeconfig: Some(kubeconfig.clone()),
                    ..AgentOptions::default()
                };
                let started = Instant::now();
                self.agent = Some(Agent::start(&self.node, &[], &options));
                started.elapsed()
            }
            Contender::Iptables => {
                let rules = self.file("rules.iptables", &iptables_ruleset(services, cidr));
                timed(|| ns.exec("iptables-restore", &[&rules.to_string_lossy()]))?
            }
            Contender::Nftables => {
                let _ = ns.exec("nft", &["delete", "table", "ip", NFT_TABLE]);
                let rules = self.file("rules.nft", &nft_ruleset(services, cidr));
                timed(|| ns.exec("nft", &["-f", &rules.to_string_lossy()]))?
            }
            other => unreachable!("{} is not a service contender", other.label()),
        };
        let target = last_frontend(services);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .client
            .ns
            .run(|| std::net::TcpStream::connect_timeout(&target.into(), Duration::from_secs(1)))
            .is_err()
        {
            ensure!(
                Instant::now() < deadline,
                "{} does not serve {target}",
                self.contender.label()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(took)
    }

    /// Removes one endpoint of the last service and returns how long until the dataplane has
    /// it: weft's EndpointSlice update until its map holds the new count; the peers' incremental update
    /// (kube-proxy's partial `iptables-restore --noflush`, its nftables transaction).
    fn change_one_endpoint(&self, services: &[BenchService]) -> anyhow::Result<Duration> {
        let mut changed = services.to_vec();
        let last = changed.len() - 1;
        changed[last].endpoints.pop();
        let cidr = cluster_cidr();
        let ns = &self.node.ns;
        match self.contender {
            Contender::Weft => {
                let agent = self.agent.as_ref().context("the agent runs")?;
                let (api, _) = self.api.as_ref().context("the API server runs")?;
                let frontends: BpfHashMap<_, ServiceKey, ServiceValue> = BpfHashMap::try_from(
                    open_pinned(agent.pin_dir(), SERVICES_MAP).context("the pinned frontends")?,
                )?;
                let target = last_frontend(&changed);
                let key = ServiceKey {
                    addr: target.ip().octets(),
                    port: target.port(),
                    proto: ip_proto::TCP,
                    _pad: 0,
                };
                let wanted = u32::try_from(changed[last].endpoints.len())?;
                let started = Instant::now();
                api.apply(api_slice(last, &changed[last]));
                while !frontends.get(&key, 0).is_ok_and(|v| v.count == wanted) {
                    ensure!(
                        started.elapsed() < Duration::from_secs(10),
                        "weft never applied the change"
                    );
                    thread::sleep(Duration::from_micros(200));
                }
                let took = started.elapsed();
                // Back to the full set for whatever runs next.
                api.apply(api_slice(last, &services[last]));
                Ok(took)
            }
            Contender::Iptables => {
                let update = self.file("update.iptables", &iptables_update(&changed, last, cidr));
                let took = timed(|| {
                    ns.exec(
                        "iptables-restore",
                        &["--noflush", &update.to_string_lossy()],
                    )
                })?;
                let back = self.file("back.iptables", &iptables_update(services, last, cidr));
                ns.exec("iptables-restore", &["--noflush", &back.to_string_lossy()])?;
                Ok(took)
            }
            Contender::Nftables => {
                let update = self.file("update.nft", &nft_update(&changed, last, cidr));
                let took = timed(|| ns.exec("nft", &["-f", &update.to_string_lossy()]))?;
                // Restore the endpoint chain the update left empty, and the full service.
                let back = self.file("back.nft", &nft_update(services, last, cidr));
                ns.exec("nft", &["-f", &back.to_string_lossy()])?;
                Ok(took)
            }
            other => unreachable!("{} is not a service contender", other.label()),
        }
    }
}

/// Service number `index` as the API server holds it.
fn api_service(index: usize, service: &BenchService) -> serde_json::Value {
    apiserver::service(
        "bench",
        &format!("svc-{index}"),
        service.vip,
        service.port,
        service.target_port,
    )
}

/// Its EndpointSlice.
fn api_slice(index: usize, service: &BenchService) -> serde_json::Value {
    apiserver::endpoint_slice(
        "bench",
        &format!("svc-{index}"),
        service.target_port,
        &service.endpoints,
    )
}

fn timed<T, E: Into<anyhow::Error>>(f: impl FnOnce() -> Result<T, E>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    f().map_err(Into::into)?;
    Ok(started.elapsed())
}

fn last_frontend(services: &[BenchService]) -> SocketAddrV4 {
    let last = services.last().expect("at least one service");
    SocketAddrV4::new(last.vip, last.port)
}

/// `items` rotated by `by`: contenders take turns going first.
fn rotated<T: Copy>(items: &[T], by: usize) -> Vec<T> {
    let mut items = items.to_vec();
    let len = items.len();
    items.rotate_left(by % len);
    items
}

/// Figures 2, 3, 5 and 6 on one node per contender. Returns the connect-latency series for
/// the plot.
fn node_figures(plan: &Plan, report: &mut Report) -> anyhow::Result<Vec<Series>> {
    let contenders = [Contender::Weft, Contender::Iptables, Contender::Nftables];
    let mut nodes: Vec<ServiceNode> = contenders.iter().map(|c| ServiceNode::new(*c)).collect();
    let mut latency: Vec<Series> = contenders.iter().map(|c| (*c, Vec::new())).collect();
    let largest = *plan.node_scales.last().expect("a scale");
    for &scale in plan.node_scales {
        let services = peers::services(scale, &backends(), TARGET_PORT);
        let case = format!("{scale} services × {ENDPOINTS} endpoints");
        for node in &mut nodes {
            let took = node.program(&services)?;
            report.add(
                "5 programming from nothing",
                &case,
                "ms",
                Better::Lower,
                node.contender,
                took.as_secs_f64() * 1e3,
            );
            eprintln!(
                "  {case}: {} programmed in {took:?}",
                node.contender.label()
            );
        }
        let target = last_frontend(&services);
        let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
        for round in 0..plan.repeats {
            for index in rotated(&[0, 1, 2], round) {
                let node = &nodes[index];
                let rate = connect_rate(&node.client.ns, target, plan.load);
                ensure!(
                    rate.failures == 0 || rate.per_second > 0.0,
                    "{}: no connection succeeded",
                    node.contender.label()
                );
                report.add(
                    "2 new TCP connections",
                    &case,
                    "conn/s",
                    Better::Higher,
                    node.contender,
                    rate.per_second,
                );
                report.add(
                    "2 connect latency p50",
                    &case,
                    "µs",
                    Better::Lower,
                    node.contender,
                    rate.p50_us,
                );
                report.add(
                    "2 connect latency p99",
                    &case,
                    "µs",
                    Better::Lower,
                    node.contender,
                    rate.p99_us,
                );
                p50s[index].push(rate.p50_us);
                let requests = request_rate(&node.client.ns, target, plan.load)
                    .with_context(|| format!("{}: request/response", node.contender.label()))?;
                report.add(
                    "3 requests on one connection",
                    &case,
                    "req/s",
                    Better::Higher,
                    node.contender,
                    requests,
                );
            }
        }
        #[expect(clippy::cast_precision_loss, reason = "small service counts")]
        let x = scale as f64;
        for (index, samples) in p50s.into_iter().enumerate() {
            if let Some(median) = Samples(samples).median() {
                latency[index].1.push((x, median));
            }
        }
        if scale == largest {
            let change_case = format!("one endpoint change among {scale} services");
            for round in 0..plan.repeats {
                for index in rotated(&[0, 1, 2], round) {
                    let node = &nodes[index];
                    let took = node.change_one_endpoint(&services)?;
                    report.add(
                        "5 endpoint change to dataplane",
                        &change_case,
                        "ms",
                        Better::Lower,
                        node.contender,
                        took.as_secs_f64() * 1e3,
                    );
                }
            }
            agent_footprint(plan, &nodes[0], &services, report)?;
        }
    }
    Ok(latency)
}

/// Figure 6: the agent's resident memory and CPU with the largest service set, idle and while
/// the last service's endpoints change every 100 ms.
fn agent_footprint(
    plan: &Plan,
    node: &ServiceNode,
    services: &[BenchService],
    report: &mut Report,
) -> anyhow::Result<()> {
    let agent = node.agent.as_ref().context("the agent runs")?;
    let (api, _) = node.api.as_ref().context("the API server runs")?;
    let pid = agent.pid();
    let endpoints = services.len() * ENDPOINTS;
    let case = format!("{} services, {endpoints} endpoints", services.len());
    let window = if plan.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let last = services.len() - 1;
    let mut fewer = services[last].clone();
    fewer.endpoints.pop();
    for _ in 0..plan.repeats {
        report.add(
            "6 agent resident memory",
            &case,
            "MiB",
            Better::Lower,
            Contender::Weft,
            resident_mib(pid)?,
        );
        let idle = cpu_percent(pid, window, || thread::sleep(window))?;
        report.add(
            "6 agent CPU, idle",
            &case,
            "% of a core",
            Better::Lower,
            Contender::Weft,
            idle,
        );
        let churn = cpu_percent(pid, window, || {
            let started = Instant::now();
            let mut flip = false;
            while started.elapsed() < window {
                let service = if flip { &services[last] } else { &fewer };
                api.apply(api_slice(last, service));
                flip = !flip;
                thread::sleep(Duration::from_millis(100));
            }
        })?;
        report.add(
            "6 agent CPU, endpoint churn every 100 ms",
            &case,
            "% of a core",
            Better::Lower,
            Contender::Weft,
            churn,
        );
    }
    api.apply(api_slice(last, &services[last]));
    Ok(())
}

fn resident_mib(pid: u32) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

fn cpu_percent(pid: u32, window: Duration, during: impl FnOnce()) -> anyhow::Result<f64> {
    let before = machine::process_ticks(pid)?;
    let started = Instant::now();
    during();
    let ticks = machine::process_ticks(pid)? - before;
    #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
    Ok(
        ticks as f64 / machine::ticks_per_second() / started.elapsed().max(window).as_secs_f64()
            * 100.0,
    )
}

/// Figure 4: pod-to-pod TCP across two nodes (see `weft_tests::bench::overlay`): each case's
/// contenders in a rotating order, each built just before its run and torn down after it.
fn throughput(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    for case in Case::ALL {
        let contenders = case.contenders();
        for round in 0..plan.repeats {
            for index in rotated(&(0..contenders.len()).collect::<Vec<_>>(), round) {
                let contender = contenders[index];
                let testbed = Testbed::new(contender);
                if case == Case::MtuFrames {
                    testbed.cut_to_mtu_frames()?;
                }
                let measured = testbed.measure(case.streams(), plan.throughput_secs)?;
                eprintln!(
                    "  {}, {}: {:.2} Gbit/s, {:.2} CPU s/GB, {} retransmits",
                    case.label(),
                    contender.label(),
                    measured.gbits,
                    measured.cpu_seconds_per_gb,
                    measured.retransmits
                );
                for (figure, unit, better, value) in overlay::rows(&measured) {
                    report.add(figure, case.label(), unit, better, contender, value);
                }
                // The frame lengths on the wire, once per contender.
                if round == 0 && case != Case::EightStreams && contender != Contender::SameNode {
                    let lengths = testbed.underlay_frames(plan.capture)?;
                    frame_rows(report, case, contender, &lengths);
                }
            }
        }
    }
    Ok(())
}

/// The frame length distribution on the underlay: its median and the share of super-packets.
fn frame_rows(report: &mut Report, case: Case, contender: Contender, lengths: &[usize]) {
    #[expect(
        clippy::cast_precision_loss,
        reason = "frame lengths and counts are small"
    )]
    let mut values: Vec<f64> = lengths.iter().map(|l| *l as f64).collect();
    let super_packets = lengths.iter().filter(|l| **l > 1514).count();
    #[expect(clippy::cast_precision_loss, reason = "frame counts are small")]
    let share = super_packets as f64 * 100.0 / lengths.len().max(1) as f64;
    if let Some(median) = quantile(&mut values, 0.5) {
        report.add(
            "4 underlay frame length, median (capture on the receiver's underlay port)",
            case.label(),
            "bytes",
            Better::Higher,
            contender,
            median,
        );
    }
    report.add(
        "4 underlay frames longer than an MTU frame (1514 bytes)",
        case.label(),
        "% of frames",
        Better::Higher,
        contender,
        share,
    );
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

/// The report: what ran where, the table, and how to read it.
fn document(plan: &Plan, table: &str, svg: &Path, took: Duration) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "# weft benchmarks\n");
    let _ = writeln!(
        out,
        "Produced by `cargo xtask bench{}` on {} in {:.0} s. Regenerate with the same command; \
         nothing in it is asserted by a test.\n",
        if plan.quick { " --quick" } else { "" },
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        took.as_secs_f64()
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(
        out,
        "- Linux {} ({cores} CPUs: {cpu}; {memory})\n- {}; {}; iperf3 {}\n\
         - A shared, noisy 2-core VM: figures move by 10–30 % between runs. Each is the median \
         of {} repetitions, with the smallest and largest beside it; contenders take turns \
         going first.\n",
        command_output("uname", &["-r"]),
        command_output("iptables", &["--version"]),
        command_output("nft", &["--version"]),
        command_output("iperf3", &["--version"])
            .lines()
            .next()
            .unwrap_or_default(),
        plan.repeats
    );
    let _ = writeln!(out, "## What ran\n");
    out.push_str(
        "- **1 per packet**: each eBPF path under `BPF_PROG_TEST_RUN`, the kernel's own timing, \
         averaged over single runs on fresh frames (a repeated run would see its own rewritten \
         packet); beside them, empty TC and XDP programs: the floor of running any program.\n\
         - **2, 3, 5** on one node per contender (network namespaces: a bridge, ten backend pods, \
         a client pod, `br_netfilter` on as on kubeadm nodes), all three built side by side: \
         **weft** (the release agent, watching a Kubernetes API server that speaks the list/watch protocol for the Services and EndpointSlices), **kube-proxy iptables** \
         (kube-proxy's `nat` table — `KUBE-SERVICES`, `KUBE-SVC-*` with `statistic --mode random \
         --probability`, `KUBE-SEP-*` with DNAT and the hairpin mark, `KUBE-MARK-MASQ` / \
         `KUBE-POSTROUTING` with 0x4000 — loaded with `iptables-restore`), **kube-proxy \
         nftables** (its `service-ips` verdict map and per-service chains with `numgen random mod \
         N vmap`, loaded with `nft -f`). The client connects to the last service created. \
         Connections close with an RST so ephemeral ports never run out.\n\
         - **5 programming**: weft from agent start to ready (maps filled, programs attached); the \
         peers' full ruleset load. **Endpoint change**: weft from the EndpointSlice update at the API \
         server to the new endpoint count in its pinned map (watch event, 10 ms coalescing, \
         model, reconcile); the peers' \
         incremental update as kube-proxy sends it (`iptables-restore --noflush` of \
         `KUBE-SERVICES` and the changed chains; one nftables transaction), which leaves out \
         kube-proxy's own processing, in weft's favour of the peers.\n\
         - **4 pod to pod across two nodes** on a veth underlay (a bridge in its own namespace), \
         iperf3 TCP with 1 and 8 streams, each contender built just before its run and torn \
         down after it: **weft** (the release agent, eBPF host routing); **flannel vxlan \
         (kernel)**, the kernel's VXLAN device set up exactly as flanneld sets it up (`flannel.1`, \
         VNI 1, port 8472, per-node route, neighbour and FDB entries), bare; and the same on a \
         node as kubeadm runs flannel with kube-proxy: `br_netfilter` on and kube-proxy's \
         iptables rules (its `nat` table for 100 services of 10 endpoints, its `filter` chains \
         with their conntrack matches, flannel's `FLANNEL-FWD`). weft's nodes have \
         `br_netfilter` on too. Beside them weft with one part of its path left out at a time \
         (`--host-routing=kernel`: the stack routes pod traffic; `--vxlan-device=off`; \
         `--xdp=native`: what the old design's XDP on a veth costs), and two pods on one node's \
         bridge, the no-encapsulation limit. The third case cuts the wire to MTU frames as a \
         physical NIC's is (TSO off on the sender's uplink and the underlay port, GRO on the \
         receiver's uplink): it shows GRO at work. Per run: received Gbit/s, TCP retransmits, \
         the whole machine's CPU time per GB, the mean frame the underlay port carried to the \
         receiving node (bytes over packets from `ip -s link`: ~64 KiB while super-packets \
         cross whole, ~1.5 KiB once cut to MTU frames) and the frames dropped on both uplinks \
         and underlay ports; once per contender, the lengths of the frames on the wire from a \
         short packet capture on that port (median, and the share longer than an MTU frame).\n\
         - **6 agent footprint**: weft only (kube-proxy's process is not run here); resident \
         memory and CPU of the agent process with the largest service set.\n\n",
    );
    let _ = writeln!(out, "## Results\n\n{table}");
    let _ = writeln!(
        out,
        "![connect latency against the number of services]({})\n",
        svg.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    out
}
