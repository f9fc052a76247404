//! Fragmented datagrams of translated connections. Only a datagram's first fragment carries
//! the ports that say which connection it belongs to; the later ones carry the addresses, the
//! protocol and the IP identification. As Cilium's IPv4 fragment map does, the first fragment
//! of a datagram that is translated leaves its ports under those four fields, and the later
//! fragments are translated by them (the address only: the transport checksum sits in the
//! first fragment, which has it updated).
//!
//! A later fragment that comes before its first goes on untranslated, as nothing yet says
//! whose it is; it leaves a mark, and the first fragment that finds it is dropped (counted):
//! the datagram could not be reassembled whole at the endpoint or the client anyway. Marks are
//! kept per direction of translation (client packets, replies), as a datagram may pass one
//! direction's hook untranslated, be reassembled and fragmented again by the node's stack,
//! and be translated by the other's: only the order its own hooks see counts.
//!
//! TCP and UDP only: an SCTP datagram's CRC32c covers the whole datagram, and a port change
//! moves it by an amount that depends on the datagram's length, which the first fragment does
//! not give. Its first fragment is dropped (counted).

use weft_common::{
    drop_reason::DropReason,
    ip_proto,
    maps::{FRAGMENT_TIMEOUT_NS, FragKey, FragValue, frag_state},
    packet::{ETH_HLEN, Ipv4Header, PacketBytes as _, Ports, ipv4},
};

use crate::{ct, maps::FRAGMENTS, packet::Skb};

/// The datagram `ip` is a fragment of, or `None` when the header is not readable.
#[inline(always)]
fn datagram(skb: &Skb<'_>, ip: &Ipv4Header, direction: u8) -> Option<FragKey> {
    let id = skb.read::<2>(ETH_HLEN + ipv4::IDENTIFICATION)?;
    Some(FragKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        id: u16::from_be_bytes(id),
        proto: ip.proto,
        direction,
    })
}

/// The entry of `key`, unless it is older than the kernel's reassembly timeout (an earlier
/// datagram's, whose identification was reused).
#[inline(always)]
fn current(key: &FragKey, now: u64) -> Option<FragValue> {
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    let entry = unsafe { *FRAGMENTS.get_ptr(key)? };
    (now.saturating_sub(entry.seen_ns) <= FRAGMENT_TIMEOUT_NS).then_some(entry)
}

/// Records the first fragment `ip` (with `ports`) of a datagram translated in `direction`
/// (a `ct_direction`), so its later fragments follow it; an error when later fragments came
/// first, or for SCTP.
#[inline(always)]
pub(crate) fn first(
    skb: &Skb<'_>,
    ip: &Ipv4Header,
    ports: &Ports,
    direction: u8,
) -> Result<(), DropReason> {
    if ip.proto == ip_proto::SCTP {
        return Err(DropReason::FragmentUntranslatable);
    }
    let key = datagram(skb, ip, direction).ok_or(DropReason::FragmentUntranslatable)?;
    let now = ct::now_ns();
    if current(&key, now).is_some_and(|entry| entry.state == frag_state::LATER_FIRST) {
        return Err(DropReason::FragmentUntranslatable);
    }
    let entry = FragValue {
        src_port: ports.src_port,
        dst_port: ports.dst_port,
        state: frag_state::TRANSLATED,
        _pad: [0; 3],
        seen_ns: now,
    };
    FRAGMENTS
        .insert(key, entry, 0)
        .map_err(|_| DropReason::FragmentUntranslatable)
}

/// The ports of the datagram whose later fragment `ip` is, if its first fragment was
/// translated in `direction`. A later fragment of a datagram nothing is known of yet leaves
/// the mark that its first fragment came late.
#[inline(always)]
pub(crate) fn later(skb: &Skb<'_>, ip: &Ipv4Header, direction: u8) -> Option<(u16, u16)> {
    if !matches!(ip.proto, ip_proto::TCP | ip_proto::UDP) {
        return None;
    }
    let key = datagram(skb, ip, direction)?;
    let now = ct::now_ns();
    match current(&key, now) {
        Some(entry) => {
            (entry.state == frag_state::TRANSLATED).then_some((entry.src_port, entry.dst_port))
        }
        None => {
            let mark = FragValue {
                state: frag_state::LATER_FIRST,
                seen_ns: now,
                ..FragValue::default()
            };
            let _ = FRAGMENTS.insert(key, mark, 0);
            None
        }
    }
}
