//! XDP on the uplink, where the agent puts it (`--xdp`): an early filter for the overlay, which
//! drops VXLAN for this node that `tc_from_uplink` would drop (from an address that holds no
//! lease, cut short, carrying no IPv4) before the kernel builds an skb for it. Everything else
//! passes untouched; decapsulation is `tc_from_uplink`'s, where GSO keeps working.
//!
//! It is off by default on veth and virtio-net uplinks, whose offloads an XDP program turns off
//! (a veth's peer loses GSO; a virtio-net guest loses its host's TSO and checksum offloads).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use weft_common::vxlan::{self, Received};

use crate::{
    maps::{VTEPS, count_drop, overlay},
    packet::Xdp,
};

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    let overlay = overlay();
    if overlay.public_ip == [0; 4] {
        return XDP_PASS;
    }
    match vxlan::classify(&Xdp(&ctx), &overlay, |src| VTEPS.get_ptr(src).is_some()) {
        Received::Drop(reason) => {
            count_drop(reason);
            XDP_DROP
        }
        Received::NotOurs | Received::Member(_) => XDP_PASS,
    }
}
