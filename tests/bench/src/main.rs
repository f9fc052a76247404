//! `cargo xtask bench [--quick]`: weft against kube-proxy (iptables and nftables modes) and the
//! kernel's VXLAN device as flannel configures it, on namespace clusters built here, with the
//! same load through each, in one run. Prints one table and writes it, with the machine, the
//! date and the command, to the report file (and a plot of connect latency against the number
//! of services beside it). Nothing here asserts a figure.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ipnet::Ipv4Net;
use weft::{
    datapath::conntrack::Conntrack,
    datapath::loader::MapLimits,
    datapath::maps::{MapSource as _, PinnedMaps},
};
use weft_bench::{
    Better, Contender, Row, Samples, Series,
    load::{self, ConnectRate},
    machine::{self, Counters},
    overlay::{self, Case, Testbed},
    peers::{
        self, BenchService, NFT_TABLE, iptables_ruleset, iptables_update, nft_ruleset, nft_update,
    },
    plot, quantile, table,
};
use weft_common::{
    ip_proto,
    maps::{SERVICES_MAP, ServiceKey},
    programs::{FROM_PODS, FROM_UPLINK, TO_POD, TO_UPLINK},
};
use weft_tests::{
    apiserver::{self, ApiServer},
    cluster::{Agent, AgentOptions, Node, Pod},
    harness::{Datapath, TC_FLOOR, XDP_FLOOR},
    netns::{require_root, unique},
    overlay_fixture::{self, REMOTE_IP, inner_frame, pod, uplink_namespace, vxlan_frame},
    packet::{ACK, SYN, parse, tcp},
};

