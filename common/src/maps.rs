//! BPF map names, keys and values.
//!
//! Conventions, which every type here follows:
//! - IPv4 addresses are `[u8; 4]` in network order (as on the wire), so `bpftool map dump`
//!   prints them as four readable octets.
//! - Ports are `u16` in **host** order, so dumps print `4432`, not `20497`; the datapath converts
//!   when it reads or writes a packet.
//! - Padding is explicit and always zero; the agent and the datapath build keys with
//!   `..Default::default()`-style constructors so hash lookups never see stray bytes.
//! - Map names carry a layout version (`_v1`). A change to a key or value layout bumps it, so a
//!   pinned map from an older weft is never read with the wrong layout.

use crate::conntrack::moved_port;

/// What kind of BPF map a map is: the kernel's `bpf_map_type` number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
}

/// Where a map's capacity comes from: this build, or one of the agent's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Fixed(u32),
    /// `--max-services`, [`DEFAULT_MAX_SERVICES`] unless set.
    Services,
    /// `--max-endpoints`, [`DEFAULT_MAX_ENDPOINTS`] unless set.
    Endpoints,
    /// `--ct-entries`, [`DEFAULT_CT_ENTRIES`] unless set.
    Conntrack,
}

impl Capacity {
    /// The capacity the eBPF object declares, before the agent's flags.
    #[must_use]
    pub const fn default_entries(self) -> u32 {
        match self {
            Self::Fixed(entries) => entries,
            Self::Services => DEFAULT_MAX_SERVICES,
            Self::Endpoints => DEFAULT_MAX_ENDPOINTS,
            Self::Conntrack => DEFAULT_CT_ENTRIES,
        }
    }
}

/// A map's facts without its types: what a pin must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The map's name in the object and its pin's name. It carries a layout version (`_v1`).
    pub name: &'static str,
    pub kind: MapKind,
    /// For an LPM trie, the prefix length (`u32`) and the key after it.
    pub key_size: usize,
    pub value_size: usize,
    pub capacity: Capacity,
}

/// A map's facts with its key and value types, so whoever opens it opens it with those. For an
/// LPM trie, `K` is the key after the prefix length.
pub struct MapDef<K, V> {
    pub spec: MapSpec,
    types: core::marker::PhantomData<fn() -> (K, V)>,
}

impl<K, V> MapDef<K, V> {
    const fn new(name: &'static str, kind: MapKind, capacity: Capacity) -> Self {
        let prefix_len = match kind {
            MapKind::LpmTrie => size_of::<u32>(),
            _ => 0,
        };
        Self {
            spec: MapSpec {
                name,
                kind,
                key_size: prefix_len + size_of::<K>(),
                value_size: size_of::<V>(),
                capacity,
            },
            types: core::marker::PhantomData,
        }
    }

    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.spec.name
    }
}

impl<K, V> Clone for MapDef<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for MapDef<K, V> {}

impl<K, V> core::fmt::Display for MapDef<K, V> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.spec.name)
    }
}

impl<K, V> core::fmt::Debug for MapDef<K, V> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.spec.fmt(f)
    }
}

/// Service frontends: [`ServiceKey`] -> [`ServiceValue`].
pub const SERVICES_MAP: MapDef<ServiceKey, ServiceValue> =
    MapDef::new("weft_svc_v2", MapKind::Hash, Capacity::Services);
/// Endpoint slots: [`EndpointKey`] -> [`EndpointValue`].
pub const ENDPOINTS_MAP: MapDef<EndpointKey, EndpointValue> =
    MapDef::new("weft_ep_v1", MapKind::Hash, Capacity::Endpoints);
/// Endpoint set names, read only by `weft inspect` and the agent: set id (host order) ->
/// [`ServiceName`].
pub const SERVICE_NAMES_MAP: MapDef<u32, ServiceName> =
    MapDef::new("weft_svcname_v2", MapKind::Hash, Capacity::Services);
/// The endpoint membership index: [`EndpointMemberKey`] -> slot (host order). Session
/// affinity checks here that a remembered endpoint still belongs to its set.
pub const ENDPOINT_MEMBERS_MAP: MapDef<EndpointMemberKey, u32> =
    MapDef::new("weft_epmember_v1", MapKind::Hash, Capacity::Endpoints);
