//! `weft trace`'s packets and their reading: the first packet of a flow as a probe frame, and
//! what one program run did to it, in words. Pure; the live runs are the binary's.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use serde::Serialize;
use weft_common::{
    csum, ip_proto,
    packet::{ETH_HLEN, ETH_P_IP, Frame, Transport, parse_ipv4, parse_transport},
    vxlan::{self, Encap},
};

use crate::sources::objects::protocol_name;

/// TCP's SYN and RST flags.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
/// What a UDP probe carries, so a capture shows where it came from.
const UDP_PAYLOAD: &[u8] = b"weft trace";

/// A malformed `--from` or `--to`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("`{0}` is not IP:port/protocol (e.g. 10.96.0.10:80/tcp)")]
    Destination(String),
    #[error("`{0}` is not IP or IP:port (e.g. 10.244.1.5 or 10.244.1.5:40000)")]
    Source(String),
    #[error("protocol `{0}` is not tcp or udp")]
    Protocol(String),
}

/// A flow's first packet: from, to, and the transport (TCP or UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}",
            self.src,
            self.dst,
            protocol_name(self.proto)
        )
    }
}

/// `--to`: `IP:port/proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddrV4,
    pub proto: u8,
}

impl FromStr for Destination {
    type Err = ProbeError;

    fn from_str(text: &str) -> Result<Self, ProbeError> {
        let (addr, proto) = text
            .split_once('/')
            .ok_or_else(|| ProbeError::Destination(text.to_owned()))?;
        let addr = addr
            .parse()
            .map_err(|_| ProbeError::Destination(text.to_owned()))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => ip_proto::TCP,
            "udp" => ip_proto::UDP,
            _ => return Err(ProbeError::Protocol(proto.to_owned())),
        };
        Ok(Self { addr, proto })
    }
}

/// `--from`: `IP` or `IP:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub addr: Ipv4Addr,
    /// `None`: any free port.
    pub port: Option<u16>,
}

impl FromStr for Source {
    type Err = ProbeError;

    fn from_str(text: &str) -> Result<Self, ProbeError> {
        if let Ok(addr) = text.parse() {
            return Ok(Self { addr, port: None });
        }
        let addr: SocketAddrV4 = text
            .parse()
            .map_err(|_| ProbeError::Source(text.to_owned()))?;
        Ok(Self {
            addr: *addr.ip(),
            port: Some(addr.port()),
        })
    }
}

/// The flow's first packet as an Ethernet frame: a TCP SYN, or a short UDP datagram, with
/// correct checksums.
#[must_use]
pub fn frame(flow: &Flow, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&flow.src.port().to_be_bytes());
    l4.extend_from_slice(&flow.dst.port().to_be_bytes());
    if flow.proto == ip_proto::TCP {
        // Sequence 1, no ack, a 20-byte header, SYN, a window of 64240.
        l4.extend_from_slice(&[
            0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xfa, 0xf0, 0, 0, 0, 0,
        ]);
    } else {
        let len = (8 + UDP_PAYLOAD.len()) as u16;
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(UDP_PAYLOAD);
    }
    let checksum_at = if flow.proto == ip_proto::TCP { 16 } else { 6 };
    let pseudo = csum::sum_words(&flow.src.ip().octets())
        + csum::sum_words(&flow.dst.ip().octets())
        + u32::from(flow.proto)
        + l4.len() as u32;
    let checksum = match !csum::fold(pseudo + csum::sum_words(&l4)) {
        // UDP sends a computed 0 as all ones (0 means "no checksum").
        0 => 0xffff,
        sum => sum,
    };
    l4[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[..10].copy_from_slice(&[0x45, 0, 0, 0, 0x77, 0x74, 0x40, 0, 64, flow.proto]);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[12..16].copy_from_slice(&flow.src.ip().octets());
    ip[16..20].copy_from_slice(&flow.dst.ip().octets());
    let ip_checksum = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_HLEN + usize::from(total));
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// `inner` (an Ethernet frame) as it arrives over VXLAN: the outer Ethernet header addressed to
/// `outer_dst_mac`, then `encap`'s headers, then `inner`'s IP packet.
#[must_use]
pub fn encapsulated(inner: &[u8], encap: &Encap, outer_dst_mac: [u8; 6]) -> Vec<u8> {
    let packet = inner.get(ETH_HLEN..).unwrap_or_default();
    let headers = vxlan::headers(&Encap {
        inner_len: packet.len() as u32,
        ..*encap
    });
    let mut frame = Vec::with_capacity(ETH_HLEN + headers.len() + packet.len());
    frame.extend_from_slice(&outer_dst_mac);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&headers);
    frame.extend_from_slice(packet);
    frame
}

