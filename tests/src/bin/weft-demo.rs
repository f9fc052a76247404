//! `cargo xtask demo`: the seed's example, live. A node made of network namespaces, the three
//! nginx pods serving HTTP, a client pod, and `weft agent` serving Service `nginx`
//! (10.254.40.119:4432 -> :80) with eBPF. Requests go from the client pod and from the node
//! itself; the demo prints who answered and what `weft inspect` shows, then tears it all down
//! (or, with `--keep`, leaves it running and says how to clean up).

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
use weft_tests::{
    apps::{Answer, HttpConnection, http_get, serve_forever},
    cluster::{Agent, AgentOptions, Node, weft_binary},
    netns::{require_root, run},
    seed::{self, BACKENDS, TARGET_PORT, cluster_cidr, nginx_manifest, pod_subnet},
};

const NODE: &str = "wdemo-node";
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 20, 9);
const STATE_DIR: &str = "/run/weft-demo";
/// The UDP port the pod servers also answer on (unused by the nginx Service).
const UDP_PORT: u16 = 5353;

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

fn tally(answers: &[Answer]) -> BTreeMap<Ipv4Addr, (usize, Ipv4Addr)> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        counts
            .entry(answer.server)
            .or_insert((0, *answer.client_seen.ip()))
            .0 += 1;
    }
    counts
}

fn print_tally(what: &str, answers: &[Answer]) {
    println!(
        "\n{what}: {} requests to {}",
        answers.len(),
        seed::frontend()
    );
    for (server, (count, seen)) in tally(answers) {
        println!("  {server:<14} answered {count:>3}   (saw the client as {seen})");
    }
}

fn demo(keep: bool) -> anyhow::Result<()> {
    require_root();
    if Path::new("/run/netns").join(NODE).exists() {
        bail!("a previous demo is still running; remove it with `cargo xtask demo --clean`");
    }
    println!(
        "weft demo: the seed's nginx Service on one node, served by eBPF instead of kube-proxy\n"
    );
    let node = Node::new(NODE, pod_subnet());
    println!("node     {NODE}: bridge cni0 {}/24", node.gateway());
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for ip in BACKENDS {
        let pod = node.add_pod(ip);
        servers.push(PodServer::start(&pod.ns.path())?);
        println!("pod      {}: {ip}, HTTP on :{TARGET_PORT}", pod.ns.name());
        pods.push(pod);
    }
    fs::create_dir_all(STATE_DIR)?;
    let options = AgentOptions {
        cluster_cidr: Some(cluster_cidr()),
        state_dir: Some(STATE_DIR.into()),
        ..AgentOptions::default()
    };
    let agent = Agent::start(
        &node,
        &[("nginx.yaml", &nginx_manifest(&BACKENDS))],
        &options,
    );
    println!(
        "agent    weft agent --pin-dir {} --manifests {STATE_DIR}/manifests --pod-subnet {} --cluster-cidr {}",
        agent.pin_dir().display(),
        pod_subnet(),
        cluster_cidr()
    );
    let client = node.add_pod(CLIENT);
    println!("client   {}: {CLIENT}", client.ns.name());
    println!(
        "service  default/nginx {} -> :{TARGET_PORT} on {BACKENDS:?}",
        seed::frontend()
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while client.ns.run(|| http_get(seed::frontend())).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the client pod cannot reach the service; agent log:\n{}",
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let from_client: Vec<Answer> = client.ns.run(|| {
        (0..30)
            .map(|_| http_get(seed::frontend()))
            .collect::<Result<_, _>>()
    })?;
    print_tally("From the client pod", &from_client);
    let from_node: Vec<Answer> = node.ns.run(|| {
        (0..9)
            .map(|_| HttpConnection::open(seed::frontend()).and_then(|mut c| c.request()))
            .collect::<Result<_, _>>()
    })?;
    print_tally(
        "From the node itself (cgroup socket hooks, no packet rewriting)",
        &from_node,
    );

    let weft = weft_binary().display().to_string();
    let pin_dir = format!("--pin-dir={}", agent.pin_dir().display());
    for table in ["services", "backends", "conntrack", "drops"] {
        println!("\n$ weft inspect {table} {pin_dir}");
        let output = run(&weft, &["inspect", table, &pin_dir])?;
        let lines: Vec<&str> = output.lines().collect();
        for line in lines.iter().take(12) {
            println!("{line}");
        }
        if lines.len() > 12 {
            println!("... ({} more)", lines.len() - 12);
        }
    }

    if keep {
        let pids: Vec<String> = std::iter::once(agent.pid())
            .chain(servers.into_iter().map(PodServer::keep))
            .map(|pid| pid.to_string())
            .collect();
        fs::write(Path::new(STATE_DIR).join("pids"), pids.join(" "))?;
        println!(
            "\nThe demo keeps running (agent log: {STATE_DIR}/agent.log). Try:\n  \
             ip netns exec {} curl -s http://{}/\n  \
             bpftool map dump pinned {}/weft_svc_v1\nRemove it with: cargo xtask demo --clean",
            client.ns.name(),
            seed::frontend(),
            agent.pin_dir().display()
        );
        std::mem::forget(agent);
        for pod in pods.into_iter().chain([client]) {
            pod.ns.keep();
        }
        node.ns.keep();
        return Ok(());
    }
    println!("\nTearing down (pass --keep to leave it running).");
    drop(agent);
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
        // Give the agent its clean exit (it removes its nftables table).
        thread::sleep(Duration::from_millis(500));
    }
    for ns in run("ip", &["netns", "list"])?.lines() {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if name.starts_with(NODE) {
            run("ip", &["netns", "del", name])?;
        }
    }
    let pins = Path::new("/sys/fs/bpf").join(format!("weft-{NODE}"));
    if pins.exists() {
        fs::remove_dir_all(&pins)?;
    }
    if state.exists() {
        fs::remove_dir_all(state)?;
    }
    println!("demo removed");
    Ok(())
}