/// ClientIP session affinity: [`AffinityKey`] -> [`AffinityValue`].
pub const AFFINITY_MAP: MapDef<AffinityKey, AffinityValue> = MapDef::new(
    "weft_affinity_v1",
    MapKind::LruHash,
    Capacity::Fixed(DEFAULT_AFFINITY_ENTRIES),
);
/// `loadBalancerSourceRanges`, an LPM trie: [`SourceRangeKey`] -> `u8` (1).
pub const SOURCE_RANGES_MAP: MapDef<SourceRangeKey, u8> = MapDef::new(
    "weft_srcrange_v1",
    MapKind::LpmTrie,
    Capacity::Fixed(MAX_SOURCE_RANGES),
);
/// Connection tracking: [`CtKey`] -> [`CtValue`].
pub const CONNTRACK_MAP: MapDef<CtKey, CtValue> =
    MapDef::new("weft_ct4_v1", MapKind::LruHash, Capacity::Conntrack);
/// Socket-level NAT of the host's own sockets: [`SockNatKey`] -> [`SockNatValue`].
pub const SOCK_NAT_MAP: MapDef<SockNatKey, SockNatValue> = MapDef::new(
    "weft_socknat_v1",
    MapKind::LruHash,
    Capacity::Fixed(DEFAULT_SOCK_NAT_ENTRIES),
);
/// Fragmented datagrams being translated: [`FragKey`] -> [`FragValue`]. A datagram's later
/// fragments carry no ports; they follow its first fragment by this entry.
pub const FRAGMENTS_MAP: MapDef<FragKey, FragValue> = MapDef::new(
    "weft_frag4_v1",
    MapKind::LruHash,
    Capacity::Fixed(FRAGMENT_ENTRIES),
);
/// Per-CPU drop counters, indexed by [`crate::drop_reason::DropReason`].
pub const DROPS_MAP: MapDef<u32, u64> = MapDef::new(
    "weft_drops_v4",
    MapKind::PerCpuArray,
    Capacity::Fixed(crate::drop_reason::DROP_REASON_COUNT),
);
/// The one-entry datapath configuration: `0` -> [`DatapathConfig`].
pub const CONFIG_MAP: MapDef<u32, DatapathConfig> =
    MapDef::new("weft_config_v1", MapKind::Array, Capacity::Fixed(1));

/// Remote pod subnets, an LPM trie: IPv4 prefix (network order) -> [`RemoteNode`].
pub const SUBNETS_MAP: MapDef<[u8; 4], RemoteNode> = MapDef::new(
    "weft_subnets_v2",
    MapKind::LpmTrie,
    Capacity::Fixed(MAX_NODES),
);
/// The overlay's members: a node's PublicIP (network order) -> [`Vtep`].
pub const VTEPS_MAP: MapDef<[u8; 4], Vtep> =
    MapDef::new("weft_vteps_v1", MapKind::Hash, Capacity::Fixed(MAX_NODES));
/// The one-entry overlay configuration: `0` -> [`OverlayConfig`].
pub const OVERLAY_MAP: MapDef<u32, OverlayConfig> =
    MapDef::new("weft_overlay_v2", MapKind::Array, Capacity::Fixed(1));
/// This node's pods as the datapath learned them from their ports: a pod's IPv4 address
/// (network order) -> [`LocalPod`].
pub const LOCAL_PODS_MAP: MapDef<[u8; 4], LocalPod> = MapDef::new(
    "weft_pods_v1",
    MapKind::LruHash,
    Capacity::Fixed(MAX_LOCAL_PODS),
);

/// This node's pods by network namespace, for the socket hooks: `bpf_get_netns_cookie()` of a
/// pod's namespace (`u64`, host order) -> the pod's IPv4 address (network order). A socket in
/// one of these namespaces is translated at `connect()`/`sendmsg()`, with the pod's address as
/// the client (affinity, source ranges), as the per-packet path would see it.
pub const POD_NAMESPACES_MAP: MapDef<u64, [u8; 4]> = MapDef::new(
    "weft_podns_v1",
    MapKind::Hash,
    Capacity::Fixed(MAX_LOCAL_PODS),
);

