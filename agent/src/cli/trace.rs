//! `weft trace`: a flow's first packet, built and run through this node's loaded programs with
//! `BPF_PROG_TEST_RUN` on their live maps, and what they did to it, explained: the service it
//! matched, the backend chosen, the NAT, the mark, the node it is encapsulated to, or why it
//! was dropped.
//!
//! The programs are the ones the agent pinned under `<pin dir>/programs` (so the agent's own
//! capabilities suffice: no lookup by id, which takes CAP_SYS_ADMIN).
//!
//! The probe is a real first packet to the live programs, so it creates what a first packet
//! creates (a conntrack entry, a session-affinity entry, the learned port of its source pod);
//! the trace puts those back as they were afterwards.
//! The drop counters count it as they count any packet. Run it in the node's network namespace
//! (the programs look up routes and devices there).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapError, lpm_trie::Key};
use ipnet::Ipv4Net;
use serde::Serialize;
use weft::{
    datapath::conntrack::Conntrack,
    datapath::links::LINKS_DIR,
    datapath::loader::PROGRAMS_DIR,
    datapath::maps::{MapSource as _, PinnedMaps, decode_name, is_not_found},
    datapath::probe::{self, Change, Destination, Flow, Source, Verdict},
    host::sys::{bpf_obj_get, bpf_prog_test_run},
    sources::objects::protocol_name,
};
use weft_common::{
    MASQUERADE_MARK,
    drop_reason::DropReason,
    maps::{
        AFFINITY_MAP, AffinityKey, CtKey, LOCAL_PODS_MAP, OVERLAY_MAP, OverlayConfig, RemoteNode,
        SERVICE_NAMES_MAP, SERVICES_MAP, SUBNETS_MAP, ServiceKey, ServiceValue, ct_direction,
        service_flags,
    },
    programs::{FROM_PODS, FROM_UPLINK, TO_POD, TO_UPLINK},
    vxlan::{self, Encap},
};

use crate::cli::inspect::Format;

/// Size of `struct __sk_buff`, a TC program's test-run context.
const SKB_CONTEXT_LEN: usize = 192;
/// Offsets of `mark` and `ifindex` in `struct __sk_buff`.
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;
/// Source ports a probe without one takes the first free one of.
const PROBE_PORTS: std::ops::Range<u16> = 40000..61000;

