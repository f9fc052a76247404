//! Service lookup and endpoint selection, shared by the TC and socket paths.

use aya_ebpf::{bindings::BPF_ANY, btf_maps::lpm_trie::Key, helpers::bpf_get_prandom_u32};
use weft_common::{
    drop_reason::DropReason,
    maps::{
        AffinityKey, AffinityValue, EndpointKey, EndpointMemberKey, EndpointValue,
        SOURCE_RANGE_FRONTEND_BITS, Selection, ServiceKey, ServiceValue, SourceRangeKey,
        service_flags,
    },
};

use crate::maps::{AFFINITY, ENDPOINT_MEMBERS, ENDPOINTS, SERVICES, SOURCE_RANGES};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// The frontend key of `addr:port/proto`.
#[inline(always)]
pub(crate) fn frontend_key(addr: [u8; 4], port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    }
}

/// The service behind a frontend, if `key` is one.
#[inline(always)]
pub(crate) fn frontend(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    SERVICES.get_ptr(key).map(|value| unsafe { *value })
}

/// Whether `client` may open a connection to `frontend`: always, unless the frontend has
/// `loadBalancerSourceRanges` and none of them holds the client.
#[inline(always)]
pub(crate) fn source_allowed(
    frontend: &ServiceKey,
    service: &ServiceValue,
    client: [u8; 4],
) -> bool {
    if service.flags & service_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SOURCE_RANGE_FRONTEND_BITS + 32,
        SourceRangeKey {
            frontend: *frontend,
            source: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Whether `addr:port` is an endpoint of set `set_id`.
#[inline(always)]
pub(crate) fn is_member(set_id: u32, addr: [u8; 4], port: u16) -> bool {
    let member = EndpointMemberKey {
        set_id,
        addr,
        port,
        _pad: 0,
    };
    ENDPOINT_MEMBERS.get_ptr(member).is_some()
}

/// The endpoint for a new connection from `client` to the set `selection` chose: the one its
/// ClientIP affinity holds it to, while that is fresh and the endpoint still in the set; else
/// one at random with equal odds (as kube-proxy's `statistic` rules), remembered for affinity.
#[inline(always)]
pub(crate) fn pick(
    service: &ServiceValue,
    selection: &Selection,
    client: [u8; 4],
    now: u64,
) -> Result<EndpointValue, DropReason> {
    if selection.count == 0 {
        return Err(if service.flags & service_flags::REJECT != 0 {
            DropReason::NoEndpoints
        } else {
            DropReason::NoLocalEndpoints
        });
    }
    if service.affinity_timeout_s == 0 {
        return random_slot(selection);
    }
    let key = AffinityKey {
        set_id: selection.set_id,
        client,
    };
    if let Some(entry) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup of an LRU slot; a racing CPU can
        // only make the timestamp one connection stale.
        let held = unsafe { *entry };
        let fresh = now.saturating_sub(held.last_used_ns)
            <= u64::from(service.affinity_timeout_s) * NS_PER_SECOND;
        if fresh && is_member(selection.set_id, held.addr, held.port) {
            // SAFETY: as above.
            unsafe { (*entry).last_used_ns = now };
            return Ok(EndpointValue {
                addr: held.addr,
                port: held.port,
                _pad: 0,
            });
        }
    }
    let endpoint = random_slot(selection)?;
    let held = AffinityValue {
        addr: endpoint.addr,
        port: endpoint.port,
        _pad: 0,
        last_used_ns: now,
    };
    // A full LRU map evicts its oldest client; a failed insert only costs this client its
    // affinity for one connection.
    let _ = AFFINITY.insert(key, held, u64::from(BPF_ANY));
    Ok(endpoint)
}

/// A slot of the selected set at random.
///
/// Returns `EndpointSlotMissing` when the slot vanished under a concurrent shrink and slot 0
/// is gone too.
#[inline(always)]
fn random_slot(selection: &Selection) -> Result<EndpointValue, DropReason> {
    // SAFETY: a helper call with no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % selection.count;
    let key = EndpointKey {
        service_id: selection.set_id,
        slot,
    };
    let first = EndpointKey {
        service_id: selection.set_id,
        slot: 0,
    };
    // The agent lowers `count` before deleting slots, so a miss means this lookup raced a
    // shrink; slot 0 survives every shrink that leaves endpoints.
    let value = ENDPOINTS
        .get_ptr(key)
        .or_else(|| ENDPOINTS.get_ptr(first))
        .ok_or(DropReason::EndpointSlotMissing)?;
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    Ok(unsafe { *value })
}