/// The pod ports whose device is a veth (its peer, the pod's end, in the pod's namespace):
/// ifindex (host order) -> `u32`, the id this node's namespace gives the pod's
/// (`link-netnsid`, host order), or [`NO_NETNS_ID`]. Only pods behind them are learned, as only
/// a veth can be delivered into with `bpf_redirect_peer`; a pod's sockets are looked up in its
/// namespace by that id, so a new service connection never takes the tuple of a direct one.
pub const PEER_PORTS_MAP: MapDef<u32, u32> = MapDef::new(
    "weft_peerports_v2",
    MapKind::Hash,
    Capacity::Fixed(MAX_LOCAL_PODS),
);

/// A [`PEER_PORTS_MAP`] value for a port whose peer's namespace has no id here.
pub const NO_NETNS_ID: u32 = u32::MAX;

/// Every map weft pins (all the object has), so the agent can check each pin before reusing it.
pub const PINNED_MAPS: [MapSpec; 17] = [
    SERVICES_MAP.spec,
    ENDPOINTS_MAP.spec,
    SERVICE_NAMES_MAP.spec,
    ENDPOINT_MEMBERS_MAP.spec,
    AFFINITY_MAP.spec,
    SOURCE_RANGES_MAP.spec,
    CONNTRACK_MAP.spec,
    SOCK_NAT_MAP.spec,
    FRAGMENTS_MAP.spec,
    DROPS_MAP.spec,
    CONFIG_MAP.spec,
    SUBNETS_MAP.spec,
    VTEPS_MAP.spec,
    OVERLAY_MAP.spec,
    LOCAL_PODS_MAP.spec,
    POD_NAMESPACES_MAP.spec,
    PEER_PORTS_MAP.spec,
];

/// Default capacity of [`SERVICES_MAP`] (frontends: one per service IP, port and protocol).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of [`ENDPOINTS_MAP`] (endpoint slots summed over all service ports).
pub const DEFAULT_MAX_ENDPOINTS: u32 = 262_144;
/// Default capacity of [`CONNTRACK_MAP`]; each connection takes two entries.
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;
/// Default capacity of [`SOCK_NAT_MAP`].
pub const DEFAULT_SOCK_NAT_ENTRIES: u32 = 65_536;
/// Capacity of [`FRAGMENTS_MAP`]: datagrams in flight in fragments at once (Cilium's default).
pub const FRAGMENT_ENTRIES: u32 = 8_192;
/// How long a fragmented datagram's entry holds: the kernel's reassembly timeout
/// (`net.ipv4.ipfrag_time`, 30 s). An older entry belongs to an earlier datagram that reused
/// the IP identification.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;
/// Capacity of [`SUBNETS_MAP`] and [`VTEPS_MAP`]: nodes in one cluster.
pub const MAX_NODES: u32 = 16_384;
/// Capacity of [`LOCAL_PODS_MAP`]: pods of one node (a /16 subnet's worth).
pub const MAX_LOCAL_PODS: u32 = 65_536;
/// Default capacity of [`AFFINITY_MAP`] (clients remembered per service with ClientIP affinity).
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;
/// Capacity of [`SOURCE_RANGES_MAP`] (source ranges summed over all load-balancer frontends).
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// A service frontend: the address, port and protocol clients connect to (a ClusterIP port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network order.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    /// IANA protocol number ([`crate::ip_proto`]).
    pub proto: u8,
    pub _pad: u8,
}