#[derive(clap::Args)]
pub struct TraceArgs {
    /// The client: `IP` or `IP:port` (without a port, the first one no tracked connection uses).
    #[arg(long)]
    from: Source,
    /// What it connects to: `IP:port/tcp` or `IP:port/udp`.
    #[arg(long)]
    to: Destination,
    /// The device the packet enters the node by: a pod's bridge port or the uplink. By default
    /// a pod of this node enters by a pod port, anything else by the uplink (from a pod of
    /// another node: as that node's VXLAN).
    #[arg(long)]
    iface: Option<String>,
    /// The agent's pin directory.
    #[arg(long, env = "WEFT_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// The bridge local pods are attached to (its subnet is this node's pod subnet).
    #[arg(long, env = "WEFT_BRIDGE", default_value = "cni0")]
    bridge: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// What `weft trace` found, as printed.
#[derive(Serialize)]
struct Report {
    flow: String,
    /// The device and hook the probe entered by.
    entry: String,
    /// The service frontend it was addressed to, if any.
    service: Option<String>,
    hops: Vec<Hop>,
    /// Where the packet ends up, in one line.
    result: String,
}

/// One program's run.
#[derive(Serialize)]
struct Hop {
    program: &'static str,
    verdict: Verdict,
    changes: Vec<Change>,
    /// Drop counters this run raised.
    drops: Vec<&'static str>,
}

/// Where the probe enters the node.
enum Entry {
    /// A local pod's bridge port (TC ingress); `chosen`: named by `--iface`, rather than any
    /// port (they all run the same program).
    PodPort { ifindex: u32, chosen: bool },
    /// The uplink (XDP, then TC ingress), plain or as VXLAN from the node holding the source.
    Uplink {
        ifindex: u32,
        from_node: Option<RemoteNode>,
    },
}

/// The node's pinned dataplane.
struct Node {
    pin_dir: PathBuf,
    overlay: OverlayConfig,
    pod_subnet: Option<Ipv4Net>,
}

impl Node {
    fn open(pin_dir: &Path, bridge: &str) -> anyhow::Result<Self> {
        let overlay = PinnedMaps::new(pin_dir).array(OVERLAY_MAP)?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            overlay: overlay.get(&0, 0)?,
            pod_subnet: bridge_subnet(bridge)?,
        })
    }

    /// The maps the node's agent pinned.
    fn maps(&self) -> PinnedMaps {
        PinnedMaps::new(&self.pin_dir)
    }

    /// The running build's program `name`, by its pin.
    fn program(&self, name: &str) -> anyhow::Result<OwnedFd> {
        let path = self.pin_dir.join(PROGRAMS_DIR).join(name);
        bpf_obj_get(&path).with_context(|| {
            format!(
                "opening the pinned program {} (pinned by `weft agent` as it starts)",
                path.display()
            )
        })
    }

    /// The devices a program is attached to, from its link pins.
    fn attached(&self, program: &str) -> Vec<u32> {
        let prefix = format!("{program}@");
        std::fs::read_dir(self.pin_dir.join(LINKS_DIR))
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?.parse().ok()
            })
            .collect()
    }

    fn uplink(&self) -> anyhow::Result<u32> {
        self.attached(FROM_UPLINK)
            .into_iter()
            .next()
            .with_context(|| {
                format!(
                    "no uplink is attached (no {FROM_UPLINK} link pinned in {})",
                    self.pin_dir.join(LINKS_DIR).display()
                )
            })
    }

    fn is_local_pod(&self, addr: Ipv4Addr) -> bool {
        self.pod_subnet.is_some_and(|subnet| subnet.contains(&addr))
    }

    fn remote_node(&self, addr: Ipv4Addr) -> anyhow::Result<Option<RemoteNode>> {
        let subnets = self.maps().lpm_trie(SUBNETS_MAP)?;
        found(subnets.get(&Key::new(32, addr.octets()), 0))
    }

    /// Sum over CPUs of each drop counter.
    fn drops(&self) -> anyhow::Result<Vec<u64>> {
        let counts = self.maps().drop_counts()?;
        Ok(counts.into_iter().map(|(_, packets)| packets).collect())
    }
}

/// The IPv4 subnet of `bridge`'s first address, if it has one.
fn bridge_subnet(bridge: &str) -> anyhow::Result<Option<Ipv4Net>> {
    for address in nix::ifaddrs::getifaddrs().context("listing the node's addresses")? {
        if address.interface_name != bridge {
            continue;
        }
        let (Some(addr), Some(mask)) = (
            address.address.as_ref().and_then(|a| a.as_sockaddr_in()),
            address.netmask.as_ref().and_then(|m| m.as_sockaddr_in()),
        ) else {
            continue;
        };
        let prefix = mask.ip().to_bits().leading_ones() as u8;
        return Ok(Some(Ipv4Net::new(addr.ip(), prefix)?.trunc()));
    }
    Ok(None)
}

