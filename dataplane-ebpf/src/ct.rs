//! Connection tracking in the datapath: find or create a connection's FORWARD entry for client
//! packets, and find its REPLY entry for replies. The rules (states, timeouts) live in
//! `weft_common::conntrack` so the agent applies the same ones.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use weft_common::{
    conntrack::{REFRESH_INTERVAL_NS, flags, is_expired, next_state, reopens},
    drop_reason::DropReason,
    maps::{CtKey, CtValue, DatapathConfig, EndpointValue, ServiceValue, ct_direction},
    packet::tcp_flags,
};

use crate::{lb, maps::CONNTRACK};

/// Where a client packet goes and whether it must be masqueraded.
pub(crate) struct Forward {
    pub(crate) addr: [u8; 4],
    pub(crate) port: u16,
    pub(crate) masquerade: bool,
}

/// Monotonic time, the clock the agent compares `last_seen_ns` against.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: a helper call with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The translation for a client packet (`key` is its tuple towards `service`'s frontend):
/// the connection's endpoint if it is tracked and live, else a new endpoint, tracked both ways.
#[inline(always)]
pub(crate) fn forward(
    key: &CtKey,
    tcp: u8,
    service: &ServiceValue,
    config: &DatapathConfig,
    now: u64,
) -> Result<Forward, DropReason> {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup of a preallocated LRU slot; fields
        // are read and written individually, and a racing writer on another CPU can only make
        // a state bit or a timestamp one packet stale.
        let (state, last_seen, addr, port) = unsafe {
            (
                (*entry).flags,
                (*entry).last_seen_ns,
                (*entry).nat_addr,
                (*entry).nat_port,
            )
        };
        if !is_expired(key.proto, state, last_seen, now) && !reopens(state, key.proto, tcp) {
            let next = next_state(state, key.proto, tcp, false);
            if next != state || now.saturating_sub(last_seen) > REFRESH_INTERVAL_NS {
                // SAFETY: as above.
                unsafe {
                    (*entry).flags = next;
                    (*entry).last_seen_ns = now;
                }
            }
            return Ok(Forward {
                addr,
                port,
                masquerade: state & flags::MASQUERADE != 0,
            });
        }
    }
    let endpoint = lb::pick_endpoint(service)?;
    track(key, tcp, &endpoint, config, now)
}

/// Records a new connection from `key` to `endpoint`: REPLY first, so reverse NAT is ready
/// before any packet can reach the endpoint.
#[inline(always)]
fn track(
    key: &CtKey,
    tcp: u8,
    endpoint: &EndpointValue,
    config: &DatapathConfig,
    now: u64,
) -> Result<Forward, DropReason> {
    // Off-cluster clients are masqueraded so replies return through this node; a hairpin
    // (an endpoint reaching itself) is masqueraded or its own stack would drop the "martian"
    // packet whose source is its own address.
    let masquerade = !config.in_cluster(key.src_addr) || endpoint.addr == key.src_addr;
    let reply_key = CtKey {
        src_addr: endpoint.addr,
        dst_addr: key.src_addr,
        src_port: endpoint.port,
        dst_port: key.src_port,
        proto: key.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    let reply = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let initial = if masquerade { flags::MASQUERADE } else { 0 };
    let forward = CtValue {
        nat_addr: endpoint.addr,
        nat_port: endpoint.port,
        flags: next_state(initial, key.proto, tcp, false),
        _pad: 0,
        last_seen_ns: now,
    };
    CONNTRACK
        .insert(reply_key, reply, u64::from(BPF_ANY))
        .and_then(|()| CONNTRACK.insert(key, forward, u64::from(BPF_ANY)))
        .map_err(|_| DropReason::ConntrackInsertFailed)?;
    Ok(Forward {
        addr: endpoint.addr,
        port: endpoint.port,
        masquerade,
    })
}

/// The frontend to restore in a reply whose tuple is `key`, if it belongs to a tracked
/// connection. Propagates the reply's state to FORWARD on the first reply, on FIN/RST and at most
/// once per refresh interval otherwise.
#[inline(always)]
pub(crate) fn reply(key: &CtKey, tcp: u8, now: u64) -> Option<([u8; 4], u16)> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: see `forward`.
    let (frontend_addr, frontend_port, state, last_refresh) = unsafe {
        (
            (*entry).nat_addr,
            (*entry).nat_port,
            (*entry).flags,
            (*entry).last_seen_ns,
        )
    };
    let closing = tcp & (tcp_flags::FIN | tcp_flags::RST) != 0;
    if state & flags::SEEN_REPLY == 0
        || closing
        || now.saturating_sub(last_refresh) > REFRESH_INTERVAL_NS
    {
        let forward_key = CtKey {
            src_addr: key.dst_addr,
            dst_addr: frontend_addr,
            src_port: key.dst_port,
            dst_port: frontend_port,
            proto: key.proto,
            direction: ct_direction::FORWARD,
            _pad: [0; 2],
        };
        if let Some(forward) = CONNTRACK.get_ptr_mut(forward_key) {
            // SAFETY: see `forward`.
            unsafe {
                (*forward).flags = next_state((*forward).flags, key.proto, tcp, true);
                (*forward).last_seen_ns = now;
            }
        }
        // SAFETY: see `forward`.
        unsafe {
            (*entry).flags = flags::SEEN_REPLY;
            (*entry).last_seen_ns = now;
        }
    }
    Some((frontend_addr, frontend_port))
}