/// What a frontend leads to: the endpoint set new connections use, and how.
///
/// Written by the agent only after all `count` slots of `id` (and `cluster_count` slots of
/// `cluster_id`) exist in [`ENDPOINTS_MAP`], and lowered before slots are removed, so the
/// datapath never picks a slot that is not there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Endpoint set id (host order); never 0. A service port has one set of all its usable
    /// endpoints and, when a traffic policy is `Local`, one of this node's endpoints.
    pub id: u32,
    /// Number of endpoint slots `0..count` of set `id` (host order).
    pub count: u32,
    /// With [`service_flags::LOCAL_EXTERNAL`]: the cluster-wide set that clients inside the
    /// cluster (pods, the node) use instead of `id`, and its slot count (host order). 0 otherwise.
    pub cluster_id: u32,
    pub cluster_count: u32,
    /// ClientIP session affinity timeout in seconds (host order); 0: no affinity.
    pub affinity_timeout_s: u32,
    /// [`service_flags`] bits (host order).
    pub flags: u16,
    pub _pad: u16,
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// Every new connection is masqueraded: NodePorts, external IPs and load-balancer IPs with
    /// `externalTrafficPolicy: Cluster` (kube-proxy's `KUBE-EXT-*` chains mark them all).
    pub const MASQUERADE_ALL: u16 = 0x01;
    /// `externalTrafficPolicy: Local` on an external frontend: clients from outside the cluster
    /// reach this node's endpoints (set `id`) with their address preserved; pods and the node
    /// use the cluster-wide set (`cluster_id`), as kube-proxy short-circuits them.
    pub const LOCAL_EXTERNAL: u16 = 0x02;
    /// Only clients inside the frontend's `loadBalancerSourceRanges` may connect.
    pub const SOURCE_RANGES: u16 = 0x04;
    /// The service port has no usable endpoint anywhere: new connections are rejected (TCP RST,
    /// ICMP port unreachable) rather than dropped, as kube-proxy's "has no endpoints" rules do.
    /// An empty set without this bit (a `Local` policy with endpoints only on other nodes) drops.
    pub const REJECT: u16 = 0x08;
}

/// Which endpoints one endpoint set holds.
pub mod endpoint_scope {
    /// Every usable endpoint of the service port (after topology hints).
    pub const CLUSTER: u8 = 0;
    /// Only this node's endpoints (`internalTrafficPolicy` or `externalTrafficPolicy: Local`).
    pub const NODE_LOCAL: u8 = 1;
}

impl ServiceValue {
    /// The endpoint set a new connection from a client uses, and whether it is masqueraded for
    /// the service's sake (hairpin is decided once the endpoint is known). `client_in_cluster`:
    /// the client is a pod of the cluster or the node itself.
    #[inline(always)]
    #[must_use]
    pub const fn select(&self, client_in_cluster: bool) -> Selection {
        if self.flags & service_flags::LOCAL_EXTERNAL != 0 {
            return if client_in_cluster {
                Selection {
                    set_id: self.cluster_id,
                    count: self.cluster_count,
                    masquerade: false,
                }
            } else {
                Selection {
                    set_id: self.id,
                    count: self.count,
                    masquerade: false,
                }
            };
        }
        Selection {
            set_id: self.id,
            count: self.count,
            masquerade: self.flags & service_flags::MASQUERADE_ALL != 0 || !client_in_cluster,
        }
    }
}

/// The endpoint set a new connection uses: see [`ServiceValue::select`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub set_id: u32,
    pub count: u32,
    pub masquerade: bool,
}

/// One endpoint slot of an endpoint set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// The set's id ([`ServiceValue::id`]), host order.
    pub service_id: u32,
    /// Slot index in `0..ServiceValue::count`, host order.
    pub slot: u32,
}

/// The endpoint a slot holds: where the datapath DNATs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointValue {
    /// Endpoint (pod) IPv4 address, network order.
    pub addr: [u8; 4],
    /// Endpoint (target) port, host order.
    pub port: u16,
    pub _pad: u16,
}

/// Maximum lengths of the name parts (Kubernetes limits: DNS labels of 63, port names of 15).
pub const NAMESPACE_LEN: usize = 64;
pub const NAME_LEN: usize = 64;
pub const PORT_NAME_LEN: usize = 16;

/// Whose endpoint set an id is: for `weft inspect`, and for the agent to adopt the maps after a
/// restart. The datapath never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// Namespace, UTF-8, NUL-padded.
    pub namespace: [u8; NAMESPACE_LEN],
    /// Service name, UTF-8, NUL-padded.
    pub name: [u8; NAME_LEN],
    /// Service port name, UTF-8, NUL-padded; empty for an unnamed port.
    pub port_name: [u8; PORT_NAME_LEN],
    /// [`endpoint_scope`] of the set.
    pub scope: u8,
    pub _pad: [u8; 3],
}

/// An endpoint's membership in a set (the index session affinity checks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointMemberKey {
    /// The set's id, host order.
    pub set_id: u32,
    /// Endpoint IPv4 address, network order.
    pub addr: [u8; 4],
    /// Endpoint port, host order.
    pub port: u16,
    pub _pad: u16,
}

