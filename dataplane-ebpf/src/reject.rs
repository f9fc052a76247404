//! Rejecting connections to a service port with no endpoints, as kube-proxy's `REJECT` rules
//! do: the packet itself becomes the answer (see `weft_common::reject`) and goes back out of the
//! interface it came in on, to the client.
//!
//! The answer keeps the skb's checksum state. On a veth (the pods' ports, a test uplink) the
//! peer accepts it as the sender's stack would; from a physical NIC the skb never carries a
//! partial checksum, and the answer's checksums are complete.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use weft_common::{
    ip_proto,
    packet::{ETH_HLEN, Ipv4Header, ipv4, tcp_flags},
    reject::{self, ICMP_HEADERS_LEN, ICMP_QUOTE_LEN, TCP_RESET_LEN},
};

/// Turns the packet into its rejection and sends it back; returns the TC action (the packet
/// is dropped when it cannot be answered: a reset, a fragment, an IPv4 header with options).
#[inline(always)]
pub(crate) fn answer(ctx: &TcContext, ip: &Ipv4Header) -> i32 {
    let answered = match ip.proto {
        ip_proto::TCP => tcp_reset(ctx, ip),
        ip_proto::UDP | ip_proto::SCTP => port_unreachable(ctx, ip),
        _ => None,
    };
    answered.unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn tcp_reset(ctx: &TcContext, ip: &Ipv4Header) -> Option<i32> {
    let tcp: [u8; 20] = ctx.load(ip.l4_offset).ok()?;
    // A reset is never answered (RFC 9293).
    if tcp[13] & tcp_flags::RST != 0 {
        return None;
    }
    let headers_len = (ip.l4_offset - ETH_HLEN) + usize::from(tcp[12] >> 4) * 4;
    let payload_len = u32::from(ip.total_len).saturating_sub(headers_len as u32);
    let reset = reject::tcp_reset(ip.src, ip.dst, &tcp, payload_len);
    resize(ctx, ETH_HLEN + TCP_RESET_LEN)?;
    ctx.store(ETH_HLEN, &reset, 0).ok()?;
    send_back(ctx)
}

#[inline(always)]
fn port_unreachable(ctx: &TcContext, ip: &Ipv4Header) -> Option<i32> {
    // The quote is a header without options and 8 bytes of the datagram.
    if ip.l4_offset != ETH_HLEN + ipv4::MIN_HEADER_LEN {
        return None;
    }
    let quote: [u8; ICMP_QUOTE_LEN] = ctx.load(ETH_HLEN).ok()?;
    let headers = reject::icmp_port_unreachable(&quote);
    resize(ctx, ETH_HLEN + ICMP_QUOTE_LEN)?;
    ctx.adjust_room(ICMP_HEADERS_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    ctx.store(ETH_HLEN, &headers, 0).ok()?;
    send_back(ctx)
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Option<()> {
    // SAFETY: a helper on this program's own context.
    (unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } == 0).then_some(())
}

/// Swaps the Ethernet addresses and sends the frame out of the interface it arrived on.
#[inline(always)]
fn send_back(ctx: &TcContext) -> Option<i32> {
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;
    // SAFETY: reading a field of this program's context, then a helper taking plain integers.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
