//! Every map the programs use. Names, kinds, key/value types and capacities are defined once in
//! `weft_common::maps` (`SERVICES_MAP`, ...); `btf_map` needs its name as a literal, so the
//! agent's unit test `the_object_holds_exactly_the_maps_and_programs_common_defines` checks
//! each map here against its definition. Capacities here are defaults the agent overrides at
//! load time (`--max-services`, `--max-endpoints`, `--ct-entries`). All maps are pinned by the
//! agent, so their contents survive its restarts.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use weft_common::{
    drop_reason::{DROP_REASON_COUNT, DropReason},
    maps::{
        AffinityKey, AffinityValue, CtKey, CtValue, DEFAULT_AFFINITY_ENTRIES, DEFAULT_CT_ENTRIES,
        DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SERVICES, DEFAULT_SOCK_NAT_ENTRIES, DatapathConfig,
        EndpointKey, EndpointMemberKey, EndpointValue, FRAGMENT_ENTRIES, FragKey, FragValue,
        LocalPod, MAX_LOCAL_PODS, MAX_NODES, MAX_SOURCE_RANGES, OverlayConfig, RemoteNode,
        ServiceKey, ServiceName, ServiceValue, SockNatKey, SockNatValue, SourceRangeKey, Vtep,
    },
};

/// Service frontends. Written by the agent (after the frontend's endpoint slots); read per new
/// connection. When full, the agent reports the services that did not fit.
#[btf_map(name = "weft_svc_v2")]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_MAX_SERVICES as usize }> =
    HashMap::new();

/// Endpoint slots of each endpoint set. Written by the agent; read per new connection.
#[btf_map(name = "weft_ep_v1")]
pub(crate) static ENDPOINTS: HashMap<
    EndpointKey,
    EndpointValue,
    { DEFAULT_MAX_ENDPOINTS as usize },
> = HashMap::new();

/// Whose each endpoint set is, for `weft inspect` and the agent. Written by the agent; never
/// read by the programs, but declared here so it carries BTF and is pinned beside the maps it
/// describes.
#[btf_map(name = "weft_svcname_v2")]
pub(crate) static SERVICE_NAMES: HashMap<u32, ServiceName, { DEFAULT_MAX_SERVICES as usize }> =
    HashMap::new();

/// Which endpoints belong to which set, so session affinity never returns a client to an
/// endpoint that left. Written by the agent (after a slot, before its removal).
#[btf_map(name = "weft_epmember_v1")]
pub(crate) static ENDPOINT_MEMBERS: HashMap<
    EndpointMemberKey,
    u32,
    { DEFAULT_MAX_ENDPOINTS as usize },
> = HashMap::new();

/// ClientIP session affinity: the endpoint each client was last given, per set. Written per
/// new connection to a service with affinity; LRU, so the oldest clients go first when full.
#[btf_map(name = "weft_affinity_v1")]
pub(crate) static AFFINITY: LruHashMap<
    AffinityKey,
    AffinityValue,
    { DEFAULT_AFFINITY_ENTRIES as usize },
> = LruHashMap::new();

/// `loadBalancerSourceRanges` per load-balancer frontend. Written by the agent before the
/// frontend that needs them.
#[btf_map(name = "weft_srcrange_v1")]
pub(crate) static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Connection tracking (see `weft_common::conntrack`). Written by the datapath; expired entries
/// are removed by the agent. LRU: under pressure the least recently used entries go first.
#[btf_map(name = "weft_ct4_v1")]
pub(crate) static CONNTRACK: LruHashMap<CtKey, CtValue, { DEFAULT_CT_ENTRIES as usize }> =
    LruHashMap::new();

/// Translations of the node's own sockets. Written by the socket hooks; socket cookies are never
/// reused, so LRU eviction is the only cleanup needed.
#[btf_map(name = "weft_socknat_v1")]
pub(crate) static SOCK_NAT: LruHashMap<
    SockNatKey,
    SockNatValue,
    { DEFAULT_SOCK_NAT_ENTRIES as usize },
