//! Clusters made of network namespaces: a node with a pod bridge, pods on veth pairs, and a
//! real `weft agent` process per node. Everything is torn down on drop, in reverse order of
//! creation (declare the agent after the node and its pods).

use std::{
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    apiserver::{self, ApiServer},
    apps::{self, Server, serve_http},
    netns::{Netns, run, unique},
    seed::{BACKENDS, TARGET_PORT, cluster_cidr, pod_subnet},
};

/// The bridge name weft uses by default, as flannel's CNI does.
pub const BRIDGE: &str = "cni0";

/// A node: a namespace with the pod bridge (as a CNI plugin would have made it), or, on an
/// overlay, a namespace with an uplink whose bridge and subnet the agent's lease decides.
pub struct Node {
    pub ns: Netns,
    subnet: Mutex<Option<Ipv4Net>>,
    /// MTU of its pods' interfaces (the overlay's is smaller).
    pod_mtu: u32,
    pods: Mutex<u32>,
}

impl Node {
    /// A node (namespace `name`) whose pods live in `subnet`; the bridge gets the subnet's first
    /// address.
    pub fn new(name: &str, subnet: Ipv4Net) -> Self {
        let ns = Netns::create(name).expect("creating the node namespace");
        let gateway = format!(
            "{}/{}",
            subnet.hosts().next().expect("subnet has hosts"),
            subnet.prefix_len()
        );
        ns.ip(&["link", "add", "name", BRIDGE, "type", "bridge"])
            .expect("creating the bridge");
        ns.ip(&["addr", "add", &gateway, "dev", BRIDGE])
            .expect("addressing the bridge");
        ns.ip(&["link", "set", BRIDGE, "up"])
            .expect("bringing up the bridge");
        Self {
            ns,
            subnet: Mutex::new(Some(subnet)),
            pod_mtu: 1500,
            pods: Mutex::new(0),
        }
    }

    /// A node whose CNI routes to each pod's veth, as the ptp plugin (or Calico) does: no
    /// bridge; pods come from [`Node::add_routed_pod`].
    pub fn routed(name: &str, subnet: Ipv4Net) -> Self {
        let ns = Netns::create(name).expect("creating the node namespace");
        ns.exec("sysctl", &["-w", "net.ipv4.ip_forward=1"])
            .expect("ip_forward");
        Self {
            ns,
            subnet: Mutex::new(Some(subnet)),
            pod_mtu: 1500,
            pods: Mutex::new(0),
        }
    }

    /// A node on `underlay` with uplink `eth0` at `address`; no bridge yet (the agent makes it
    /// once it holds a lease; see [`Node::set_subnet`]).
    pub fn on_underlay(name: &str, underlay: &crate::overlay::Underlay, address: Ipv4Addr) -> Self {
        let ns = Netns::create(name).expect("creating the node namespace");
        underlay.connect(&ns, address);
        Self {
            ns,
            subnet: Mutex::new(None),
            pod_mtu: 1500 - weft_common::vxlan::OVERHEAD,
            pods: Mutex::new(0),
        }
    }

