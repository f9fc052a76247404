//! ICMP errors about service connections (destination unreachable, fragmentation needed among
//! its codes, time exceeded, parameter problem). An error quotes the header of the packet it is
//! about, and for a translated connection that header holds the translated addresses, which the
//! socket at the other end never saw: it would ignore the error, and path MTU discovery through
//! a service would stall. netfilter's NAT rewrites such errors as it rewrites the connection's
//! packets, and so does this:
//!
//! - an error about a client's packet (from the endpoint, or a router on the way to it), on its
//!   way to the client: the quoted destination becomes the frontend again, and so does the
//!   outer source when the endpoint sent it;
//! - an error about a reply (from the client, or a router on the way to it), on its way to the
//!   frontend: the quoted source and the outer destination become the endpoint.
//!
//! The quoted IPv4 checksum, the quoted TCP or UDP checksum (when the quote holds it; a UDP
//! checksum of 0 stays 0), the ICMP checksum and the outer IPv4 checksum are updated
//! incrementally. A quoted SCTP CRC32c stays as it is: it covers the whole packet, which the
//! quote does not hold. An error whose connection is not tracked or had its client port moved
//! (see `ct`), one that quotes no ports, a fragmented one or one cut short is left alone.

use aya_ebpf::programs::TcContext;
use weft_common::{
    csum,
    drop_reason::DropReason,
    maps::{CtKey, ct_direction},
    packet::{
        ETH_HLEN, Ipv4Header, PacketBytes as _, Quoted, icmp, ipv4, l4, l4_checksum_offset,
        parse_icmp_error,
    },
};

use crate::{ct, nat::Side, packet::Loaded};

/// An error about a client's packet, on its way to the client: restores the frontend.
#[inline(always)]
pub(crate) fn to_client(ctx: &TcContext, ip: &Ipv4Header) -> Result<(), DropReason> {
    // The quoted packet went from the client to the endpoint: its reverse is a reply's tuple.
    let Some((quote, key)) = answering(ctx, ip, ct_direction::REPLY) else {
        return Ok(());
    };
    let Some(reply) = ct::related_reply(&key, ct::now_ns()).filter(|reply| {
        // A connection whose client port was moved is left alone: its quote would need both
        // ends rewritten.
        reply.client_port == key.dst_port
    }) else {
        return Ok(());
    };
    let outer = (ip.src == quote.dst).then_some(Side::Source);
    rewrite(ctx, ip, &quote, Side::Destination, reply.frontend, outer)
}

/// An error about a reply, on its way to the frontend: sends it on to the endpoint.
#[inline(always)]
pub(crate) fn to_endpoint(ctx: &TcContext, ip: &Ipv4Header) -> Result<(), DropReason> {
    // The quoted reply went from the frontend to the client: its reverse is the client's tuple.
    let Some((quote, key)) = answering(ctx, ip, ct_direction::FORWARD) else {
        return Ok(());
    };
    let Some(endpoint) = ct::related_forward(&key, ct::now_ns())
        .filter(|endpoint| endpoint.client_port == key.src_port)
    else {
        return Ok(());
    };
    rewrite(
        ctx,
        ip,
        &quote,
        Side::Source,
        (endpoint.addr, endpoint.port),
        Some(Side::Destination),
    )
}

/// The quote of the error in `ip`, if the error is addressed to the quoted packet's sender (as
/// a genuine one is), and the conntrack key, in `direction`, of the packets that answer it.
#[inline(always)]
fn answering(ctx: &TcContext, ip: &Ipv4Header, direction: u8) -> Option<(Quoted, CtKey)> {
    let quote = quoted(ctx, ip).filter(|quote| ip.dst == quote.src)?;
    let key = CtKey {
        src_addr: quote.dst,
        dst_addr: quote.src,
        src_port: quote.dst_port,
        dst_port: quote.src_port,
        proto: quote.proto,
        direction,
        _pad: [0; 2],
    };
    Some((quote, key))
}

/// The datagram the error in `ip` quotes; `None` for anything else, or an error the frame does
/// not hold whole (the stack would drop it) or whose length ends before the quoted ports.
#[inline(always)]
fn quoted(ctx: &TcContext, ip: &Ipv4Header) -> Option<Quoted> {
    if ip.total_len == 0 || ETH_HLEN + usize::from(ip.total_len) > ctx.len() as usize {
        return None;
    }
    let datagram_end = ETH_HLEN + usize::from(ip.total_len);
    // Quoted ports past the datagram's end would be frame padding, not a quote.
    parse_icmp_error(&Loaded(ctx), ip).filter(|quote| quote.l4_offset + 4 <= datagram_end)
}

