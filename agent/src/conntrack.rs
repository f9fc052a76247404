//! The agent's view of the conntrack map: reading it for `weft inspect`, and collecting the
//! entries of connections that expired. The datapath already treats expired entries as absent;
//! collection only gives their space back before LRU eviction would.

use std::{collections::HashMap, path::Path};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use weft_common::{
    conntrack::is_expired,
    maps::{CONNTRACK_MAP, CtKey, CtValue, ct_direction},
};

use crate::maps::{MapReadError, errno, open_pinned};

/// The FORWARD key a REPLY entry belongs to.
#[must_use]
pub fn forward_key_of(reply_key: &CtKey, reply: &CtValue) -> CtKey {
    CtKey {
        src_addr: reply_key.dst_addr,
        dst_addr: reply.nat_addr,
        src_port: reply_key.dst_port,
        dst_port: reply.nat_port,
        proto: reply_key.proto,
        direction: ct_direction::FORWARD,
        _pad: [0; 2],
    }
}

/// The REPLY key of a FORWARD entry.
#[must_use]
pub fn reply_key_of(forward_key: &CtKey, forward: &CtValue) -> CtKey {
    CtKey {
        src_addr: forward.nat_addr,
        dst_addr: forward_key.src_addr,
        src_port: forward.nat_port,
        dst_port: forward_key.src_port,
        proto: forward_key.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    }
}

/// The entries to delete at `now_ns`: expired connections (both entries), and REPLY entries
/// whose connection is gone or now leads elsewhere (its tuple was reused).
#[must_use]
pub fn garbage(entries: &[(CtKey, CtValue)], now_ns: u64) -> Vec<CtKey> {
    let forwards: HashMap<CtKey, CtValue> = entries
        .iter()
        .filter(|(key, _)| key.direction == ct_direction::FORWARD)
        .copied()
        .collect();
    let live = |key: &CtKey, value: &CtValue| {
        !is_expired(key.proto, value.flags, value.last_seen_ns, now_ns)
    };
    entries
        .iter()
        .filter(|(key, value)| match key.direction {
            ct_direction::FORWARD => !live(key, value),
            _ => {
                let forward_key = forward_key_of(key, value);
                !forwards.get(&forward_key).is_some_and(|forward| {
                    live(&forward_key, forward) && reply_key_of(&forward_key, forward) == *key
                })
            }
        })
        .map(|(key, _)| *key)
        .collect()
}

/// The conntrack map of a loaded or pinned dataplane.
pub struct Conntrack {
    map: BpfHashMap<MapData, CtKey, CtValue>,
}

impl Conntrack {
    /// Takes the map out of a loaded object.
    pub fn take_from(ebpf: &mut aya::Ebpf) -> Result<Self, MapError> {
        let map = ebpf
            .take_map(CONNTRACK_MAP)
            .ok_or_else(|| MapError::InvalidName {
                name: CONNTRACK_MAP.to_owned(),
            })?;
        Ok(Self {
            map: BpfHashMap::try_from(map)?,
        })
    }

    /// Opens the map an agent pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            map: BpfHashMap::try_from(open_pinned(pin_dir, CONNTRACK_MAP)?)?,
        })
    }

    /// Every entry. Entries that vanish while being read (evicted, collected) are skipped.
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>, MapReadError> {
        let mut entries = Vec::new();
        for item in self.map.iter() {
            match item {
                Ok(entry) => entries.push(entry),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(MapReadError {
                        map: CONNTRACK_MAP,
                        source,
                    });
                }
            }
        }
        Ok(entries)
    }

    /// Deletes the garbage at `now_ns`; returns how many entries went.
    pub fn collect_garbage(&mut self, now_ns: u64) -> Result<usize, MapReadError> {
        let garbage = garbage(&self.entries()?, now_ns);
        let mut removed = 0;
        for key in &garbage {
            match self.map.remove(key) {
                Ok(()) => removed += 1,
                // Evicted or reused meanwhile; either way it is not ours to report.
                Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(MapReadError {
                        map: CONNTRACK_MAP,
                        source,
                    });
                }
            }
        }
        Ok(removed)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use weft_common::{
        conntrack::{TCP_ESTABLISHED_TIMEOUT_NS, UDP_TIMEOUT_NS, flags},
        ip_proto,
    };

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
            _pad: 0,
            last_seen_ns: last_seen,
        };
        let reply = CtValue {
            nat_addr: forward_key.dst_addr,
            nat_port: forward_key.dst_port,
            flags: flags::SEEN_REPLY,
            _pad: 0,
            last_seen_ns: last_seen,
        };
        [
            (forward_key, forward),
            (reply_key_of(&forward_key, &forward), reply),
        ]
    }

    #[test]
    fn keys_derive_both_ways() {
        let [(fk, fv), (rk, rv)] = connection(40000, 6, ip_proto::TCP, 0, NOW);
        assert_eq!(forward_key_of(&rk, &rv), fk);
        assert_eq!(reply_key_of(&fk, &fv), rk);
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
        assert!(garbage(&entries, NOW).is_empty());
    }

    #[test]
    fn expired_connections_go_with_both_entries() {
        let entries = connection(40000, 6, ip_proto::UDP, 0, NOW - UDP_TIMEOUT_NS - 1);
        let mut expected: Vec<_> = entries.iter().map(|(k, _)| *k).collect();
        let mut found = garbage(&entries, NOW);
        expected.sort();
        found.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn orphaned_and_superseded_replies_go() {
        let [_, orphan] = connection(40000, 6, ip_proto::TCP, 0, NOW);
        // The client port was reused: FORWARD now leads to .7, the old REPLY from .6 is stale.
        let [old_forward, stale_reply] = connection(40001, 6, ip_proto::TCP, 0, NOW);
        let [mut new_forward, new_reply] = connection(40001, 7, ip_proto::TCP, 0, NOW);
        new_forward.0 = old_forward.0;
        let entries = [orphan, stale_reply, new_forward, new_reply];
        let mut found = garbage(&entries, NOW);
        found.sort();
        let mut expected = vec![orphan.0, stale_reply.0];
        expected.sort();
        assert_eq!(found, expected);
    }
}