/// A map lookup's value, `None` for a missing key.
fn found<V>(lookup: Result<V, MapError>) -> anyhow::Result<Option<V>> {
    match lookup {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let node = Node::open(&args.pin_dir, &args.bridge)?;
    let entry = entry(&node, args)?;
    let mut maps = node.maps();
    let mut conntrack = Conntrack::open(&mut maps)?;
    let flow = flow(args, &conntrack)?;
    let forward_key = forward_key(&flow);
    if let Some(tracked) = conntrack.get(&forward_key)? {
        bail!(
            "a tracked connection already uses {flow} (to endpoint {}); the trace leaves live \
             connections alone: give --from another port, or none",
            SocketAddrV4::new(tracked.nat_addr.into(), tracked.nat_port)
        );
    }
    let frontend = ServiceKey {
        addr: flow.dst.ip().octets(),
        port: flow.dst.port(),
        proto: flow.proto,
        _pad: 0,
    };
    let services = maps.hash(SERVICES_MAP)?;
    let service = found(services.get(&frontend, 0))?;
    let mut affinity = maps.hash(AFFINITY_MAP)?;
    let affinity_keys: Vec<AffinityKey> = service
        .iter()
        .flat_map(|service| [service.id, service.cluster_id])
        .filter(|set| *set != 0)
        .map(|set_id| AffinityKey {
            set_id,
            client: flow.src.ip().octets(),
        })
        .filter(|key| matches!(affinity.get(key, 0), Err(MapError::KeyNotFound)))
        .collect();

    // A probe from a pod of this node teaches the datapath its port, as any frame from it does.
    let mut pods = maps.hash(LOCAL_PODS_MAP)?;
    let source_pod = found(pods.get(&flow.src.ip().octets(), 0))?;

    let hops = run_hops(&node, &entry, &flow);

    // Take back what the probe created, whatever the runs did.
    let source = flow.src.ip().octets();
    match source_pod {
        Some(pod) => pods.insert(source, pod, 0)?,
        None => {
            if let Err(e) = pods.remove(&source)
                && !is_not_found(&e)
            {
                return Err(e.into());
            }
        }
    }
    if let Some(forward) = conntrack.get(&forward_key)? {
        let reply_key = CtKey::reply_of(&forward_key, &forward);
        let ours = conntrack.get(&reply_key)?.is_some_and(|reply| {
            (reply.nat_addr, reply.nat_port) == (forward_key.dst_addr, forward_key.dst_port)
        });
        let mut keys = vec![forward_key];
        keys.extend(ours.then_some(reply_key));
        conntrack.remove(&keys)?;
    }
    for key in &affinity_keys {
        if let Err(e) = affinity.remove(key)
            && !is_not_found(&e)
        {
            return Err(e.into());
        }
    }
    let hops = hops?;

    let service = match service {
        Some(value) => Some(describe_service(&args.pin_dir, &frontend, &value)?),
        None => None,
    };
    let report = Report {
        flow: format!(
            "{flow} ({})",
            if flow.proto == weft_common::ip_proto::TCP {
                "a TCP SYN"
            } else {
                "a UDP datagram"
            }
        ),
        entry: describe_entry(&entry),
        service,
        result: result(&node, &hops.0, &hops.1),
        hops: hops.0,
    };
    if args.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn entry(node: &Node, args: &TraceArgs) -> anyhow::Result<Entry> {
    let uplink = node.uplink();
    if let Some(name) = &args.iface {
        let ifindex = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("no device {name} in this network namespace"))?;
        return Ok(if uplink.as_ref().ok() == Some(&ifindex) {
            Entry::Uplink {
                ifindex,
                from_node: node.remote_node(args.from.addr)?,
            }
        } else {
            Entry::PodPort {
                ifindex,
                chosen: true,
            }
        });
    }
    if node.is_local_pod(args.from.addr) {
        // Every pod port runs the same program; the port matters only for answers sent back.
        let ifindex = node.attached(FROM_PODS).into_iter().next().unwrap_or(0);
        return Ok(Entry::PodPort {
            ifindex,
            chosen: false,
        });
    }
    Ok(Entry::Uplink {
        ifindex: uplink?,
        from_node: node.remote_node(args.from.addr)?,
    })
}

/// The conntrack key a flow's client packets are tracked under.
fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr: flow.src.ip().octets(),
        dst_addr: flow.dst.ip().octets(),
        src_port: flow.src.port(),
        dst_port: flow.dst.port(),
        proto: flow.proto,
        direction: ct_direction::FORWARD,
        _pad: [0; 2],
    }
}

/// The probe's flow: `--from` and `--to`, with the first free source port if none was given.
fn flow(args: &TraceArgs, conntrack: &Conntrack) -> anyhow::Result<Flow> {
    let flow = |port| Flow {
        src: SocketAddrV4::new(args.from.addr, port),
        dst: args.to.addr,
        proto: args.to.proto,
    };
    if let Some(port) = args.from.port {
        return Ok(flow(port));
    }
    for port in PROBE_PORTS {
        if conntrack.get(&forward_key(&flow(port)))?.is_none() {
            return Ok(flow(port));
        }
    }
    bail!("every probe source port is in use by a tracked connection; give --from IP:port")
}

