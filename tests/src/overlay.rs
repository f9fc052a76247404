//! Overlay clusters: an underlay (a bridge in a namespace of its own that every node's `eth0`
//! plugs into), a real etcd on it, and nodes configured exactly as flannel configures a vxlan
//! node, for interoperability.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use rcgen::ExtendedKeyUsagePurpose;

use crate::{
    netns::{Netns, run},
    pki::{Ca, Pair},
};

/// The underlay network every node's `eth0` is on.
pub const UNDERLAY_PREFIX: u8 = 24;
/// The underlay bridge's own address, where etcd listens.
pub const ETCD_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 254);

/// The address of node `n` (from 1) on the underlay.
#[must_use]
pub fn node_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 50, n)
}

/// A bridge in a namespace of its own: the nodes' shared L2 network.
pub struct Underlay {
    pub ns: Netns,
    ports: std::sync::Mutex<u32>,
}

impl Underlay {
    /// An underlay in namespace `name`.
    pub fn new(name: &str) -> Self {
        let ns = Netns::create(name).expect("creating the underlay namespace");
        ns.ip(&["link", "add", "name", "br0", "type", "bridge"])
            .expect("underlay bridge");
        let address = format!("{ETCD_ADDRESS}/{UNDERLAY_PREFIX}");
        ns.ip(&["addr", "add", &address, "dev", "br0"])
            .expect("underlay address");
        ns.ip(&["link", "set", "br0", "up"]).expect("underlay up");
        Self {
            ns,
            ports: std::sync::Mutex::new(0),
        }
    }

    /// The bridge's port towards the `n`-th node connected (from 1).
    #[must_use]
    pub fn port(n: u32) -> String {
        format!("u{n}")
    }

    /// Plugs `node` into the bridge: its `eth0` gets `address`.
    pub fn connect(&self, node: &Netns, address: Ipv4Addr) {
        let port = {
            let mut ports = self.ports.lock().expect("port counter");
            *ports += 1;
            Self::port(*ports)
        };
        self.ns
            .add_veth(&port, node, "eth0")
            .expect("underlay veth pair");
        self.ns
            .ip(&["link", "set", &port, "master", "br0", "up"])
            .expect("underlay port");
        let cidr = format!("{address}/{UNDERLAY_PREFIX}");
        node.ip(&["addr", "add", &cidr, "dev", "eth0"])
            .expect("node address");
        node.ip(&["link", "set", "eth0", "up"])
            .expect("node uplink up");
    }
}

/// Makes the underlay carry MTU frames from `sender` (node 1) to `receiver` (node 2), as a
/// physical NIC's wire does: the sender's uplink segments in software, and the receiver's
/// aggregates what arrives in GRO, as a NIC's driver does.
pub fn cut_to_mtu_frames(
    underlay: &Underlay,
    sender: &Netns,
    receiver: &Netns,
) -> std::io::Result<()> {
    sender.exec(
        "ethtool",
        &[
            "-K",
            "eth0",
            "tso",
            "off",
            "gso",
            "off",
            "tx-udp_tnl-segmentation",
            "off",
            "tx-udp_tnl-csum-segmentation",
            "off",
        ],
    )?;
    // A veth takes the GRO path only for what a peer without TSO sends it (or a socket's
    // own packets): the underlay's port towards the receiver must not offer TSO either.
    underlay
        .ns
        .exec("ethtool", &["-K", &Underlay::port(2), "tso", "off"])?;
    receiver.exec("ethtool", &["-K", "eth0", "gro", "on"])?;
    Ok(())
}

/// A single-member etcd (Debian's `etcd-server`) listening on the underlay, with a temporary
/// data directory; stopped on drop.
pub struct Etcd {
    child: Option<Child>,
    ns_path: std::path::PathBuf,
    data: tempfile::TempDir,
    tls: Option<EtcdTls>,
}

/// The etcd lease a key is bound to, as etcd reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLease {
    pub id: i64,
    /// The TTL it was granted, and what is left of it, in seconds.
    pub granted: u64,
    pub remaining: u64,
}

/// The certificates of an etcd that serves only TLS and requires client certificates
/// (`--client-cert-auth`), all from one fresh CA.
pub struct EtcdTls {
    _dir: tempfile::TempDir,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server's pair, for the etcd address.
    server: Pair,
    /// A client pair, for etcdctl and the agents.
    pub client: Pair,
}

