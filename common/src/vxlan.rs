//! VXLAN as Linux and flannel put it on the wire (RFC 7348): outer IPv4 and UDP (checksum 0),
//! the 8-byte VXLAN header with the I flag and a 24-bit VNI, then the inner Ethernet frame.

use crate::{
    csum,
    drop_reason::DropReason,
    ip_proto,
    maps::OverlayConfig,
    packet::{
        ETH_HLEN, ETH_P_IP, Fragment, Frame, PacketBytes, ipv4_checksum_ok, parse_ipv4, source_mac,
    },
};

/// flannel's default VXLAN port (Linux's, before IANA assigned 4789).
pub const DEFAULT_PORT: u16 = 8472;
/// flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;
/// The VXLAN header's "VNI present" flag.
pub const FLAG_VNI: u8 = 0x08;
/// VNIs are 24 bits.
pub const VNI_MAX: u32 = 0x00ff_ffff;
/// Bytes inserted between the outer Ethernet header and the inner IP packet:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const ENCAP_LEN: usize = 50;
/// The whole encapsulation overhead on the wire (`ENCAP_LEN` plus the inner Ethernet header's
/// worth of outer Ethernet): what flannel subtracts from the uplink MTU.
pub const OVERHEAD: u32 = 50;
/// Outer IPv4 TTL, as Linux VXLAN uses when none is configured.
pub const OUTER_TTL: u8 = 64;
/// The source port range Linux VXLAN spreads flows over (the default local port range).
pub const SOURCE_PORT_MIN: u16 = 32768;
pub const SOURCE_PORT_MAX: u16 = 61000;

/// The outer UDP source port for a flow hash, as Linux VXLAN's `udp_flow_src_port` computes
/// it: the hash folded, then scaled into `[SOURCE_PORT_MIN, SOURCE_PORT_MAX)`.
#[inline(always)]
#[must_use]
pub const fn source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    let span = (SOURCE_PORT_MAX - SOURCE_PORT_MIN) as u64;
    ((hash as u64 * span) >> 32) as u16 + SOURCE_PORT_MIN
}

/// The VXLAN header for `vni`.
#[inline(always)]
#[must_use]
pub const fn header(vni: u32) -> [u8; 8] {
    let vni = vni.to_be_bytes();
    [FLAG_VNI, 0, 0, 0, vni[1], vni[2], vni[3], 0]
}

/// The VNI of a VXLAN header, or `None` when its I flag is clear.
#[inline(always)]
#[must_use]
pub const fn vni(header: &[u8; 8]) -> Option<u32> {
    if header[0] & FLAG_VNI == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, header[4], header[5], header[6]]))
}

/// What an encapsulation needs besides the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encap {
    /// Outer source: this node's PublicIP.
    pub src: [u8; 4],
    /// Outer destination: the remote node's PublicIP.
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    /// Inner source MAC: this node's VtepMAC.
    pub inner_src_mac: [u8; 6],
    /// Inner destination MAC: the remote node's VtepMAC, which its `flannel.1` (or weft) expects.
    pub inner_dst_mac: [u8; 6],
    /// Outer IPv4 identification (weft copies the inner packet's).
    pub ip_id: u16,
    /// Outer TOS (weft copies the inner packet's, as Linux VXLAN with `tos inherit` does).
    pub tos: u8,
    /// Length of the inner IP packet.
    pub inner_len: u32,
}

/// The 50 bytes that go between the outer Ethernet header and the inner IP packet: outer IPv4
/// (checksummed, DF clear as Linux VXLAN sends it), UDP (checksum 0), VXLAN, inner Ethernet.
/// Lengths above 64 KiB (a GSO super-packet) are written as 0; segmentation rewrites them.
#[inline(always)]
#[must_use]
pub fn headers(encap: &Encap) -> [u8; ENCAP_LEN] {
    let ip_len = encap.inner_len + ENCAP_LEN as u32;
    let udp_len = ip_len - 20;
    let ip_len = if ip_len > 0xffff { 0 } else { ip_len as u16 };
    let udp_len = if udp_len > 0xffff { 0 } else { udp_len as u16 };
    let mut out = [0u8; ENCAP_LEN];
    let id = encap.ip_id.to_be_bytes();
    let total = ip_len.to_be_bytes();
    let mut ip = [
        0x45,
        encap.tos,
        total[0],
        total[1],
        id[0],
        id[1],
        0,
        0,
        OUTER_TTL,
        crate::ip_proto::UDP,
        0,
        0,
        encap.src[0],
        encap.src[1],
        encap.src[2],
        encap.src[3],
        encap.dst[0],
        encap.dst[1],
        encap.dst[2],
        encap.dst[3],
    ];
    let checksum = csum::ipv4_header(&ip).to_be_bytes();
    ip[10] = checksum[0];
    ip[11] = checksum[1];
    let mut i = 0;
    while i < 20 {
        out[i] = ip[i];
        i += 1;
    }
    let sport = encap.src_port.to_be_bytes();
    let dport = encap.dst_port.to_be_bytes();
    let ulen = udp_len.to_be_bytes();
    let udp = [
        sport[0], sport[1], dport[0], dport[1], ulen[0], ulen[1], 0, 0,
    ];
    let vxlan = header(encap.vni);
    let mut j = 0;
    while j < 8 {
        out[20 + j] = udp[j];
        out[28 + j] = vxlan[j];
        j += 1;
    }
    let mut k = 0;
    while k < 6 {
        out[36 + k] = encap.inner_dst_mac[k];
        out[42 + k] = encap.inner_src_mac[k];
        k += 1;
    }
    out[48] = 0x08;
    out[49] = 0x00;
    out
}