/// A client remembered by ClientIP session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The endpoint set's id, host order.
    pub set_id: u32,
    /// Client IPv4 address, network order.
    pub client: [u8; 4],
}

/// The endpoint a client is held to, and when it last opened a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// Endpoint IPv4 address, network order.
    pub addr: [u8; 4],
    /// Endpoint port, host order.
    pub port: u16,
    pub _pad: u16,
    /// CLOCK_MONOTONIC(_COARSE) nanoseconds of the client's last new connection (kube-proxy's `recent --set`:
    /// the timeout runs from the last connection, not the first).
    pub last_used_ns: u64,
}

/// A source range of a load-balancer frontend, as the data part of an LPM trie key: the
/// prefix length covers the whole frontend (64 bits) plus the range's own prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub frontend: ServiceKey,
    /// Range (or client) IPv4 address, network order.
    pub source: [u8; 4],
}

/// Bits of [`SourceRangeKey`] before the source address: an exact match on the frontend.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// Direction of a conntrack entry.
pub mod ct_direction {
    /// Keyed by the client's original tuple (client -> frontend); holds the chosen endpoint.
    pub const FORWARD: u8 = 0;
    /// Keyed by the reply tuple (endpoint -> client); holds the frontend to restore.
    pub const REPLY: u8 = 1;
}

/// A connection tuple as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source IPv4 address, network order.
    pub src_addr: [u8; 4],
    /// Destination IPv4 address, network order.
    pub dst_addr: [u8; 4],
    /// Source port, host order.
    pub src_port: u16,
    /// Destination port, host order.
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`ct_direction`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// A fragmented IPv4 datagram as one direction of translation sees it: its sender, receiver,
/// IP identification and protocol, as every one of its fragments carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// Source IPv4 address, network order.
    pub src_addr: [u8; 4],
    /// Destination IPv4 address, network order (the frontend, for a client's datagram).
    pub dst_addr: [u8; 4],
    /// The IP identification field, host order.
    pub id: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`ct_direction`]: a client's datagram (FORWARD) or a reply (REPLY). Each direction
    /// judges the order of fragments where it translates them: a hook that passes a datagram
    /// untranslated says nothing of the order another one sees.
    pub direction: u8,
}

/// What the datapath knows of a fragmented datagram: the states of a [`FragValue`].
pub mod frag_state {
    /// A later fragment came first, and went on untranslated: the datagram cannot be translated
    /// whole, so its first fragment is dropped when it comes (counted).
    pub const LATER_FIRST: u8 = 1;
    /// The first fragment was translated: the later ones follow it by its ports.
    pub const TRANSLATED: u8 = 2;
}

/// The ports of a fragmented datagram, from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// Source port, host order (0 for [`frag_state::LATER_FIRST`]).
    pub src_port: u16,
    /// Destination port, host order (0 for [`frag_state::LATER_FIRST`]).
    pub dst_port: u16,
    /// [`frag_state`].
    pub state: u8,
    pub _pad: [u8; 3],
    /// When the entry was written, `CLOCK_MONOTONIC` nanoseconds.
    pub seen_ns: u64,
}

/// Conntrack state. A connection is a FORWARD entry (authoritative: endpoint, state, age) plus a
/// REPLY entry (an index for reverse NAT); see [`crate::conntrack`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// FORWARD: the endpoint address. REPLY: the frontend address. Network order.
    pub nat_addr: [u8; 4],
    /// FORWARD: the endpoint port. REPLY: the frontend port. Host order.
    pub nat_port: u16,
    /// FORWARD: [`crate::conntrack::flags`] bits. REPLY: the FORWARD entry's bits as of the
    /// last time a reply found it live (0 before any did).
    pub flags: u8,
    /// How the client's port was moved on the wire to keep the connection's tuple apart from
    /// another's (netfilter's clash resolution), the same in both entries: 0 when it was not;
    /// see [`crate::conntrack::moved_port`].
    pub port_move: u8,
    /// CLOCK_MONOTONIC(_COARSE) nanoseconds. FORWARD: when a packet of the connection (either
    /// way) was last seen, refreshed at most once per [`crate::conntrack::REFRESH_INTERVAL_NS`].
    /// REPLY: when a reply last found the FORWARD entry live (its creation before any did).
    pub last_seen_ns: u64,
}

