//! Connection tracking in the datapath: find or create a connection's FORWARD entry for client
//! packets, and find its REPLY entry for replies. The rules (states, timeouts) live in
//! `weft_common::conntrack` so the agent applies the same ones.
//!
//! Two connections must never meet on one tuple at the endpoint: a pod's connection to a
//! service and its direct one to the endpoint behind it can have the same client port, and so
//! can its connections to two services with a common endpoint. As netfilter does, the second to
//! open is given another client port on the wire ([`weft_common::conntrack::moved_port`]): a
//! new service connection whose endpoint tuple is taken, and a direct connection from a pod
//! whose tuple a tracked one holds (which is then tracked too, as a connection to itself).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use weft_common::{
    conntrack::{
        PORT_MOVES, REFRESH_INTERVAL_NS, flags, is_expired, keeps_class, moved_port, next_state,
        opens, reopens, reply_opens_anew, tcp_closed,
    },
    drop_reason::DropReason,
    ip_proto,
    maps::{CtKey, CtValue, EndpointValue},
    packet::tcp_flags,
};

use crate::maps::CONNTRACK;

/// The endpoint a new connection goes to, and whether the service asks for masquerade.
pub(crate) struct Choice {
    pub(crate) endpoint: EndpointValue,
    pub(crate) masquerade: bool,
}

/// Where a client packet goes, from which client port, and whether it must be masqueraded.
pub(crate) struct Forward {
    pub(crate) addr: [u8; 4],
    pub(crate) port: u16,
    /// The client's port on the wire: its own unless it was moved.
    pub(crate) client_port: u16,
    pub(crate) masquerade: bool,
}

/// What a reply of a tracked connection gets back: the frontend as its source, and the
/// client's own port as its destination.
pub(crate) struct Reply {
    pub(crate) frontend: ([u8; 4], u16),
    pub(crate) client_port: u16,
}

/// 1 when the kernel has `bpf_ktime_get_coarse_ns` (Linux 5.11+), set by the agent as it
/// loads the programs. Read-only, so the verifier knows its value and drops the branch not
/// taken: older kernels load the programs too.
#[unsafe(no_mangle)]
static HAS_COARSE_CLOCK: u8 = 0;

