//! `tc_to_uplink`: replies of connections translated for outside clients get their frontend
//! back (as on `tc_to_pod`); then a packet for the pod Network is encapsulated to the node whose
//! lease holds its subnet (see [`super::vxlan`]). A packet for the Network that no lease holds
//! is dropped; everything else goes on unchanged.

use weft_common::drop_reason::DropReason;

use super::{Fixture, L3, Outcome, REMOTE_SUBNET, VERDICT_DROP, in_network, in_subnet, parse_ip};

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
        let (output, unknown) = super::vxlan::encapsulated(&packet, &restored.unknown);
        Outcome {
            output,
            unknown,
            ..restored
        }
    }
}
