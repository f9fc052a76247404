//! Figure 4: pod-to-pod TCP across two nodes on a veth underlay, weft against the kernel's
//! VXLAN device as flanneld sets it up, bare and on a node that also runs kube-proxy's iptables
//! rules with `br_netfilter` on; beside them weft with one part of its overlay path left out at
//! a time, and two pods on one node (no encapsulation) as the limit. Every contender is built
//! just before its run and torn down after it, so only the one measured exists.
//!
//! Per run: iperf3's received rate and retransmits, the whole machine's CPU time per GB moved,
//! the mean frame the underlay port sends to the receiving node (bytes over packets: ~64 KiB
//! while GSO super-packets cross the underlay whole, ~1.5 KiB once something cut them to MTU
//! frames), and the drops counted on the nodes' uplinks and the underlay's ports. A short
//! capture on that underlay port gives the frame length distribution beside it.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;

use weft_tests::{
    capture,
    cluster::{AgentOptions, Pod},
    netns::Netns,
    overlay::{
        CLUSTER_PREFIX, Cluster, Etcd, FlannelNode, Underlay, cluster_network, cluster_options,
        cluster_with, network_config, node_address,
    },
};

use crate::{Better, Contender, machine, peers};

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub gbits: f64,
    pub retransmits: f64,
    pub cpu_seconds_per_gb: f64,
    /// Mean bytes per frame the underlay port sent to the receiving node (`None` on one node).
    pub underlay_frame: Option<f64>,
    /// Frames dropped on the uplinks and underlay ports (rx and tx) during the run.
    pub drops: f64,
}

/// A traffic pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    OneStream,
    EightStreams,
    /// One stream, with the sender's uplink segmenting in software (no TSO) and the receiver's
    /// doing GRO: MTU frames on the wire, what a physical NIC hands the stack.
    MtuFrames,
}

impl Case {
    pub const ALL: [Self; 3] = [Self::OneStream, Self::EightStreams, Self::MtuFrames];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::OneStream => "1 stream",
            Self::EightStreams => "8 streams",
            Self::MtuFrames => "1 stream, MTU frames on the wire, GRO at the receiver",
        }
    }

    #[must_use]
    pub fn streams(self) -> u32 {
        match self {
            Self::EightStreams => 8,
            Self::OneStream | Self::MtuFrames => 1,
        }
    }

    /// Who runs in this case: all, one stream; the main contenders with 8 streams; those GRO
    /// concerns with MTU frames.
    #[must_use]
    pub fn contenders(self) -> &'static [Contender] {
        match self {
            Self::OneStream => &[
                Contender::Weft,
                Contender::KernelVxlan,
                Contender::KernelVxlanKubeProxy,
                Contender::WeftKernelRouting,
                Contender::WeftNoVxlanDevice,
                Contender::WeftNativeXdp,
                Contender::SameNode,
            ],
            Self::EightStreams => &[
                Contender::Weft,
                Contender::KernelVxlan,
                Contender::KernelVxlanKubeProxy,
                Contender::WeftKernelRouting,
                Contender::SameNode,
            ],
            Self::MtuFrames => &[
                Contender::Weft,
                Contender::KernelVxlan,
                Contender::KernelVxlanKubeProxy,
                Contender::WeftNoVxlanDevice,
            ],
        }
    }
}

/// Two pods for one contender: a client and a server, on two nodes of an underlay (or on one
/// node for [`Contender::SameNode`]). Dropping it tears everything down.
pub enum Testbed {
    Weft(Cluster),
    Kernel(KernelPair),
}

impl Testbed {
    /// Builds `contender`'s testbed.
    #[must_use]
    pub fn new(contender: Contender) -> Self {
        let weft = |nodes, pods, extra: &[&str]| {
            let extra: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
            let config = network_config(cluster_network());
            let cluster = cluster_with(Etcd::start, &config, nodes, pods, |etcd| AgentOptions {
                extra_args: extra,
                ..cluster_options(etcd)
            });
            // As on a kubeadm node, where weft replaces kube-proxy and flannel.
            for node in &cluster.nodes {
                node.set_bridge_netfilter(true);
            }
            Self::Weft(cluster)
        };
        match contender {
            Contender::Weft => weft(2, 1, &[]),
            Contender::WeftKernelRouting => weft(2, 1, &["--host-routing=kernel"]),
            Contender::WeftNoVxlanDevice => weft(2, 1, &["--vxlan-device=off"]),
            Contender::WeftNativeXdp => weft(2, 1, &["--xdp=native"]),
            Contender::SameNode => weft(1, 2, &[]),
            Contender::KernelVxlan => Self::Kernel(KernelPair::new(false)),
            Contender::KernelVxlanKubeProxy => Self::Kernel(KernelPair::new(true)),
            Contender::Iptables | Contender::Nftables | Contender::WeftPacketNat => {
                unreachable!("not an overlay contender")
            }
        }
    }