impl EtcdTls {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a certificate directory");
        let ca = Ca::new("weft test etcd CA");
        // etcd also dials itself (its gRPC gateway) with its server certificate.
        let server = ca.issue(
            dir.path(),
            "etcd-server",
            &[ETCD_ADDRESS.into()],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let client = ca.issue(
            dir.path(),
            "etcd-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        );
        Self {
            ca: ca.write(dir.path(), "ca.pem"),
            _dir: dir,
            server,
            client,
        }
    }
}

impl Etcd {
    /// Starts etcd in `underlay`'s namespace and waits until it answers.
    pub fn start(underlay: &Underlay) -> Self {
        Self::start_with(underlay, None)
    }

    /// Starts etcd serving only TLS with client certificate authentication; etcdctl and
    /// [`cluster_options`] use a client certificate from its CA.
    pub fn start_tls(underlay: &Underlay) -> Self {
        Self::start_with(underlay, Some(EtcdTls::new()))
    }

    fn start_with(underlay: &Underlay, tls: Option<EtcdTls>) -> Self {
        let mut etcd = Self {
            child: None,
            ns_path: underlay.ns.path(),
            data: tempfile::tempdir().expect("etcd data directory"),
            tls,
        };
        etcd.launch();
        etcd
    }

    /// The client URL.
    #[must_use]
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{ETCD_ADDRESS}:2379")
    }

    /// The certificates, for an etcd started with [`Etcd::start_tls`].
    #[must_use]
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// The agent flags for this etcd's CA and client certificate (none without TLS).
    #[must_use]
    pub fn agent_tls_args(&self) -> Vec<String> {
        self.tls
            .iter()
            .flat_map(|tls| {
                [
                    format!("--etcd-cafile={}", tls.ca.display()),
                    format!("--etcd-certfile={}", tls.client.cert.display()),
                    format!("--etcd-keyfile={}", tls.client.key.display()),
                ]
            })
            .collect()
    }

    fn launch(&mut self) {
        let url = self.endpoint();
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.ns_path.display()))
            .args(["etcd", "--name", "weft-test", "--data-dir"])
            .arg(self.data.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "weft-test=http://127.0.0.1:2380"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server.cert)
                .arg("--key-file")
                .arg(&tls.server.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd (package etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(20));
        while self.ctl(&["endpoint", "health"]).is_err() {
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd, as a crash would; its data stays for [`Etcd::resume`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped etcd again on its data directory and waits until it answers.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        self.launch();
    }

    /// Empties a stopped etcd's data directory, as a lost disk would (or a restore from nothing).
    pub fn wipe(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        self.data = tempfile::tempdir().expect("etcd data directory");
    }

    /// Runs `etcdctl <args>` (v3 API) against this etcd.
    pub fn ctl(&self, args: &[&str]) -> std::io::Result<String> {
        let ns = format!("--net={}", self.ns_path.display());
        let endpoint = format!("--endpoints={}", self.endpoint());
        let credentials: Vec<String> = self
            .tls
            .iter()
            .flat_map(|tls| {
                [
                    format!("--cacert={}", tls.ca.display()),
                    format!("--cert={}", tls.client.cert.display()),
                    format!("--key={}", tls.client.key.display()),
                ]
            })
            .collect();
        let mut full = vec![
            ns.as_str(),
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            endpoint.as_str(),
        ];
        full.extend(credentials.iter().map(String::as_str));
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]).expect("etcdctl put");
    }

    pub fn delete(&self, key: &str) {
        self.ctl(&["del", key]).expect("etcdctl del");
    }

    /// The value under `key`, if any.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self
            .ctl(&["get", key, "--print-value-only"])
            .expect("etcdctl get");
        let value = out.trim_end_matches('\n');
        (!value.is_empty()).then(|| value.to_owned())
    }

    /// Grants an etcd lease of `ttl` seconds; returns its ID.
    #[must_use]
    pub fn grant(&self, ttl: u32) -> i64 {
        let out = self
            .ctl(&["lease", "grant", &ttl.to_string()])
            .expect("etcdctl lease grant");
        // "lease 694d854330fc5110 granted with TTL(3600s)"
        out.split_whitespace()
            .nth(1)
            .and_then(|id| i64::from_str_radix(id, 16).ok())
            .unwrap_or_else(|| panic!("no lease ID in {out:?}"))
    }

    /// The etcd lease `key` is bound to; `None` for a key without TTL (a reservation) or no
    /// key.
    #[must_use]
    pub fn lease_of(&self, key: &str) -> Option<KeyLease> {
        let out = self.ctl(&["get", key, "-w", "json"]).expect("etcdctl get");
        let answer: serde_json::Value = serde_json::from_str(&out).expect("etcdctl's JSON");
        let id = answer.pointer("/kvs/0/lease")?.as_i64()?;
        let text = self
            .ctl(&["lease", "timetolive", &format!("{id:x}")])
            .expect("etcdctl lease timetolive");
        // "lease 694d854330fc5110 granted with TTL(86400s), remaining(86399s)"
        let seconds = |label: &str| -> u64 {
            let rest = &text[text.find(label).unwrap_or_else(|| panic!("{text}")) + label.len()..];
            rest[..rest.find('s').expect("seconds")]
                .parse()
                .expect("a number")
        };
        Some(KeyLease {
            id,
            granted: seconds("granted with TTL("),
            remaining: seconds("remaining("),
        })
    }

    /// Every key under `prefix`.
    #[must_use]
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.ctl(&["get", prefix, "--prefix", "--keys-only"])
            .expect("etcdctl get --prefix")
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Leaves etcd running, with its data, when this value goes away (the demo's `--keep`);
    /// returns its pid.
    pub fn keep(mut self) -> u32 {
        let pid = self.child.take().map_or(0, |child| child.id());
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().expect("placeholder"));
        let _ = data.keep();
        pid
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Cuts a node off from etcd (both directions, nftables in its namespace) until dropped:
/// its connections to etcd go silent, as behind a failed link.
pub struct EtcdPartition<'a> {
    node: &'a Netns,
}

