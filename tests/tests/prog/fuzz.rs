//! Differential packet fuzzing: random and mutated frames through every packet program with
//! `BPF_PROG_TEST_RUN`, each compared with what the reference model (`weft_tests::reference`)
//! says the program must do: the same verdict, the same output bytes, the same mark and the same
//! drop counter.
//!
//! Mutations start from valid frames of every kind the programs handle (service traffic both
//! ways, NodePorts, rejections, pod-to-pod across nodes, VXLAN from a member), so most frames
//! get deep into the parsers before they stop making sense. Deterministic: the seed and the
//! frame count are printed and can be changed with `WEFT_FUZZ_SEED` and `WEFT_FUZZ_FRAMES`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use weft::model::NodeLease;
use weft_common::{
    conntrack::flags,
    drop_reason::DropReason,
    maps::{CtKey, CtValue, FragKey, FragValue, LocalPod, OverlayConfig, ct_direction},
    programs::{FROM_PODS, FROM_UPLINK, TO_POD, TO_UPLINK, XDP_UPLINK},
};
use weft_tests::{
    harness::{Datapath, VERDICT_DROP, VERDICT_REDIRECT},
    overlay_fixture::{
        OUR_IP, OUR_VTEP, REMOTE_IP, REMOTE_VTEP, XDP_DROP, inner_frame, overlay, uplink_namespace,
        vxlan_frame,
    },
    packet::{ACK, FIN, PSH, SYN, checksum, fragmented, icmp_error, icmp_errors, sctp, tcp, udp},
    reference::{Connection, Fixture, LOCAL_SUBNET, NODE_NAME, Outcome, SCTP, TCP, UDP, Unknown},
    seed::cluster_cidr,
};

const DEFAULT_SEED: u64 = 0x5eed_0f3e_f7a1;
const DEFAULT_FRAMES: usize = 100_000;
/// Kinds of mismatch reported in full per program, at most (the first frame of each).
const REPORTED: usize = 12;

const PROGRAMS: [&str; 5] = [FROM_PODS, FROM_UPLINK, TO_POD, TO_UPLINK, XDP_UPLINK];

/// xorshift64*: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            let v = v.trim_start_matches("0x");
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} does not parse"))
        })
        .unwrap_or(default)
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.into(), port)
}