impl CtKey {
    /// The REPLY key of the connection whose FORWARD entry is (`forward_key`, `forward`): from
    /// its endpoint back to its client's port as the endpoint sees it.
    #[inline(always)]
    #[must_use]
    pub const fn reply_of(forward_key: &Self, forward: &CtValue) -> Self {
        Self {
            src_addr: forward.nat_addr,
            dst_addr: forward_key.src_addr,
            src_port: forward.nat_port,
            dst_port: moved_port(forward_key.src_port, forward.port_move),
            proto: forward_key.proto,
            direction: ct_direction::REPLY,
            _pad: [0; 2],
        }
    }

    /// The FORWARD key of the connection a REPLY entry (`reply_key`, `reply`) belongs to.
    #[inline(always)]
    #[must_use]
    pub const fn forward_of(reply_key: &Self, reply: &CtValue) -> Self {
        Self {
            src_addr: reply_key.dst_addr,
            dst_addr: reply.nat_addr,
            src_port: moved_port(reply_key.dst_port, reply.port_move),
            dst_port: reply.nat_port,
            proto: reply_key.proto,
            direction: ct_direction::FORWARD,
            _pad: [0; 2],
        }
    }
}

/// A host socket's translation (cgroup `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockNatKey {
    /// `bpf_get_socket_cookie()`, host order.
    pub cookie: u64,
    /// FORWARD: the frontend address. REPLY: the endpoint address. Network order.
    pub addr: [u8; 4],
    /// FORWARD: the frontend port. REPLY: the endpoint port. Host order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`ct_direction`].
    pub direction: u8,
}

/// The other side of a [`SockNatKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockNatValue {
    /// FORWARD: the endpoint address. REPLY: the frontend address. Network order.
    pub addr: [u8; 4],
    /// FORWARD: the endpoint port. REPLY: the frontend port. Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Node-wide settings the agent writes before it attaches any program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Cluster (pod) CIDR network address, network order. Sources outside it are masqueraded.
    pub cluster_cidr_addr: [u8; 4],
    /// Cluster CIDR prefix length; 0 (the default) counts every source as inside, so nothing is
    /// masqueraded for being off-cluster (kube-proxy without `--cluster-cidr` does the same).
    pub cluster_cidr_prefix_len: u8,
    pub _pad: [u8; 3],
    /// `bpf_get_netns_cookie()` of the node's network namespace, host order: the socket hooks
    /// translate sockets there and in the pods' namespaces of [`POD_NAMESPACES_MAP`] (other
    /// sockets are left to TC). 0 (a kernel that cannot tell the agent its cookie) translates
    /// sockets in every namespace, the node being the client.
    pub host_netns_cookie: u64,
}

impl DatapathConfig {
    /// Whether `addr` is inside the cluster CIDR, or could be: with no CIDR set, every address
    /// counts as inside (for masquerade: kube-proxy without `--cluster-cidr`).
    #[inline(always)]
    #[must_use]
    pub fn in_cluster(&self, addr: [u8; 4]) -> bool {
        prefix_contains(self.cluster_cidr_addr, self.cluster_cidr_prefix_len, addr)
    }

    /// Whether `addr` is known to be inside the cluster CIDR: with no CIDR set, nothing is. A
    /// client arriving from outside the node is treated as off-cluster unless this holds.
    #[inline(always)]
    #[must_use]
    pub fn known_in_cluster(&self, addr: [u8; 4]) -> bool {
        self.cluster_cidr_prefix_len != 0 && self.in_cluster(addr)
    }
}

/// Where a remote pod subnet lives: the node to encapsulate to, and the next hop towards it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemoteNode {
    /// The node's PublicIP (outer destination), network order.
    pub public_ip: [u8; 4],
    /// The node's VtepMAC (inner destination MAC), as in its lease.
    pub vtep_mac: [u8; 6],
    /// The MAC of the next hop towards the PublicIP (the node itself on one segment, else the
    /// underlay's router), as the node's neighbour table has it.
    pub next_hop_mac: [u8; 6],
    /// The ifindex (host order) that next hop is reached through; 0 while it is not known,
    /// and the datapath looks the route up (FIB) for each packet instead.
    pub next_hop_ifindex: u32,
}

