//! TC egress of the uplink: everything the node sends out of it, including what it routes from
//! its pods. A reply to a client whose connection `tc_from_uplink` translated (a NodePort, an
//! external IP) first gets its frontend back as its source. Then a packet for the cluster's pod
//! Network (the agent routes the whole Network out of the uplink) is encapsulated in VXLAN to
//! the node whose lease holds its subnet, exactly as Linux VXLAN (`flannel.1`) would frame it;
//! everything else goes on unchanged.
//!
//! The encapsulation grows the packet in place with `bpf_skb_adjust_room` and its tunnel flags,
//! so a GSO super-packet stays one: the kernel segments it after this hook, each segment with
//! its own outer headers, and TCP offloads keep working through the overlay.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh,
    },
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    drop_reason::DropReason,
    packet::{ETH_HLEN, Frame, PacketBytes as _, parse_ipv4},
    vxlan::{self, Encap},
};

use crate::{
    maps::{SUBNETS, count_drop, overlay},
    packet::Skb,
    service,
};

/// `AF_INET`, for the FIB lookup.
const AF_INET: u8 = 2;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header's length, in the flags' top byte.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

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
    let node = SUBNETS
        .get(&Key::new(32, ip.dst))
        .copied()
        .ok_or(DropReason::NoLeaseForDestination)?;
    let inner = skb.read::<20>(ETH_HLEN).ok_or(DropReason::EncapFailed)?;
    // SAFETY: helpers on this program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let headers = vxlan::headers(&Encap {
        src: overlay.public_ip,
        dst: node.public_ip,
        src_port: vxlan::source_port(hash),
        dst_port: overlay.port,
        vni: overlay.vni,
        inner_src_mac: overlay.vtep_mac,
        inner_dst_mac: node.vtep_mac,
        ip_id: u16::from_be_bytes([inner[4], inner[5]]),
        tos: inner[1],
        inner_len: ctx.len() - ETH_HLEN as u32,
    });
    let flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        | ENCAP_L2_ETH_LEN;
    // Kernels before 5.12 refuse the L2_ETH flag (it marks the inner protocol as Ethernet for
    // GSO); without it they still segment right: the inner MAC length says where IPv4 starts.
    ctx.adjust_room(vxlan::ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .or_else(|_| {
            let older = flags & !u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH);
            ctx.adjust_room(vxlan::ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, older)
        })
        .map_err(|_| DropReason::EncapFailed)?;
    ctx.store(ETH_HLEN, &headers, 0)
        .map_err(|_| DropReason::EncapFailed)?;
    forward(ctx, overlay.public_ip, node.public_ip)
}

/// Addresses the outer Ethernet header to the next hop towards `dst` and sends the packet on:
/// out of this device when the route says so, else redirected to the one it names.
#[inline(always)]
fn forward(ctx: &TcContext, src: [u8; 4], dst: [u8; 4]) -> Result<i32, DropReason> {
    // SAFETY: `bpf_fib_lookup` is plain data; all-zero is its documented initial state.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // SAFETY: reading a field of this program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.family = AF_INET;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `fib` is a valid, initialised lookup structure of the size passed.
    let found = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match found as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&fib.dmac);
            macs[6..].copy_from_slice(&fib.smac);
            ctx.store(0, &macs, 0)
                .map_err(|_| DropReason::EncapFailed)?;
            if fib.ifindex == ifindex {
                Ok(TC_ACT_UNSPEC)
            } else {
                // SAFETY: a helper taking plain integers.
                Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
            }
        }
        // The next hop is known but not yet resolved: let the kernel resolve it and send.
        // SAFETY: a helper taking an interface index and no parameters.
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        _ => Err(DropReason::NoRouteToNode),
    }
}
