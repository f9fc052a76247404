//! A reference model of weft's packet programs: what each must do to a frame, given the fixed
//! map state of [`Fixture`], written from the programs' documented behaviour in plain Rust,
//! independently of the datapath's code (its parser, its checksum updates, its encapsulation).
//! Checksums here are computed over whole headers and segments; the datapath updates them
//! incrementally, and the differential fuzzer (`tests/tests/prog/fuzz.rs`) compares the two.
//!
//! One module per program family: [`service`] (`tc_from_pods`, `tc_from_uplink`, `tc_to_pod`),
//! [`tc_to_uplink`], and [`vxlan`] for the overlay's part of them and `xdp_uplink`.

mod service;
mod tc_to_uplink;
mod vxlan;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
};

use weft_common::drop_reason::DropReason;

use crate::{
    harness::{VERDICT_DROP, VERDICT_PASS, VERDICT_REDIRECT},
    overlay_fixture::{OUR_IP, XDP_DROP, XDP_PASS},
    seed::{self, endpoint_slice, service as service_manifest},
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;

/// The masquerade mark bit (kube-proxy's `KUBE-MARK-MASQ`).
const MASQUERADE: u32 = 0x4000;

/// The node's name, for the agent's model.
pub const NODE_NAME: &str = "node-a";
/// This node's pod subnet and the remote node's.
pub const LOCAL_SUBNET: [u8; 3] = [172, 30, 20];
pub const REMOTE_SUBNET: [u8; 3] = [172, 30, 44];

/// One service port of the fixture, with at most one endpoint so the choice is deterministic.
#[derive(Clone, Copy, Debug)]
pub struct ServicePort {
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub target_port: u16,
    /// A NodePort, served on [`OUR_IP`].
    pub node_port: Option<u16>,
    pub endpoint: Option<Ipv4Addr>,
}

impl ServicePort {
    fn endpoint_addr(&self) -> Option<SocketAddrV4> {
        self.endpoint
            .map(|ip| SocketAddrV4::new(ip, self.target_port))
    }

    fn protocol(&self) -> &'static str {
        match self.proto {
            TCP => "TCP",
            UDP => "UDP",
            _ => "SCTP",
        }
    }
}

/// A connection the fixture's conntrack holds from the start, established both ways.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub proto: u8,
    pub endpoint: SocketAddrV4,
    pub masquerade: bool,
}

/// A fragmented datagram the fixture's fragment map holds from the start.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// A `weft_common::maps::ct_direction`: whose hooks keep the entry.
    pub direction: u8,
    /// A `weft_common::maps::frag_state`.
    pub state: u8,
}

/// The map state the model assumes: services, the node's NodePort address, the overlay (this
/// node 192.168.50.1, Network 172.30.0.0/16, VNI 1, port 8472; node .2 holds 172.30.44.0/24),
/// the cluster CIDR 172.30.0.0/16, and the connections and fragmented datagrams tracked from
/// the start.
pub struct Fixture {
    pub services: Vec<ServicePort>,
    pub connections: Vec<Connection>,
    pub datagrams: Vec<Datagram>,
    /// The pods the node has learned from their ports (address, MAC), all on one port.
    pub pods: Vec<([u8; 4], [u8; 6])>,
}

/// What a program does to one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    pub output: Vec<u8>,
    /// The skb mark afterwards (TC only; XDP has none and keeps the input's).
    pub mark: u32,
    pub drop: Option<DropReason>,
    /// Whether the program reads or writes conntrack state for this frame (the fuzzer restores
    /// the fixture's conntrack after such frames).
    pub conntrack: bool,
    /// Whether the program may write the fragment map (the fuzzer restores it after such
    /// frames): for every fragment of TCP, UDP or SCTP.
    pub fragments: bool,
    /// Whether the program learns a pod it did not know (the fuzzer restores the learned pods
    /// after such frames).
    pub pods: bool,
    /// Output bytes the model cannot know, with why: the fuzzer checks them as stated and takes
    /// them from the datapath's output.
    pub unknown: Vec<(Range<usize>, Unknown)>,
}

/// Output bytes outside the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// The outer UDP source port of an encapsulation: the kernel's flow hash (seeded at boot)
    /// scaled into Linux VXLAN's range 32768..61000.
    FlowHashPort,
    /// An SCTP checksum of a datagram whose IPv4 length does not cover its ports: there is no
    /// CRC to keep.
    SctpChecksumOfRunt,
}