    /// The node's pod subnet.
    #[must_use]
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
            .lock()
            .expect("subnet")
            .expect("the node has a pod subnet (set_subnet)")
    }

    /// Records the subnet the node's lease holds.
    pub fn set_subnet(&self, subnet: Ipv4Net) {
        *self.subnet.lock().expect("subnet") = Some(subnet);
    }

    /// The address of the node's `n`-th pod in its subnet (`n` from 1; .1 is the gateway).
    #[must_use]
    pub fn pod_address(&self, n: u8) -> Ipv4Addr {
        let network = self.subnet().network().octets();
        Ipv4Addr::new(network[0], network[1], network[2], network[3] + 1 + n)
    }

    /// Turns netfilter hooks on bridged traffic (`br_netfilter`'s `bridge-nf-call-iptables`) on
    /// or off in this node. Kubernetes nodes run with it on; the module is loaded when needed.
    pub fn set_bridge_netfilter(&self, on: bool) {
        const KEY: &str = "net.bridge.bridge-nf-call-iptables";
        if on && self.ns.exec("sysctl", &["-n", KEY]).is_err() {
            run("modprobe", &["br_netfilter"]).expect("loading br_netfilter");
        }
        let setting = format!("{KEY}={}", u8::from(on));
        if let Err(e) = self.ns.exec("sysctl", &["-w", &setting]) {
            // Without the module there are no bridge hooks to turn off.
            assert!(!on, "enabling bridge netfilter: {e}");
        }
    }

    /// The bridge's address: the pods' default gateway.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet().hosts().next().expect("subnet has hosts")
    }

    /// A pod with address `addr`, on a veth pair whose node side joins the bridge.
    pub fn add_pod(&self, addr: Ipv4Addr) -> Pod {
        let (ns, host_side) = self.pod_namespace();
        let mtu = self.pod_mtu.to_string();
        self.ns
            .ip(&[
                "link", "set", &host_side, "mtu", &mtu, "master", BRIDGE, "up",
            ])
            .expect("enslaving the veth");
        let cidr = format!("{addr}/{}", self.subnet().prefix_len());
        ns.ip(&["addr", "add", &cidr, "dev", "eth0"])
            .expect("addressing the pod");
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])
            .expect("bringing up the pod's eth0");
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])
        .expect("routing the pod");
        Pod { ns, addr }
    }

    /// A pod with address `addr` as the ptp CNI plugin makes one: a /32 on its `eth0`, the
    /// node's gateway address on the node side of the veth (on no bridge), a host route to the
    /// pod through it, and the pod's default route through the gateway.
    pub fn add_routed_pod(&self, addr: Ipv4Addr) -> Pod {
        let (ns, host_side) = self.pod_namespace();
        let gateway = self.gateway().to_string();
        self.ns
            .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_side])
            .expect("addressing the node side");
        self.ns
            .ip(&["link", "set", &host_side, "up"])
            .expect("bringing up the node side");
        self.ns
            .ip(&["route", "add", &format!("{addr}/32"), "dev", &host_side])
            .expect("routing to the pod");
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])
            .expect("addressing the pod");
        ns.ip(&["link", "set", "eth0", "up"])
            .expect("bringing up the pod's eth0");
        ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])
            .expect("the pod's route to its gateway");
        ns.ip(&["route", "add", "default", "via", &gateway])
            .expect("routing the pod");
        Pod { ns, addr }
    }

    /// A new pod's namespace, with a veth pair whose `eth0` is in it; returns the node side's
    /// name.
    fn pod_namespace(&self) -> (Netns, String) {
        let index = {
            let mut pods = self.pods.lock().expect("pod counter");
            *pods += 1;
            *pods
        };
        let ns = Netns::create(&format!("{}p{index}", self.ns.name()))
            .expect("creating the pod namespace");
        let host_side = format!("veth{index}");
        self.ns
            .add_veth(&host_side, &ns, "eth0")
            .expect("creating the pod's veth pair");
        (ns, host_side)
    }
}

/// A pod: a namespace with one address.
pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

impl Pod {
    /// Whether a connection from this pod to `vip` is connected to an endpoint in the pod's
    /// kernel (the socket hooks translated it), rather than to `vip` (translated per packet, or
    /// not at all).
    #[must_use]
    pub fn translated_at_connect(&self, vip: std::net::SocketAddrV4) -> bool {
        let (local, sockets) = self
            .ns
            .run(|| {
                let stream = std::net::TcpStream::connect(vip)?;
                let local = stream.local_addr()?;
                let sockets = self.ns.exec("ss", &["-tnH", "state", "established"])?;
                Ok::<_, std::io::Error>((local, sockets))
            })
            .expect("a connection and the pod's socket table");
        let line = sockets
            .lines()
            .find(|line| line.contains(&format!("{local} ")))
            .unwrap_or_else(|| panic!("no socket from {local} in the pod: {sockets}"));
        !line.contains(&format!("{vip}"))
    }
}