/// What a frame arriving on the uplink is to the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Not VXLAN this node takes: anything else, a fragment, an outer header the stack would
    /// refuse, or VXLAN with another VNI. The stack (or the kernel's VXLAN device) judges it.
    NotOurs,
    /// VXLAN for this node that is dropped and counted: cut short, not IPv4 inside, or from an
    /// address that holds no lease.
    Drop(DropReason),
    /// VXLAN for this node from a member.
    Member(Tunneled),
}

/// A member's VXLAN packet, as decapsulation needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunneled {
    /// The bytes between the outer Ethernet header and the inner IPv4 header (50, more with
    /// outer IPv4 options): what decapsulation removes.
    pub encap_len: usize,
    /// The outer IPv4 TOS byte, whose ECN field decapsulation carries inward.
    pub outer_tos: u8,
    /// The outer source: the sending node's PublicIP.
    pub outer_src: [u8; 4],
    /// The inner Ethernet source: the sending node's VtepMAC.
    pub inner_src_mac: [u8; 6],
}

/// Classifies a frame the uplink received, as Linux's VXLAN receive path would take it for
/// `overlay`: outer IPv4 to this node's PublicIP with a valid header, not a fragment, UDP to
/// the overlay's port, the I flag and the overlay's VNI. `member` says whether an outer source
/// holds a lease. What lies past the outer total length is padding, never VXLAN.
#[inline(always)]
pub fn classify<P: PacketBytes + ?Sized>(
    frame: &P,
    overlay: &OverlayConfig,
    member: impl FnOnce([u8; 4]) -> bool,
) -> Received {
    let Frame::Ipv4(ip) = parse_ipv4(frame) else {
        return Received::NotOurs;
    };
    if ip.proto != ip_proto::UDP || ip.fragment != Fragment::Whole || ip.dst != overlay.public_ip {
        return Received::NotOurs;
    }
    let header_len = ip.l4_offset - ETH_HLEN;
    if usize::from(ip.total_len) < header_len || !ipv4_checksum_ok(frame, header_len) {
        return Received::NotOurs;
    }
    // The datagram ends at its total length (or at the frame's end, if cut short).
    let datagram_end = ETH_HLEN + usize::from(ip.total_len);
    let Some(udp) = frame.read::<8>(ip.l4_offset) else {
        return Received::NotOurs;
    };
    if ip.l4_offset + 8 > datagram_end || u16::from_be_bytes([udp[2], udp[3]]) != overlay.port {
        return Received::NotOurs;
    }
    // UDP to this node's VXLAN port: from here on it is VXLAN or garbage.
    let inner = ip.l4_offset + 16;
    let Some(vxlan) = frame.read::<8>(ip.l4_offset + 8) else {
        return Received::Drop(DropReason::VxlanMalformed);
    };
    if inner > datagram_end {
        return Received::Drop(DropReason::VxlanMalformed);
    }
    if vni(&vxlan) != Some(overlay.vni) {
        return Received::NotOurs;
    }
    if !member(ip.src) {
        return Received::Drop(DropReason::VxlanUnknownSource);
    }
    let Some(ethernet) = frame.read::<{ ETH_HLEN }>(inner) else {
        return Received::Drop(DropReason::VxlanMalformed);
    };
    if inner + ETH_HLEN > datagram_end
        || u16::from_be_bytes([ethernet[12], ethernet[13]]) != ETH_P_IP
    {
        return Received::Drop(DropReason::VxlanMalformed);
    }
    Received::Member(Tunneled {
        encap_len: inner,
        outer_tos: ip.tos,
        outer_src: ip.src,
        inner_src_mac: source_mac(&ethernet),
    })
}

