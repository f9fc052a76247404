//! XDP on the uplink: VXLAN for this node (its PublicIP, its port, its VNI) from a node that
//! holds a lease is decapsulated, addressed to the uplink, and passed to the stack, which routes
//! the inner packet to the local pod (or takes it, if it is for the node). VXLAN from an address
//! that holds no lease is dropped and counted. Everything else passes untouched.
//!
//! Fragmented VXLAN is passed as it is: the kernel reassembles and drops it for want of a
//! socket, as flannel's `flannel.1` would not (weft does not reassemble in XDP). So is an outer
//! IPv4 header the stack would refuse (a bad checksum, a total length of 0 or shorter than the
//! header): the stack drops it and counts it as it counts any, as it would for `flannel.1`.
//! What lies past the outer total length is padding, never VXLAN.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
};
use weft_common::{
    drop_reason::DropReason,
    ip_proto,
    packet::{ETH_HLEN, ETH_P_IP, Fragment, Frame, PacketBytes as _, ipv4_checksum_ok, parse_ipv4},
    vxlan,
};

use crate::{
    maps::{VTEPS, count_drop, overlay},
    packet::Xdp,
};

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    match decapsulate(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Result<u32, DropReason> {
    let frame = Xdp(ctx);
    let Frame::Ipv4(ip) = parse_ipv4(&frame) else {
        return Ok(XDP_PASS);
    };
    let overlay = overlay();
    if ip.proto != ip_proto::UDP || ip.fragment != Fragment::Whole || ip.dst != overlay.public_ip {
        return Ok(XDP_PASS);
    }
    let header_len = ip.l4_offset - ETH_HLEN;
    if usize::from(ip.total_len) < header_len || !ipv4_checksum_ok(&frame, header_len) {
        return Ok(XDP_PASS);
    }
    // The datagram ends at its total length (or at the frame's end, if cut short).
    let datagram_end = ETH_HLEN + usize::from(ip.total_len);
    let Some(udp) = frame.read::<8>(ip.l4_offset) else {
        return Ok(XDP_PASS);
    };
    if ip.l4_offset + 8 > datagram_end {
        return Ok(XDP_PASS);
    }
    if u16::from_be_bytes([udp[2], udp[3]]) != overlay.port {
        return Ok(XDP_PASS);
    }
    // UDP to this node's VXLAN port: from here on it is VXLAN or garbage.
    let inner = ip.l4_offset + 16;
    if inner > datagram_end {
        return Err(DropReason::VxlanMalformed);
    }
    let header = frame
        .read::<{ vxlan::header(0).len() }>(ip.l4_offset + 8)
        .ok_or(DropReason::VxlanMalformed)?;
    if vxlan::vni(&header) != Some(overlay.vni) {
        // Another VNI (or no VNI flag): possibly another VXLAN user of this port; not ours.
        return Ok(XDP_PASS);
    }
    if VTEPS.get_ptr(ip.src).is_none() {
        return Err(DropReason::VxlanUnknownSource);
    }
    if inner + ETH_HLEN > datagram_end {
        return Err(DropReason::VxlanMalformed);
    }
    let inner_ethernet = frame
        .read::<{ ETH_HLEN }>(inner)
        .ok_or(DropReason::VxlanMalformed)?;
    if u16::from_be_bytes([inner_ethernet[12], inner_ethernet[13]]) != ETH_P_IP {
        return Err(DropReason::VxlanMalformed);
    }
    // SAFETY: a helper on this program's own context; `inner` is within the frame (just read).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner as i32) } != 0 {
        return Err(DropReason::VxlanMalformed);
    }
    // The inner frame is addressed to our VtepMAC; readdress it to the uplink so the stack
    // takes it and routes it on.
    Xdp(ctx)
        .write(0, &overlay.uplink_mac)
        .ok_or(DropReason::VxlanMalformed)?;
    Ok(XDP_PASS)
}
