//! The overlay's part of the programs, as the fixture's node (192.168.50.1, Network
//! 172.30.0.0/16, its own subnet 172.30.20.0/24, `--host-routing=ebpf`, no VXLAN device) must
//! do it:
//!
//! - **Receiving** (`tc_from_uplink`, `xdp_uplink`): VXLAN for this node (its address, port
//!   8472, VNI 1) from a node that holds a lease is the overlay's. The outer packet must be one
//!   the stack itself would take (a valid IPv4 header checksum, a total length that holds the
//!   header, not a fragment, a frame addressed to the uplink or to a group): anything else is
//!   not the overlay's. Past the total length is padding, never VXLAN. VXLAN to this node that
//!   is cut short (by its length or the frame's end), or carries no IPv4, or comes from an
//!   address that holds no lease, is dropped and counted. `xdp_uplink` stops at that; the TC
//!   hook decapsulates: the outer headers go, the outer ECN is carried inward (RFC 6040: a
//!   congestion mark on a packet not ECN-capable inside is dropped), the frame is addressed to
//!   the uplink from the sender's VtepMAC; less than an IPv4 header left inside cannot be
//!   decapsulated and is dropped. The inner packet is then translated as any frame from
//!   outside, and one for a pod this node learned is delivered straight into it: the reply's
//!   reverse NAT, the TTL decremented, addressed to the pod from the bridge.
//! - **Learning** (`tc_from_pods`): an IPv4 or ARP frame from an address of this node's subnet
//!   teaches where that pod is.
//! - **Sending** (`tc_from_pods` for a pod's packet to a pod of another node, `tc_to_uplink`
//!   for what the node routes to the Network): encapsulated as Linux VXLAN (`flannel.1`) frames
//!   it, to the node whose lease holds the subnet, addressed to the next hop (the fuzzer's
//!   uplink namespace resolves the remote node to `NEXT_HOP_MAC`). A pod's packet goes straight
//!   out of the uplink only when the stack has nothing to do for it: no masquerade mark, a TTL
//!   above 1, no bigger than the overlay's MTU (1450), a subnet a node holds; it gets the
//!   forwarding's TTL decrement and the reverse NAT of replies the uplink translated.

use weft_common::drop_reason::DropReason;

use super::{
    Fixture, L3, MASQUERADE, Outcome, REMOTE_SUBNET, UDP, Unknown, VERDICT_REDIRECT, XDP_DROP,
    XDP_PASS, checksum, fold, in_network, in_subnet, parse_ip, rechecksum, sum,
};
use crate::overlay_fixture::{
    BRIDGE_MAC, NEXT_HOP_MAC, OUR_IP, OUR_VTEP, REMOTE_IP, REMOTE_VTEP, UPLINK_MAC,
};

/// The overlay's largest inner packet.
const INNER_MTU: usize = 1450;

/// What the uplink received, to the overlay.
pub(super) enum Received {
    NotOurs,
    Drop(DropReason),
    /// A member's VXLAN: the bytes decapsulation removes, the outer TOS, the inner source MAC.
    Member {
        encap_len: usize,
        outer_tos: u8,
        inner_src_mac: [u8; 6],
    },
}

impl Fixture {
    /// `xdp_uplink` on a frame the uplink receives: drops what the overlay drops.
    #[must_use]
    pub fn xdp_uplink(&self, frame: &[u8]) -> Outcome {
        match received(frame) {
            Received::Drop(reason) => Outcome::drop(XDP_DROP, frame, 0, reason),
            Received::NotOurs | Received::Member { .. } => Outcome::pass(XDP_PASS, frame, 0),
        }
    }

    /// The pod this node learned at `addr`: its MAC.
    fn learned_pod(&self, addr: [u8; 4]) -> Option<[u8; 6]> {
        self.pods
            .iter()
            .find(|(pod, _)| *pod == addr)
            .map(|(_, mac)| *mac)
    }

    /// Whether `tc_from_pods` learns something new from `frame` (a pod it does not know, or
    /// known with another MAC).
    pub(super) fn learns(&self, frame: &[u8]) -> bool {
        let sender_at = match frame.get(12..14) {
            Some([0x08, 0x00]) => 14 + 12,
            Some([0x08, 0x06]) => 14 + 14,
            _ => return false,
        };
        let Some(sender) = frame.get(sender_at..sender_at + 4) else {
            return false;
        };
        let sender: [u8; 4] = sender.try_into().expect("4 bytes");
        let mac: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        in_subnet(sender, super::LOCAL_SUBNET) && self.learned_pod(sender) != Some(mac)
    }