    fn pods(&self) -> (&Pod, &Pod) {
        match self {
            Self::Weft(cluster) if cluster.nodes.len() == 1 => {
                (&cluster.pods[0][0], &cluster.pods[0][1])
            }
            Self::Weft(cluster) => (&cluster.pods[0][0], &cluster.pods[1][0]),
            Self::Kernel(pair) => (&pair.client, &pair.server),
        }
    }

    /// The underlay and the namespaces of the sending and receiving nodes (the same one on a
    /// single node).
    fn places(&self) -> (Option<&Underlay>, &Netns, &Netns) {
        match self {
            Self::Weft(cluster) => (
                (cluster.nodes.len() > 1).then_some(&cluster.underlay),
                &cluster.nodes[0].ns,
                &cluster.nodes[cluster.nodes.len() - 1].ns,
            ),
            Self::Kernel(pair) => (Some(&pair.underlay), &pair.a.node.ns, &pair.b.node.ns),
        }
    }

    /// Makes the underlay carry MTU frames with GRO at the receiver (see
    /// [`weft_tests::overlay::cut_to_mtu_frames`]).
    pub fn cut_to_mtu_frames(&self) -> anyhow::Result<()> {
        let (underlay, sender, receiver) = self.places();
        let underlay = underlay.context("one node: no underlay")?;
        weft_tests::overlay::cut_to_mtu_frames(underlay, sender, receiver)?;
        Ok(())
    }

    /// Every interface whose drops count: both nodes' uplinks and the underlay's ports.
    fn counted_interfaces(&self) -> Vec<(&Netns, String)> {
        let (underlay, sender, receiver) = self.places();
        let Some(underlay) = underlay else {
            return Vec::new();
        };
        vec![
            (sender, "eth0".to_owned()),
            (receiver, "eth0".to_owned()),
            (&underlay.ns, Underlay::port(1)),
            (&underlay.ns, Underlay::port(2)),
        ]
    }