/// Options for one agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    pub cluster_cidr: Option<Ipv4Net>,
    /// A directory for the manifests (`manifests/`), the agent's log (`agent.log`) and its
    /// `subnet.env`; a temporary one when unset.
    pub state_dir: Option<PathBuf>,
    /// etcd endpoint and key prefix: the agent joins the overlay (uplink `eth0`) and its lease
    /// decides the pod subnet.
    pub etcd: Option<(String, String)>,
    /// Watch the Kubernetes API through this kubeconfig instead of the manifest directory.
    pub kubeconfig: Option<PathBuf>,
    /// flannel's `net-conf.json`: the agent joins the overlay (uplink `eth0`) as flannel's
    /// kube subnet manager, its subnet the Node's podCIDR (needs `kubeconfig`).
    pub net_conf: Option<PathBuf>,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// Run the agent with only these capabilities in its bounding set (`setpriv` names:
    /// `bpf`, `net_admin`, ...), and so only these effective; all of root's when unset.
    pub capabilities: Option<Vec<String>>,
}

/// The `weft` binary of this build: `WEFT_BIN`, or `weft` in the directory of the running
/// executable (a binary of this workspace) or its parent (a test, under `deps/`).
#[must_use]
pub fn weft_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("executable path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("weft"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no weft binary beside {}: build it first (`cargo build -p weft`; `cargo xtask test` does)",
                exe.display()
            )
        })
}

/// Starts `nsenter <args>` (the agent in a node's namespace), appending its log to `log_file`.
fn spawn_agent(args: &[String], log_file: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .expect("agent log file");
    // nsenter, unlike `ip netns exec`, keeps the host's /sys, where bpffs is mounted.
    Command::new("nsenter")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting weft agent")
}

/// A running `weft agent` in a node's namespace, with its own pin directory and manifest
/// directory. Dropping it stops the agent (SIGTERM) and runs `weft cleanup` for it.
pub struct Agent {
    child: Child,
    /// The nsenter command line, to start the agent again.
    args: Vec<String>,
    pin_dir: PathBuf,
    manifests: PathBuf,
    log_file: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts an agent on `node` serving `manifests` (file name, content) and waits until it
    /// reports ready.
    pub fn start(node: &Node, manifests: &[(&str, &str)], options: &AgentOptions) -> Self {
        let mut agent = Self::launch(node, manifests, options);
        agent.wait_ready(0);
        agent
    }