/// Writes `bytes` at `at` with the store helper (the checksums are updated by hand).
#[inline(always)]
fn store<const N: usize>(ctx: &TcContext, at: usize, bytes: [u8; N]) -> Result<(), DropReason> {
    ctx.store(at, &bytes, 0)
        .map_err(|_| DropReason::NatRewriteFailed)
}

/// Rewrites the quoted packet's `side` (address and port) to `new`, and the outer header's
/// `outer` address to `new`'s address, with every checksum that covers them.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4Header,
    quote: &Quoted,
    side: Side,
    new: ([u8; 4], u16),
    outer: Option<Side>,
) -> Result<(), DropReason> {
    let failed = DropReason::NatRewriteFailed;
    let skb = Loaded(ctx);
    let (addr_at, port_at) = match side {
        Side::Source => (
            quote.ip_offset + ipv4::SRC_ADDR,
            quote.l4_offset + l4::SRC_PORT,
        ),
        Side::Destination => (
            quote.ip_offset + ipv4::DST_ADDR,
            quote.l4_offset + l4::DST_PORT,
        ),
    };
    let ip_checksum_at = quote.ip_offset + ipv4::CHECKSUM;
    let icmp_checksum_at = ip.l4_offset + icmp::CHECKSUM;
    let datagram_end = ETH_HLEN + usize::from(ip.total_len);
    let old_addr = skb.read::<4>(addr_at).ok_or(failed)?;
    let old_port = skb.read::<2>(port_at).ok_or(failed)?;
    let old_ip_checksum = skb.read::<2>(ip_checksum_at).ok_or(failed)?;
    let icmp_checksum = skb.read::<2>(icmp_checksum_at).ok_or(failed)?;
    let new_port = new.1.to_be_bytes();
    let new_ip_checksum = csum::replace(u16::from_be_bytes(old_ip_checksum), &old_addr, &new.0);
    // The quoted transport checksum, when quoted and in use: it covers the addresses (through
    // the pseudo-header) and the ports.
    let l4_checksum = l4_checksum_offset(quote.proto)
        .map(|(offset, zero_is_none)| (quote.l4_offset + offset, zero_is_none))
        .filter(|(at, _)| at + 2 <= datagram_end)
        .and_then(|(at, zero_is_none)| {
            let field = skb.read::<2>(at)?;
            (!(zero_is_none && field == [0, 0])).then_some((at, zero_is_none, field))
        });
    let (l4_checksum_at, old_l4_checksum, new_l4_checksum) = match l4_checksum {
        Some((at, zero_is_none, field)) => {
            let [a, b, c, d] = old_addr;
            let [e, f, g, h] = new.0;
            let mut updated = csum::replace(
                u16::from_be_bytes(field),
                &[a, b, c, d, old_port[0], old_port[1]],
                &[e, f, g, h, new_port[0], new_port[1]],
            );
            if zero_is_none && updated == 0 {
                updated = 0xffff;
            }
            (Some(at), field, updated.to_be_bytes())
        }
        None => (None, [0; 2], [0; 2]),
    };
    // Every quoted field that changes sits at an even offset of the ICMP message, which its
    // checksum covers in 16-bit words.
    let [a, b, c, d] = old_addr;
    let [e, f, g, h] = new.0;
    let new_icmp_checksum = csum::replace(
        u16::from_be_bytes(icmp_checksum),
        &[
            a,
            b,
            c,
            d,
            old_ip_checksum[0],
            old_ip_checksum[1],
            old_port[0],
            old_port[1],
            old_l4_checksum[0],
            old_l4_checksum[1],
        ],
        &[
            e,
            f,
            g,
            h,
            new_ip_checksum.to_be_bytes()[0],
            new_ip_checksum.to_be_bytes()[1],
            new_port[0],
            new_port[1],
            new_l4_checksum[0],
            new_l4_checksum[1],
        ],
    );
    store(ctx, addr_at, new.0)?;
    store(ctx, port_at, new_port)?;
    store(ctx, ip_checksum_at, new_ip_checksum.to_be_bytes())?;
    store(ctx, icmp_checksum_at, new_icmp_checksum.to_be_bytes())?;
    if let Some(at) = l4_checksum_at {
        store(ctx, at, new_l4_checksum)?;
    }
    if let Some(outer) = outer {
        let outer_at = ETH_HLEN
            + match outer {
                Side::Source => ipv4::SRC_ADDR,
                Side::Destination => ipv4::DST_ADDR,
            };
        let old_outer = skb.read::<4>(outer_at).ok_or(failed)?;
        let outer_checksum = skb.read::<2>(ETH_HLEN + ipv4::CHECKSUM).ok_or(failed)?;
        let outer_checksum = csum::replace(u16::from_be_bytes(outer_checksum), &old_outer, &new.0);
        store(ctx, outer_at, new.0)?;
        store(ctx, ETH_HLEN + ipv4::CHECKSUM, outer_checksum.to_be_bytes())?;
    }
    Ok(())
}
