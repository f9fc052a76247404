//! `cargo xtask demo`: the seed's cluster, live. etcd holds flannel's config and three leases
//! under `/kube-fujitsu/network` (the seed's subnets 172.30.20.0/24, 172.30.44.0/24 and
//! 172.30.83.0/24); three nodes made of network namespaces on one underlay each run `weft agent`,
//! which takes its lease, joins the VXLAN overlay and serves the seed's Service `nginx`
//! (10.254.40.119:4432 -> :80), whose three pods now sit one per node. Requests go from a client
//! pod and from a node; the demo prints who answered, from which node, and what `weft inspect`
//! shows, then tears it all down (or, with `--keep`, leaves it running and says how to clean up).

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use weft_tests::{
    apps::{Answer, HttpConnection, http_get, serve_forever},
    cluster::{Agent, AgentOptions, Node, Pod, weft_binary},
    netns::{require_root, run},
    overlay::{Etcd, Underlay, network_config, node_address},
    seed::{self, TARGET_PORT, cluster_cidr, nginx_manifest},
};

const PREFIX: &str = "/kube-fujitsu/network";
const NAME: &str = "wdemo";
const STATE_DIR: &str = "/run/weft-demo";
/// The UDP port the pod servers also answer on (unused by the nginx Service).
const UDP_PORT: u16 = 5353;
/// The seed's leases: node, subnet, VtepMAC (the seed shows node A's).
const NODES: [(&str, &str, &str); 3] = [
    ("A", "172.30.20.0/24", "b6:c7:0f:7f:66:a7"),
    ("B", "172.30.44.0/24", "0e:fe:c0:a8:32:02"),
    ("C", "172.30.83.0/24", "0e:fe:c0:a8:32:03"),
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => demo(false),
        Some("--keep") => demo(true),
        Some("--clean") => clean(),
        // Internal: what each nginx pod runs, started inside the pod's namespace.
        Some("pod-server") => Ok(serve_forever(TARGET_PORT, UDP_PORT)?),
        Some(other) => bail!("unknown argument {other}; use --keep or --clean"),
    }
}

/// A pod's server process; killed on drop unless kept.
struct PodServer(Option<Child>);

impl PodServer {
    /// Starts this binary as the server of the pod in namespace `ns`.
    fn start(ns: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg(exe)
            .arg("pod-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a pod server")?;
        Ok(Self(Some(child)))
    }

