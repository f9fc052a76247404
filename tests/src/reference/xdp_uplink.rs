//! `xdp_uplink`: VXLAN for this node (its address, port 8472, VNI 1) from a node that holds a
//! lease is stripped and the inner frame, readdressed to the uplink, handed to the stack. The
//! outer packet must be one the stack itself would take (a valid IPv4 header checksum, a total
//! length that holds the header, not a fragment): anything else passes untouched, for the stack
//! to judge as it judges any packet. Past the total length is padding, never VXLAN. VXLAN to
//! this node that is cut short (by its length or the frame's end), or carries no IPv4, or
//! comes from an address that holds no lease, is dropped and counted.

use weft_common::drop_reason::DropReason;

use super::{Fixture, L3, Outcome, UDP, XDP_DROP, XDP_PASS, fold, parse_ip, sum};
use crate::overlay_fixture::{OUR_IP, REMOTE_IP, UPLINK_MAC};

impl Fixture {
    /// `xdp_uplink` on a frame the uplink receives.
    #[must_use]
    pub fn xdp_uplink(&self, frame: &[u8]) -> Outcome {
        let pass = Outcome::pass(XDP_PASS, frame, 0);
        let drop = |reason| Outcome::drop(XDP_DROP, frame, 0, reason);
        let L3::Ipv4(ip) = parse_ip(frame) else {
            return pass;
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
            return pass;
        }
        // Everything below lies inside the datagram the IPv4 length gives.
        let datagram = &frame[..ip.end(frame)];
        let Some(udp) = datagram.get(ip.l4..ip.l4 + 8) else {
            return pass;
        };
        if udp[2..4] != 8472u16.to_be_bytes() {
            return pass;
        }
        let Some(vxlan) = datagram.get(ip.l4 + 8..ip.l4 + 16) else {
            return drop(DropReason::VxlanMalformed);
        };
        // Without the I flag or with another VNI it may be another VXLAN user's: not ours.
        if vxlan[0] & 0x08 == 0 || vxlan[4..7] != [0, 0, 1] {
            return pass;
        }
        if ip.src != REMOTE_IP.octets() {
            return drop(DropReason::VxlanUnknownSource);
        }
        let inner = ip.l4 + 16;
        let Some(ethernet) = datagram.get(inner..inner + 14) else {
            return drop(DropReason::VxlanMalformed);
        };
        if ethernet[12..14] != [0x08, 0x00] {
            return drop(DropReason::VxlanMalformed);
        }
        let mut output = frame[inner..].to_vec();
        output[..6].copy_from_slice(&UPLINK_MAC);
        Outcome { output, ..pass }
    }
}
