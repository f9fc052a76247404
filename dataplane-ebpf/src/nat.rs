//! Address and port rewriting with incremental checksum updates.
//!
//! The kernel helpers are used rather than open-coded checksum math because they also handle
//! `CHECKSUM_PARTIAL` skbs (veth traffic with offloads), where only the pseudo-header part of the
//! transport checksum may change.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weft_common::{
    drop_reason::DropReason,
    packet::{ETH_HLEN, Ipv4Header, ipv4, l4, l4_checksum_offset},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// Rewrites `side`'s address and port from `old` to `new` and fixes the IPv4 and TCP/UDP
/// checksums. A UDP checksum of 0 (none) stays 0.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4Header,
    side: Side,
    old: ([u8; 4], u16),
    new: ([u8; 4], u16),
) -> Result<(), DropReason> {
    let (addr_offset, port_offset) = match side {
        Side::Source => (ETH_HLEN + ipv4::SRC_ADDR, ip.l4_offset + l4::SRC_PORT),
        Side::Destination => (ETH_HLEN + ipv4::DST_ADDR, ip.l4_offset + l4::DST_PORT),
    };
    let (checksum, udp) = l4_checksum_offset(ip.proto).ok_or(DropReason::NatRewriteFailed)?;
    let checksum_offset = ip.l4_offset + checksum;
    let mangled_0 = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let failed = |_| DropReason::NatRewriteFailed;
    if old.0 != new.0 {
        // The helpers take the values exactly as they sit in the packet (network order).
        let from = u64::from(u32::from_ne_bytes(old.0));
        let to = u64::from(u32::from_ne_bytes(new.0));
        ctx.l4_csum_replace(
            checksum_offset,
            from,
            to,
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
        )
        .map_err(failed)?;
        ctx.l3_csum_replace(ETH_HLEN + ipv4::CHECKSUM, from, to, 4)
            .map_err(failed)?;
        ctx.store(addr_offset, &new.0, 0).map_err(failed)?;
    }
    if old.1 != new.1 {
        let to_bytes = new.1.to_be_bytes();
        let from = u64::from(u16::from_ne_bytes(old.1.to_be_bytes()));
        let to = u64::from(u16::from_ne_bytes(to_bytes));
        ctx.l4_csum_replace(checksum_offset, from, to, mangled_0 | 2)
            .map_err(failed)?;
        ctx.store(port_offset, &to_bytes, 0).map_err(failed)?;
    }
    Ok(())
}