    /// Starts an agent as [`Agent::start`] does, without waiting for it to be ready (one that
    /// is expected not to get there).
    pub fn launch(node: &Node, manifests: &[(&str, &str)], options: &AgentOptions) -> Self {
        let temporary = match options.state_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("agent state directory")),
        };
        let state_dir = match (&options.state_dir, &temporary) {
            (Some(dir), _) => dir.clone(),
            (None, Some(temp)) => temp.path().to_owned(),
            (None, None) => unreachable!("a temporary directory is made when none is given"),
        };
        let manifest_dir = state_dir.join("manifests");
        fs::create_dir_all(&manifest_dir).expect("manifest directory");
        for (file, text) in manifests {
            fs::write(manifest_dir.join(file), text).expect("writing a manifest");
        }
        let log_file = state_dir.join("agent.log");
        // A fresh log: readiness is read from it, and it is appended to across restarts.
        fs::write(&log_file, "").expect("agent log file");
        let pin_dir = Self::pin_dir_for(node);
        let mut args: Vec<String> = vec![format!("--net={}", node.ns.path().display())];
        if let Some(capabilities) = &options.capabilities {
            let keep: Vec<String> = capabilities.iter().map(|c| format!("+{c}")).collect();
            args.extend([
                "setpriv".into(),
                format!("--bounding-set=-all,{}", keep.join(",")),
                "--inh-caps=-all".into(),
                "--".into(),
            ]);
        }
        args.extend([
            weft_binary().display().to_string(),
            "--log-format=json".into(),
            "agent".into(),
            format!("--pin-dir={}", pin_dir.display()),
            // Nodes share the host's name; each is named after its namespace instead.
            format!("--hostname-override={}", node.ns.name()),
        ]);
        args.push(match &options.kubeconfig {
            Some(kubeconfig) => format!("--kubeconfig={}", kubeconfig.display()),
            None => format!("--manifests={}", manifest_dir.display()),
        });
        let subnet_file = format!("--subnet-file={}", state_dir.join("subnet.env").display());
        match (&options.etcd, &options.net_conf) {
            (Some((endpoint, prefix)), _) => args.extend([
                format!("--etcd-endpoints={endpoint}"),
                format!("--etcd-prefix={prefix}"),
                "--iface=eth0".into(),
                subnet_file,
            ]),
            (None, Some(net_conf)) => args.extend([
                "--kube-subnet-mgr".into(),
                format!("--net-config-path={}", net_conf.display()),
                "--iface=eth0".into(),
                subnet_file,
            ]),
            // With the API, the subnet comes from the Node's spec.podCIDR.
            (None, None) if options.kubeconfig.is_some() => {}
            (None, None) => args.push(format!("--pod-subnet={}", node.subnet())),
        }
        if let Some(cidr) = options.cluster_cidr {
            args.push(format!("--cluster-cidr={cidr}"));
        }
        args.extend(options.extra_args.iter().cloned());
        Self {
            child: spawn_agent(&args, &log_file),
            args,
            pin_dir,
            manifests: manifest_dir,
            log_file,
            _temporary: temporary,
        }
    }

    /// The pin directory an agent on `node` uses: one per node, as nodes share the host.
    #[must_use]
    pub fn pin_dir_for(node: &Node) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("weft-{}", node.ns.name()))
    }

    /// The pod subnet from the `subnet.env` the agent wrote (overlay agents).
    #[must_use]
    pub fn leased_subnet(&self) -> Ipv4Net {
        let env = self
            .manifests
            .parent()
            .expect("state directory")
            .join("subnet.env");
        let text = fs::read_to_string(&env).expect("the agent wrote subnet.env");
        let subnet = text
            .lines()
            .find_map(|line| line.strip_prefix("FLANNEL_SUBNET="))
            .expect("FLANNEL_SUBNET in subnet.env");
        subnet.parse::<Ipv4Net>().expect("a CIDR").trunc()
    }

    /// Starts an overlay agent on `node` and sets the node's subnet from the lease it took.
    pub fn join(node: &Node, manifests: &[(&str, &str)], options: &AgentOptions) -> Self {
        assert!(
            options.etcd.is_some() || options.net_conf.is_some(),
            "joining needs etcd or net-conf.json"
        );
        let agent = Self::start(node, manifests, options);
        node.set_subnet(agent.leased_subnet());
        agent
    }

    /// Restarts the agent with `extra` arguments added to its command line.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        self.restart();
    }

    /// Stops the agent and starts it again on the same pins and manifests; waits until ready.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "the agent exits cleanly: {status}\n{}",
            self.log()
        );
        self.start_again();
    }

    /// Kills the agent (SIGKILL: it gets no chance to tidy anything) and starts it again;
    /// waits until ready.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().expect("killing the agent");
        self.child.wait().expect("reaping the agent");
        self.start_again();
    }

    /// Starts the stopped agent again with the same command line, or with `binary` in place of
    /// the `weft` it ran (an upgrade); waits until ready.
    pub fn start_again_as(&mut self, binary: &Path) {
        let at = self.binary_at();
        self.args[at] = binary.display().to_string();
        self.start_again();
    }

    /// Starts the stopped agent again with the same command line; waits until ready.
    pub fn start_again(&mut self) {
        let readies = self.readies();
        self.launch_again();
        self.wait_ready(readies);
    }

    /// Starts the stopped agent again without waiting for it to be ready (one that is expected
    /// not to get there).
    pub fn launch_again(&mut self) {
        self.child = spawn_agent(&self.args, &self.log_file);
    }

    /// `weft cleanup` in the agent's namespace, against its pins.
    pub fn cleanup(&self) -> std::io::Result<String> {
        run(
            "nsenter",
            &[
                &self.args[0],
                &weft_binary().display().to_string(),
                "cleanup",
                &format!("--pin-dir={}", self.pin_dir.display()),
            ],
        )
    }

    /// How many times the agent logged that it is ready (its log survives restarts).
    fn readies(&self) -> usize {
        self.messages().iter().filter(|m| *m == "ready").count()
    }

    /// Waits until the agent has logged "ready" more than `before` times.
    fn wait_ready(&mut self, before: usize) {
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(20));
        while self.readies() <= before {
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "weft agent did not become ready (exit status {exited:?}); its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The messages the agent logged (JSON lines: `fields.message`), in order.
    #[must_use]
    pub fn messages(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                Some(value.pointer("/fields/message")?.as_str()?.to_owned())
            })
            .collect()
    }

    /// Whether the agent process has exited.
    #[must_use]
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes (or replaces) a manifest file atomically, as a ConfigMap update would.
    pub fn write_manifest(&self, file: &str, text: &str) {
        let staged = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&staged, text).expect("staging a manifest");
        fs::rename(&staged, self.manifests.join(file)).expect("replacing a manifest");
    }

    /// Deletes a manifest file.
    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests.join(file)).expect("removing a manifest");
    }

    /// The directory the agent reads its manifests from.
    #[must_use]
    pub fn manifest_dir(&self) -> &Path {
        &self.manifests
    }

    /// `weft inspect <table>` against this agent's pins.
    #[must_use]
    pub fn inspect(&self, table: &str) -> String {
        let pin_dir = format!("--pin-dir={}", self.pin_dir.display());
        run(
            &weft_binary().display().to_string(),
            &["inspect", table, &pin_dir],
        )
        .expect("weft inspect")
    }

    /// Where the `weft` binary is in the agent's `nsenter` command line (after the namespace
    /// and any capability limits).
    fn binary_at(&self) -> usize {
        self.args
            .iter()
            .position(|arg| Path::new(arg) == weft_binary())
            .expect("the agent's command line names the weft binary")
    }

    /// `weft trace <args>` in the agent's node (its namespace, its pins, its capabilities), as
    /// JSON; the error is weft's message.
    pub fn trace(&self, args: &[&str]) -> std::io::Result<serde_json::Value> {
        let pin_dir = format!("--pin-dir={}", self.pin_dir.display());
        let prefix = &self.args[..self.binary_at()];
        let mut command: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let weft = weft_binary().display().to_string();
        command.extend([weft.as_str(), "trace", &pin_dir, "-ojson"]);
        command.extend(args);
        let output = run("nsenter", &command)?;
        serde_json::from_str(&output).map_err(std::io::Error::other)
    }
}