    /// A pod's packet for a pod of another node, after service translation (`translated`):
    /// encapsulated, or `None` where the stack's path takes it.
    pub(super) fn send_from_pod(&self, translated: &Outcome) -> Option<Outcome> {
        if translated.mark & MASQUERADE != 0 {
            return None;
        }
        let packet = &translated.output;
        let L3::Ipv4(ip) = parse_ip(packet) else {
            return None;
        };
        let remote = in_network(ip.dst) && !in_subnet(ip.dst, super::LOCAL_SUBNET);
        if !remote
            || !in_subnet(ip.src, super::LOCAL_SUBNET)
            || packet.len() - 14 > INNER_MTU
            || packet.get(14 + 8).is_none_or(|ttl| *ttl <= 1)
            || !in_subnet(ip.dst, REMOTE_SUBNET)
        {
            return None;
        }
        let forwarded = match self.forwarded(translated) {
            Ok(forwarded) => forwarded,
            Err(dropped) => return Some(dropped),
        };
        let (output, unknown) = encapsulated(&forwarded.output, &forwarded.unknown);
        Some(Outcome {
            output,
            unknown,
            ..forwarded
        })
    }

    /// `tc_from_uplink`'s overlay half on a frame from the network: `None` when it is not the
    /// overlay's (service translation alone judges it), else what becomes of it, service
    /// translation of the inner packet included.
    pub(super) fn receive_overlay(&self, frame: &[u8], mark: u32) -> Option<Outcome> {
        // Frames to another host's MAC are the stack's to drop (a group address is taken).
        if frame.len() >= 6 && frame[..6] != UPLINK_MAC && frame[0] & 1 == 0 {
            return None;
        }
        let (encap_len, outer_tos, inner_src_mac) = match received(frame) {
            Received::NotOurs => return None,
            Received::Drop(reason) => {
                return Some(Outcome::drop(super::VERDICT_DROP, frame, mark, reason));
            }
            Received::Member {
                encap_len,
                outer_tos,
                inner_src_mac,
            } => (encap_len, outer_tos, inner_src_mac),
        };
        let inner_at = 14 + encap_len;
        if frame.len() < inner_at + 20 {
            return Some(Outcome::drop(
                super::VERDICT_DROP,
                frame,
                mark,
                DropReason::DecapFailed,
            ));
        }
        let inner_tos = frame[inner_at + 1];
        let Some(tos) = weft_common::vxlan::decapsulated_tos(outer_tos, inner_tos) else {
            return Some(Outcome::drop(
                super::VERDICT_DROP,
                frame,
                mark,
                DropReason::VxlanCongestionNotEct,
            ));
        };
        let mut inner = Vec::with_capacity(frame.len() - encap_len);
        inner.extend_from_slice(&UPLINK_MAC);
        inner.extend_from_slice(&inner_src_mac);
        inner.extend_from_slice(&frame[12..14]);
        inner.extend_from_slice(&frame[inner_at..]);
        if tos != inner_tos {
            set_header_byte(&mut inner, 1, tos);
        }
        let translated = self.to_endpoint(&inner, mark, super::service::Clients::Outside);
        if translated.verdict != super::VERDICT_PASS {
            return Some(translated);
        }
        Some(self.deliver_to_pod(&translated).unwrap_or(translated))
    }

    /// A decapsulated packet, after service translation, for a pod this node learned:
    /// delivered straight into it; `None` where the stack's path takes it.
    fn deliver_to_pod(&self, translated: &Outcome) -> Option<Outcome> {
        if translated.mark & MASQUERADE != 0 {
            return None;
        }
        let packet = &translated.output;
        let L3::Ipv4(ip) = parse_ip(packet) else {
            return None;
        };
        let pod_mac = self.learned_pod(ip.dst)?;
        if packet.get(14 + 8).is_none_or(|ttl| *ttl <= 1) {
            return None;
        }
        let mut forwarded = match self.forwarded(translated) {
            Ok(forwarded) => forwarded,
            Err(dropped) => return Some(dropped),
        };
        forwarded.output[..6].copy_from_slice(&pod_mac);
        forwarded.output[6..12].copy_from_slice(&BRIDGE_MAC);
        Some(Outcome {
            verdict: VERDICT_REDIRECT,
            ..forwarded
        })
    }

    /// A translated packet as the datapath forwards it past the stack: the reverse NAT of a
    /// tracked reply, then the TTL decremented; `Err` when the reverse NAT drops it.
    fn forwarded(&self, translated: &Outcome) -> Result<Outcome, Outcome> {
        let restored = self.to_client(&translated.output, translated.mark);
        if restored.drop.is_some() {
            return Err(Outcome {
                conntrack: true,
                ..restored
            });
        }
        let mut output = restored.output.clone();
        decrement_ttl(&mut output);
        Ok(Outcome {
            output,
            conntrack: translated.conntrack || restored.conntrack,
            ..restored
        })
    }
}