/// What a program returned, in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// TC_ACT_UNSPEC / TC_ACT_OK / XDP_PASS: on to the next hook or the stack.
    Continues,
    /// TC_ACT_SHOT / XDP_DROP.
    Dropped,
    /// TC_ACT_REDIRECT: sent out by the program itself.
    Redirected,
    /// Any other value.
    Unknown,
}

impl Verdict {
    /// A TC program's return value.
    #[must_use]
    pub const fn of_tc(value: u32) -> Self {
        match value as i32 {
            -1 | 0 => Self::Continues,
            2 => Self::Dropped,
            7 => Self::Redirected,
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Continues => "continues",
            Self::Dropped => "dropped",
            Self::Redirected => "redirected",
            Self::Unknown => "unknown verdict",
        })
    }
}

/// One thing a program did to the packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Change {
    /// DNAT: a service frontend translated to an endpoint.
    Destination { from: String, to: String },
    /// Reverse NAT: an endpoint's reply given its frontend back as source.
    Source { from: String, to: String },
    /// Mark bits the program set.
    Mark { set: u32 },
    /// Wrapped in VXLAN for another node.
    Encapsulated {
        outer_src: Ipv4Addr,
        outer_dst: Ipv4Addr,
        port: u16,
        vni: u32,
    },
    /// Taken out of VXLAN from another node.
    Decapsulated { outer_src: Ipv4Addr, vni: u32 },
    /// Answered in place: a TCP reset or an ICMP error sent back to the client.
    Rejected { answer: &'static str },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Destination { from, to } => write!(f, "destination {from} -> {to} (DNAT)"),
            Self::Source { from, to } => write!(f, "source {from} -> {to} (reverse NAT)"),
            Self::Mark { set } => write!(f, "mark {set:#x} set"),
            Self::Encapsulated {
                outer_src,
                outer_dst,
                port,
                vni,
            } => write!(
                f,
                "encapsulated in VXLAN {outer_src} -> {outer_dst}:{port}, VNI {vni}"
            ),
            Self::Decapsulated { outer_src, vni } => {
                write!(f, "decapsulated from VXLAN sent by {outer_src}, VNI {vni}")
            }
            Self::Rejected { answer } => write!(f, "answered with {answer} to the client"),
        }
    }
}

/// The addresses, ports and TCP flags of an Ethernet/IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    tcp_flags: u8,
}

fn tuple(frame: &[u8]) -> Option<Tuple> {
    let Frame::Ipv4(ip) = parse_ipv4(frame) else {
        return None;
    };
    let (src_port, dst_port, tcp_flags) = match parse_transport(frame, &ip) {
        Transport::Ports(ports) => (ports.src_port, ports.dst_port, ports.tcp_flags),
        _ => (0, 0, 0),
    };
    Some(Tuple {
        src: SocketAddrV4::new(ip.src.into(), src_port),
        dst: SocketAddrV4::new(ip.dst.into(), dst_port),
        proto: ip.proto,
        tcp_flags,
    })
}

/// A VXLAN frame's outer tuple, VNI and inner frame (its Ethernet header as the inner one),
/// or `None` for a frame that is not VXLAN.
fn vxlan_parts(frame: &[u8]) -> Option<(Tuple, u32, &[u8])> {
    let outer = tuple(frame)?;
    if outer.proto != ip_proto::UDP {
        return None;
    }
    let header: [u8; 8] = frame.get(ETH_HLEN + 28..ETH_HLEN + 36)?.try_into().ok()?;
    let inner = frame.get(ETH_HLEN + 36..)?;
    if inner.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    Some((outer, vxlan::vni(&header)?, inner))
}

