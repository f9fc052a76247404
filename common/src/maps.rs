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

/// Name of the service frontend map: [`ServiceKey`] -> [`ServiceValue`].
pub const SERVICES_MAP: &str = "weft_svc_v1";
/// Name of the endpoint slot map: [`EndpointKey`] -> [`EndpointValue`].
pub const ENDPOINTS_MAP: &str = "weft_ep_v1";
/// Name of the service name map, read only by `weft inspect`: `u32` service id -> [`ServiceName`].
pub const SERVICE_NAMES_MAP: &str = "weft_svcname_v1";
/// Name of the connection tracking map: [`CtKey`] -> [`CtValue`].
pub const CONNTRACK_MAP: &str = "weft_ct4_v1";
/// Name of the socket-level NAT map of the host's own sockets: [`SockNatKey`] -> [`SockNatValue`].
pub const SOCK_NAT_MAP: &str = "weft_socknat_v1";
/// Name of the per-CPU drop counters, indexed by [`crate::drop_reason::DropReason`].
pub const DROPS_MAP: &str = "weft_drops_v1";
/// Name of the one-entry datapath configuration array: `0` -> [`DatapathConfig`].
pub const CONFIG_MAP: &str = "weft_config_v1";

/// Name of the remote pod subnets, an LPM trie: IPv4 prefix (network order) -> [`RemoteNode`].
pub const SUBNETS_MAP: &str = "weft_subnets_v1";
/// Name of the overlay members: a node's PublicIP (network order) -> [`Vtep`].
pub const VTEPS_MAP: &str = "weft_vteps_v1";
/// Name of the one-entry overlay configuration array: `0` -> [`OverlayConfig`].
pub const OVERLAY_MAP: &str = "weft_overlay_v1";

/// Every map weft pins, so the agent can check each pin's layout before reusing it.
pub const PINNED_MAPS: [&str; 10] = [
    SERVICES_MAP,
    ENDPOINTS_MAP,
    SERVICE_NAMES_MAP,
    CONNTRACK_MAP,
    SOCK_NAT_MAP,
    DROPS_MAP,
    CONFIG_MAP,
    SUBNETS_MAP,
    VTEPS_MAP,
    OVERLAY_MAP,
];

/// Default capacity of [`SERVICES_MAP`] (frontends: one per service IP, port and protocol).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of [`ENDPOINTS_MAP`] (endpoint slots summed over all service ports).
pub const DEFAULT_MAX_ENDPOINTS: u32 = 262_144;
/// Default capacity of [`CONNTRACK_MAP`]; each connection takes two entries.
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;
/// Default capacity of [`SOCK_NAT_MAP`].
pub const DEFAULT_SOCK_NAT_ENTRIES: u32 = 65_536;
/// Capacity of [`SUBNETS_MAP`] and [`VTEPS_MAP`]: nodes in one cluster.
pub const MAX_NODES: u32 = 16_384;

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

/// What a frontend leads to: the service port's id and how many endpoint slots it has.
///
/// Written by the agent only after all `count` slots of `id` exist in [`ENDPOINTS_MAP`], and
/// lowered before slots are removed, so the datapath never picks a slot that is not there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Service port id (host order), shared by every frontend of one service port; never 0.
    pub id: u32,
    /// Number of endpoint slots `0..count` (host order); 0 means the service has no endpoints.
    pub count: u32,
}

/// One endpoint slot of a service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// [`ServiceValue::id`], host order.
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

/// Human name of a service port, for `weft inspect`; the datapath never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// Namespace, UTF-8, NUL-padded.
    pub namespace: [u8; NAMESPACE_LEN],
    /// Service name, UTF-8, NUL-padded.
    pub name: [u8; NAME_LEN],
    /// Service port name, UTF-8, NUL-padded; empty for an unnamed port.
    pub port_name: [u8; PORT_NAME_LEN],
}

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

/// Conntrack state. A connection is a FORWARD entry (authoritative: endpoint, state, age) plus a
/// REPLY entry (an index for reverse NAT); see [`crate::conntrack`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// FORWARD: the endpoint address. REPLY: the frontend address. Network order.
    pub nat_addr: [u8; 4],
    /// FORWARD: the endpoint port. REPLY: the frontend port. Host order.
    pub nat_port: u16,
    /// FORWARD: [`crate::conntrack::flags`] bits. REPLY: 0.
    pub flags: u8,
    pub _pad: u8,
    /// FORWARD: `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when a packet of the connection (either
    /// way) was last seen, refreshed at most once per [`crate::conntrack::REFRESH_INTERVAL_NS`].
    /// REPLY: when it was created.
    pub last_seen_ns: u64,
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
    /// translate only sockets there (pods are served by TC). 0 translates sockets in every netns.
    pub host_netns_cookie: u64,
}

impl DatapathConfig {
    /// Whether `addr` is inside the cluster CIDR.
    #[inline(always)]
    #[must_use]
    pub fn in_cluster(&self, addr: [u8; 4]) -> bool {
        let len = self.cluster_cidr_prefix_len;
        if len == 0 {
            return true;
        }
        let mask = if len >= 32 {
            u32::MAX
        } else {
            !(u32::MAX >> len)
        };
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.cluster_cidr_addr) & mask
    }
}

/// Where a remote pod subnet lives: the node to encapsulate to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemoteNode {
    /// The node's PublicIP (outer destination), network order.
    pub public_ip: [u8; 4],
    /// The node's VtepMAC (inner destination MAC), as in its lease.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
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
    pub _pad: u8,
    /// VXLAN UDP port, host order.
    pub port: u16,
    /// VXLAN network identifier, host order.
    pub vni: u32,
    /// This node's VtepMAC: the inner source MAC it sends, the one its lease advertises.
    pub vtep_mac: [u8; 6],
    /// The uplink's own MAC: decapsulated frames are addressed to it so the node routes them.
    pub uplink_mac: [u8; 6],
}

impl OverlayConfig {
    /// Whether `addr` is in the cluster's pod Network.
    #[inline(always)]
    #[must_use]
    pub fn in_network(&self, addr: [u8; 4]) -> bool {
        prefix_contains(self.network_addr, self.network_prefix_len, addr)
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
    assert!(size_of::<ServiceValue>() == 8);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointValue>() == 8);
    assert!(size_of::<ServiceName>() == 144);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 16);
    assert!(size_of::<SockNatKey>() == 16);
    assert!(size_of::<SockNatValue>() == 8);
    assert!(size_of::<DatapathConfig>() == 16);
    assert!(size_of::<RemoteNode>() == 12);
    assert!(size_of::<Vtep>() == 8);
    assert!(size_of::<OverlayConfig>() == 28);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        CtKey, CtValue, DatapathConfig, EndpointKey, EndpointValue, OverlayConfig, RemoteNode,
        ServiceKey, ServiceName, ServiceValue, SockNatKey, SockNatValue, Vtep,
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
        CtKey,
        CtValue,
        SockNatKey,
        SockNatValue,
        DatapathConfig,
        RemoteNode,
        Vtep,
        OverlayConfig,
    );
}

#[cfg(test)]
mod tests {
    use super::DatapathConfig;

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