impl Outcome {
    /// A service translation: passed on rewritten, conntrack consulted.
    fn translated(output: Vec<u8>, mark: u32, unknown: Vec<(Range<usize>, Unknown)>) -> Self {
        Self {
            verdict: VERDICT_PASS,
            output,
            mark,
            drop: None,
            conntrack: true,
            fragments: false,
            pods: false,
            unknown,
        }
    }

    fn pass(verdict: u32, frame: &[u8], mark: u32) -> Self {
        Self {
            verdict,
            output: frame.to_vec(),
            mark,
            drop: None,
            conntrack: false,
            fragments: false,
            pods: false,
            unknown: Vec::new(),
        }
    }

    fn drop(verdict: u32, frame: &[u8], mark: u32, reason: DropReason) -> Self {
        Self {
            drop: Some(reason),
            ..Self::pass(verdict, frame, mark)
        }
    }
}

impl Fixture {
    /// The fixture everything is fuzzed against.
    #[must_use]
    pub fn new() -> Self {
        let pod = |last| Ipv4Addr::new(172, 30, 20, last);
        let services = vec![
            ServicePort {
                name: "nginx",
                cluster_ip: seed::VIP,
                port: seed::PORT,
                proto: TCP,
                target_port: seed::TARGET_PORT,
                node_port: None,
                endpoint: Some(pod(6)),
            },
            ServicePort {
                name: "dns",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 10),
                port: 53,
                proto: UDP,
                target_port: 5353,
                node_port: None,
                endpoint: Some(Ipv4Addr::new(172, 30, 44, 7)),
            },
            ServicePort {
                name: "signal",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 11),
                port: 38412,
                proto: SCTP,
                target_port: 9000,
                node_port: None,
                endpoint: Some(pod(7)),
            },
            ServicePort {
                name: "web",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 20),
                port: 80,
                proto: TCP,
                target_port: 8080,
                node_port: Some(30080),
                endpoint: Some(pod(8)),
            },
            ServicePort {
                name: "gone-tcp",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 30),
                port: 80,
                proto: TCP,
                target_port: 80,
                node_port: None,
                endpoint: None,
            },
            ServicePort {
                name: "gone-udp",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 31),
                port: 53,
                proto: UDP,
                target_port: 53,
                node_port: None,
                endpoint: None,
            },
            ServicePort {
                name: "gone-sctp",
                cluster_ip: Ipv4Addr::new(10, 254, 0, 32),
                port: 9999,
                proto: SCTP,
                target_port: 9999,
                node_port: None,
                endpoint: None,
            },
        ];
        let client = |ip: Ipv4Addr, port| SocketAddrV4::new(ip, port);
        let connection = |client, service: &ServicePort, frontend, masquerade| Connection {
            client,
            frontend,
            proto: service.proto,
            endpoint: service.endpoint_addr().expect("tracked services have one"),
            masquerade,
        };
        let nginx = services[0];
        let dns = services[1];
        let signal = services[2];
        let web = services[3];
        let cluster = |s: &ServicePort| SocketAddrV4::new(s.cluster_ip, s.port);
        let node_port =
            |s: &ServicePort| SocketAddrV4::new(OUR_IP, s.node_port.expect("a NodePort"));
        let connections = vec![
            connection(client(pod(9), 40000), &nginx, cluster(&nginx), false),
            connection(client(pod(9), 40001), &dns, cluster(&dns), false),
            connection(client(pod(9), 40002), &signal, cluster(&signal), false),
            // A hairpin: the endpoint reaching itself through its service.
            connection(client(pod(6), 41000), &nginx, cluster(&nginx), true),
            // A NodePort from outside the cluster and from a remote pod: both masqueraded.
            connection(
                client(Ipv4Addr::new(192, 168, 50, 100), 50000),
                &web,
                node_port(&web),
                true,
            ),
            connection(
                client(Ipv4Addr::new(172, 30, 44, 9), 50001),
                &web,
                node_port(&web),
                true,
            ),
        ];
        // The client and the endpoint of the tracked connections, seen from their port.
        let pods = vec![
            (pod(9).octets(), crate::overlay_fixture::POD_MAC),
            (pod(6).octets(), crate::overlay_fixture::POD_MAC),
        ];
        let datagrams = datagrams(&connections);
        Self {
            services,
            connections,
            datagrams,
            pods,
        }
    }

    /// The fixture's services as manifests, for the harness (and so the agent's reconciler).
    #[must_use]
    pub fn manifests(&self) -> String {
        let mut documents = Vec::new();
        for s in &self.services {
            let endpoints: Vec<Ipv4Addr> = s.endpoint.into_iter().collect();
            let mut service =
                service_manifest(s.name, s.cluster_ip, s.port, s.protocol(), s.target_port);
            if let Some(node_port) = s.node_port {
                service = service
                    .replace("spec:\n", "spec:\n  type: NodePort\n")
                    .replace("protocol:", &format!("nodePort: {node_port}, protocol:"));
            }
            documents.push(service);
            documents.push(endpoint_slice(
                s.name,
                s.protocol(),
                s.target_port,
                &endpoints,
            ));
        }
        documents.join("---\n")
    }

    /// The service behind frontend `addr:port/proto` (ClusterIPs, and NodePorts on this node's
    /// address), and whether it masquerades every client: a NodePort with
    /// `externalTrafficPolicy: Cluster` does, as kube-proxy's `KUBE-EXT` chains mark it.
    fn frontend(&self, addr: [u8; 4], port: u16, proto: u8) -> Option<(&ServicePort, bool)> {
        let addr = Ipv4Addr::from(addr);
        self.services.iter().find_map(|s| {
            if s.proto != proto {
                None
            } else if s.cluster_ip == addr && s.port == port {
                Some((s, false))
            } else if addr == OUR_IP && s.node_port == Some(port) {
                Some((s, true))
            } else {
                None
            }
        })
    }

    /// The tracked connection a client packet with this tuple belongs to.
    fn forward(&self, tuple: &Tuple) -> Option<&Connection> {
        self.connections.iter().find(|c| {
            c.proto == tuple.proto && c.client == tuple.src() && c.frontend == tuple.dst()
        })
    }

    /// What `direction`'s hooks know of the datagram `ip` is a fragment of, if the fixture
    /// holds it.
    fn datagram(&self, frame: &[u8], ip: &Ip, direction: u8) -> Option<&Datagram> {
        let id = u16::from_be_bytes([frame[18], frame[19]]);
        self.datagrams.iter().find(|d| {
            d.src.octets() == ip.src
                && d.dst.octets() == ip.dst
                && d.id == id
                && d.proto == ip.proto
                && d.direction == direction
        })
    }

    /// The tracked connection a reply with this tuple belongs to.
    fn reply(&self, tuple: &Tuple) -> Option<&Connection> {
        self.connections.iter().find(|c| {
            c.proto == tuple.proto && c.endpoint == tuple.src() && c.client == tuple.dst()
        })
    }
}

