//! Service lookup and endpoint selection, shared by the TC and socket paths.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use weft_common::{
    drop_reason::DropReason,
    maps::{EndpointKey, EndpointValue, ServiceKey, ServiceValue},
};

use crate::maps::{ENDPOINTS, SERVICES};

/// The service behind a frontend, if `addr:port/proto` is one.
#[inline(always)]
pub(crate) fn frontend(addr: [u8; 4], port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    SERVICES.get_ptr(key).map(|value| unsafe { *value })
}

/// Picks an endpoint at random with equal odds, as kube-proxy's `statistic` rules do.
///
/// Returns `NoEndpoints` for a service without endpoints and `EndpointSlotMissing` when the
/// slot vanished under a concurrent shrink and slot 0 is gone too.
#[inline(always)]
pub(crate) fn pick_endpoint(service: &ServiceValue) -> Result<EndpointValue, DropReason> {
    if service.count == 0 {
        return Err(DropReason::NoEndpoints);
    }
    // SAFETY: a helper call with no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.count;
    let key = EndpointKey {
        service_id: service.id,
        slot,
    };
    let first = EndpointKey {
        service_id: service.id,
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