    /// Leaves the process running; returns its pid.
    fn keep(mut self) -> u32 {
        self.0.take().map_or(0, |child| child.id())
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn print_tally(what: &str, answers: &[Answer], node_of: &BTreeMap<Ipv4Addr, &str>) {
    println!(
        "\n{what}: {} requests to {}",
        answers.len(),
        seed::frontend()
    );
    let mut counts: BTreeMap<Ipv4Addr, (usize, Ipv4Addr)> = BTreeMap::new();
    for answer in answers {
        counts
            .entry(answer.server)
            .or_insert((0, *answer.client_seen.ip()))
            .0 += 1;
    }
    for (server, (count, seen)) in counts {
        let node = node_of.get(&server).copied().unwrap_or("?");
        println!("  {server:<13} on node {node} answered {count:>3}   (saw the client as {seen})");
    }
}

fn demo(keep: bool) -> anyhow::Result<()> {
    require_root();
    if Path::new("/run/netns").join(format!("{NAME}-ul")).exists() {
        bail!("a previous demo is still running; remove it with `cargo xtask demo --clean`");
    }
    println!("weft demo: the seed's cluster, with eBPF in place of flannel.1 and kube-proxy\n");
    let underlay = Underlay::new(&format!("{NAME}-ul"));
    let etcd = Etcd::start(&underlay);
    let network: Ipv4Net = cluster_cidr();
    etcd.put(&format!("{PREFIX}/config"), &network_config(network));
    println!(
        "etcd     {} with {PREFIX}/config = {}",
        etcd.endpoint(),
        network_config(network)
    );
    let nodes: Vec<Node> = NODES
        .iter()
        .enumerate()
        .map(|(i, (node, subnet, vtep_mac))| {
            let address = node_address(i as u8 + 1);
            let subnet: Ipv4Net = subnet.parse().expect("seed subnet");
            // A reservation (a lease without TTL) carrying the node's PublicIP: the agent takes
            // it as its own, as flannel does.
            etcd.put(
                &format!("{PREFIX}/subnets/{}-{}", subnet.network(), subnet.prefix_len()),
                &format!(r#"{{"PublicIP":"{address}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}}}}"#),
            );
            Node::on_underlay(&format!("{NAME}-{}", node.to_lowercase()), &underlay, address)
        })
        .collect();
    fs::create_dir_all(STATE_DIR)?;
    let agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            Agent::join(
                node,
                &[],
                &AgentOptions {
                    etcd: Some((etcd.endpoint(), PREFIX.to_owned())),
                    state_dir: Some(Path::new(STATE_DIR).join(NODES[i].0)),
                    ..AgentOptions::default()
                },
            )
        })
        .collect();
    for ((name, ..), (node, agent)) in NODES.iter().zip(nodes.iter().zip(&agents)) {
        println!(
            "node {name}   {}: uplink eth0 {}, lease {} (pod bridge cni0 {}), agent pins {}",
            node.ns.name(),
            node.ns
                .ip(&["-4", "-o", "addr", "show", "eth0"])?
                .split_whitespace()
                .nth(3)
                .unwrap_or("?"),
            node.subnet(),
            node.gateway(),
            agent.pin_dir().display()
        );
    }
    let mut node_of = BTreeMap::new();
    let mut servers = Vec::new();
    let mut pods: Vec<Pod> = Vec::new();
    let backends: Vec<Ipv4Addr> = nodes
        .iter()
        .zip(NODES)
        .map(|(node, (name, ..))| {
            let pod = node.add_pod(node.pod_address(5));
            node_of.insert(pod.addr, name);
            let addr = pod.addr;
            servers.push(PodServer::start(&pod.ns.path()));
            println!(
                "pod      nginx {} on node {name}, HTTP on :{TARGET_PORT}",
                pod.addr
            );
            pods.push(pod);
            addr
        })
        .collect();
    let servers: Vec<PodServer> = servers.into_iter().collect::<Result<_, _>>()?;
    let client = nodes[0].add_pod(nodes[0].pod_address(8));
    println!("client   {} on node A", client.addr);
    for agent in &agents {
        agent.write_manifest("nginx.yaml", &nginx_manifest(&backends));
    }
    println!(
        "service  default/nginx {} -> :{TARGET_PORT} on {backends:?}",
        seed::frontend()
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while client.ns.run(|| http_get(seed::frontend())).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the client pod cannot reach the service; node A's agent log:\n{}",
                agents[0].log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let from_client: Vec<Answer> = client.ns.run(|| {
        (0..30)
            .map(|_| http_get(seed::frontend()))
            .collect::<Result<_, _>>()
    })?;
    print_tally(
        "From the client pod on node A (two of three backends are across the overlay)",
        &from_client,
        &node_of,
    );
    let from_node: Vec<Answer> = nodes[1].ns.run(|| {
        (0..9)
            .map(|_| HttpConnection::open(seed::frontend()).and_then(|mut c| c.request()))
            .collect::<Result<_, _>>()
    })?;
    print_tally(
        "From node B itself (cgroup socket hooks; the overlay carries it from B's gateway)",
        &from_node,
        &node_of,
    );

    let weft = weft_binary().display().to_string();
    let pin_dir = format!("--pin-dir={}", agents[0].pin_dir().display());
    for table in ["subnets", "services", "backends", "conntrack", "drops"] {
        println!("\n$ weft inspect {table} {pin_dir}   # node A");
        let output = run(&weft, &["inspect", table, &pin_dir])?;
        let lines: Vec<&str> = output.lines().collect();
        for line in lines.iter().take(13) {
            println!("{line}");
        }
        if lines.len() > 13 {
            println!("... ({} more)", lines.len() - 13);
        }
    }
    println!("\n$ etcdctl get {PREFIX}/subnets --prefix");
    for key in etcd.keys(&format!("{PREFIX}/subnets/")) {
        println!("{key}\n{}", etcd.get(&key).unwrap_or_default());
    }

    if keep {
        let pids: Vec<String> = agents
            .iter()
            .map(Agent::pid)
            .chain(servers.into_iter().map(PodServer::keep))
            .chain(std::iter::once(etcd.keep()))
            .map(|pid| pid.to_string())
            .collect();
        fs::write(Path::new(STATE_DIR).join("pids"), pids.join(" "))?;
        println!(
            "\nThe demo keeps running (agent logs: {STATE_DIR}/<node>/agent.log). Try:\n  \
             ip netns exec {} curl -s http://{}/\n  \
             bpftool map dump pinned {}/weft_subnets_v1\nRemove it with: cargo xtask demo --clean",
            client.ns.name(),
            seed::frontend(),
            agents[0].pin_dir().display()
        );
        for agent in agents {
            std::mem::forget(agent);
        }
        for pod in pods.into_iter().chain([client]) {
            pod.ns.keep();
        }
        for node in nodes {
            node.ns.keep();
        }
        underlay.ns.keep();
        return Ok(());
    }
    println!("\nTearing down (pass --keep to leave it running).");
    drop(agents);
    drop(servers);
    fs::remove_dir_all(STATE_DIR)?;
    Ok(())
}

/// Removes what `--keep` left: processes, namespaces, pins, state.
fn clean() -> anyhow::Result<()> {
    require_root();
    let state = Path::new(STATE_DIR);
    if let Ok(pids) = fs::read_to_string(state.join("pids")) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &[pid]);
        }
        // Give the agents their clean exit (they remove their routes and nftables tables).
        thread::sleep(Duration::from_millis(500));
    }
    for ns in run("ip", &["netns", "list"])?.lines() {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if name.starts_with(NAME) {
            run("ip", &["netns", "del", name])?;
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf")? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("weft-{NAME}")))
        {
            fs::remove_dir_all(&path)?;
        }
    }
    if state.exists() {
        fs::remove_dir_all(state)?;
    }
    println!("demo removed");
    Ok(())
}