/// Endpoints per service, as the issue's scale points have them.
const ENDPOINTS: usize = 10;
/// The port the bench servers listen on in every backend pod.
const TARGET_PORT: u16 = 8080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 200);
/// How long before each timed endpoint change nothing changes.
const QUIET_BEFORE_A_CHANGE: Duration = Duration::from_millis(50);
/// The load generator's client and the backends' servers never share a CPU.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

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
    /// Length of one measured connection-rate run.
    load: Duration,
    /// The unmeasured connection-rate run before each measured one.
    warm_up: Duration,
    /// Connections in flight at once.
    concurrencies: &'static [u32],
    /// Rounds of connection-rate runs per contender and scale.
    connection_repeats: usize,
    /// Length of one request/response run.
    requests: Duration,
    /// Endpoint changes timed for weft, and for each peer.
    endpoint_changes: usize,
    peer_endpoint_changes: usize,
    /// Repetitions of every other figure (contenders in a rotating order).
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
    load: Duration::from_secs(8),
    warm_up: Duration::from_secs(1),
    concurrencies: &[1, 8, 64],
    connection_repeats: 5,
    requests: Duration::from_secs(3),
    endpoint_changes: 50,
    peer_endpoint_changes: 10,
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
    load: Duration::from_millis(500),
    warm_up: Duration::from_millis(100),
    concurrencies: &[1, 8, 64],
    connection_repeats: 2,
    requests: Duration::from_millis(300),
    endpoint_changes: 5,
    peer_endpoint_changes: 2,
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
    /// The row of `figure` in `case`, made (at the end) if there is none yet.
    fn row(&mut self, figure: &str, case: &str, unit: &'static str, better: Better) -> &mut Row {
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
        &mut self.rows[index]
    }

    /// Puts the row in place before any value reaches it, so rows read in a chosen order.
    fn declare(&mut self, figure: &str, case: &str, unit: &'static str, better: Better) {
        self.row(figure, case, unit, better);
    }

    fn add(
        &mut self,
        figure: &str,
        case: &str,
        unit: &'static str,
        better: Better,
        contender: Contender,
        value: f64,
    ) {
        self.row(figure, case, unit, better).add(contender, value);
    }

    /// Marks `contender`'s figure in an existing row with `notes`.
    fn note(&mut self, figure: &str, case: &str, contender: Contender, notes: &[String]) {
        if let Some(row) = self
            .rows
            .iter_mut()
            .find(|r| r.figure == figure && r.case == case)
        {
            for note in notes {
                row.note(contender, note.clone());
            }
        }
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

/// Figure 1: nanoseconds per packet of each path above an empty TC program's (the floor:
/// mostly the test run's own timer), from the kernel's own timing of `BPF_PROG_TEST_RUN`; the
/// floor measured beside every repetition, and shown too.
fn packet_costs(plan: &Plan, report: &mut Report) {
    const FIGURE: &str = "1 per packet";
    let ns_per = |report: &mut Report, case: &str, value: f64| {
        report.add(FIGURE, case, "ns", Better::Lower, Contender::Weft, value);
    };
    let above = |report: &mut Report, case: &str, value: f64, floor: f64| {
        report.add(
            FIGURE,
            case,
            "ns above the floor",
            Better::Lower,
            Contender::Weft,
            value - floor,
        );
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
        // A new connection each run, in every repetition: a conntrack miss, a choice, two
        // entries written.
        let mut source = 10_000u16;
        for round in 0..plan.repeats {
            let client = |port: u16| SocketAddrV4::new(CLIENT, port);
            let probe = tcp(client(9_997), vip, ACK).build();
            let floor = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(TC_FLOOR, &probe, 0, 0, 1).duration
            });
            let first = mean_ns(plan.packet_runs, |_| {
                source = source.wrapping_add(1).max(10_000);
                let frame = tcp(client(source), vip, SYN).build();
                datapath.run_with(FROM_PODS, &frame, 0, 0, 1).duration
            });
            above(
                report,
                &format!("ClusterIP first packet (conntrack miss), {scale} services"),
                first,
                floor,
            );
            // The same with both CPUs opening connections at once: conntrack's LRU shared.
            let both = first_packets_on_every_cpu(&mut datapath, plan.packet_runs, vip, round);
            above(
                report,
                &format!(
                    "ClusterIP first packet (conntrack miss), both CPUs at once, {scale} services"
                ),
                both,
                floor,
            );
            // One established connection: a conntrack hit.
            let established = tcp(client(9_999), vip, SYN).build();
            let forward = datapath.run_with(FROM_PODS, &established, 0, 0, 1);
            let endpoint = parse(&forward.output).dst;
            let data = tcp(client(9_999), vip, ACK).build();
            let hit = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(FROM_PODS, &data, 0, 0, 1).duration
            });
            above(
                report,
                &format!("ClusterIP established (conntrack hit), {scale} services"),
                hit,
                floor,
            );
            let reply = tcp(endpoint, client(9_999), ACK).build();
            let reverse = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(TO_POD, &reply, 0, 0, 1).duration
            });
            above(
                report,
                &format!("reverse NAT of a reply, {scale} services"),
                reverse,
                floor,
            );
            let other_pod = tcp(client(9_998), SocketAddrV4::new(backends()[0], 22), ACK).build();
            let pass = mean_ns(plan.packet_runs, |_| {
                datapath.run_with(FROM_PODS, &other_pod, 0, 0, 1).duration
            });
            above(
                report,
                &format!("non-service packet, {scale} services"),
                pass,
                floor,
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
                let floor = mean_ns_in(
                    &ns,
                    &mut datapath,
                    plan.packet_runs,
                    TC_FLOOR,
                    &to_remote,
                    port,
                );
                let at_port = mean_ns_in(
                    &ns,
                    &mut datapath,
                    plan.packet_runs,
                    FROM_PODS,
                    &to_remote,
                    port,
                );
                above(
                    report,
                    &case("VXLAN encapsulation at a pod's port (tc_from_pods, redirected)"),
                    at_port,
                    floor,
                );
                let encap = mean_ns_in(
                    &ns,
                    &mut datapath,
                    plan.packet_runs,
                    TO_UPLINK,
                    &to_remote,
                    uplink,
                );
                above(
                    report,
                    &case("VXLAN encapsulation on the uplink's egress (tc_to_uplink)"),
                    encap,
                    floor,
                );
            }
        }
    }
    for _ in 0..plan.repeats {
        let tc_floor = mean_ns(plan.packet_runs, |_| {
            datapath.run_with(TC_FLOOR, &to_remote, 0, 0, 1).duration
        });
        let into_pod = mean_ns_in(
            &ns,
            &mut datapath,
            plan.packet_runs,
            FROM_UPLINK,
            &encapsulated,
            uplink,
        );
        above(
            report,
            "VXLAN decapsulation straight into a learned pod (tc_from_uplink)",
            into_pod,
            tc_floor,
        );
        let decap = mean_ns_in(
            &ns,
            &mut datapath,
            plan.packet_runs,
            FROM_UPLINK,
            &not_learned,
            uplink,
        );
        above(
            report,
            "VXLAN decapsulation for the stack (tc_from_uplink)",
            decap,
            tc_floor,
        );
        ns_per(report, "empty TC program (floor)", tc_floor);
        let xdp_floor = mean_ns(plan.packet_runs, |_| {
            datapath.run_xdp_repeated(XDP_FLOOR, &encapsulated, 1).2
        });
        ns_per(report, "empty XDP program (floor)", xdp_floor);
    }
}

