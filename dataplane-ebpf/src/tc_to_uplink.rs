//! TC egress of the uplink: everything the node sends out of it, including what it routes from
//! its pods. A reply to a client whose connection `tc_from_uplink` translated (a NodePort, an
//! external IP) first gets its frontend back as its source. Then a packet for the cluster's pod
//! Network (the agent routes the whole Network out of the uplink) is encapsulated in VXLAN to
//! the node whose lease holds its subnet, exactly as Linux VXLAN (`flannel.1`) would frame it
//! (see `vxlan`); everything else goes on unchanged, the encapsulated packets that pods'
//! ports sent here included.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    drop_reason::DropReason,
    packet::{Frame, parse_ipv4},
};

use crate::{
    maps::{count_drop, overlay},
    packet::Skb,
    service,
    vxlan::{self, EALREADY},
};

#[classifier]
pub fn tc_to_uplink(ctx: TcContext) -> i32 {
    match service::to_client(&ctx).and_then(|()| encapsulate(&ctx)) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn encapsulate(ctx: &TcContext) -> Result<i32, DropReason> {
    let skb = Skb(ctx);
    skb.pull_headers();
    // The uplink carries the underlay too; anything not IPv4 for the pod Network is not ours.
    let Frame::Ipv4(ip) = parse_ipv4(&skb) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let overlay = overlay();
    if overlay.public_ip == [0; 4] || !overlay.in_network(ip.dst) {
        return Ok(TC_ACT_UNSPEC);
    }
    let node = vxlan::remote_node(ip.dst).ok_or(DropReason::NoLeaseForDestination)?;
    match vxlan::encapsulate(ctx, &overlay, &node) {
        Ok(()) => vxlan::forward(ctx, &overlay, &node),
        // Marked as encapsulated already (this node decapsulated it, and a pod sent it on):
        // the VXLAN device encapsulates it as the kernel does.
        Err(Some(EALREADY)) => {
            vxlan::to_tunnel_device(ctx, &overlay, &node).ok_or(DropReason::EncapFailed)
        }
        Err(_) => Err(DropReason::EncapFailed),
    }
}