const PARTITION_TABLE: &str = "weft-test-etcd-cut";

impl<'a> EtcdPartition<'a> {
    #[must_use]
    pub fn cut(node: &'a Netns) -> Self {
        let table = ["table", "ip", PARTITION_TABLE];
        let address = ETCD_ADDRESS.to_string();
        let add = |args: &[&str]| {
            let mut full = vec!["add"];
            full.extend_from_slice(args);
            node.exec("nft", &full)
                .expect("nft: cutting the node off etcd");
        };
        add(&table);
        add(&[
            "chain",
            "ip",
            PARTITION_TABLE,
            "out",
            "{ type filter hook output priority 0; }",
        ]);
        add(&[
            "rule",
            "ip",
            PARTITION_TABLE,
            "out",
            "ip",
            "daddr",
            &address,
            "tcp",
            "dport",
            "2379",
            "drop",
        ]);
        add(&[
            "chain",
            "ip",
            PARTITION_TABLE,
            "in",
            "{ type filter hook input priority 0; }",
        ]);
        add(&[
            "rule",
            "ip",
            PARTITION_TABLE,
            "in",
            "ip",
            "saddr",
            &address,
            "tcp",
            "sport",
            "2379",
            "drop",
        ]);
        Self { node }
    }
}

impl Drop for EtcdPartition<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .node
            .exec("nft", &["delete", "table", "ip", PARTITION_TABLE])
        {
            eprintln!("cleanup: {e}");
        }
    }
}