/// The mean of `runs` first packets (new connections to `vip`) per CPU, run on every CPU at
/// once, each thread pinned to its CPU with a client of its own (in each `round` another).
fn first_packets_on_every_cpu(
    datapath: &mut Datapath,
    runs: u16,
    vip: SocketAddrV4,
    round: usize,
) -> f64 {
    let program = datapath.program_fd(FROM_PODS);
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let totals: Vec<Duration> = thread::scope(|scope| {
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                let program = &program;
                scope.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu).expect("a CPU index within the set");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .expect("pinning a bench thread");
                    let third = u8::try_from(100 + round * cpus + cpu).expect("few CPUs");
                    let client = Ipv4Addr::new(10, 244, third, 1);
                    (0..runs)
                        .map(|run| {
                            let source = SocketAddrV4::new(client, 10_000 + run);
                            let frame = tcp(source, vip, SYN).build();
                            weft::host::sys::bpf_prog_test_run(program.as_fd(), &frame, None)
                                .expect("a test run")
                                .duration
                        })
                        .sum()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a bench thread"))
            .collect()
    });
    let total: Duration = totals.iter().sum();
    #[expect(clippy::cast_precision_loss, reason = "few CPUs")]
    let all_runs = (cpus * usize::from(runs)) as f64;
    total.as_secs_f64() * 1e9 / all_runs
}

/// One node serving the bench's services through one contender: ten backend pods and a client
/// pod on the bridge, netfilter on bridged traffic as on any kubeadm node. weft's agent watches
/// a Kubernetes API (the tests' list/watch server) for them, as in a cluster. Each backend runs
/// a `weft-load` server pinned to [`SERVER_CPU`]; clients run pinned to [`CLIENT_CPU`]. Built
/// just before its contender is measured and gone (namespaces, rules, agent) right after.
struct ServiceNode {
    contender: Contender,
    agent: Option<Agent>,
    api: Option<(ApiServer, PathBuf)>,
    client: Pod,
    _servers: Vec<load::Child>,
    backends: Vec<Pod>,
    node: Node,
    files: tempfile::TempDir,
}