/// Runs the probe through the entry hook(s) and, while it goes on, the hook it leaves by.
/// Returns the hops and the packet as it leaves the last one.
fn run_hops(node: &Node, entry: &Entry, flow: &Flow) -> anyhow::Result<(Vec<Hop>, Vec<u8>)> {
    let overlay = &node.overlay;
    let plain = probe::frame(flow, [0x02, 0, 0, 0, 0, 0x02], overlay.uplink_mac);
    let mut hops = Vec::new();
    let mut packet = plain.clone();
    let mut mark = 0u32;
    let mut stages: Vec<(&'static str, u32)> = Vec::new();
    match entry {
        Entry::PodPort { ifindex, .. } => stages.push((FROM_PODS, *ifindex)),
        Entry::Uplink { ifindex, from_node } => {
            if let Some(remote) = from_node {
                packet = probe::encapsulated(
                    &plain,
                    &Encap {
                        src: remote.public_ip,
                        dst: overlay.public_ip,
                        src_port: vxlan::SOURCE_PORT_MIN,
                        dst_port: overlay.port,
                        vni: overlay.vni,
                        inner_src_mac: remote.vtep_mac,
                        inner_dst_mac: overlay.vtep_mac,
                        ip_id: 0,
                        tos: 0,
                        inner_len: 0,
                    },
                    overlay.uplink_mac,
                );
            }
            stages.push((FROM_UPLINK, *ifindex));
        }
    }
    let mut index = 0;
    while index < stages.len() {
        let (program, ifindex) = stages[index];
        let drops_before = node.drops()?;
        let fd = node.program(program)?;
        let (verdict, output, mark_after) = {
            let mut context = [0u8; SKB_CONTEXT_LEN];
            context[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
            context[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
            let run = bpf_prog_test_run(fd.as_fd(), &packet, Some(&context))
                .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
            let mark_after = run
                .context
                .get(SKB_MARK..SKB_MARK + 4)
                .map_or(mark, |bytes| {
                    u32::from_ne_bytes(bytes.try_into().expect("4 bytes"))
                });
            (Verdict::of_tc(run.return_value), run.data, mark_after)
        };
        let drops_after = node.drops()?;
        let drops = DropReason::ALL
            .iter()
            .zip(drops_before.iter().zip(&drops_after))
            .filter(|(_, (before, after))| after > before)
            .map(|(reason, _)| reason.name())
            .collect();
        hops.push(Hop {
            program,
            verdict,
            changes: probe::changes(&packet, &output, mark, mark_after),
            drops,
        });
        packet = output;
        mark = mark_after;
        index += 1;
        if verdict != Verdict::Continues {
            break;
        }
        if index == stages.len() && program != TO_UPLINK && program != TO_POD {
            // Out of the entry hooks: on to the hook the packet leaves by.
            if let Some(exit) = exit_hook(node, &packet)? {
                stages.push(exit);
            }
        }
    }
    Ok((hops, packet))
}

/// The hook a packet that went on leaves the node by: the port of a local pod, the uplink for
/// anything not for the node itself.
fn exit_hook(node: &Node, packet: &[u8]) -> anyhow::Result<Option<(&'static str, u32)>> {
    let Some(destination) = probe::destination(packet) else {
        return Ok(None);
    };
    let addr = *destination.ip();
    if node.is_local_pod(addr) {
        let port = node.attached(TO_POD).into_iter().next().unwrap_or(0);
        return Ok(Some((TO_POD, port)));
    }
    if addr == Ipv4Addr::from(node.overlay.public_ip) {
        return Ok(None);
    }
    Ok(Some((TO_UPLINK, node.uplink()?)))
}

fn describe_entry(entry: &Entry) -> String {
    let name = |ifindex: u32| {
        nix::net::if_::if_indextoname(ifindex).map_or_else(
            |_| format!("ifindex {ifindex}"),
            |name| name.to_string_lossy().into_owned(),
        )
    };
    match entry {
        Entry::PodPort {
            ifindex,
            chosen: true,
        } => format!("pod port {}, {FROM_PODS}", name(*ifindex)),
        Entry::PodPort {
            ifindex,
            chosen: false,
        } => format!(
            "a pod port ({}; every port runs the same program), {FROM_PODS}",
            name(*ifindex)
        ),
        Entry::Uplink {
            ifindex,
            from_node: None,
        } => format!("uplink {}, {FROM_UPLINK}", name(*ifindex)),
        Entry::Uplink {
            ifindex,
            from_node: Some(remote),
        } => format!(
            "uplink {}, as VXLAN from node {}: {FROM_UPLINK}",
            name(*ifindex),
            Ipv4Addr::from(remote.public_ip)
        ),
    }
}

fn describe_service(
    pin_dir: &Path,
    frontend: &ServiceKey,
    service: &ServiceValue,
) -> anyhow::Result<String> {
    let names = PinnedMaps::new(pin_dir).hash(SERVICE_NAMES_MAP)?;
    let name = found(names.get(&service.id, 0))?.map_or_else(
        || format!("<set {}>", service.id),
        |n| decode_name(&n).0.to_string(),
    );
    let mut notes = Vec::new();
    if service.flags & service_flags::REJECT != 0 {
        notes.push("no endpoints: connections are rejected".to_owned());
    }
    if service.flags & service_flags::MASQUERADE_ALL != 0 {
        notes.push("masquerade all".to_owned());
    }
    if service.affinity_timeout_s != 0 {
        notes.push(format!("ClientIP affinity {}s", service.affinity_timeout_s));
    }
    Ok(format!(
        "{name} at {}:{}/{}, {} endpoint(s){}",
        Ipv4Addr::from(frontend.addr),
        frontend.port,
        protocol_name(frontend.proto),
        service.count,
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join(", "))
        }
    ))
}

/// Where the packet ends up, in one line.
fn result(node: &Node, hops: &[Hop], packet: &[u8]) -> String {
    let backend = hops
        .iter()
        .flat_map(|hop| &hop.changes)
        .find_map(|change| match change {
            Change::Destination { to, .. } => Some(to.clone()),
            _ => None,
        });
    let via = backend.map_or_else(String::new, |backend| format!(", backend {backend}"));
    let Some(last) = hops.last() else {
        return "not run".to_owned();
    };
    if last.verdict == Verdict::Dropped {
        return format!(
            "dropped by {}: {}",
            last.program,
            if last.drops.is_empty() {
                "no drop counter moved".to_owned()
            } else {
                last.drops.join(", ")
            }
        );
    }
    for change in hops.iter().flat_map(|hop| &hop.changes) {
        match change {
            Change::Rejected { answer } => {
                return format!("rejected: {answer} sent back to the client");
            }
            Change::Encapsulated { outer_dst, .. } => {
                return format!("sent to node {outer_dst} over VXLAN{via}");
            }
            _ => {}
        }
    }
    let masquerade = hops
        .iter()
        .flat_map(|hop| &hop.changes)
        .any(|change| matches!(change, Change::Mark { set } if set & MASQUERADE_MARK != 0));
    let masquerade = if masquerade {
        ", masqueraded to the node's address by nftables"
    } else {
        ""
    };
    match probe::destination(packet) {
        Some(to) if node.is_local_pod(*to.ip()) && last.verdict == Verdict::Redirected => {
            format!("delivered straight into local pod {to}")
        }
        Some(to) if node.is_local_pod(*to.ip()) => {
            format!("delivered to local pod {to}{masquerade}")
        }
        Some(to) if *to.ip() == Ipv4Addr::from(node.overlay.public_ip) => {
            format!("delivered to this node, {to}")
        }
        Some(to) => format!("leaves the node for {to}{masquerade}"),
        None => "goes on".to_owned(),
    }
}

fn print_report(report: &Report) {
    println!("flow      {}", report.flow);
    println!("enters    {}", report.entry);
    println!(
        "service   {}",
        report
            .service
            .as_deref()
            .unwrap_or("none at this destination")
    );
    for hop in &report.hops {
        let mut line = format!("{}: {}", hop.program, hop.verdict);
        for change in &hop.changes {
            line.push_str(&format!("; {change}"));
        }
        if !hop.drops.is_empty() {
            line.push_str(&format!("; counted as {}", hop.drops.join(", ")));
        }
        println!("hop       {line}");
    }
    println!("result    {}", report.result);
}
