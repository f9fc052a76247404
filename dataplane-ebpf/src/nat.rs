//! Address and port rewriting with incremental checksum updates.
//!
//! The address, the port and the IPv4 header checksum (RFC 1624, computed inline) are written
//! straight into the packet. The transport checksum is updated by the kernel's helper, once for
//! the address (a pseudo-header change) and once for the port, because only the kernel knows
//! the skb's checksum state: for a `CHECKSUM_PARTIAL` skb (veth traffic with offloads) the
//! field holds the pseudo-header sum, which an address change must update and a port change
//! must not touch; for a `CHECKSUM_COMPLETE` one `skb->csum` must follow the address change.
//! One helper call cannot do both, and a wrong guess corrupts every offloaded packet.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weft_common::{
    crc32c, csum,
    drop_reason::DropReason,
    ip_proto,
    packet::{ETH_HLEN, Ipv4Header, PacketBytes as _, ipv4, l4, l4_checksum_offset},
};

use crate::packet::Skb;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// Rewrites `side`'s address and port from `old` to `new` and fixes the IPv4 and transport
/// checksums. A UDP checksum of 0 (none) stays 0.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4Header,
    side: Side,
    old: ([u8; 4], u16),
    new: ([u8; 4], u16),
) -> Result<(), DropReason> {
    let port_offset = match side {
        Side::Source => ip.l4_offset + l4::SRC_PORT,
        Side::Destination => ip.l4_offset + l4::DST_PORT,
    };
    let failed = |_| DropReason::NatRewriteFailed;
    let skb = Skb(ctx);
    // Direct stores first: the helpers below end direct access to the packet.
    rewrite_address(&skb, side, old.0, new.0)?;
    if ip.proto == ip_proto::SCTP {
        // SCTP's checksum covers no pseudo-header: only the port changes it.
        if old.1 != new.1 {
            rewrite_sctp_port(ctx, ip, port_offset, new.1)?;
        }
        return Ok(());
    }
    if old.1 != new.1 {
        skb.write(port_offset, new.1.to_be_bytes())
            .ok_or(DropReason::NatRewriteFailed)?;
    }
    let (checksum, udp) = l4_checksum_offset(ip.proto).ok_or(DropReason::NatRewriteFailed)?;
    let checksum_offset = ip.l4_offset + checksum;
    let mangled_0 = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if old.0 != new.0 {
        let (from, to) = (as_word(old.0), as_word(new.0));
        ctx.l4_csum_replace(
            checksum_offset,
            from,
            to,
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
        )
        .map_err(failed)?;
    }
    if old.1 != new.1 {
        let from = u64::from(u16::from_ne_bytes(old.1.to_be_bytes()));
        let to = u64::from(u16::from_ne_bytes(new.1.to_be_bytes()));
        ctx.l4_csum_replace(checksum_offset, from, to, mangled_0 | 2)
            .map_err(failed)?;
    }
    Ok(())
}

/// Rewrites `side`'s address from `old` to `new` and fixes the IPv4 header checksum: all a
/// later fragment needs, whose transport checksum (in the first fragment) covers the address.
#[inline(always)]
pub(crate) fn rewrite_address(
    skb: &Skb<'_>,
    side: Side,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let addr_offset = match side {
        Side::Source => ETH_HLEN + ipv4::SRC_ADDR,
        Side::Destination => ETH_HLEN + ipv4::DST_ADDR,
    };
    let checksum = skb
        .read::<2>(ETH_HLEN + ipv4::CHECKSUM)
        .ok_or(DropReason::NatRewriteFailed)?;
    let checksum = csum::replace(u16::from_be_bytes(checksum), &old, &new);
    skb.write(ETH_HLEN + ipv4::CHECKSUM, checksum.to_be_bytes())
        .and_then(|()| skb.write(addr_offset, new))
        .ok_or(DropReason::NatRewriteFailed)
}

/// An address as the checksum helpers take it: exactly as it sits in the packet.
#[inline(always)]
fn as_word(addr: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(addr))
}

/// Rewrites one SCTP port and updates the CRC32c incrementally (see `weft_common::crc32c`).
/// A checksum field of 0 is one the sending stack left for the device to fill in (SCTP's
/// `CHECKSUM_PARTIAL`): it is computed after this hook, over the rewritten packet, so it stays 0.
#[inline(always)]
fn rewrite_sctp_port(
    ctx: &TcContext,
    ip: &Ipv4Header,
    port_offset: usize,
    port: u16,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::NatRewriteFailed;
    let ports: [u8; 4] = ctx.load(ip.l4_offset).map_err(failed)?;
    let mut rewritten = ports;
    let at = port_offset - ip.l4_offset;
    let bytes = port.to_be_bytes();
    if at == l4::SRC_PORT {
        rewritten[0] = bytes[0];
        rewritten[1] = bytes[1];
    } else {
        rewritten[2] = bytes[0];
        rewritten[3] = bytes[1];
    }
    let checksum_offset = ip.l4_offset + l4::SCTP_CHECKSUM;
    let checksum: [u8; 4] = ctx.load(checksum_offset).map_err(failed)?;
    if checksum != [0; 4] {
        let sctp_len = u32::from(ip.total_len).saturating_sub((ip.l4_offset - ETH_HLEN) as u32);
        let updated =
            u32::from_le_bytes(checksum) ^ crc32c::ports_delta(ports, rewritten, sctp_len);
        ctx.store(checksum_offset, &updated.to_le_bytes(), 0)
            .map_err(failed)?;
    }
    ctx.store(ip.l4_offset, &rewritten, 0).map_err(failed)
}