/// For each TCP and UDP connection, a datagram each way whose first fragment was translated
/// (identifications 0x1000 + n client to frontend, 0x2000 + n endpoint to client) and one each
/// way whose later fragment came first (0x3000 + n, 0x4000 + n), each known to its direction;
/// the same marks known to the other direction only (0x6000 + n, 0x7000 + n); and a client's
/// datagram whose connection is gone (0x5000).
fn datagrams(connections: &[Connection]) -> Vec<Datagram> {
    use weft_common::maps::{
        ct_direction::{FORWARD, REPLY},
        frag_state::{LATER_FIRST, TRANSLATED},
    };
    let mut datagrams = Vec::new();
    for (n, c) in connections.iter().enumerate() {
        if c.proto == SCTP {
            continue;
        }
        let n = n as u16;
        let forward = |id, direction, state| Datagram {
            src: *c.client.ip(),
            dst: *c.frontend.ip(),
            id,
            proto: c.proto,
            src_port: c.client.port(),
            dst_port: c.frontend.port(),
            direction,
            state,
        };
        let reply = |id, direction, state| Datagram {
            src: *c.endpoint.ip(),
            dst: *c.client.ip(),
            id,
            proto: c.proto,
            src_port: c.endpoint.port(),
            dst_port: c.client.port(),
            direction,
            state,
        };
        datagrams.push(forward(0x1000 + n, FORWARD, TRANSLATED));
        datagrams.push(reply(0x2000 + n, REPLY, TRANSLATED));
        datagrams.push(forward(0x3000 + n, FORWARD, LATER_FIRST));
        datagrams.push(reply(0x4000 + n, REPLY, LATER_FIRST));
        datagrams.push(forward(0x6000 + n, REPLY, LATER_FIRST));
        datagrams.push(reply(0x7000 + n, FORWARD, LATER_FIRST));
    }
    let first = connections[0];
    datagrams.push(Datagram {
        src: *first.client.ip(),
        dst: *first.frontend.ip(),
        id: 0x5000,
        proto: first.proto,
        src_port: first.client.port() + 1,
        dst_port: first.frontend.port(),
        direction: FORWARD,
        state: TRANSLATED,
    });
    datagrams
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// An IPv4 packet as the stack would accept its header.
#[derive(Clone, Copy, Debug)]
struct Ip {
    /// Offset of the transport header in the frame.
    l4: usize,
    header_len: usize,
    /// The total length field (0: a BIG TCP super-packet, whose length is the frame's).
    total_len: usize,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    more_fragments: bool,
    fragment_offset: u16,
}

impl Ip {
    fn later_fragment(&self) -> bool {
        self.fragment_offset != 0
    }

    fn first_fragment(&self) -> bool {
        self.more_fragments && self.fragment_offset == 0
    }

    /// Where the datagram ends in `frame`: its total length, or the frame's end when the frame
    /// is shorter or the length is 0 (BIG TCP).
    fn end(&self, frame: &[u8]) -> usize {
        if self.total_len == 0 {
            frame.len()
        } else {
            (14 + self.total_len).min(frame.len())
        }
    }
}

enum L3 {
    NotIpv4,
    Malformed,
    Ipv4(Ip),
}

/// Ethernet, then IPv4: version 4, a header of at least 20 bytes present in full, a total
/// length that holds the header (or 0, BIG TCP).
fn parse_ip(frame: &[u8]) -> L3 {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return L3::NotIpv4;
    }
    let Some(ip) = frame.get(14..34) else {
        return L3::Malformed;
    };
    let header_len = usize::from(ip[0] & 0xf) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4
        || header_len < 20
        || frame.len() < 14 + header_len
        || (total_len != 0 && total_len < header_len)
    {
        return L3::Malformed;
    }
    let fragment = u16::from_be_bytes([ip[6], ip[7]]);
    L3::Ipv4(Ip {
        l4: 14 + header_len,
        header_len,
        total_len,
        proto: ip[9],
        src: ip[12..16].try_into().expect("4 bytes"),
        dst: ip[16..20].try_into().expect("4 bytes"),
        more_fragments: fragment & 0x2000 != 0,
        fragment_offset: fragment & 0x1fff,
    })
}