    /// One iperf3 run of `secs` seconds with `streams` parallel streams, client to server.
    pub fn measure(&self, streams: u32, secs: u32) -> anyhow::Result<Measured> {
        let (client, server) = self.pods();
        let (underlay, _, _) = self.places();
        let _server = IperfServer::start(&server.ns)?;
        let counted = self.counted_interfaces();
        let drops_before = total_drops(&counted)?;
        let port_before = underlay.map(port_tx).transpose()?;
        let busy = machine::busy_ticks()?;
        let output = client.ns.exec(
            "iperf3",
            &[
                "-c",
                &server.addr.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )?;
        let busy = machine::busy_ticks()? - busy;
        let port_after = underlay.map(port_tx).transpose()?;
        let drops = total_drops(&counted)? - drops_before;
        let result: serde_json::Value = serde_json::from_str(&output).context("iperf3's JSON")?;
        let received = &result["end"]["sum_received"];
        let bits_per_second = received["bits_per_second"]
            .as_f64()
            .context("iperf3 throughput")?;
        let bytes = received["bytes"].as_f64().context("iperf3 byte count")?;
        let retransmits = result["end"]["sum_sent"]["retransmits"]
            .as_f64()
            .context("iperf3 retransmits")?;
        #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
        let cpu_seconds = busy as f64 / machine::ticks_per_second();
        let underlay_frame = port_before.zip(port_after).map(|(before, after)| {
            #[expect(clippy::cast_precision_loss, reason = "counter deltas are small")]
            let mean = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
            mean
        });
        #[expect(clippy::cast_precision_loss, reason = "counter deltas are small")]
        Ok(Measured {
            gbits: bits_per_second / 1e9,
            retransmits,
            cpu_seconds_per_gb: cpu_seconds / (bytes / 1e9),
            underlay_frame,
            drops: drops as f64,
        })
    }

    /// The lengths of the frames the underlay sends to the receiving node during `window`, with
    /// one stream running: the frame length distribution on the wire.
    pub fn underlay_frames(&self, window: Duration) -> anyhow::Result<Vec<usize>> {
        let (client, server) = self.pods();
        let (Some(underlay), _, _) = self.places() else {
            bail!("one node: no underlay")
        };
        let _server = IperfServer::start(&server.ns)?;
        let secs = (window.as_secs() + 2).to_string();
        let mut load = Command::new("nsenter")
            .arg(format!("--net={}", client.ns.path().display()))
            .args(["iperf3", "-c", &server.addr.to_string()])
            .args(["-p", &IPERF_PORT.to_string(), "-t", &secs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (install it: cargo xtask setup)")?;
        thread::sleep(Duration::from_millis(500));
        let lengths = capture::sent_frame_lengths(&underlay.ns, &Underlay::port(2), window);
        let _ = load.kill();
        let _ = load.wait();
        Ok(lengths)
    }
}

/// The port the bench's iperf3 servers listen on.
const IPERF_PORT: u16 = 5201;

/// An iperf3 server in a namespace for one test, killed when dropped.
struct IperfServer(Child);

impl IperfServer {
    fn start(ns: &Netns) -> anyhow::Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["iperf3", "-s", "-1", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (install it: cargo xtask setup)")?;
        // Listening before the client connects.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let listening = ns
                .exec("ss", &["-Htln", &format!("sport = :{IPERF_PORT}")])
                .is_ok_and(|out| !out.trim().is_empty());
            if listening {
                return Ok(Self(child));
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("iperf3 did not start listening")
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes and packets the underlay's port towards the receiving node (node 2) has sent.
fn port_tx(underlay: &Underlay) -> anyhow::Result<(u64, u64)> {
    let stats = underlay.ns.link_stats(&Underlay::port(2))?;
    Ok((stats.tx_bytes, stats.tx_packets))
}

fn total_drops(interfaces: &[(&Netns, String)]) -> anyhow::Result<u64> {
    let mut drops = 0;
    for (ns, name) in interfaces {
        drops += ns.link_stats(name)?.dropped;
    }
    Ok(drops)
}

/// Two nodes set up exactly as flanneld's vxlan backend sets them up, a pod on each; with
/// `kube_proxy`, as a flannel + kube-proxy node also is: kube-proxy's iptables rules (its `nat`
/// table for 100 services of 10 endpoints, its `filter` chains with their conntrack matches,
/// flannel's `FLANNEL-FWD`) and `br_netfilter` on, as kubeadm requires.
pub struct KernelPair {
    client: Pod,
    server: Pod,
    a: FlannelNode,
    b: FlannelNode,
    _etcd: Etcd,
    underlay: Underlay,
}

impl KernelPair {
    #[must_use]
    pub fn new(kube_proxy: bool) -> Self {
        let underlay = Underlay::new(&weft_tests::netns::unique("wbvx"));
        let etcd = Etcd::start(&underlay);
        etcd.put(
            &format!("{CLUSTER_PREFIX}/config"),
            &network_config(cluster_network()),
        );
        let subnets: [Ipv4Net; 2] = [
            "172.30.1.0/24".parse().expect("CIDR"),
            "172.30.2.0/24".parse().expect("CIDR"),
        ];
        let name = underlay.ns.name().to_owned();
        let a = FlannelNode::new(
            &format!("{name}a"),
            &underlay,
            node_address(1),
            subnets[0],
            &etcd,
            CLUSTER_PREFIX,
        );
        let mut b = FlannelNode::new(
            &format!("{name}b"),
            &underlay,
            node_address(2),
            subnets[1],
            &etcd,
            CLUSTER_PREFIX,
        );
        // Each flannel node has a VtepMAC of its own.
        b.vtep_mac = "0e:fe:c0:a8:32:02".to_owned();
        b.node
            .ns
            .ip(&["link", "set", "flannel.1", "address", &b.vtep_mac])
            .expect("VtepMAC");
        a.add_remote(subnets[1], b.public_ip, &b.vtep_mac);
        b.add_remote(subnets[0], a.public_ip, &a.vtep_mac);
        if kube_proxy {
            let endpoints: Vec<Ipv4Addr> = (0..10)
                .map(|i| Ipv4Addr::new(172, 30, 2, 100 + i))
                .collect();
            let services = peers::services(100, &endpoints, 8080);
            let rules = format!(
                "{}{}",
                peers::iptables_ruleset(&services, cluster_network()),
                peers::iptables_forwarding(cluster_network())
            );
            for node in [&a.node, &b.node] {
                node.set_bridge_netfilter(true);
                restore(&node.ns, &rules).expect("kube-proxy's rules load");
            }
        }
        let client = a.node.add_pod(a.node.pod_address(1));
        let server = b.node.add_pod(b.node.pod_address(1));
        Self {
            client,
            server,
            a,
            b,
            _etcd: etcd,
            underlay,
        }
    }
}

/// `iptables-restore` of `rules` in `ns`.
fn restore(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables-restore"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore (install iptables: cargo xtask setup)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The rows one run adds to the report: (figure, unit, better, value).
#[must_use]
pub fn rows(measured: &Measured) -> Vec<(&'static str, &'static str, Better, f64)> {
    let mut rows = vec![
        (
            "4 pod-to-pod TCP throughput, two nodes",
            "Gbit/s",
            Better::Higher,
            measured.gbits,
        ),
        (
            "4 CPU time per GB moved (whole machine)",
            "CPU s/GB",
            Better::Lower,
            measured.cpu_seconds_per_gb,
        ),
        (
            "4 TCP retransmits per run",
            "segments",
            Better::Lower,
            measured.retransmits,
        ),
        (
            "4 drops on the uplinks and underlay ports per run",
            "frames",
            Better::Lower,
            measured.drops,
        ),
    ];
    if let Some(frame) = measured.underlay_frame {
        rows.push((
            "4 mean frame the underlay carries to the receiver",
            "bytes",
            Better::Higher,
            frame,
        ));
    }
    rows
}