/// Monotonic time, the clock the agent compares `last_seen_ns` against: the coarse one (the
/// last tick's time, read without touching the clock source) where the kernel has it, since
/// conntrack's timeouts are seconds and the timestamp is written at most once a second.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: reading a global the loader wrote; helper calls with no arguments.
    unsafe {
        if core::ptr::read_volatile(&raw const HAS_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// The translation for a client packet (`key` is its tuple towards a frontend): the
/// connection's endpoint if it is tracked and live, else the one `choose` picks for a new
/// connection, tracked both ways. `held` says whether a socket holds a REPLY tuple that
/// conntrack does not (a pod's direct connection, see `sock`).
#[inline(always)]
pub(crate) fn forward(
    key: &CtKey,
    tcp: u8,
    now: u64,
    choose: impl FnOnce() -> Result<Choice, DropReason>,
    held: impl Fn(&CtKey) -> bool,
) -> Result<Forward, DropReason> {
    let replaced = match follow(key, tcp, now) {
        Ok(forward) => return Ok(forward),
        Err(replaced) => replaced,
    };
    let choice = choose()?;
    track(key, tcp, &choice, now, replaced.as_ref(), held)
}

/// The translation of the live tracked connection a client packet (`key`) belongs to, its
/// state updated; otherwise the closed or expired entry on the tuple, if any.
#[inline(always)]
fn follow(key: &CtKey, tcp: u8, now: u64) -> Result<Forward, Option<CtValue>> {
    let entry = CONNTRACK.get_ptr_mut(key).ok_or(None)?;
    // SAFETY: the pointer comes from a successful lookup of a preallocated LRU slot; fields
    // are read and written individually, and a racing writer on another CPU can only make a
    // state bit or a timestamp one packet stale.
    let current = unsafe { *entry };
    if is_expired(key.proto, current.flags, current.last_seen_ns, now)
        || reopens(current.flags, key.proto, tcp)
    {
        return Err(Some(current));
    }
    let next = next_state(current.flags, key.proto, tcp, false);
    if next != current.flags || now.saturating_sub(current.last_seen_ns) > REFRESH_INTERVAL_NS {
        // SAFETY: as above.
        unsafe {
            (*entry).flags = next;
            (*entry).last_seen_ns = now;
        }
    }
    Ok(Forward::from_entry(key, &current))
}

/// The client port on the wire for a direct packet from a pod (`key`, whose destination is no
/// frontend): moved if its connection is tracked because its tuple clashed with a tracked
/// connection's, or if this packet opens it on such a tuple; `None` for the rest, which is
/// left alone (one lookup for most: the connection's FORWARD entry, which is not there).
#[inline(always)]
pub(crate) fn direct(
    key: &CtKey,
    tcp: u8,
    now: u64,
    held: impl Fn(&CtKey) -> bool,
) -> Result<Option<u16>, DropReason> {
    let replaced = match follow(key, tcp, now) {
        Ok(forward) => return Ok(Some(forward.client_port)),
        Err(replaced) => replaced,
    };
    if !opens(key.proto, tcp) {
        return Ok(None);
    }
    let itself = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        ..CtValue::default()
    };
    if !reply_taken(&CtKey::reply_of(key, &itself), key, now) {
        if let Some(old) = replaced {
            // A new connection on a tuple that clashes no more: the closed or expired one's
            // move must not catch its later packets.
            let _ = CONNTRACK.remove(key);
            let _ = CONNTRACK.remove(CtKey::reply_of(key, &old));
        }
        return Ok(None);
    }
    let choice = Choice {
        endpoint: EndpointValue {
            addr: key.dst_addr,
            port: key.dst_port,
            _pad: 0,
        },
        masquerade: false,
    };
    track(key, tcp, &choice, now, replaced.as_ref(), held).map(|forward| Some(forward.client_port))
}

impl Forward {
    #[inline(always)]
    fn from_entry(key: &CtKey, entry: &CtValue) -> Self {
        Self {
            addr: entry.nat_addr,
            port: entry.nat_port,
            client_port: moved_port(key.src_port, entry.port_move),
            masquerade: entry.flags & flags::MASQUERADE != 0,
        }
    }
}

/// The move of `key`'s client port that keeps a new connection to `endpoint` apart from every
/// live connection at the endpoint, tracked or `held`: 0 when its own tuple is free.
#[inline(always)]
fn free_port_move(
    key: &CtKey,
    endpoint: &EndpointValue,
    now: u64,
    held: impl Fn(&CtKey) -> bool,
) -> Result<u8, DropReason> {
    let mut forward = CtValue {
        nat_addr: endpoint.addr,
        nat_port: endpoint.port,
        ..CtValue::default()
    };
    for port_move in 0..=PORT_MOVES {
        if port_move != 0 && !keeps_class(key.src_port, port_move) {
            continue;
        }
        forward.port_move = port_move;
        let reply_key = CtKey::reply_of(key, &forward);
        if !reply_taken(&reply_key, key, now) && !held(&reply_key) {
            return Ok(port_move);
        }
    }
    Err(DropReason::TupleInUse)
}

/// Whether the REPLY tuple `reply_key` belongs to a live connection other than the one from
/// `forward_key`: one not closed, whose FORWARD entry still leads to it.
#[inline(always)]
fn reply_taken(reply_key: &CtKey, forward_key: &CtKey, now: u64) -> bool {
    // SAFETY: the pointers come from successful lookups; the values are copied out at once.
    let Some(reply) = CONNTRACK.get_ptr(reply_key).map(|entry| unsafe { *entry }) else {
        return false;
    };
    let owner = CtKey::forward_of(reply_key, &reply);
    if owner == *forward_key {
        return false;
    }
    CONNTRACK.get_ptr(owner).is_some_and(|entry| {
        // SAFETY: as above.
        let forward = unsafe { *entry };
        CtKey::reply_of(&owner, &forward) == *reply_key
            && !is_expired(owner.proto, forward.flags, forward.last_seen_ns, now)
            && !(owner.proto == ip_proto::TCP && tcp_closed(forward.flags))
    })
}

/// Records a new connection from `key` to the chosen endpoint, FORWARD then REPLY, in place of
/// the closed or expired connection `replaced` on the same tuple, if any (whose REPLY entry
/// goes with it: [`reply`] trusts a REPLY entry it checked recently). A connection whose first
/// packets reach two CPUs at once is tracked by whichever inserts first; the other follows its
/// choice, so every packet of the connection goes to one endpoint.
#[inline(always)]
fn track(
    key: &CtKey,
    tcp: u8,
    choice: &Choice,
    now: u64,
    replaced: Option<&CtValue>,
    held: impl Fn(&CtKey) -> bool,
) -> Result<Forward, DropReason> {
    let replacing = replaced.is_some();
    let endpoint = &choice.endpoint;
    // Besides what the service asks for, a hairpin (an endpoint reaching itself) is
    // masqueraded, or its own stack would drop the "martian" packet whose source is its own
    // address.
    let masquerade = choice.masquerade || endpoint.addr == key.src_addr;
    let initial = if masquerade { flags::MASQUERADE } else { 0 };
    let forward = CtValue {
        nat_addr: endpoint.addr,
        nat_port: endpoint.port,
        flags: next_state(initial, key.proto, tcp, false),
        port_move: free_port_move(key, endpoint, now, held)?,
        last_seen_ns: now,
    };
    // An expired or closed entry is replaced; a fresh one must not overwrite a racing CPU's.
    let mode = if replacing { BPF_ANY } else { BPF_NOEXIST };
    if CONNTRACK.insert(key, forward, u64::from(mode)).is_err() {
        if replacing {
            return Err(DropReason::ConntrackInsertFailed);
        }
        let winner = CONNTRACK
            .get_ptr(key)
            .ok_or(DropReason::ConntrackInsertFailed)?;
        // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
        return Ok(Forward::from_entry(key, &unsafe { *winner }));
    }
    let reply_key = CtKey::reply_of(key, &forward);
    if let Some(old) = replaced {
        let old_reply_key = CtKey::reply_of(key, old);
        if old_reply_key != reply_key {
            let _ = CONNTRACK.remove(old_reply_key);
        }
    }
    let reply = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        flags: 0,
        port_move: forward.port_move,
        last_seen_ns: now,
    };
    if CONNTRACK
        .insert(reply_key, reply, u64::from(BPF_ANY))
        .is_err()
    {
        // Nothing half-tracked: without its REPLY the connection's replies could not be restored.
        let _ = CONNTRACK.remove(key);
        return Err(DropReason::ConntrackInsertFailed);
    }
    Ok(Forward::from_entry(key, &forward))
}