impl ServiceNode {
    fn new(contender: Contender) -> anyhow::Result<Self> {
        let node = Node::new(&unique("wbench"), pod_subnet());
        node.set_bridge_netfilter(true);
        // weft's agent turns forwarding on; the peers' nodes need it too (kubelet's job).
        node.ns
            .exec("sysctl", &["-w", "net.ipv4.ip_forward=1"])
            .context("turning forwarding on")?;
        let backends: Vec<Pod> = backends().into_iter().map(|ip| node.add_pod(ip)).collect();
        let servers = backends
            .iter()
            .map(|pod| load::Child::server(&pod.ns, SERVER_CPU, TARGET_PORT))
            .collect::<anyhow::Result<_>>()?;
        let client = node.add_pod(CLIENT);
        Ok(Self {
            contender,
            agent: None,
            api: None,
            client,
            _servers: servers,
            backends,
            node,
            files: tempfile::tempdir().context("a directory for rulesets")?,
        })
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
            Contender::Weft | Contender::WeftPacketNat => {
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
                    extra_args: if self.contender == Contender::WeftPacketNat {
                        vec!["--socket-lb=host-only".into()]
                    } else {
                        Vec::new()
                    },
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
            Contender::Weft | Contender::WeftPacketNat => {
                let agent = self.agent.as_ref().context("the agent runs")?;
                let (api, _) = self.api.as_ref().context("the API server runs")?;
                let frontends = PinnedMaps::new(agent.pin_dir()).hash(SERVICES_MAP)?;
                let target = last_frontend(&changed);
                let key = ServiceKey {
                    addr: target.ip().octets(),
                    port: target.port(),
                    proto: ip_proto::TCP,
                    _pad: 0,
                };
                let count = |service: &BenchService| u32::try_from(service.endpoints.len());
                let reaches = |wanted: u32| -> anyhow::Result<Duration> {
                    let started = Instant::now();
                    while !frontends.get(&key, 0).is_ok_and(|v| v.count == wanted) {
                        ensure!(
                            started.elapsed() < Duration::from_secs(10),
                            "weft never applied the change"
                        );
                        thread::sleep(Duration::from_micros(100));
                    }
                    Ok(started.elapsed())
                };
                // The change comes after a quiet spell longer than the agent's least interval
                // between passes, as changes to one service mostly do.
                thread::sleep(QUIET_BEFORE_A_CHANGE);
                api.apply(api_slice(last, &changed[last]));
                let took = reaches(count(&changed[last])?)?;
                // Back to the full set, in the dataplane too, before anything else runs.
                api.apply(api_slice(last, &services[last]));
                reaches(count(&services[last])?)?;
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

    /// Empties netfilter's conntrack table in the node and weft's conntrack map: every run
    /// starts with no connection tracked.
    fn flush_conntrack(&self) -> anyhow::Result<()> {
        self.node
            .ns
            .exec("conntrack", &["-F"])
            .context("conntrack -F (the conntrack package)")?;
        if let Some(agent) = &self.agent {
            let mut conntrack = Conntrack::open(&mut PinnedMaps::new(agent.pin_dir()))?;
            let keys: Vec<_> = conntrack.entries()?.into_iter().map(|(k, _)| k).collect();
            conntrack.remove(&keys)?;
        }
        Ok(())
    }

    /// What can show a connection lost or slowed: the TCP counters of the client and backend
    /// pods (`nstat`), the node's netfilter conntrack statistics (`conntrack -S`), and weft's
    /// drop counters.
    fn trouble_counters(&self) -> anyhow::Result<Counters> {
        let mut counters = Counters::new();
        for pod in std::iter::once(&self.client).chain(&self.backends) {
            let tcp = machine::tcp_counters(&pod.ns)?;
            for name in ["ListenOverflows", "ListenDrops", "TCPSynRetrans"] {
                *counters.entry(name.to_owned()).or_default() +=
                    tcp.get(name).copied().unwrap_or(0);
            }
        }
        let conntrack = machine::conntrack_counters(&self.node.ns);
        for name in ["insert_failed", "drop", "early_drop"] {
            counters.insert(
                format!("conntrack {name}"),
                conntrack.get(name).copied().unwrap_or(0),
            );
        }
        if let Some(agent) = &self.agent {
            for (reason, packets) in PinnedMaps::new(agent.pin_dir()).drop_counts()? {
                counters.insert(format!("weft drop {}", reason.name()), packets);
            }
        }
        Ok(counters)
    }

    /// One connection-rate run to `target`: conntrack flushed, a warm-up, then the measured run
    /// with the whole machine's CPU time and what went wrong beside it.
    fn connection_run(
        &self,
        plan: &Plan,
        target: SocketAddrV4,
        concurrency: u32,
    ) -> anyhow::Result<ConnectionRun> {
        let ns = &self.client.ns;
        self.flush_conntrack()?;
        load::Child::connect_rate(ns, CLIENT_CPU, target, concurrency, plan.warm_up)?;
        let before = self.trouble_counters()?;
        let busy = machine::busy_ticks()?;
        let rate = load::Child::connect_rate(ns, CLIENT_CPU, target, concurrency, plan.load)?;
        #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
        let cpu_seconds = (machine::busy_ticks()? - busy) as f64 / machine::ticks_per_second();
        let mut notes: Vec<String> = rate
            .errors
            .iter()
            .map(|(cause, count)| format!("{count} × {cause}"))
            .collect();
        for (name, grown) in machine::increase(&before, &self.trouble_counters()?) {
            if grown > 0 {
                notes.push(format!("{grown} {name}"));
            }
        }
        if rate.generator_bound(concurrency) {
            notes.push(format!(
                "generator-bound (Little's law gives {:.0}/s)",
                f64::from(concurrency) / (rate.mean_lifetime_us * 1e-6)
            ));
        }
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let cpu_us_per_connection = cpu_seconds * 1e6 / rate.connections.max(1) as f64;
        Ok(ConnectionRun {
            rate,
            cpu_us_per_connection,
            notes,
        })
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

/// What one connection-rate run gave.
struct ConnectionRun {
    rate: ConnectRate,
    cpu_us_per_connection: f64,
    /// Errors, timeouts, drops and a failed Little's-law check, as the report prints them.
    notes: Vec<String>,
}

/// Where a client connects: the service's ClusterIP, or straight to a backend pod (the limit of
/// the node's path without a service in it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    ClusterIp,
    PodIp,
}

impl Target {
    fn address(self, services: &[BenchService]) -> SocketAddrV4 {
        match self {
            Self::ClusterIp => last_frontend(services),
            Self::PodIp => SocketAddrV4::new(backends()[0], TARGET_PORT),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::ClusterIp => "to the ClusterIP",
            Self::PodIp => "straight to a pod IP (the limit)",
        }
    }
}

const CONNECTIONS: &str = "2 new TCP connections";

/// The rows of figures 2 and 3 at one scale, declared in reading order before any run.
fn declare_connection_rows(plan: &Plan, report: &mut Report, case: &str) {
    for concurrency in plan.concurrencies {
        let case = format!("{case}, {concurrency} in flight");
        for target in [Target::ClusterIp, Target::PodIp] {
            report.declare(
                &format!("{CONNECTIONS} {}", target.label()),
                &case,
                "conn/s",
                Better::Higher,
            );
        }
        for (figure, unit, better) in [
            ("2 ClusterIP rate / pod-IP rate", "ratio", Better::Higher),
            (
                "2 connect latency p50 to the ClusterIP",
                "µs",
                Better::Lower,
            ),
            (
                "2 connect latency p99 to the ClusterIP",
                "µs",
                Better::Lower,
            ),
            (
                "2 CPU per connection to the ClusterIP (whole machine)",
                "CPU µs",
                Better::Lower,
            ),
        ] {
            report.declare(figure, &case, unit, better);
        }
    }
}

/// Figures 2 and 3 on `node`: `plan.connection_repeats` rounds, each with every (target,
/// concurrency) pair once in a rotating order. Returns the connect latency p50s to the ClusterIP
/// with one connection in flight, for the plot.
fn connection_figures(
    plan: &Plan,
    node: &ServiceNode,
    services: &[BenchService],
    case: &str,
    report: &mut Report,
) -> anyhow::Result<Vec<f64>> {
    let label = node.contender.label();
    let runs: Vec<(Target, u32)> = [Target::ClusterIp, Target::PodIp]
        .into_iter()
        .flat_map(|t| plan.concurrencies.iter().map(move |c| (t, *c)))
        .collect();
    let mut p50s = Vec::new();
    for round in 0..plan.connection_repeats {
        let mut rates: Vec<(Target, u32, f64)> = Vec::new();
        for (target, concurrency) in rotated(&runs, round) {
            let run = node
                .connection_run(plan, target.address(services), concurrency)
                .with_context(|| format!("{label}: connections {}", target.label()))?;
            let per_second = run.rate.per_second();
            eprintln!(
                "  {case}, {label}, {concurrency} in flight {}: {per_second:.0}/s, p50 {:.0} µs{}",
                target.label(),
                run.rate.p50_us,
                if run.notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", run.notes.join("; "))
                }
            );
            let case = format!("{case}, {concurrency} in flight");
            let figure = format!("{CONNECTIONS} {}", target.label());
            report.add(
                &figure,
                &case,
                "conn/s",
                Better::Higher,
                node.contender,
                per_second,
            );
            report.note(&figure, &case, node.contender, &run.notes);
            rates.push((target, concurrency, per_second));
            if target == Target::ClusterIp {
                for (figure, unit, value) in [
                    (
                        "2 connect latency p50 to the ClusterIP",
                        "µs",
                        run.rate.p50_us,
                    ),
                    (
                        "2 connect latency p99 to the ClusterIP",
                        "µs",
                        run.rate.p99_us,
                    ),
                    (
                        "2 CPU per connection to the ClusterIP (whole machine)",
                        "CPU µs",
                        run.cpu_us_per_connection,
                    ),
                ] {
                    report.add(figure, &case, unit, Better::Lower, node.contender, value);
                }
                if concurrency == 1 {
                    p50s.push(run.rate.p50_us);
                }
            }
        }
        for concurrency in plan.concurrencies {
            let rate_to = |wanted: Target| {
                rates
                    .iter()
                    .find(|(t, c, _)| *t == wanted && c == concurrency)
                    .map(|r| r.2)
            };
            if let (Some(vip), Some(direct)) = (rate_to(Target::ClusterIp), rate_to(Target::PodIp))
                && direct > 0.0
            {
                report.add(
                    "2 ClusterIP rate / pod-IP rate",
                    &format!("{case}, {concurrency} in flight"),
                    "ratio",
                    Better::Higher,
                    node.contender,
                    vip / direct,
                );
            }
        }
        for target in [Target::ClusterIp, Target::PodIp] {
            let requests = load::Child::request_rate(
                &node.client.ns,
                CLIENT_CPU,
                target.address(services),
                plan.requests,
            )?;
            let figure = format!("3 requests on one connection {}", target.label());
            report.add(
                &figure,
                case,
                "req/s",
                Better::Higher,
                node.contender,
                requests.per_second(),
            );
            if let Some(error) = requests.error {
                report.note(&figure, case, node.contender, &[error]);
            }
        }
    }
    Ok(p50s)
}

/// Figures 2, 3, 5 and 6: at each scale, each contender on a node of its own, built just
/// before it is measured and torn down after (contenders take turns going first). Returns the
/// connect-latency series for the plot.
fn node_figures(plan: &Plan, report: &mut Report) -> anyhow::Result<Vec<Series>> {
    let contenders = [
        Contender::Weft,
        Contender::WeftPacketNat,
        Contender::Iptables,
        Contender::Nftables,
    ];
    let mut latency: Vec<Series> = contenders.iter().map(|c| (*c, Vec::new())).collect();
    let largest = *plan.node_scales.last().expect("a scale");
    for (scale_index, &scale) in plan.node_scales.iter().enumerate() {
        let services = peers::services(scale, &backends(), TARGET_PORT);
        let case = format!("{scale} services × {ENDPOINTS} endpoints");
        declare_connection_rows(plan, report, &case);
        for contender in rotated(&contenders, scale_index) {
            let mut node = ServiceNode::new(contender)?;
            let took = node.program(&services)?;
            report.add(
                "5 programming from nothing",
                &case,
                "ms",
                Better::Lower,
                contender,
                took.as_secs_f64() * 1e3,
            );
            eprintln!("  {case}: {} programmed in {took:?}", contender.label());
            let p50s = connection_figures(plan, &node, &services, &case, report)?;
            #[expect(clippy::cast_precision_loss, reason = "small service counts")]
            let x = scale as f64;
            if let Some(median) = Samples(p50s).median()
                && let Some((_, points)) = latency.iter_mut().find(|(c, _)| *c == contender)
            {
                points.push((x, median));
            }
            if scale == largest {
                endpoint_changes(plan, &node, &services, report)?;
                if contender == Contender::Weft {
                    agent_footprint(plan, &node, &services, report)?;
                }
            }
        }
    }
    Ok(latency)
}

/// Figure 5's endpoint change: how long one endpoint change takes to reach the dataplane, over
/// many changes (fewer for the peers, whose changes take far longer).
fn endpoint_changes(
    plan: &Plan,
    node: &ServiceNode,
    services: &[BenchService],
    report: &mut Report,
) -> anyhow::Result<()> {
    let changes = if node.contender == Contender::Weft {
        plan.endpoint_changes
    } else {
        plan.peer_endpoint_changes
    };
    let case = format!(
        "one endpoint change among {} services, {} ms after the last (weft over {} changes, \
         the peers over {})",
        services.len(),
        QUIET_BEFORE_A_CHANGE.as_millis(),
        plan.endpoint_changes,
        plan.peer_endpoint_changes
    );
    let mut took = Vec::new();
    for _ in 0..changes {
        let change = node.change_one_endpoint(services)?.as_secs_f64() * 1e3;
        report.add(
            "5 endpoint change to dataplane",
            &case,
            "ms",
            Better::Lower,
            node.contender,
            change,
        );
        took.push(change);
    }
    if let Some(p99) = quantile(&mut took, 0.99) {
        report.add(
            "5 endpoint change to dataplane, p99",
            &case,
            "ms",
            Better::Lower,
            node.contender,
            p99,
        );
    }
    Ok(())
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

/// Figure 4: pod-to-pod TCP across two nodes (see `weft_bench::overlay`): each case's
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
         of {} repetitions ({} for figures 2 and 3, each run {:.0} s after a {:.0} s warm-up), \
         with the smallest and largest beside it; contenders take turns going first.\n",
        command_output("uname", &["-r"]),
        command_output("iptables", &["--version"]),
        command_output("nft", &["--version"]),
        command_output("iperf3", &["--version"])
            .lines()
            .next()
            .unwrap_or_default(),
        plan.repeats,
        plan.connection_repeats,
        plan.load.as_secs_f64(),
        plan.warm_up.as_secs_f64()
    );
    let _ = writeln!(out, "## What ran\n");
    out.push_str(
        "- **1 per packet**: each eBPF path under `BPF_PROG_TEST_RUN`, the kernel's own timing, \
         averaged over single runs on fresh frames (a repeated run would see its own rewritten \
         packet), given as nanoseconds above an empty program of the same hook run beside it \
         (the floor: mostly the test run's own timer; shown too). A first packet is a new \
         connection in every run of every repetition (a conntrack miss, an endpoint chosen, two \
         entries written), once on one CPU and once on every CPU at the same time (conntrack's \
         LRU shared between them).\n\
         - **2, 3, 5** on one node per contender (network namespaces: a bridge, ten backend pods, \
         a client pod, `br_netfilter` on as on kubeadm nodes). Only the contender under test \
         exists while it is measured: its node is built just before and torn down after, and the \
         contenders take turns going first from one scale to the next. **weft** (the release \
         agent, watching a Kubernetes API server that speaks the list/watch protocol for the \
         Services and EndpointSlices), **kube-proxy iptables** (kube-proxy's `nat` table — \
         `KUBE-SERVICES`, `KUBE-SVC-*` with `statistic --mode random --probability`, `KUBE-SEP-*` \
         with DNAT and the hairpin mark, `KUBE-MARK-MASQ` / `KUBE-POSTROUTING` with 0x4000 — \
         loaded with `iptables-restore`), **kube-proxy nftables** (its `service-ips` verdict map \
         and per-service chains with `numgen random mod N vmap`, loaded with `nft -f`).\n\
         - **2 connections**: the load generator is its own small processes (`weft-load`, epoll, \
         non-blocking): one accept-and-echo server per backend pod (backlog 4096), all pinned to \
         CPU 1, and one client in the client pod pinned to CPU 0 that keeps 1, 8 or 64 connects \
         in flight, closes each connection with an RST as soon as it is established (no \
         TIME_WAIT, so ephemeral ports never run out) and counts any connect that fails or takes \
         over 1 s by cause. Every run: netfilter's conntrack (`conntrack -F`) and weft's \
         conntrack map emptied, an unmeasured warm-up, then the measured run; the pods' \
         `ListenOverflows`, `ListenDrops` and `TCPSynRetrans` (`nstat`), the node's conntrack \
         `drop`, `early_drop` and `insert_failed` (`conntrack -S`) and weft's drop counters are \
         read before and after, and anything that grew is printed beside the figure (⚠). Each \
         round runs every (target, concurrency) pair once in a rotating order: to the ClusterIP \
         of the last service created, and straight to a backend pod's IP through the same node \
         (the limit: what the node's path costs with no service lookup in it). *ClusterIP rate / \
         pod-IP rate* pairs the two runs of one round. *CPU per connection* is the whole \
         machine's busy CPU time over the run divided by the connections made. A run fails \
         Little's law when the rate is more than 15 % off concurrency / mean connection \
         lifetime (socket() to the RST sent): the client then spent its time between \
         connections and the run is marked *generator-bound*.\n\
         - **3 requests**: one connection, 64-byte requests and answers one after another, to \
         the ClusterIP and straight to a pod IP, from the same pinned client process.\n\
         - **5 programming**: weft from agent start to ready (programs verified, the first list \
         of Services and EndpointSlices read, maps filled, programs attached to the pods' \
         ports); the peers' full ruleset load. **Endpoint change**: weft from the EndpointSlice \
         update at the API server to the new endpoint count in its pinned map (watch event, \
         model, reconcile), each change 50 ms after the last (longer than the agent's 10 ms \
         least interval between passes, which a burst of changes waits out) and undone and seen \
         undone before the next; the p99 is over all of them; the peers' \
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