/// The ECN field of a TOS byte (RFC 3168): not-ECT, ECT(1), ECT(0), CE.
const ECN_MASK: u8 = 0b11;
const ECN_ECT_1: u8 = 0b01;
const ECN_ECT_0: u8 = 0b10;
const ECN_CE: u8 = 0b11;

/// The inner TOS byte after decapsulation, as Linux's `INET_ECN_decapsulate` (RFC 6040, normal
/// mode) leaves it: congestion marked on the outer header is carried inward, as is ECT(1); a
/// packet marked CE outside whose inner header is not ECN-capable cannot carry the mark and is
/// dropped (`None`).
#[inline(always)]
#[must_use]
pub const fn decapsulated_tos(outer_tos: u8, inner_tos: u8) -> Option<u8> {
    let (outer, inner) = (outer_tos & ECN_MASK, inner_tos & ECN_MASK);
    if inner == 0 {
        return if outer == ECN_CE {
            None
        } else {
            Some(inner_tos)
        };
    }
    if outer == ECN_CE {
        Some(inner_tos | ECN_CE)
    } else if outer == ECN_ECT_1 && inner == ECN_ECT_0 {
        Some((inner_tos & !ECN_MASK) | ECN_ECT_1)
    } else {
        Some(inner_tos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encap() -> Encap {
        Encap {
            src: [192, 168, 50, 1],
            dst: [192, 168, 50, 2],
            src_port: 40000,
            dst_port: DEFAULT_PORT,
            vni: DEFAULT_VNI,
            inner_src_mac: [0x0e, 0xfe, 192, 168, 50, 1],
            inner_dst_mac: [0xb6, 0xc7, 0x0f, 0x7f, 0x66, 0xa7],
            ip_id: 0x1234,
            tos: 0,
            inner_len: 60,
        }
    }

    #[test]
    fn headers_are_laid_out_as_linux_vxlan_sends_them() {
        let h = headers(&encap());
        assert_eq!(&h[0..4], &[0x45, 0, 0, 110], "IPv4, total 60 + 50");
        assert_eq!(&h[4..9], &[0x12, 0x34, 0, 0, 64], "id, DF clear, TTL 64");
        assert_eq!(h[9], 17, "UDP");
        assert_eq!(
            crate::csum::ipv4_header(&h[..20].try_into().unwrap()),
            0,
            "valid checksum"
        );
        assert_eq!(&h[12..20], &[192, 168, 50, 1, 192, 168, 50, 2]);
        assert_eq!(
            &h[20..28],
            &[0x9c, 0x40, 0x21, 0x18, 0, 90, 0, 0],
            "ports, length 90, checksum 0"
        );
        assert_eq!(&h[28..36], &[0x08, 0, 0, 0, 0, 0, 1, 0], "I flag, VNI 1");
        assert_eq!(&h[36..42], &[0xb6, 0xc7, 0x0f, 0x7f, 0x66, 0xa7]);
        assert_eq!(&h[42..48], &[0x0e, 0xfe, 192, 168, 50, 1]);
        assert_eq!(&h[48..50], &[0x08, 0x00]);
    }

    #[test]
    fn vni_round_trips_and_needs_the_flag() {
        for vni in [0, 1, 4096, VNI_MAX] {
            assert_eq!(super::vni(&header(vni)), Some(vni));
        }
        let mut no_flag = header(7);
        no_flag[0] = 0;
        assert_eq!(super::vni(&no_flag), None);
    }

    #[test]
    fn source_ports_stay_in_range_and_spread() {
        let mut seen = [false; 16];
        for i in 0..4096u32 {
            let port = source_port(i.wrapping_mul(2_654_435_761));
            assert!((SOURCE_PORT_MIN..SOURCE_PORT_MAX).contains(&port));
            seen[usize::from(
                (port - SOURCE_PORT_MIN) / ((SOURCE_PORT_MAX - SOURCE_PORT_MIN) / 16 + 1),
            )] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "every sixteenth of the range is used: {seen:?}"
        );
    }

    #[test]
    fn ecn_follows_rfc_6040_as_linux_applies_it() {
        // (outer, inner) -> inner after, for the ECN field alone, DSCP 0x28 kept throughout.
        for (outer, inner, after) in [
            (0b00, 0b00, Some(0b00)),
            (0b10, 0b00, Some(0b00)),
            (0b01, 0b00, Some(0b00)),
            (0b11, 0b00, None),
            (0b00, 0b10, Some(0b10)),
            (0b11, 0b10, Some(0b11)),
            (0b11, 0b01, Some(0b11)),
            (0b01, 0b10, Some(0b01)),
            (0b01, 0b11, Some(0b11)),
            (0b10, 0b01, Some(0b01)),
        ] {
            assert_eq!(
                decapsulated_tos(0xa0 | outer, 0x28 << 2 | inner),
                after.map(|ecn| 0x28 << 2 | ecn),
                "outer {outer:02b}, inner {inner:02b}"
            );
        }
    }

    fn overlay() -> OverlayConfig {
        OverlayConfig {
            public_ip: [192, 168, 50, 1],
            port: DEFAULT_PORT,
            vni: DEFAULT_VNI,
            ..OverlayConfig::default()
        }
    }

    /// A VXLAN frame from 192.168.50.2 to this node, carrying `inner` (an Ethernet frame).
    fn received(inner: &[u8], vni: u32, port: u16) -> [u8; 200] {
        let mut frame = [0u8; 200];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let encap = headers(&Encap {
            src: [192, 168, 50, 2],
            dst: [192, 168, 50, 1],
            src_port: 40000,
            dst_port: port,
            vni,
            inner_src_mac: [2, 0, 0, 0, 0, 2],
            inner_dst_mac: [2, 0, 0, 0, 0, 1],
            ip_id: 7,
            tos: 0x02,
            inner_len: (inner.len() - 14) as u32,
        });
        frame[14..64].copy_from_slice(&encap);
        frame[64..50 + inner.len()].copy_from_slice(&inner[14..]);
        frame
    }

    fn inner() -> [u8; 54] {
        let mut inner = [0u8; 54];
        inner[12..14].copy_from_slice(&[0x08, 0x00]);
        inner[14] = 0x45;
        inner[17] = 40;
        inner
    }

    #[test]
    fn a_members_vxlan_is_recognised_with_what_decapsulation_needs() {
        let frame = received(&inner(), DEFAULT_VNI, DEFAULT_PORT);
        let len = 14 + 50 + 40;
        assert_eq!(
            classify(&frame[..len], &overlay(), |src| src == [192, 168, 50, 2]),
            Received::Member(Tunneled {
                encap_len: 50,
                outer_tos: 0x02,
                outer_src: [192, 168, 50, 2],
                inner_src_mac: [2, 0, 0, 0, 0, 2],
            })
        );
        assert_eq!(
            classify(&frame[..len], &overlay(), |_| false),
            Received::Drop(DropReason::VxlanUnknownSource)
        );
    }

    #[test]
    fn other_vnis_ports_and_addresses_are_not_ours_and_runts_are_dropped() {
        let member = |_| true;
        let len = 14 + 50 + 40;
        let other_vni = received(&inner(), 2, DEFAULT_PORT);
        assert_eq!(
            classify(&other_vni[..len], &overlay(), member),
            Received::NotOurs
        );
        let other_port = received(&inner(), DEFAULT_VNI, 4789);
        assert_eq!(
            classify(&other_port[..len], &overlay(), member),
            Received::NotOurs
        );
        let mut elsewhere = received(&inner(), DEFAULT_VNI, DEFAULT_PORT);
        elsewhere[33] = 9;
        assert_eq!(
            classify(&elsewhere[..len], &overlay(), member),
            Received::NotOurs
        );
        let frame = received(&inner(), DEFAULT_VNI, DEFAULT_PORT);
        assert_eq!(
            classify(&frame[..14 + 20 + 8 + 4], &overlay(), member),
            Received::Drop(DropReason::VxlanMalformed),
            "VXLAN header cut off"
        );
        assert_eq!(
            classify(&frame[..14 + 36 + 10], &overlay(), member),
            Received::Drop(DropReason::VxlanMalformed),
            "inner Ethernet header cut off"
        );
        let mut frame = received(&inner(), DEFAULT_VNI, DEFAULT_PORT);
        frame[62..64].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            classify(&frame[..len], &overlay(), member),
            Received::Drop(DropReason::VxlanMalformed)
        );
    }

    #[test]
    fn super_packet_lengths_become_zero() {
        let h = headers(&Encap {
            inner_len: 65_500,
            ..encap()
        });
        assert_eq!(&h[2..4], &[0, 0], "65550 does not fit the IPv4 length");
        assert_eq!(
            &h[24..26],
            &65_530u16.to_be_bytes(),
            "but the UDP length still does"
        );
        let h = headers(&Encap {
            inner_len: 70_000,
            ..encap()
        });
        assert_eq!(&h[24..26], &[0, 0]);
    }
}