impl Agent {
    /// The agent's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the agent with SIGTERM (SIGKILL after 5 s) and returns how it exited. Its pins stay
    /// until the agent is dropped.
    pub fn stop(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // nsenter execs the agent, so the child's pid is the agent's.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().expect("reaping the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows what the agent said, which its temporary directory takes away.
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- the last lines the agent of {} logged ---\n{}",
                self.pin_dir.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        if let Err(e) = self.cleanup() {
            eprintln!("weft cleanup for {}: {e}", self.pin_dir.display());
        }
        // What cleanup could not remove (its namespace already gone, say) still goes: removing
        // the link pins detaches the programs.
        if let Err(e) = fs::remove_dir_all(&self.pin_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: removing {}: {e}", self.pin_dir.display());
        }
    }
}

/// The agent's Prometheus metrics, scraped from its default `--metrics-bind-address`
/// (127.0.0.1:10249) inside `node`'s namespace.
#[must_use]
pub fn scrape_metrics(node: &Node) -> String {
    let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10_249);
    let (status, body) = node
        .ns
        .run(|| apps::http_status(address, "/metrics"))
        .expect("scraping the agent's /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one sample (`name` or `name{labels}`, as exposed) in a scrape.
#[must_use]
pub fn metric(scrape: &str, sample: &str) -> Option<f64> {
    scrape
        .lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .and_then(|(_, value)| value.parse().ok())
}

/// A node serving manifests, with the seed's three backends serving HTTP and a client pod
/// (created after the agent, so its port is picked up live). Fields drop top to bottom: the
/// agent stops before the namespaces go.
pub struct ManifestNode {
    pub agent: Agent,
    pub client: Pod,
    _servers: Vec<Server>,
    _backends: Vec<Pod>,
    pub node: Node,
}

impl ManifestNode {
    /// Starts the node with `manifests` (file name, content) and the agent's `extra_args`;
    /// waits until the agent is ready.
    pub fn start<F: AsRef<str>, T: AsRef<str>>(manifests: &[(F, T)], extra_args: &[&str]) -> Self {
        crate::netns::require_root();
        let node = Node::new(&unique("wman"), pod_subnet());
        let backends: Vec<Pod> = BACKENDS.iter().map(|ip| node.add_pod(*ip)).collect();
        let servers = backends
            .iter()
            .map(|pod| serve_http(&pod.ns, TARGET_PORT))
            .collect();
        let files: Vec<(&str, &str)> = manifests
            .iter()
            .map(|(file, text)| (file.as_ref(), text.as_ref()))
            .collect();
        let agent = Agent::start(
            &node,
            &files,
            &AgentOptions {
                cluster_cidr: Some(cluster_cidr()),
                extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
                ..AgentOptions::default()
            },
        );
        let client = node.add_pod(CLIENT);
        Self {
            agent,
            client,
            _servers: servers,
            _backends: backends,
            node,
        }
    }
}

/// A node whose agent watches a test API server, with the seed's three backends serving HTTP
/// and a client pod. Fields drop top to bottom: the agent stops before the namespaces go.
pub struct KubeNode {
    pub agent: Agent,
    pub client: Pod,
    _servers: Vec<Server>,
    _backends: Vec<Pod>,
    pub node: Node,
    _dir: tempfile::TempDir,
}

impl KubeNode {
    /// Starts the node against `api` (which gets the node's Node object; the agent takes its
    /// pod subnet from it) and waits until the agent is ready.
    pub fn start(api: &ApiServer) -> Self {
        let mut node = Self::launch(api);
        node.wait_ready();
        node
    }

    /// Waits until the agent reports ready.
    pub fn wait_ready(&mut self) {
        self.agent.wait_ready(0);
    }

    /// Starts the node as [`KubeNode::start`] does, without waiting for the agent.
    pub fn launch(api: &ApiServer) -> Self {
        crate::netns::require_root();
        let node = Node::new(&unique("wkub"), pod_subnet());
        api.apply(apiserver::node(node.ns.name(), pod_subnet()));
        let backends: Vec<Pod> = BACKENDS.iter().map(|ip| node.add_pod(*ip)).collect();
        let servers = backends
            .iter()
            .map(|pod| serve_http(&pod.ns, TARGET_PORT))
            .collect();
        let dir = tempfile::tempdir().expect("a directory for the kubeconfig");
        let kubeconfig = api.listen_in(&node.ns, dir.path());
        let agent = Agent::launch(
            &node,
            &[],
            &AgentOptions {
                cluster_cidr: Some(cluster_cidr()),
                kubeconfig: Some(kubeconfig),
                ..AgentOptions::default()
            },
        );
        let client = node.add_pod(CLIENT);
        Self {
            agent,
            client,
            _servers: servers,
            _backends: backends,
            node,
            _dir: dir,
        }
    }

    /// The backends that answer `requests` requests to `frontend` from the client.
    #[must_use]
    pub fn servers_of(&self, frontend: SocketAddrV4, requests: usize) -> BTreeSet<Ipv4Addr> {
        self.client.ns.run(|| {
            (0..requests)
                .filter_map(|_| apps::http_get(frontend).ok().map(|answer| answer.server))
                .collect()
        })
    }
}

/// The client pod's address on a [`KubeNode`] or a [`ManifestNode`].
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 20, 9);
