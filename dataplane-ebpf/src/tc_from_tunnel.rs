//! TC ingress of the node's `external` VXLAN device: what the kernel decapsulated, because
//! `tc_from_uplink` left it whole (a GSO aggregate it could not decapsulate safely, VXLAN with
//! another VNI, fragments the kernel reassembled). The device takes any VXLAN on the port, so
//! the overlay's rules are applied again here, on the tunnel metadata the kernel attached:
//! the overlay's VNI, from a node that holds a lease. What passes is translated as any frame
//! from outside the node and goes on to the stack.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_tunnel_key},
    helpers::bpf_skb_get_tunnel_key,
    macros::classifier,
    programs::TcContext,
};
use weft_common::drop_reason::DropReason;

use crate::{
    maps::{VTEPS, count_drop, overlay},
    service::{self, Clients},
    vxlan::TUNNEL_KEY_LEN,
};

#[classifier]
pub fn tc_from_tunnel(ctx: TcContext) -> i32 {
    match member(&ctx) {
        Ok(()) => service::to_endpoint(&ctx, Clients::Outside),
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn member(ctx: &TcContext) -> Result<(), DropReason> {
    // SAFETY: `bpf_tunnel_key` is plain data; all-zero is its documented initial state.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is valid for writes of the size passed.
    let got = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &raw mut key, TUNNEL_KEY_LEN, 0) };
    if got != 0 {
        // No tunnel metadata: not from the VXLAN socket (nothing else sends into the device).
        return Err(DropReason::VxlanUnknownSource);
    }
    if key.tunnel_id != overlay().vni {
        return Err(DropReason::VxlanOtherVni);
    }
    // SAFETY: the kernel filled the IPv4 member of the union for an IPv4 tunnel.
    let source = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    if VTEPS.get_ptr(source).is_none() {
        return Err(DropReason::VxlanUnknownSource);
    }
    Ok(())
}