/// An overlay member: a node whose VXLAN the uplink accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vtep {
    /// The pod subnet its lease holds, network order (for `weft inspect subnets`).
    pub subnet_addr: [u8; 4],
    pub subnet_prefix_len: u8,
    pub _pad: [u8; 3],
}

/// This node's overlay settings, written by the agent before it attaches the overlay programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverlayConfig {
    /// This node's PublicIP: outer source of what it sends, outer destination of what it takes.
    pub public_ip: [u8; 4],
    /// The cluster's pod Network (flannel's `Network`), network order.
    pub network_addr: [u8; 4],
    pub network_prefix_len: u8,
    /// [`overlay_flags`].
    pub flags: u8,
    /// VXLAN UDP port, host order.
    pub port: u16,
    /// VXLAN network identifier, host order.
    pub vni: u32,
    /// This node's VtepMAC: the inner source MAC it sends, the one its lease advertises.
    pub vtep_mac: [u8; 6],
    /// The uplink's own MAC: decapsulated frames are addressed to it so the node routes them.
    pub uplink_mac: [u8; 6],
    /// This node's pod subnet (its lease), network order.
    pub local_subnet_addr: [u8; 4],
    pub local_subnet_prefix_len: u8,
    pub _pad: u8,
    /// The largest inner IPv4 packet the overlay carries unfragmented (the pod routes' MTU),
    /// host order: bigger ones take the kernel's path, which fragments or answers with ICMP.
    pub inner_mtu: u16,
    /// The uplink's ifindex (host order): where packets encapsulated at a pod's port go.
    pub uplink_ifindex: u32,
    /// The ifindex (host order) of the node's `external` VXLAN device, the kernel path for what
    /// the programs hand on; 0 when there is none.
    pub tunnel_ifindex: u32,
    /// The pod bridge's MAC: the source of frames delivered straight into a pod, as its
    /// gateway's would be.
    pub bridge_mac: [u8; 6],
    pub _pad2: [u8; 2],
}

/// Bits of [`OverlayConfig::flags`].
pub mod overlay_flags {
    /// Packets between this node's pods and remote pods skip the node's stack: decapsulated
    /// straight into the pod (`bpf_redirect_peer`), encapsulated at the pod's port and
    /// redirected to the uplink (`--host-routing=ebpf`). Clear: the stack routes them
    /// (`--host-routing=kernel`), and netfilter sees them.
    pub const EBPF_HOST_ROUTING: u8 = 1;
}

/// A pod of this node, learned from the frames its port receives from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalPod {
    /// The ifindex of the pod's port (the host side of its veth), host order.
    pub ifindex: u32,
    /// The pod's MAC.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl OverlayConfig {
    /// Whether `addr` is in the cluster's pod Network.
    #[inline(always)]
    #[must_use]
    pub fn in_network(&self, addr: [u8; 4]) -> bool {
        prefix_contains(self.network_addr, self.network_prefix_len, addr)
    }

    /// Whether `addr` is in this node's own pod subnet.
    #[inline(always)]
    #[must_use]
    pub fn in_local_subnet(&self, addr: [u8; 4]) -> bool {
        self.local_subnet_prefix_len != 0
            && prefix_contains(self.local_subnet_addr, self.local_subnet_prefix_len, addr)
    }

    /// Whether `addr` is a pod of another node: in the Network, outside this node's subnet.
    #[inline(always)]
    #[must_use]
    pub fn is_remote_pod(&self, addr: [u8; 4]) -> bool {
        self.public_ip != [0; 4] && self.in_network(addr) && !self.in_local_subnet(addr)
    }

    /// Whether pod traffic skips the node's stack ([`overlay_flags::EBPF_HOST_ROUTING`]).
    #[inline(always)]
    #[must_use]
    pub fn ebpf_host_routing(&self) -> bool {
        self.flags & overlay_flags::EBPF_HOST_ROUTING != 0
    }
}

/// Whether `addr` is inside `network/prefix_len` (every address is inside a /0).
#[inline(always)]
#[must_use]
pub fn prefix_contains(network: [u8; 4], prefix_len: u8, addr: [u8; 4]) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let mask = if prefix_len >= 32 {
        u32::MAX
    } else {
        !(u32::MAX >> prefix_len)
    };
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(network) & mask
}