/// What a program changed between the frame it was given and the one it left, and in the mark.
/// A packet it encapsulated or decapsulated is compared by its inner packet.
#[must_use]
pub fn changes(before: &[u8], after: &[u8], mark_before: u32, mark_after: u32) -> Vec<Change> {
    let mut changes = Vec::new();
    let (mut before, mut after) = (before, after);
    match (vxlan_parts(before), vxlan_parts(after)) {
        (None, Some((outer, vni, inner))) => {
            changes.push(Change::Encapsulated {
                outer_src: *outer.src.ip(),
                outer_dst: *outer.dst.ip(),
                port: outer.dst.port(),
                vni,
            });
            after = inner;
        }
        (Some((outer, vni, inner)), None) => {
            changes.push(Change::Decapsulated {
                outer_src: *outer.src.ip(),
                vni,
            });
            before = inner;
        }
        _ => {}
    }
    let (Some(old), Some(new)) = (tuple(before), tuple(after)) else {
        return changes;
    };
    if new.dst.ip() == old.src.ip() && new.src.ip() != old.src.ip() {
        let answer = match new.proto {
            ip_proto::TCP if new.tcp_flags & TCP_RST != 0 => "a TCP reset",
            ip_proto::ICMP => "an ICMP port unreachable",
            _ => "a packet",
        };
        changes.push(Change::Rejected { answer });
    } else {
        if new.dst != old.dst {
            changes.push(Change::Destination {
                from: old.dst.to_string(),
                to: new.dst.to_string(),
            });
        }
        if new.src != old.src {
            changes.push(Change::Source {
                from: old.src.to_string(),
                to: new.src.to_string(),
            });
        }
    }
    let set = mark_after & !mark_before;
    if set != 0 {
        changes.push(Change::Mark { set });
    }
    changes
}

/// The destination of an Ethernet/IPv4 frame (the inner one, past VXLAN), with its port.
#[must_use]
pub fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    tuple(frame).map(|tuple| tuple.dst)
}

#[cfg(test)]
mod tests {
    use weft_common::packet::ipv4_checksum_ok;

    use super::*;

    fn flow(proto: u8) -> Flow {
        Flow {
            src: "10.244.1.5:40000".parse().unwrap(),
            dst: "10.96.0.10:80".parse().unwrap(),
            proto,
        }
    }

    /// The transport checksum verifies: pseudo-header plus segment sum to all ones.
    fn transport_checksum_ok(frame: &[u8]) -> bool {
        let ip = &frame[ETH_HLEN..ETH_HLEN + 20];
        let segment = &frame[ETH_HLEN + 20..];
        let sum = csum::sum_words(&ip[12..20])
            + u32::from(ip[9])
            + segment.len() as u32
            + csum::sum_words(segment);
        csum::fold(sum) == 0xffff
    }

    #[test]
    fn probes_are_well_formed_syns_and_datagrams() {
        for proto in [ip_proto::TCP, ip_proto::UDP] {
            let frame = frame(&flow(proto), [2; 6], [4; 6]);
            assert!(ipv4_checksum_ok(frame.as_slice(), 20), "{frame:02x?}");
            assert!(transport_checksum_ok(&frame), "{frame:02x?}");
            let tuple = tuple(&frame).unwrap();
            assert_eq!((tuple.src, tuple.dst), (flow(proto).src, flow(proto).dst));
            assert_eq!(tuple.proto, proto);
            if proto == ip_proto::TCP {
                assert_eq!(tuple.tcp_flags, TCP_SYN);
            }
        }
    }

