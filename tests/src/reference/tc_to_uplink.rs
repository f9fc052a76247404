//! `tc_to_uplink`: replies of connections translated for outside clients get their frontend
//! back (as on `tc_to_pod`); then a packet for the pod Network is encapsulated to the node whose
//! lease holds its subnet, as Linux VXLAN (`flannel.1`) frames it, and addressed to the next hop
//! (the fuzzer's uplink namespace resolves the remote node to `NEXT_HOP_MAC`). A packet for the
//! Network that no lease holds is dropped; everything else goes on unchanged.

use weft_common::drop_reason::DropReason;

use super::{
    Fixture, L3, Outcome, REMOTE_SUBNET, Unknown, VERDICT_DROP, checksum, in_network, in_subnet,
    parse_ip, sum,
};
use crate::overlay_fixture::{NEXT_HOP_MAC, OUR_IP, OUR_VTEP, REMOTE_IP, REMOTE_VTEP, UPLINK_MAC};

impl Fixture {
    /// `tc_to_uplink` on a frame the node sends out of its uplink.
    #[must_use]
    pub fn tc_to_uplink(&self, frame: &[u8], mark: u32) -> Outcome {
        let restored = self.to_client(frame, mark);
        if restored.drop.is_some() {
            return restored;
        }
        let packet = restored.output.clone();
        // Malformed IPv4 is not the overlay's to judge either: it goes on as it is.
        let L3::Ipv4(ip) = parse_ip(&packet) else {
            return restored;
        };
        if !in_network(ip.dst) {
            return restored;
        }
        if !in_subnet(ip.dst, REMOTE_SUBNET) {
            return Outcome {
                verdict: VERDICT_DROP,
                drop: Some(DropReason::NoLeaseForDestination),
                ..restored
            };
        }
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
        let mut unknown = restored.unknown.clone();
        for (range, _) in &mut unknown {
            *range = range.start + 50..range.end + 50;
        }
        unknown.push((source_port_at..source_port_at + 2, Unknown::FlowHashPort));
        Outcome {
            output,
            unknown,
            ..restored
        }
    }
}