const _: () = {
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 24);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointValue>() == 8);
    assert!(size_of::<ServiceName>() == 148);
    assert!(size_of::<EndpointMemberKey>() == 12);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SourceRangeKey>() == 12);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 16);
    assert!(size_of::<SockNatKey>() == 16);
    assert!(size_of::<SockNatValue>() == 8);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragValue>() == 16);
    assert!(size_of::<DatapathConfig>() == 16);
    assert!(size_of::<RemoteNode>() == 20);
    assert!(size_of::<Vtep>() == 8);
    assert!(size_of::<OverlayConfig>() == 52);
    assert!(size_of::<LocalPod>() == 12);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        AffinityKey, AffinityValue, CtKey, CtValue, DatapathConfig, EndpointKey, EndpointMemberKey,
        EndpointValue, FragKey, FragValue, LocalPod, OverlayConfig, RemoteNode, ServiceKey,
        ServiceName, ServiceValue, SockNatKey, SockNatValue, SourceRangeKey, Vtep,
    };

    macro_rules! impl_pod {
        ($($ty:ty),* $(,)?) => {
            $(
                // SAFETY: `#[repr(C)]`, only integer and byte-array fields, and every padding byte
                // is an explicit field, so any bit pattern is valid and none is uninitialised.
                unsafe impl aya::Pod for $ty {}
            )*
        };
    }

    impl_pod!(
        ServiceKey,
        ServiceValue,
        EndpointKey,
        EndpointValue,
        ServiceName,
        EndpointMemberKey,
        AffinityKey,
        AffinityValue,
        SourceRangeKey,
        CtKey,
        CtValue,
        SockNatKey,
        SockNatValue,
        FragKey,
        FragValue,
        DatapathConfig,
        RemoteNode,
        Vtep,
        OverlayConfig,
        LocalPod,
    );
}

#[cfg(test)]
mod tests {
    use super::{DatapathConfig, Selection, ServiceValue, service_flags};

    fn frontend(flags: u16) -> ServiceValue {
        ServiceValue {
            id: 7,
            count: 2,
            cluster_id: 3,
            cluster_count: 5,
            flags,
            ..ServiceValue::default()
        }
    }

    #[test]
    fn cluster_ip_masquerades_only_clients_from_outside() {
        let value = frontend(0);
        assert_eq!(
            value.select(true),
            Selection {
                set_id: 7,
                count: 2,
                masquerade: false
            }
        );
        assert!(value.select(false).masquerade);
    }

    #[test]
    fn external_cluster_policy_masquerades_everyone() {
        let value = frontend(service_flags::MASQUERADE_ALL);
        assert!(value.select(true).masquerade);
        assert!(value.select(false).masquerade);
    }

    #[test]
    fn external_local_policy_keeps_outside_clients_local_and_sends_the_cluster_wide() {
        let value = frontend(service_flags::LOCAL_EXTERNAL);
        assert_eq!(
            value.select(false),
            Selection {
                set_id: 7,
                count: 2,
                masquerade: false
            }
        );
        assert_eq!(
            value.select(true),
            Selection {
                set_id: 3,
                count: 5,
                masquerade: false
            }
        );
    }

    fn config(addr: [u8; 4], len: u8) -> DatapathConfig {
        DatapathConfig {
            cluster_cidr_addr: addr,
            cluster_cidr_prefix_len: len,
            ..DatapathConfig::default()
        }
    }

    #[test]
    fn cluster_membership_follows_the_prefix() {
        let cfg = config([172, 30, 0, 0], 16);
        assert!(cfg.in_cluster([172, 30, 20, 6]));
        assert!(cfg.in_cluster([172, 30, 255, 255]));
        assert!(!cfg.in_cluster([172, 31, 0, 1]));
        assert!(!cfg.in_cluster([10, 167, 226, 38]));
    }

    #[test]
    fn unset_cidr_counts_everything_inside() {
        assert!(config([0; 4], 0).in_cluster([8, 8, 8, 8]));
    }

    #[test]
    fn host_prefix_matches_one_address() {
        let cfg = config([10, 0, 0, 1], 32);
        assert!(cfg.in_cluster([10, 0, 0, 1]));
        assert!(!cfg.in_cluster([10, 0, 0, 2]));
    }
}