    #[test]
    fn arguments_parse_or_say_what_is_expected() {
        assert_eq!(
            "10.96.0.10:53/UDP".parse(),
            Ok(Destination {
                addr: "10.96.0.10:53".parse().unwrap(),
                proto: ip_proto::UDP
            })
        );
        assert_eq!(
            "10.96.0.10:53".parse::<Destination>(),
            Err(ProbeError::Destination("10.96.0.10:53".into()))
        );
        assert_eq!(
            "10.96.0.10:53/sctp".parse::<Destination>(),
            Err(ProbeError::Protocol("sctp".into()))
        );
        assert_eq!(
            "10.244.1.5".parse(),
            Ok(Source {
                addr: Ipv4Addr::new(10, 244, 1, 5),
                port: None
            })
        );
        assert_eq!(
            "10.244.1.5:4000".parse::<Source>().unwrap().port,
            Some(4000)
        );
        assert!("pod-a".parse::<Source>().is_err());
    }

    #[test]
    fn a_rewritten_destination_and_mark_read_as_dnat_and_masquerade() {
        let before = frame(&flow(ip_proto::TCP), [2; 6], [4; 6]);
        let after = frame(
            &Flow {
                dst: "10.244.2.3:8080".parse().unwrap(),
                ..flow(ip_proto::TCP)
            },
            [2; 6],
            [4; 6],
        );
        assert_eq!(
            changes(&before, &after, 0, 0x4000),
            [
                Change::Destination {
                    from: "10.96.0.10:80".into(),
                    to: "10.244.2.3:8080".into()
                },
                Change::Mark { set: 0x4000 }
            ]
        );
        assert_eq!(changes(&before, &before, 0x4000, 0x4000), []);
    }

    #[test]
    fn vxlan_is_recognised_both_ways() {
        let inner = frame(&flow(ip_proto::UDP), [2; 6], [4; 6]);
        let encap_to_node_2 = Encap {
            src: [192, 168, 50, 1],
            dst: [192, 168, 50, 2],
            src_port: 40000,
            dst_port: vxlan::DEFAULT_PORT,
            vni: 1,
            inner_src_mac: [6; 6],
            inner_dst_mac: [8; 6],
            ip_id: 0,
            tos: 0,
            inner_len: 0,
        };
        let outer = encapsulated(&inner, &encap_to_node_2, [10; 6]);
        assert!(ipv4_checksum_ok(outer.as_slice(), 20));
        let encap = Change::Encapsulated {
            outer_src: Ipv4Addr::new(192, 168, 50, 1),
            outer_dst: Ipv4Addr::new(192, 168, 50, 2),
            port: 8472,
            vni: 1,
        };
        assert_eq!(changes(&inner, &outer, 0, 0), std::slice::from_ref(&encap));
        let decap = Change::Decapsulated {
            outer_src: Ipv4Addr::new(192, 168, 50, 1),
            vni: 1,
        };
        assert_eq!(changes(&outer, &inner, 0, 0), [decap]);
        // Translated and encapsulated by one program (at a pod's port): both are told.
        let translated = frame(
            &Flow {
                dst: "10.244.2.7:8080".parse().unwrap(),
                ..flow(ip_proto::UDP)
            },
            [2; 6],
            [4; 6],
        );
        let sent = encapsulated(&translated, &encap_to_node_2, [10; 6]);
        assert_eq!(
            changes(&inner, &sent, 0, 0),
            [
                encap,
                Change::Destination {
                    from: "10.96.0.10:80".into(),
                    to: "10.244.2.7:8080".into()
                }
            ]
        );
        assert_eq!(
            destination(&outer),
            Some("192.168.50.2:8472".parse().unwrap())
        );
    }

    #[test]
    fn a_reset_sent_back_reads_as_a_rejection() {
        let before = frame(&flow(ip_proto::TCP), [2; 6], [4; 6]);
        let mut after = frame(
            &Flow {
                src: flow(ip_proto::TCP).dst,
                dst: flow(ip_proto::TCP).src,
                proto: ip_proto::TCP,
            },
            [4; 6],
            [2; 6],
        );
        after[ETH_HLEN + 20 + 13] = TCP_RST;
        assert_eq!(
            changes(&before, &after, 0, 0),
            [Change::Rejected {
                answer: "a TCP reset"
            }]
        );
    }
}