/// A transport tuple.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Tuple {
    fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src.into(), self.sport)
    }

    fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst.into(), self.dport)
    }
}

enum L4 {
    /// Not TCP, UDP or SCTP, or a later fragment (no transport header).
    Other,
    /// The transport header is cut short by the frame's end.
    Truncated,
    Ports(Tuple),
}

/// The length of the fixed transport header the datapath needs for `proto`.
fn l4_header_len(proto: u8) -> Option<usize> {
    match proto {
        TCP => Some(20),
        UDP => Some(8),
        SCTP => Some(12),
        _ => None,
    }
}

fn parse_l4(frame: &[u8], ip: &Ip) -> L4 {
    let Some(len) = l4_header_len(ip.proto) else {
        return L4::Other;
    };
    if ip.later_fragment() {
        return L4::Other;
    }
    let Some(h) = frame.get(ip.l4..ip.l4 + len) else {
        return L4::Truncated;
    };
    L4::Ports(Tuple {
        src: ip.src,
        dst: ip.dst,
        sport: u16::from_be_bytes([h[0], h[1]]),
        dport: u16::from_be_bytes([h[2], h[3]]),
        proto: ip.proto,
    })
}

/// Big-endian 16-bit words summed (an odd last byte padded with zero), unfolded.
fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

/// A sum folded to 16 bits with end-around carries.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of data whose words sum to `data`.
fn checksum(data: u64) -> u16 {
    !fold(data)
}

/// The checksum field a rewrite leaves when the covered data's sum goes from `before` to
/// `after` (both without the field): recomputed in full when `field` was right, else carrying
/// the same error, as a router's update must (RFC 1624).
fn rechecksum(field: u16, before: u64, after: u64) -> u16 {
    if fold(before + u64::from(field)) == 0xffff {
        checksum(after)
    } else {
        moved(field, before, after)
    }
}

/// The checksum field `field` moved by the change of data it covers from summing to `before`
/// to `after`: the sender's claimed sum, updated (RFC 1624); the only update possible when the
/// covered data is not all there.
fn moved(field: u16, before: u64, after: u64) -> u16 {
    let claimed = u64::from(!field);
    !fold(claimed + u64::from(fold(after)) + u64::from(!fold(before)))
}

/// CRC32c (Castagnoli), bit by bit, as SCTP computes it.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Whether `addr` is in `prefix.0/24`.
fn in_subnet(addr: [u8; 4], subnet: [u8; 3]) -> bool {
    addr[..3] == subnet
}

/// Whether `addr` is in the cluster CIDR and pod Network, 172.30.0.0/16.
fn in_network(addr: [u8; 4]) -> bool {
    addr[..2] == [172, 30]
}