/// Valid frames of every kind the programs handle, named.
fn seeds(fixture: &Fixture) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let pod = |last, port| addr([172, 30, 20, last], port);
    let remote_pod = |last, port| addr([172, 30, 44, last], port);
    let outside = addr([192, 168, 50, 100], 50007);
    for s in &fixture.services {
        let frontend = SocketAddrV4::new(s.cluster_ip, s.port);
        let mut fronts = vec![frontend];
        if let Some(node_port) = s.node_port {
            fronts.push(SocketAddrV4::new(OUR_IP, node_port));
        }
        for front in fronts {
            let client = pod(9, 45000);
            let packet = match s.proto {
                TCP => tcp(client, front, SYN),
                UDP => udp(client, front, b"query"),
                _ => sctp(client, front, &[1, 0, 0, 4]),
            };
            seeds.push((
                format!("{} new from a pod to {front}", s.name),
                packet.build(),
            ));
            let mut from_outside = packet.clone();
            from_outside.src = outside;
            seeds.push((
                format!("{} new from outside to {front}", s.name),
                from_outside.build(),
            ));
        }
    }
    for c in &fixture.connections {
        let (forward, reply) = match c.proto {
            TCP => (
                tcp(c.client, c.frontend, ACK | PSH).payload(b"GET / HTTP/1.1\r\n\r\n"),
                tcp(c.endpoint, c.client, ACK | PSH).payload(b"HTTP/1.1 200 OK\r\n"),
            ),
            UDP => (
                udp(c.client, c.frontend, b"query"),
                udp(c.endpoint, c.client, b"answer"),
            ),
            _ => (
                sctp(c.client, c.frontend, &[0, 0, 0, 8, 1, 2, 3, 4]),
                sctp(c.endpoint, c.client, &[0, 0, 0, 8, 5, 6, 7, 8]),
            ),
        };
        seeds.push((format!("tracked {c:?}: forward"), forward.build()));
        seeds.push((format!("tracked {c:?}: reply"), reply.build()));
        // A direct connection from the client's port to the endpoint: its tuple clashes.
        let direct = match c.proto {
            TCP => Some(tcp(c.client, c.endpoint, SYN)),
            UDP => Some(udp(c.client, c.endpoint, b"direct")),
            _ => None,
        };
        if let Some(direct) = direct {
            seeds.push((format!("tracked {c:?}: direct, clashing"), direct.build()));
        }
        // ICMP errors about the connection, both ways: about the client's packet as the
        // endpoint got it (from the endpoint, and from a router, whole or 8 bytes quoted), and
        // about a reply as the client got it.
        let mut sent = forward.clone();
        sent.dst = c.endpoint;
        let mut answered = reply.clone();
        answered.src = c.frontend;
        for (kind, error) in icmp_errors() {
            for (from, quote_len) in [(*c.endpoint.ip(), usize::MAX), (OUR_IP, 28)] {
                seeds.push((
                    format!("tracked {c:?}: {kind} from {from} about a client packet"),
                    icmp_error(from, *c.client.ip(), error, &sent.build(), quote_len),
                ));
            }
            seeds.push((
                format!("tracked {c:?}: {kind} from the client about a reply"),
                icmp_error(
                    *c.client.ip(),
                    *c.frontend.ip(),
                    error,
                    &answered.build(),
                    usize::MAX,
                ),
            ));
        }
        seeds.push((
            format!("tracked {c:?}: reply, FIN"),
            tcp(c.endpoint, c.client, FIN | ACK).build(),
        ));
    }
    // The fixture's fragmented datagrams: the first, a middle and the last fragment of each.
    for d in &fixture.datagrams {
        let (src, dst) = (
            addr(d.src.octets(), d.src_port),
            addr(d.dst.octets(), d.dst_port),
        );
        let payload = [0x5a; 150];
        let datagram = match d.proto {
            TCP => tcp(src, dst, ACK | PSH).payload(&payload),
            _ => udp(src, dst, &payload),
        }
        .build();
        for (n, fragment) in fragmented(&datagram, d.id, 64).into_iter().enumerate() {
            seeds.push((format!("{d:?}: fragment {n}"), fragment));
        }
    }
    seeds.push((
        "pod to a remote pod".into(),
        tcp(pod(5, 40000), remote_pod(5, 80), SYN)
            .payload(b"hello")
            .build(),
    ));
    seeds.push((
        "UDP without checksum to a remote pod".into(),
        udp(pod(5, 40000), remote_pod(5, 53), b"x")
            .without_udp_checksum()
            .build(),
    ));
    seeds.push((
        "pod to a subnet no node holds".into(),
        tcp(pod(5, 40000), addr([172, 30, 99, 5], 80), SYN).build(),
    ));
    seeds.push((
        "underlay".into(),
        tcp(
            addr(OUR_IP.octets(), 40000),
            addr(REMOTE_IP.octets(), 2379),
            SYN,
        )
        .build(),
    ));
    let mut icmp = udp(
        pod(5, 0),
        SocketAddrV4::new(fixture.services[0].cluster_ip, 0),
        b"",
    )
    .build();
    icmp[14 + 9] = 1;
    icmp[34..42].copy_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    fix_ip_checksum(&mut icmp);
    seeds.push(("ICMP echo to a ClusterIP".into(), icmp));
    let inner = inner_frame();
    seeds.push((
        "VXLAN from the member".into(),
        vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0),
    ));
    let mut inner_udp = udp(remote_pod(7, 5353), pod(9, 40001), b"answer").build();
    inner_udp[0..6].copy_from_slice(&OUR_VTEP);
    inner_udp[6..12].copy_from_slice(&REMOTE_VTEP);
    seeds.push((
        "VXLAN from the member, a tracked reply inside, UDP checksum".into(),
        vxlan_frame(REMOTE_IP, 8472, 1, &inner_udp, 0x1234),
    ));
    // Congestion marked on the outer header, with the inner packet ECN-capable or not.
    for inner_ecn in [0b10, 0b00] {
        let mut inner = tcp(remote_pod(5, 80), pod(9, 40000), ACK).build();
        inner[0..6].copy_from_slice(&OUR_VTEP);
        inner[15] |= inner_ecn;
        fix_ip_checksum(&mut inner);
        let mut frame = vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0);
        frame[15] = 0b11;
        fix_ip_checksum(&mut frame);
        seeds.push((
            format!("VXLAN marked CE, inner ECN field {inner_ecn:02b}"),
            frame,
        ));
    }
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    seeds.push(("ARP".into(), arp));
    seeds
}