/// flannel's network config for `network` (vxlan, VNI 1, port 8472), as JSON.
#[must_use]
pub fn network_config(network: Ipv4Net) -> String {
    format!(r#"{{"Network":"{network}","SubnetLen":24,"Backend":{{"Type":"vxlan"}}}}"#)
}

/// A node set up exactly as flanneld (vxlan backend) sets one up, without flanneld: the kernel
/// VXLAN device `flannel.1` (VNI 1, port 8472, no learning) with the VtepMAC, the subnet's
/// network address on it, the bridge with the gateway, and per remote node a route
/// `via <subnet>.0 onlink`, a permanent neighbour and an FDB entry. Its lease is flannel's JSON.
pub struct FlannelNode {
    pub node: crate::cluster::Node,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: String,
}

impl FlannelNode {
    /// Sets the node up with `subnet` and publishes its lease under `prefix` in `etcd`.
    pub fn new(
        name: &str,
        underlay: &Underlay,
        public_ip: Ipv4Addr,
        subnet: Ipv4Net,
        etcd: &Etcd,
        prefix: &str,
    ) -> Self {
        let flannel = Self::set_up(name, underlay, public_ip, subnet);
        etcd.put(
            &format!(
                "{prefix}/subnets/{}-{}",
                subnet.network(),
                subnet.prefix_len()
            ),
            &format!(
                r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{}}}"#,
                flannel.backend_data()
            ),
        );
        flannel
    }

    /// The vxlan `BackendData` flanneld publishes for this node.
    #[must_use]
    pub fn backend_data(&self) -> String {
        format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, self.vtep_mac)
    }

    /// Sets the node up with `subnet`, publishing nothing.
    pub fn set_up(name: &str, underlay: &Underlay, public_ip: Ipv4Addr, subnet: Ipv4Net) -> Self {
        let node = crate::cluster::Node::on_underlay(name, underlay, public_ip);
        node.set_subnet(subnet);
        let vtep_mac = "b6:c7:0f:7f:66:a7".to_owned();
        let ns = &node.ns;
        let public = public_ip.to_string();
        ns.ip(&[
            "link",
            "add",
            "name",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "nolearning",
            "local",
            &public,
            "dev",
            "eth0",
        ])
        .expect("flannel.1");
        ns.ip(&[
            "link",
            "set",
            "flannel.1",
            "address",
            &vtep_mac,
            "mtu",
            "1450",
        ])
        .expect("flannel.1 mac");
        let vtep_address = format!("{}/32", subnet.network());
        ns.ip(&["addr", "add", &vtep_address, "dev", "flannel.1"])
            .expect("flannel.1 address");
        ns.ip(&["link", "set", "flannel.1", "up"])
            .expect("flannel.1 up");
        ns.ip(&[
            "link",
            "add",
            "name",
            crate::cluster::BRIDGE,
            "type",
            "bridge",
        ])
        .expect("cni0");
        let gateway = format!("{}/{}", node.gateway(), subnet.prefix_len());
        ns.ip(&["addr", "add", &gateway, "dev", crate::cluster::BRIDGE])
            .expect("cni0 address");
        ns.ip(&["link", "set", crate::cluster::BRIDGE, "mtu", "1450", "up"])
            .expect("cni0 up");
        ns.exec("sysctl", &["-w", "net.ipv4.ip_forward=1"])
            .expect("ip_forward");
        Self {
            node,
            public_ip,
            vtep_mac,
        }
    }

    /// What flanneld programs for a remote node's lease.
    pub fn add_remote(&self, subnet: Ipv4Net, public_ip: Ipv4Addr, vtep_mac: &str) {
        let ns = &self.node.ns;
        let next_hop = subnet.network().to_string();
        ns.ip(&[
            "route",
            "add",
            &subnet.to_string(),
            "via",
            &next_hop,
            "dev",
            "flannel.1",
            "onlink",
        ])
        .expect("flannel route");
        ns.ip(&[
            "neigh",
            "replace",
            &next_hop,
            "lladdr",
            vtep_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])
        .expect("flannel neighbour");
        run(
            "bridge",
            &[
                "-n",
                ns.name(),
                "fdb",
                "append",
                vtep_mac,
                "dev",
                "flannel.1",
                "dst",
                &public_ip.to_string(),
            ],
        )
        .expect("flannel fdb");
    }
}

/// The etcd prefix overlay clusters keep flannel's config and leases under.
pub const CLUSTER_PREFIX: &str = "/weft-test/network";
/// The port every cluster pod serves HTTP on, and UDP.
pub const POD_HTTP_PORT: u16 = 80;
pub const POD_UDP_PORT: u16 = 5353;

/// The pod Network of overlay clusters.
#[must_use]
pub fn cluster_network() -> Ipv4Net {
    "172.30.0.0/16".parse().expect("valid CIDR")
}

/// `count` pods on every node, each serving HTTP on [`POD_HTTP_PORT`] and UDP on
/// [`POD_UDP_PORT`]: `pods[n]` are node `n`'s.
#[must_use]
pub fn add_pods(
    nodes: &[crate::cluster::Node],
    count: u8,
) -> (Vec<Vec<crate::cluster::Pod>>, Vec<crate::apps::Server>) {
    use crate::apps::{serve_http, serve_udp};
    let mut servers = Vec::new();
    let pods = nodes
        .iter()
        .map(|node| {
            (1..=count)
                .map(|p| {
                    let pod = node.add_pod(node.pod_address(p));
                    servers.push(serve_http(&pod.ns, POD_HTTP_PORT));
                    servers.push(serve_udp(&pod.ns, POD_UDP_PORT));
                    pod
                })
                .collect()
        })
        .collect();
    (pods, servers)
}

/// An overlay cluster of weft nodes. Fields drop top to bottom: agents stop before namespaces
/// and etcd go.
pub struct Cluster {
    pub agents: Vec<crate::cluster::Agent>,
    pub servers: Vec<crate::apps::Server>,
    /// `pods[n]` are node `n`'s pods.
    pub pods: Vec<Vec<crate::cluster::Pod>>,
    pub nodes: Vec<crate::cluster::Node>,
    pub etcd: Etcd,
    pub underlay: Underlay,
}