/// What the uplink received is to the overlay (see the module's rules).
fn received(frame: &[u8]) -> Received {
    let L3::Ipv4(ip) = parse_ip(frame) else {
        return Received::NotOurs;
    };
    let header_checksum_ok = fold(sum(&frame[14..ip.l4])) == 0xffff;
    let length_ok = ip.total_len >= ip.header_len;
    if !header_checksum_ok
        || !length_ok
        || ip.proto != UDP
        || ip.more_fragments
        || ip.later_fragment()
        || ip.dst != OUR_IP.octets()
    {
        return Received::NotOurs;
    }
    // Everything below lies inside the datagram the IPv4 length gives.
    let datagram = &frame[..ip.end(frame)];
    let Some(udp) = datagram.get(ip.l4..ip.l4 + 8) else {
        return Received::NotOurs;
    };
    if udp[2..4] != 8472u16.to_be_bytes() {
        return Received::NotOurs;
    }
    let Some(vxlan) = datagram.get(ip.l4 + 8..ip.l4 + 16) else {
        return Received::Drop(DropReason::VxlanMalformed);
    };
    // Without the I flag or with another VNI it may be another VXLAN user's: not ours.
    if vxlan[0] & 0x08 == 0 || vxlan[4..7] != [0, 0, 1] {
        return Received::NotOurs;
    }
    if ip.src != REMOTE_IP.octets() {
        return Received::Drop(DropReason::VxlanUnknownSource);
    }
    let inner = ip.l4 + 16;
    let Some(ethernet) = datagram.get(inner..inner + 14) else {
        return Received::Drop(DropReason::VxlanMalformed);
    };
    if ethernet[12..14] != [0x08, 0x00] {
        return Received::Drop(DropReason::VxlanMalformed);
    }
    Received::Member {
        encap_len: inner,
        outer_tos: frame[15],
        inner_src_mac: ethernet[6..12].try_into().expect("6 bytes"),
    }
}

/// Sets one byte of the IPv4 header and updates its checksum as a router does (RFC 1624: a
/// wrong checksum stays wrong by as much).
fn set_header_byte(frame: &mut [u8], at: usize, value: u8) {
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    let header = 14..14 + header_len;
    let field = u16::from_be_bytes([frame[24], frame[25]]);
    let before = sum(&frame[header.clone()]) - u64::from(field);
    frame[14 + at] = value;
    let after = sum(&frame[header]) - u64::from(field);
    frame[24..26].copy_from_slice(&rechecksum(field, before, after).to_be_bytes());
}

fn decrement_ttl(frame: &mut [u8]) {
    let ttl = frame[14 + 8];
    set_header_byte(frame, 8, ttl - 1);
}

/// `packet` encapsulated to the remote node, addressed to the next hop; `unknown` are the
/// packet's own unknown bytes, moved with it. Adds the outer source port, the kernel's flow
/// hash.
pub(super) fn encapsulated(
    packet: &[u8],
    unknown: &[(std::ops::Range<usize>, Unknown)],
) -> (Vec<u8>, Vec<(std::ops::Range<usize>, Unknown)>) {
    let inner = &packet[14..];
    let total = 20 + 8 + 8 + 14 + inner.len();
    // Lengths past 64 KiB (a GSO super-packet) are written as 0 for segmentation to fill.
    let length = |len: usize| u16::try_from(len).unwrap_or(0).to_be_bytes();
    let mut outer = vec![0x45, inner[1]];
    outer.extend_from_slice(&length(total));
    outer.extend_from_slice(&inner[4..6]);
    outer.extend_from_slice(&[0, 0, 64, 17, 0, 0]);
    outer.extend_from_slice(&OUR_IP.octets());
    outer.extend_from_slice(&REMOTE_IP.octets());
    let c = checksum(sum(&outer));
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    let mut output = Vec::with_capacity(14 + total);
    output.extend_from_slice(&NEXT_HOP_MAC);
    output.extend_from_slice(&UPLINK_MAC);
    output.extend_from_slice(&[0x08, 0x00]);
    output.extend_from_slice(&outer);
    let source_port_at = output.len();
    output.extend_from_slice(&[0, 0]);
    output.extend_from_slice(&8472u16.to_be_bytes());
    output.extend_from_slice(&length(total - 20));
    // No UDP checksum (RFC 7348), the I flag and VNI 1.
    output.extend_from_slice(&[0, 0, 0x08, 0, 0, 0, 0, 0, 1, 0]);
    output.extend_from_slice(&REMOTE_VTEP);
    output.extend_from_slice(&OUR_VTEP);
    output.extend_from_slice(&[0x08, 0x00]);
    output.extend_from_slice(inner);
    let mut unknown: Vec<_> = unknown
        .iter()
        .map(|(range, what)| (range.start + 50..range.end + 50, *what))
        .collect();
    unknown.push((source_port_at..source_port_at + 2, Unknown::FlowHashPort));
    (output, unknown)
}