/// What to restore in a reply whose tuple is `key`, if it belongs to a live tracked
/// connection that still leads to this endpoint. A REPLY entry whose connection is gone,
/// expired or now leads elsewhere (its client port was reused), or that a SYN-ACK finds closed
/// (a direct connection reusing the tuple), is stale: it is removed and the packet left alone,
/// so direct traffic between the same two sockets is never rewritten. The reply's state (first
/// reply, FIN, RST) and time go to the FORWARD entry.
///
/// One lookup for most replies: the REPLY entry keeps the connection's state as of the last
/// time a reply found its FORWARD entry live, and when. A reply that carries no SYN, FIN or RST,
/// within a refresh interval of that check, on an answered connection, is restored from the
/// REPLY entry alone: nothing it could change is stale. The FORWARD entry was live then and its
/// time refreshed, so it cannot expire in between (timeouts are seconds); a new connection on
/// the tuple removes this REPLY entry ([`track`]); the agent removes both entries together.
#[inline(always)]
pub(crate) fn reply(key: &CtKey, tcp: u8, now: u64) -> Option<Reply> {
    let entry_ptr = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: see `follow`.
    let entry = unsafe { *entry_ptr };
    if entry.flags & flags::SEEN_REPLY != 0
        && !control_segment(key.proto, tcp)
        && now.saturating_sub(entry.last_seen_ns) <= REFRESH_INTERVAL_NS
    {
        return Some(Reply::from_entry(key, &entry));
    }
    let forward_key = CtKey::forward_of(key, &entry);
    let live = CONNTRACK.get_ptr_mut(forward_key).filter(|forward| {
        // SAFETY: see `follow`.
        let forward = unsafe { **forward };
        CtKey::reply_of(&forward_key, &forward) == *key
            && !is_expired(key.proto, forward.flags, forward.last_seen_ns, now)
            && !reply_opens_anew(forward.flags, key.proto, tcp)
    });
    let Some(forward) = live else {
        let _ = CONNTRACK.remove(key);
        return None;
    };
    // SAFETY: see `follow`.
    unsafe {
        let state = (*forward).flags;
        let next = next_state(state, key.proto, tcp, true);
        if next != state || now.saturating_sub((*forward).last_seen_ns) > REFRESH_INTERVAL_NS {
            (*forward).flags = next;
            (*forward).last_seen_ns = now;
        }
        (*entry_ptr).flags = next;
        (*entry_ptr).last_seen_ns = now;
    }
    Some(Reply::from_entry(key, &entry))
}

impl Reply {
    #[inline(always)]
    fn from_entry(key: &CtKey, entry: &CtValue) -> Self {
        Self {
            frontend: (entry.nat_addr, entry.nat_port),
            client_port: moved_port(key.dst_port, entry.port_move),
        }
    }
}

/// The frontend of the live connection whose replies have the tuple `key`, for an ICMP error
/// about one of its packets or a later fragment of a reply: the REPLY entry, if its FORWARD
/// entry is live and still leads to this endpoint (as [`reply`] judges it). Neither changes
/// its state.
#[inline(always)]
pub(crate) fn related_reply(key: &CtKey, now: u64) -> Option<Reply> {
    // SAFETY: the pointers come from successful lookups; the values are copied out at once.
    let entry = unsafe { *CONNTRACK.get_ptr(key)? };
    let forward_key = CtKey::forward_of(key, &entry);
    let forward = unsafe { *CONNTRACK.get_ptr(forward_key)? };
    (CtKey::reply_of(&forward_key, &forward) == *key
        && !is_expired(key.proto, forward.flags, forward.last_seen_ns, now))
    .then(|| Reply::from_entry(key, &entry))
}

/// Where the live connection whose client packets have the tuple `key` goes, for an ICMP error
/// about one of its replies or a later fragment of a client's datagram (whose first fragment
/// updated the connection). Neither changes its state.
#[inline(always)]
pub(crate) fn related_forward(key: &CtKey, now: u64) -> Option<Forward> {
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    let forward = unsafe { *CONNTRACK.get_ptr(key)? };
    (!is_expired(key.proto, forward.flags, forward.last_seen_ns, now))
        .then(|| Forward::from_entry(key, &forward))
}

/// Whether a packet may change its connection's state: a TCP segment with SYN, FIN or RST.
#[inline(always)]
fn control_segment(proto: u8, tcp: u8) -> bool {
    proto == ip_proto::TCP && tcp & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0
}