/// What an agent of an overlay cluster on `etcd` is started with (with its TLS files when it
/// has TLS).
#[must_use]
pub fn cluster_options(etcd: &Etcd) -> crate::cluster::AgentOptions {
    crate::cluster::AgentOptions {
        etcd: Some((etcd.endpoint(), CLUSTER_PREFIX.to_owned())),
        extra_args: etcd.agent_tls_args(),
        ..crate::cluster::AgentOptions::default()
    }
}

/// `count` weft nodes on `underlay` (node `n` at [`node_address`]`(n)`), their agents started
/// at the same moment on `etcd`'s overlay.
#[must_use]
pub fn start_nodes(
    underlay: &Underlay,
    etcd: &Etcd,
    count: u8,
    capabilities: Option<&[&str]>,
) -> (Vec<crate::cluster::Node>, Vec<crate::cluster::Agent>) {
    start_nodes_with(underlay, count, &with_capabilities(etcd, capabilities))
}

/// [`cluster_options`] for `etcd`, with only `capabilities` if given.
fn with_capabilities(etcd: &Etcd, capabilities: Option<&[&str]>) -> crate::cluster::AgentOptions {
    crate::cluster::AgentOptions {
        capabilities: capabilities.map(|caps| caps.iter().map(|c| (*c).to_owned()).collect()),
        ..cluster_options(etcd)
    }
}

/// Node `n` of `underlay` (at [`node_address`]`(n)`), without an agent yet.
#[must_use]
pub fn node_on(underlay: &Underlay, n: u8) -> crate::cluster::Node {
    crate::cluster::Node::on_underlay(
        &format!("{}n{n}", underlay.ns.name()),
        underlay,
        node_address(n),
    )
}

/// [`start_nodes`] with every agent started with `options`.
#[must_use]
pub fn start_nodes_with(
    underlay: &Underlay,
    count: u8,
    options: &crate::cluster::AgentOptions,
) -> (Vec<crate::cluster::Node>, Vec<crate::cluster::Agent>) {
    use crate::cluster::{Agent, Node};
    let nodes: Vec<Node> = (1..=count).map(|n| node_on(underlay, n)).collect();
    let agents = thread::scope(|scope| {
        let started: Vec<_> = nodes
            .iter()
            .map(|node| scope.spawn(|| Agent::join(node, &[], options)))
            .collect();
        started
            .into_iter()
            .map(|agent| agent.join().expect("agent started"))
            .collect()
    });
    (nodes, agents)
}

/// `nodes` weft nodes (node `n` at [`node_address`]`(n)`) with `pods` pods each, every pod
/// serving HTTP and UDP; the agents start together.
#[must_use]
pub fn cluster(nodes: u8, pods: u8) -> Cluster {
    cluster_on(Etcd::start, nodes, pods, None)
}

/// [`cluster`] on the etcd `start` starts ([`Etcd::start`], [`Etcd::start_tls`]), its agents
/// with only `capabilities` if given (see [`crate::cluster::AgentOptions::capabilities`]).
#[must_use]
pub fn cluster_on(
    start: fn(&Underlay) -> Etcd,
    nodes: u8,
    pods: u8,
    capabilities: Option<&[&str]>,
) -> Cluster {
    cluster_with(
        start,
        &network_config(cluster_network()),
        nodes,
        pods,
        |etcd| with_capabilities(etcd, capabilities),
    )
}

/// [`cluster`] on the etcd `start` starts, with the network config `config` (JSON, over
/// [`cluster_network`]), every agent started with the options `options` gives for that etcd.
#[must_use]
pub fn cluster_with(
    start: fn(&Underlay) -> Etcd,
    config: &str,
    nodes: u8,
    pods: u8,
    options: impl FnOnce(&Etcd) -> crate::cluster::AgentOptions,
) -> Cluster {
    crate::netns::require_root();
    let underlay = Underlay::new(&crate::netns::unique("wovl"));
    let etcd = start(&underlay);
    etcd.put(&format!("{CLUSTER_PREFIX}/config"), config);
    let (nodes, agents) = start_nodes_with(&underlay, nodes, &options(&etcd));
    let (pods, servers) = add_pods(&nodes, pods);
    Cluster {
        agents,
        servers,
        pods,
        nodes,
        etcd,
        underlay,
    }
}