/// The transport header's offset in an IPv4 frame, if the header length byte is there.
fn l4_offset(frame: &[u8]) -> Option<usize> {
    (frame.len() > 14 && frame[12..14] == [0x08, 0x00])
        .then(|| 14 + usize::from(frame[14] & 0x0f) * 4)
}

fn fix_ip_checksum(frame: &mut [u8]) {
    let Some(l4) = l4_offset(frame) else { return };
    if l4 < 34 || frame.len() < l4 {
        return;
    }
    frame[24..26].fill(0);
    let c = checksum(&frame[14..l4]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Recomputes the transport checksum over the segment the IPv4 length gives.
fn fix_l4_checksum(frame: &mut [u8]) {
    let Some(l4) = l4_offset(frame) else { return };
    if frame.len() < 34 || l4 < 34 {
        return;
    }
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let end = (14 + total).min(frame.len());
    let proto = frame[23];
    let at = match proto {
        TCP => l4 + 16,
        UDP => l4 + 6,
        SCTP => l4 + 8,
        _ => return,
    };
    if end < at + 4 {
        return;
    }
    if proto == SCTP {
        frame[at..at + 4].fill(0);
        let crc = weft_common::crc32c::checksum(&frame[l4..end]);
        frame[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        return;
    }
    frame[at..at + 2].fill(0);
    let mut pseudo = frame[26..34].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&((end - l4) as u16).to_be_bytes());
    pseudo.extend_from_slice(&frame[l4..end]);
    let mut c = checksum(&pseudo);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// One mutation of `frame`; returns what it did.
fn mutate(rng: &mut Rng, fixture: &Fixture, frame: &mut Vec<u8>) -> String {
    let l4 = l4_offset(frame).unwrap_or(34);
    match rng.below(17) {
        0 | 1 => {
            // Cut at or near a header boundary of some layer (VXLAN's inner ones too).
            let boundaries = [
                14,
                34,
                l4,
                l4 + 4,
                l4 + 8,
                l4 + 12,
                l4 + 16,
                l4 + 20,
                l4 + 30,
            ];
            let at = (rng.pick(&boundaries) + rng.below(4)).saturating_sub(rng.below(4));
            let at = if rng.chance(20) {
                rng.below(frame.len() + 1)
            } else {
                at
            };
            frame.truncate(at.max(14));
            format!("truncated to {}", frame.len())
        }
        2 => {
            let words = 1 + rng.below(10);
            if frame.len() < l4.max(34) || l4 + 4 * words > 14 + 60 {
                return "IP options (no room)".into();
            }
            let options: Vec<u8> = (0..4 * words)
                .map(|_| if rng.chance(50) { 1 } else { rng.byte() })
                .collect();
            frame.splice(l4..l4, options);
            frame[14] = 0x40 | ((frame[14] & 0x0f) + words as u8);
            let total = u16::from_be_bytes([frame[16], frame[17]]).wrapping_add(4 * words as u16);
            frame[16..18].copy_from_slice(&total.to_be_bytes());
            fix_ip_checksum(frame);
            format!("{words} words of IP options")
        }
        3 => {
            if frame.len() < 34 {
                return "fragment (no header)".into();
            }
            let field: u16 = match rng.below(4) {
                0 => 0x2000,
                1 => 0x2000 | (1 + rng.below(0x1fff)) as u16,
                2 => (1 + rng.below(0x1fff)) as u16,
                _ => 0x4000,
            };
            frame[20..22].copy_from_slice(&field.to_be_bytes());
            fix_ip_checksum(frame);
            format!("fragment field {field:#06x}")
        }
        4 => {
            if frame.len() < 34 {
                return "total length (no header)".into();
            }
            let actual = frame.len() - 14;
            let total = match rng.below(4) {
                0 => rng.below(actual),
                1 => actual + 1 + rng.below(100),
                2 => 0,
                _ => rng.below(0x10000),
            } as u16;
            frame[16..18].copy_from_slice(&total.to_be_bytes());
            if rng.chance(80) {
                fix_ip_checksum(frame);
            }
            format!("total length {total} (frame holds {actual})")
        }
        5 => {
            let source = if rng.chance(85) {
                REMOTE_IP
            } else {
                Ipv4Addr::new(192, 168, 50, 9)
            };
            let mut inner = frame.clone();
            inner[0..6].copy_from_slice(&OUR_VTEP);
            *frame = vxlan_frame(source, 8472, 1, &inner, 0);
            format!("wrapped in VXLAN from {source}")
        }
        6 => {
            let Some(vxlan) = frame.get_mut(l4 + 8..l4 + 16) else {
                return "VXLAN header (none)".into();
            };
            match rng.below(3) {
                0 => vxlan[0] = rng.byte(),
                1 => vxlan[4..7].copy_from_slice(&[rng.pick(&[0, 1]), 0, rng.pick(&[0, 1, 2])]),
                _ => {
                    vxlan[1] = rng.byte();
                    vxlan[7] = rng.byte();
                }
            }
            format!("VXLAN header {vxlan:02x?}")
        }
        7 => {
            let at = match rng.below(3) {
                0 => 24,
                1 => l4 + 16,
                _ => l4 + 6,
            };
            let Some(byte) = frame.get_mut(at) else {
                return "checksum (none)".into();
            };
            *byte ^= 1 + rng.byte() % 255;
            format!("checksum byte {at} damaged")
        }
        8 => {
            let ether_type: u16 = rng.pick(&[0x86dd, 0x0806, 0x8100, 0x88a8, 0x0800, 0x0801]);
            let ether_type = if rng.chance(20) {
                rng.next() as u16
            } else {
                ether_type
            };
            frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
            format!("EtherType {ether_type:#06x}")
        }
        9 => {
            let tpid: u16 = rng.pick(&[0x8100, 0x88a8]);
            let mut tag = tpid.to_be_bytes().to_vec();
            tag.extend_from_slice(&[0, rng.byte()]);
            frame.splice(12..12, tag);
            format!("VLAN tag {tpid:#06x}")
        }
        10 => {
            if frame.len() < 34 {
                return "protocol (no header)".into();
            }
            let proto = rng.pick(&[1, 6, 17, 132, 47, 50, 0, 255]);
            frame[23] = proto;
            fix_ip_checksum(frame);
            format!("IP protocol {proto}")
        }
        11 => {
            let n = 1 + rng.below(4);
            let mut changed = Vec::new();
            for _ in 0..n {
                let reach = frame
                    .len()
                    .min(if rng.chance(80) { 90 } else { usize::MAX });
                let at = rng.below(reach);
                frame[at] = rng.byte();
                changed.push(at);
            }
            format!("random bytes at {changed:?}")
        }
        12 => {
            // Addresses and ports the map state knows, so damaged frames still hit entries.
            if frame.len() < l4 + 4 || l4 < 34 {
                return "addresses (no room)".into();
            }
            let s = rng.pick(&fixture.services);
            let c: Connection = rng.pick(&fixture.connections);
            let (src, dst) = match rng.below(4) {
                0 => (c.client, c.frontend),
                1 => (c.endpoint, c.client),
                2 => (c.client, SocketAddrV4::new(s.cluster_ip, s.port)),
                _ => (
                    SocketAddrV4::new(Ipv4Addr::from(rng.next() as u32), rng.next() as u16),
                    SocketAddrV4::new(
                        rng.pick(&[OUR_IP, Ipv4Addr::new(172, 30, 44, 5), s.cluster_ip]),
                        rng.pick(&[s.port, 30080, 8472]),
                    ),
                ),
            };
            frame[26..30].copy_from_slice(&src.ip().octets());
            frame[30..34].copy_from_slice(&dst.ip().octets());
            frame[l4..l4 + 2].copy_from_slice(&src.port().to_be_bytes());
            frame[l4 + 2..l4 + 4].copy_from_slice(&dst.port().to_be_bytes());
            fix_ip_checksum(frame);
            format!("{src} -> {dst}")
        }
        13 => {
            let Some(header) = frame.get_mut(l4 + 12..l4 + 14) else {
                return "TCP flags (none)".into();
            };
            if rng.chance(50) {
                header[1] = rng.byte();
                format!("TCP flags {:#04x}", header[1])
            } else {
                header[0] = rng.byte() & 0xf0;
                format!("TCP data offset {}", header[0] >> 4)
            }
        }
        15 => {
            // A datagram the fragment map knows, as a first, later or whole datagram.
            if frame.len() < 34 {
                return "fragment (no room)".into();
            }
            let id = rng.pick(&fixture.datagrams).id;
            let field: u16 = rng.pick(&[0x2000, 0x0008, 0x2010, 0x4000]);
            frame[18..20].copy_from_slice(&id.to_be_bytes());
            frame[20..22].copy_from_slice(&field.to_be_bytes());
            fix_ip_checksum(frame);
            format!("identification {id:#06x}, fragment field {field:#06x}")
        }
        14 => {
            let n = 1 + rng.below(64);
            frame.extend((0..n).map(|_| rng.byte()));
            format!("{n} bytes appended")
        }
        _ => {
            let Some(first) = frame.get_mut(14) else {
                return "IP version/IHL (none)".into();
            };
            *first = if rng.chance(50) {
                0x40 | rng.byte() & 0x0f
            } else {
                rng.byte()
            };
            format!("IP version/IHL byte {:#04x}", *first)
        }
    }
}

/// A frame to fuzz with, and how it was made.
fn frame(rng: &mut Rng, fixture: &Fixture, seeds: &[(String, Vec<u8>)]) -> (Vec<u8>, String) {
    if rng.chance(8) {
        let len = 14 + rng.below(200);
        let mut frame: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        let deep = rng.chance(50) && len >= 34;
        if deep {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[14] = 0x45;
        }
        return (
            frame,
            format!("random {len} bytes{}", if deep { ", IPv4" } else { "" }),
        );
    }
    let (name, seed) = &seeds[rng.below(seeds.len())];
    let mut frame = seed.clone();
    let mut how = format!("seed `{name}`");
    for _ in 0..rng.below(4) {
        let _ = write!(how, "; {}", mutate(rng, fixture, &mut frame));
    }
    // Carried by the overlay, so mutated inner frames reach decapsulation (and VXLAN seeds
    // become VXLAN in VXLAN); sometimes with the outer headers mutated too.
    if rng.chance(20) {
        frame[0..6].copy_from_slice(&OUR_VTEP);
        frame = vxlan_frame(REMOTE_IP, 8472, 1, &frame, 0);
        how.push_str("; carried in VXLAN");
        if rng.chance(50) {
            let _ = write!(how, "; {}", mutate(rng, fixture, &mut frame));
        }
    }
    if rng.chance(30) {
        fix_l4_checksum(&mut frame);
        how.push_str("; transport checksum fixed");
    }
    frame.truncate(1500);
    (frame, how)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the datapath did, in the model's terms.
fn actual(
    datapath: &mut Datapath,
    program: &str,
    frame: &[u8],
    mark: u32,
    uplink: u32,
) -> Option<(u32, Vec<u8>, u32)> {
    if program == XDP_UPLINK {
        let (action, output, _) = datapath.try_run_xdp(program, frame, 1).ok()?;
        return Some((action, output, 0));
    }
    let run = datapath
        .try_run_with(program, frame, mark, uplink, 1)
        .ok()?;
    Some((run.verdict, run.output, run.mark))
}

/// Fills in the output bytes the model cannot know from the datapath's output, checking what
/// can be checked of them; `Err` when those bytes break their rule.
fn fill_unknown(expected: &mut Outcome, output: &[u8]) -> Result<(), String> {
    for (range, what) in &expected.unknown {
        let Some(bytes) = output.get(range.clone()) else {
            return Ok(());
        };
        if *what == Unknown::FlowHashPort {
            let port = u16::from_be_bytes([bytes[0], bytes[1]]);
            if !(32768..61000).contains(&port) {
                return Err(format!("outer source port {port} outside 32768..61000"));
            }
        }
        if let Some(slot) = expected.output.get_mut(range.clone()) {
            slot.copy_from_slice(bytes);
        }
    }
    Ok(())
}

/// The fixture's connections, opened through the datapath, then marked answered and last seen
/// in the far future, so that no entry expires or changes state while the fuzzer runs.
fn open_connections(datapath: &mut Datapath, fixture: &Fixture) -> Vec<(CtKey, CtValue)> {
    for c in &fixture.connections {
        let first = match c.proto {
            TCP => tcp(c.client, c.frontend, SYN),
            UDP => udp(c.client, c.frontend, b"q"),
            _ => sctp(c.client, c.frontend, &[1, 0, 0, 4]),
        }
        .build();
        let program = if c.client.ip().octets()[..3] == LOCAL_SUBNET {
            FROM_PODS
        } else {
            FROM_UPLINK
        };
        datapath.run(program, &first, 0);
    }
    let mut entries = datapath.conntrack();
    assert_eq!(entries.len(), 2 * fixture.connections.len(), "{entries:?}");
    for (key, value) in &mut entries {
        assert_eq!(
            value.port_move, 0,
            "no fixture connection clashes with another"
        );
        value.last_seen_ns = u64::MAX / 2;
        if key.direction == ct_direction::FORWARD {
            value.flags |= flags::SEEN_REPLY;
            let c = fixture
                .connections
                .iter()
                .find(|c| addr(key.src_addr, key.src_port) == c.client && key.proto == c.proto)
                .expect("a fixture connection");
            assert_eq!(
                (
                    addr(value.nat_addr, value.nat_port),
                    value.flags & flags::MASQUERADE != 0
                ),
                (c.endpoint, c.masquerade),
                "the datapath tracks {c:?} as the model does"
            );
        }
    }
    datapath.set_conntrack(&entries);
    entries
}

/// The fixture's fragmented datagrams as fragment map entries, written in the far future so that
/// none times out while the fuzzer runs; sorted by key.
fn datagrams(fixture: &Fixture) -> Vec<(FragKey, FragValue)> {
    let mut entries: Vec<(FragKey, FragValue)> = fixture
        .datagrams
        .iter()
        .map(|d| {
            let key = FragKey {
                src_addr: d.src.octets(),
                dst_addr: d.dst.octets(),
                id: d.id,
                proto: d.proto,
                direction: d.direction,
            };
            let value = FragValue {
                src_port: d.src_port,
                dst_port: d.dst_port,
                state: d.state,
                _pad: [0; 3],
                seen_ns: u64::MAX / 2,
            };
            (key, value)
        })
        .collect();
    entries.sort_unstable_by_key(|(key, _)| *key);
    entries
}

fn model(fixture: &Fixture, program: &str, frame: &[u8], mark: u32) -> Outcome {
    match program {
        FROM_PODS => fixture.tc_from_pods(frame, mark),
        FROM_UPLINK => fixture.tc_from_uplink(frame, mark),
        TO_POD => fixture.tc_to_pod(frame, mark),
        TO_UPLINK => fixture.tc_to_uplink(frame, mark),
        _ => fixture.xdp_uplink(frame),
    }
}

/// What happened to one program's frames.
#[derive(Default)]
struct Tally {
    run: usize,
    /// Frames the kernel would not build an skb from (an IPv4 or IPv6 EtherType with less than
    /// that header behind it); neither side judges them.
    refused: usize,
    /// By what the model expected: passed unchanged, rewritten (translated, decapsulated,
    /// encapsulated), answered (a rejection sent back), dropped.
    unchanged: usize,
    rewritten: usize,
    answered: usize,
    dropped: usize,
    mismatches: usize,
    /// The first mismatch of each kind, in full.
    reports: BTreeMap<String, String>,
}

impl Tally {
    fn count(&mut self, expected: &Outcome, frame: &[u8]) {
        match (expected.drop, expected.verdict) {
            (_, VERDICT_REDIRECT) => self.answered += 1,
            (Some(_), _) => self.dropped += 1,
            _ if expected.output == frame => self.unchanged += 1,
            _ => self.rewritten += 1,
        }
    }
}

/// The fuzzing run's state: the datapath, the model, and the conntrack both start from.
struct Fuzzer<'a> {
    datapath: &'a mut Datapath,
    fixture: &'a Fixture,
    baseline: Vec<(CtKey, CtValue)>,
    /// The learned pods every frame starts from.
    pods: Vec<([u8; 4], LocalPod)>,
    uplink: u32,
    /// Drop counters as last read.
    counted: BTreeMap<DropReason, u64>,
    /// Drops the model expects over the whole run.
    expected_drops: BTreeMap<DropReason, u64>,
    /// The fragment map every frame starts from.
    fragments: Vec<(FragKey, FragValue)>,
    /// The runs since conntrack was last restored, which the model says leave it alone.
    since_restore: Vec<String>,
}

impl Fuzzer<'_> {
    /// Runs `program` on `frame` and compares it with the model; a report on a mismatch.
    fn check(
        &mut self,
        program: &str,
        frame: &[u8],
        mark: u32,
        how: &str,
        tally: &mut Tally,
    ) -> Option<(String, String)> {
        let mut expected = model(self.fixture, program, frame, mark);
        let Some((verdict, output, mark_out)) =
            actual(self.datapath, program, frame, mark, self.uplink)
        else {
            let short_ip = match frame[12..14] {
                [0x08, 0x00] => frame.len() < 14 + 20,
                [0x86, 0xdd] => frame.len() < 14 + 40,
                _ => false,
            };
            assert!(
                program != XDP_UPLINK && short_ip,
                "the kernel refused to run {program} on {} ({how})",
                hex(frame)
            );
            tally.refused += 1;
            return None;
        };
        tally.run += 1;
        tally.count(&expected, frame);
        if let Some(reason) = expected.drop {
            *self.expected_drops.entry(reason).or_default() += 1;
        }
        // Drop counters are read around frames either side drops or answers; the totals at
        // the end catch a counter that moved anywhere else.
        let dropped = if program == XDP_UPLINK {
            verdict == XDP_DROP
        } else {
            verdict == VERDICT_DROP || verdict == VERDICT_REDIRECT
        };
        let mut drop = None;
        if expected.drop.is_some() || dropped {
            let now = self.datapath.drops();
            drop = now
                .iter()
                .find(|(reason, n)| self.counted.get(reason) != Some(n))
                .map(|(reason, _)| *reason);
            self.counted = now;
        }
        let unknown = fill_unknown(&mut expected, &output);
        let same = unknown.is_ok()
            && verdict == expected.verdict
            && output == expected.output
            && mark_out == expected.mark
            && drop == expected.drop;
        if expected.pods || !same {
            self.datapath.set_local_pods(&self.pods);
        }
        if expected.fragments || !same {
            self.datapath.set_fragments(&self.fragments);
        }
        if expected.conntrack || expected.pods || !same {
            self.datapath.set_conntrack(&self.baseline);
            self.since_restore.clear();
        } else {
            self.since_restore
                .push(format!("{program} on {} ({how})", hex(frame)));
        }
        if same {
            return None;
        }
        tally.mismatches += 1;
        let kind = format!(
            "{:?} {:?} / {verdict:#x} {drop:?}",
            expected.verdict, expected.drop
        );
        let report = format!(
            "{program}: {how}\n  frame     {}\n  model     verdict {:#x}, mark {:#x}, drop {:?}, output {}\n  datapath  verdict {verdict:#x}, mark {mark_out:#x}, drop {drop:?}, output {}{}",
            hex(frame),
            expected.verdict,
            expected.mark,
            expected.drop,
            hex(&expected.output),
            hex(&output),
            unknown
                .err()
                .map(|e| format!("\n  {e}"))
                .unwrap_or_default(),
        );
        Some((kind, report))
    }

    /// Asserts that conntrack holds exactly the fixture's connections and the learned pods are
    /// the fixture's, as they must be after runs the model says leave them alone.
    fn assert_state_untouched(&mut self) {
        let mut pods = self.datapath.local_pods();
        pods.sort_unstable_by_key(|(addr, _)| *addr);
        assert!(
            pods == self.pods,
            "the learned pods changed, by one of these runs:\n{}\nnow: {pods:?}",
            self.since_restore.join("\n")
        );
        let mut fragments = self.datapath.fragments();
        fragments.sort_unstable_by_key(|(key, _)| *key);
        assert!(
            fragments == self.fragments,
            "the fragment map changed, by one of these runs:\n{}\nnow: {fragments:?}",
            self.since_restore.join("\n")
        );
        let mut entries = self.datapath.conntrack();
        entries.sort_by_key(|(key, _)| format!("{key:?}"));
        let mut baseline = self.baseline.clone();
        baseline.sort_by_key(|(key, _)| format!("{key:?}"));
        assert!(
            entries == baseline,
            "conntrack changed, by one of these runs:\n{}\nnow: {entries:?}",
            self.since_restore.join("\n")
        );
        self.since_restore.clear();
    }
}

#[test]
fn every_program_does_what_the_reference_model_says() {
    let seed: u64 = env_or("WEFT_FUZZ_SEED", DEFAULT_SEED);
    let count: usize = env_or("WEFT_FUZZ_FRAMES", DEFAULT_FRAMES);
    println!("fuzz: seed {seed:#x}, {count} frames, each through {PROGRAMS:?}");
    let fixture = Fixture::new();
    let mut datapath = Datapath::new(&fixture.manifests(), Some(cluster_cidr()));
    datapath.set_node(|node| {
        node.name = Some(NODE_NAME.into());
        node.node_port_addresses = [OUR_IP].into();
    });
    // The encapsulation's FIB lookup needs an uplink that knows the remote node's MAC.
    let (ns, uplink) = uplink_namespace();
    datapath.set_overlay(&OverlayConfig {
        uplink_ifindex: uplink,
        ..overlay()
    });
    datapath.set_lease(
        "172.30.44.0/24".parse().expect("a subnet"),
        NodeLease {
            public_ip: REMOTE_IP,
            vtep_mac: REMOTE_VTEP,
        },
    );
    let started = Instant::now();
    let (tallies, expected_drops, drops) = ns.run(|| {
        let baseline = open_connections(&mut datapath, &fixture);
        // The fixture's pods, as learned from their frames on the port the fuzzer runs on.
        let mut pods: Vec<([u8; 4], LocalPod)> = fixture
            .pods
            .iter()
            .map(|(addr, mac)| {
                let pod = LocalPod {
                    ifindex: uplink,
                    mac: *mac,
                    _pad: [0; 2],
                };
                (*addr, pod)
            })
            .collect();
        pods.sort_unstable_by_key(|(addr, _)| *addr);
        datapath.set_local_pods(&pods);
        let fragments = datagrams(&fixture);
        datapath.set_fragments(&fragments);
        // Frames run on the uplink's ifindex, a veth: the pods behind it are learned.
        datapath.add_peer_port(uplink);
        let counted = datapath.drops();
        let mut fuzzer = Fuzzer {
            datapath: &mut datapath,
            fixture: &fixture,
            baseline,
            pods,
            fragments,
            uplink,
            counted,
            expected_drops: BTreeMap::new(),
            since_restore: Vec::new(),
        };
        let seeds = seeds(&fixture);
        let mut rng = Rng(seed | 1);
        let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
        for n in 0..count {
            if n % 64 == 0 {
                fuzzer.assert_state_untouched();
            }
            let (frame, how) = frame(&mut rng, &fixture, &seeds);
            let mark = if rng.chance(10) { rng.next() as u32 } else { 0 };
            for program in PROGRAMS {
                let tally = tallies.entry(program).or_default();
                if let Some((kind, report)) = fuzzer.check(program, &frame, mark, &how, tally)
                    && tally.reports.len() < REPORTED
                {
                    tally.reports.entry(kind).or_insert(report);
                }
            }
        }
        (tallies, fuzzer.expected_drops, datapath.drops())
    });
    let elapsed = started.elapsed();
    let mut failures = String::new();
    let mut total = 0;
    for (program, t) in &tallies {
        total += t.run;
        println!(
            "fuzz: {program}: {} frames run ({} refused by the kernel): {} unchanged, \
             {} rewritten, {} answered, {} dropped; {} mismatches",
            t.run, t.refused, t.unchanged, t.rewritten, t.answered, t.dropped, t.mismatches
        );
        for report in t.reports.values() {
            let _ = writeln!(failures, "{report}\n");
        }
    }
    println!("fuzz: {total} program runs in {elapsed:.1?}; drops counted {drops:?}");
    assert!(
        failures.is_empty(),
        "the datapath and the model disagree (seed {seed:#x}):\n\n{failures}"
    );
    assert_eq!(drops, expected_drops, "drop counters over the whole run");
}
