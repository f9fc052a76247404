//! The agent's view of the connection maps: reading conntrack for `weft inspect`, collecting
//! the entries of connections that expired (the datapath already treats them as absent;
//! collection gives their space back before LRU eviction would), and purging UDP flows whose
//! endpoint left its service, so their clients move to a live endpoint (kube-proxy's
//! stale-UDP-conntrack clean-up, including the node's own sockets).
//!
//! A sweep reads the map entry by entry while the datapath keeps writing, so every deletion
//! re-reads its entry first and leaves it when it changed since the read, and REPLY entries
//! created after the sweep began are never taken for orphans.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use weft_common::{
    conntrack::is_expired,
    ip_proto,
    maps::{
        CONNTRACK_MAP, CtKey, CtValue, EndpointValue, SOCK_NAT_MAP, ServiceKey, SockNatKey,
        SockNatValue, ct_direction,
    },
};

use crate::{
    datapath::maps::{MapOpenError, MapReadError, MapSource, errno},
    model::UdpEndpoints,
};

/// How long a REPLY entry may exist without its FORWARD before it counts as an orphan: the
/// datapath writes the two one after the other, and a sweep may read them on either side.
pub const ORPHAN_GRACE_NS: u64 = 2_000_000_000;

/// The entries to delete at `now_ns`: expired connections (both entries), and REPLY entries
/// older than `sweep_start_ns` less the grace whose connection is gone or now leads elsewhere.
#[must_use]
pub fn garbage(entries: &[(CtKey, CtValue)], now_ns: u64, sweep_start_ns: u64) -> Vec<CtKey> {
    let forwards: HashMap<CtKey, CtValue> = entries
        .iter()
        .filter(|(key, _)| key.direction == ct_direction::FORWARD)
        .copied()
        .collect();
    let live = |key: &CtKey, value: &CtValue| {
        !is_expired(key.proto, value.flags, value.last_seen_ns, now_ns)
    };
    let settled = sweep_start_ns.saturating_sub(ORPHAN_GRACE_NS);
    entries
        .iter()
        .filter(|(key, value)| match key.direction {
            ct_direction::FORWARD => !live(key, value),
            _ => {
                let forward_key = CtKey::forward_of(key, value);
                value.last_seen_ns < settled
                    && !forwards.get(&forward_key).is_some_and(|forward| {
                        live(&forward_key, forward)
                            && CtKey::reply_of(&forward_key, forward) == *key
                    })
            }
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Whether going from `before` to `after` took an endpoint away from a UDP frontend (or took
/// the frontend away), so flows may be left pointing at it.
#[must_use]
pub fn lost_udp_endpoints(before: &UdpEndpoints, after: &UdpEndpoints) -> bool {
    before.iter().any(|(frontend, endpoints)| {
        after
            .get(frontend)
            .is_none_or(|now| endpoints.iter().any(|endpoint| !now.contains(endpoint)))
    })
}

fn leads_to_valid(
    valid: &UdpEndpoints,
    frontend_addr: [u8; 4],
    frontend_port: u16,
    endpoint_addr: [u8; 4],
    endpoint_port: u16,
) -> bool {
    let frontend = ServiceKey {
        addr: frontend_addr,
        port: frontend_port,
        proto: ip_proto::UDP,
        _pad: 0,
    };
    let endpoint = EndpointValue {
        addr: endpoint_addr,
        port: endpoint_port,
        _pad: 0,
    };
    valid
        .get(&frontend)
        .is_some_and(|endpoints| endpoints.contains(&endpoint))
}

/// UDP connections whose endpoint is no longer one of their frontend's (both entries). A direct
/// connection tracked only because its client port was moved (it leads to its own destination)
/// has no frontend and stays.
#[must_use]
pub fn stale_udp_connections(entries: &[(CtKey, CtValue)], valid: &UdpEndpoints) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, value)| {
            key.direction == ct_direction::FORWARD
                && key.proto == ip_proto::UDP
                && (value.nat_addr, value.nat_port) != (key.dst_addr, key.dst_port)
                && !leads_to_valid(
                    valid,
                    key.dst_addr,
                    key.dst_port,
                    value.nat_addr,
                    value.nat_port,
                )
        })
        .flat_map(|(key, value)| [*key, CtKey::reply_of(key, value)])
        .collect()
}

/// The node's UDP sockets whose sticky endpoint is no longer one of their frontend's.
#[must_use]
pub fn stale_udp_sockets(
    entries: &[(SockNatKey, SockNatValue)],
    valid: &UdpEndpoints,
) -> Vec<SockNatKey> {
    entries
        .iter()
        .filter(|(key, value)| {
            key.direction == ct_direction::FORWARD
                && key.proto == ip_proto::UDP
                && !leads_to_valid(valid, key.addr, key.port, value.addr, value.port)
        })
        .map(|(key, _)| *key)
        .collect()
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Entries deleted as expired.
    pub removed: usize,
    /// Entries left (as read during the sweep).
    pub remaining: usize,
}

/// The connection maps of a loaded or pinned dataplane.
pub struct Conntrack {
    map: BpfHashMap<MapData, CtKey, CtValue>,
    sockets: BpfHashMap<MapData, SockNatKey, SockNatValue>,
}

impl Conntrack {
    /// Takes the maps out of a loaded object, or opens an agent's pins.
    pub fn open(source: &mut impl MapSource) -> Result<Self, MapOpenError> {
        Ok(Self {
            map: source.hash(CONNTRACK_MAP)?,
            sockets: source.hash(SOCK_NAT_MAP)?,
        })
    }

    /// Every conntrack entry. Entries that vanish while being read are skipped.
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>, MapReadError> {
        read_tolerantly(&self.map, CONNTRACK_MAP.name())
    }

    /// The entry under `key`, if there is one.
    pub fn get(&self, key: &CtKey) -> Result<Option<CtValue>, MapError> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the entries under `keys` (absent ones are fine).
    pub fn remove(&mut self, keys: &[CtKey]) -> Result<(), MapError> {
        for key in keys {
            match self.map.remove(key) {
                Err(e) if errno(&e) != Some(libc::ENOENT) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes what has expired by now.
    pub fn collect_garbage(&mut self) -> Result<Sweep, MapReadError> {
        let sweep_start = monotonic_now_ns();
        let entries = self.entries()?;
        let garbage = garbage(&entries, monotonic_now_ns(), sweep_start);
        let removed = remove_unchanged(&mut self.map, &entries, &garbage, CONNTRACK_MAP.name())?;
        Ok(Sweep {
            removed,
            remaining: entries.len() - removed,
        })
    }

    /// Deletes UDP flows (conntrack and the node's sockets) whose endpoint is not in `valid`;
    /// returns how many entries went.
    pub fn purge_udp(&mut self, valid: &UdpEndpoints) -> Result<usize, MapReadError> {
        let entries = self.entries()?;
        let stale = stale_udp_connections(&entries, valid);
        let mut removed = remove_unchanged(&mut self.map, &entries, &stale, CONNTRACK_MAP.name())?;
        let sockets = read_tolerantly(&self.sockets, SOCK_NAT_MAP.name())?;
        let stale = stale_udp_sockets(&sockets, valid);
        removed += remove_unchanged(&mut self.sockets, &sockets, &stale, SOCK_NAT_MAP.name())?;
        Ok(removed)
    }
}

fn read_tolerantly<K: aya::Pod, V: aya::Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapReadError> {
    let mut entries = Vec::new();
    for item in map.iter() {
        match item {
            Ok(entry) => entries.push(entry),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(MapReadError { map: name, source }),
        }
    }
    Ok(entries)
}

/// Deletes each key of `doomed` whose value is still what `snapshot` read, so an entry the
/// datapath refreshed or recreated since is left alone.
fn remove_unchanged<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod + PartialEq>(
    map: &mut BpfHashMap<MapData, K, V>,
    snapshot: &[(K, V)],
    doomed: &[K],
    name: &'static str,
) -> Result<usize, MapReadError> {
    let read: HashMap<K, V> = snapshot.iter().copied().collect();
    let mut removed = 0;
    for key in doomed {
        let Ok(current) = map.get(key, 0) else {
            continue;
        };
        if read.get(key) != Some(&current) {
            continue;
        }
        match map.remove(key) {
            Ok(()) => removed += 1,
            // Evicted meanwhile; either way it is gone.
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(source) => return Err(MapReadError { map: name, source }),
        }
    }
    Ok(removed)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock the datapath stamps conntrack with
/// (`bpf_ktime_get_coarse_ns()`; on kernels without it, `bpf_ktime_get_ns()`, the same clock
/// at most a tick ahead, which the timeouts of seconds never notice).
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use weft_common::conntrack::{TCP_ESTABLISHED_TIMEOUT_NS, UDP_TIMEOUT_NS, flags, moved_port};

    use super::*;

    const NOW: u64 = 1_000 * 1_000_000_000_000;

    fn connection(
        client_port: u16,
        backend: u8,
        proto: u8,
        state: u8,
        last_seen: u64,
    ) -> [(CtKey, CtValue); 2] {
        let forward_key = CtKey {
            src_addr: [172, 30, 20, 9],
            dst_addr: [10, 254, 40, 119],
            src_port: client_port,
            dst_port: 4432,
            proto,
            direction: ct_direction::FORWARD,
            _pad: [0; 2],
        };
        let forward = CtValue {
            nat_addr: [172, 30, 20, backend],
            nat_port: 80,
            flags: state,
            port_move: 0,
            last_seen_ns: last_seen,
        };
        let reply = CtValue {
            nat_addr: forward_key.dst_addr,
            nat_port: forward_key.dst_port,
            flags: flags::SEEN_REPLY,
            port_move: 0,
            last_seen_ns: last_seen,
        };
        [
            (forward_key, forward),
            (CtKey::reply_of(&forward_key, &forward), reply),
        ]
    }

    #[test]
    fn keys_derive_both_ways() {
        let [(fk, fv), (rk, rv)] = connection(40000, 6, ip_proto::TCP, 0, NOW);
        assert_eq!(CtKey::forward_of(&rk, &rv), fk);
        assert_eq!(CtKey::reply_of(&fk, &fv), rk);
    }

    #[test]
    fn live_connections_stay() {
        let entries = connection(
            40000,
            6,
            ip_proto::TCP,
            flags::SEEN_REPLY,
            NOW - TCP_ESTABLISHED_TIMEOUT_NS,
        );
        assert!(garbage(&entries, NOW, NOW).is_empty());
    }

    #[test]
    fn expired_connections_go_with_both_entries() {
        let entries = connection(40000, 6, ip_proto::UDP, 0, NOW - UDP_TIMEOUT_NS - 1);
        let mut expected: Vec<_> = entries.iter().map(|(k, _)| *k).collect();
        let mut found = garbage(&entries, NOW, NOW);
        expected.sort();
        found.sort();
        assert_eq!(found, expected);
    }

    /// A connection whose client port was moved, and a direct one moved out of its way.
    fn moved(mut connection: [(CtKey, CtValue); 2], port_move: u8) -> [(CtKey, CtValue); 2] {
        let [(forward_key, mut forward), (_, mut reply)] = connection;
        forward.port_move = port_move;
        reply.port_move = port_move;
        connection = [
            (forward_key, forward),
            (CtKey::reply_of(&forward_key, &forward), reply),
        ];
        connection
    }

    #[test]
    fn moved_connections_keep_both_entries_and_their_keys_derive_both_ways() {
        let [(fk, fv), (rk, rv)] = moved(connection(40000, 6, ip_proto::TCP, 0, NOW), 1);
        assert_eq!(rk.dst_port, moved_port(40000, 1));
        assert_eq!(CtKey::forward_of(&rk, &rv), fk);
        let old = NOW - 3 * ORPHAN_GRACE_NS;
        let entries = moved(
            connection(40000, 6, ip_proto::TCP, flags::SEEN_REPLY, old),
            1,
        );
        assert!(garbage(&entries, NOW, NOW).is_empty(), "{fv:?}");
    }

    #[test]
    fn a_udp_purge_leaves_direct_connections_that_were_moved() {
        let [(service_key, service), _] = connection(40000, 6, ip_proto::UDP, 0, NOW);
        let direct_key = CtKey {
            dst_addr: service.nat_addr,
            dst_port: service.nat_port,
            ..service_key
        };
        let direct = CtValue {
            port_move: 1,
            ..service
        };
        let entries = [(service_key, service), (direct_key, direct)];
        // No UDP frontend is valid any more: the service's connection goes, the direct one not.
        let stale = stale_udp_connections(&entries, &UdpEndpoints::new());
        assert_eq!(
            stale,
            [service_key, CtKey::reply_of(&service_key, &service)]
        );
    }

    #[test]
    fn orphaned_and_superseded_replies_go() {
        let old = NOW - 3 * ORPHAN_GRACE_NS;
        let [_, orphan] = connection(40000, 6, ip_proto::TCP, 0, old);
        // The client port was reused: FORWARD now leads to .7, the old REPLY from .6 is stale.
        let [old_forward, stale_reply] = connection(40001, 6, ip_proto::TCP, 0, old);
        let [mut new_forward, new_reply] = connection(40001, 7, ip_proto::TCP, 0, NOW);
        new_forward.0 = old_forward.0;
        let entries = [orphan, stale_reply, new_forward, new_reply];
        let mut found = garbage(&entries, NOW, NOW);
        found.sort();
        let mut expected = vec![orphan.0, stale_reply.0];
        expected.sort();
        assert_eq!(found, expected);
    }
}