> = LruHashMap::new();

/// Fragmented datagrams of translated connections: the ports their later fragments are
/// translated by (see `frag`). Written per first fragment of such a datagram, and per later
/// fragment that comes before its first; LRU, and an entry older than the kernel's reassembly
/// timeout is ignored, so nothing needs removing.
#[btf_map(name = "weft_frag4_v1")]
pub(crate) static FRAGMENTS: LruHashMap<FragKey, FragValue, { FRAGMENT_ENTRIES as usize }> =
    LruHashMap::new();

/// Drop counters, one per `DropReason`, per CPU.
#[btf_map(name = "weft_drops_v4")]
pub(crate) static DROPS: PerCpuArray<u64, { DROP_REASON_COUNT as usize }> = PerCpuArray::new();

/// This node's pods by network namespace cookie: their addresses, for the socket hooks.
/// Written by the agent.
#[btf_map(name = "weft_podns_v1")]
pub(crate) static POD_NAMESPACES: HashMap<u64, [u8; 4], { MAX_LOCAL_PODS as usize }> =
    HashMap::new();

/// Node-wide settings, written by the agent before it attaches the programs.
#[btf_map(name = "weft_config_v1")]
pub(crate) static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Remote pod subnets by prefix (from the other nodes' leases). Written by the agent; read per
/// packet leaving through the uplink to the pod Network.
#[btf_map(name = "weft_subnets_v2")]
pub(crate) static SUBNETS: LpmTrie<[u8; 4], RemoteNode, { MAX_NODES as usize }> = LpmTrie::new();

/// Overlay members by PublicIP. Written by the agent; read per VXLAN packet for this node.
#[btf_map(name = "weft_vteps_v1")]
pub(crate) static VTEPS: HashMap<[u8; 4], Vtep, { MAX_NODES as usize }> = HashMap::new();

/// This node's overlay settings, written by the agent before it attaches the overlay programs.
#[btf_map(name = "weft_overlay_v2")]
pub(crate) static OVERLAY: Array<OverlayConfig, 1> = Array::new();

/// This node's pods, learned from what their ports receive from them (as a bridge learns its
/// forwarding table): where a packet from the overlay for one of them is delivered. Written
/// per packet only when a pod's port or MAC changed; the agent removes the pods of ports that
/// left. LRU, so a full table forgets the quietest pods, whose packets take the stack.
#[btf_map(name = "weft_pods_v1")]
pub(crate) static LOCAL_PODS: LruHashMap<[u8; 4], LocalPod, { MAX_LOCAL_PODS as usize }> =
    LruHashMap::new();

/// The pod ports whose device is a veth, the only kind `bpf_redirect_peer` delivers into (a
/// packet redirected to another kind is lost): only pods behind them are learned. The value is
/// the id of the pod's namespace, where its sockets are looked up (see `sock`). Written by the
/// agent as it attaches to ports and detaches from them.
#[btf_map(name = "weft_peerports_v2")]
pub(crate) static PEER_PORTS: HashMap<u32, u32, { MAX_LOCAL_PODS as usize }> = HashMap::new();

/// Counts a drop. Per-CPU, so a plain increment is exact.
#[inline(always)]
pub(crate) fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs (programs are not preempted on one CPU).
        unsafe { *counter += 1 };
    }
}

/// A TC verdict, or `TC_ACT_SHOT` for a drop, counted.
#[inline(always)]
pub(crate) fn verdict(outcome: Result<i32, DropReason>) -> i32 {
    outcome.unwrap_or_else(|reason| {
        count_drop(reason);
        TC_ACT_SHOT
    })
}

/// The node's settings; all-zero (nothing masqueraded for being off-cluster) before the agent
/// has written them.
#[inline(always)]
pub(crate) fn config() -> DatapathConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// The node's overlay settings (all-zero before the agent wrote them: no address is ours).
#[inline(always)]
pub(crate) fn overlay() -> OverlayConfig {
    OVERLAY.get(0).copied().unwrap_or_default()
}
