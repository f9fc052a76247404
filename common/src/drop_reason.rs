//! Why the datapath dropped a packet: the index of the per-CPU drop counter map.

/// A drop reason. The discriminant is the counter's index in [`crate::maps::DROPS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// An IPv4 frame whose header is truncated or invalid (version, IHL, total length).
    MalformedIpv4 = 0,
    /// A packet for a service frontend whose TCP/UDP header is truncated.
    MalformedL4 = 1,
    /// A fragment of a datagram to a service frontend, or of a reply of a translated
    /// connection, that cannot be translated with the rest: the first fragment (which carries
    /// the ports) of a datagram whose later fragments came before it and went on untranslated,
    /// or a later fragment whose connection is gone.
    FragmentUntranslatable = 2,
    /// A new connection to a service port with no usable endpoint anywhere; it is answered
    /// with a TCP reset or an ICMP port unreachable where the packet allows one.
    NoEndpoints = 3,
    /// The chosen endpoint slot vanished between reading the service and the slot (a concurrent
    /// shrink); the client retransmits and lands on a live slot.
    EndpointSlotMissing = 4,
    /// The conntrack map refused a new entry.
    ConntrackInsertFailed = 5,
    /// A kernel helper failed to rewrite an address, port or checksum.
    NatRewriteFailed = 6,
    /// A packet for the cluster's pod Network whose subnet no node holds a lease for.
    NoLeaseForDestination = 7,
    /// Encapsulation failed (no room, or a helper refused the rewrite).
    EncapFailed = 8,
    /// No route to the remote node's PublicIP.
    NoRouteToNode = 9,
    /// VXLAN for this node from an address that holds no lease (flannel accepts it; weft does not).
    VxlanUnknownSource = 10,
    /// VXLAN for this node whose headers are cut short or whose inner frame is not IPv4.
    VxlanMalformed = 11,
    /// A new connection that a `Local` traffic policy confines to this node, which has no
    /// endpoint of the service (kube-proxy drops these too).
    NoLocalEndpoints = 12,
    /// A new connection to a load-balancer address from outside its `loadBalancerSourceRanges`.
    SourceRangeDenied = 13,
    /// VXLAN whose outer header carries a congestion mark (CE) the inner packet, not
    /// ECN-capable, cannot carry (RFC 6040; Linux's VXLAN drops it too).
    VxlanCongestionNotEct = 14,
    /// VXLAN with another VNI than the overlay's, which the node's VXLAN device took.
    VxlanOtherVni = 15,
    /// Decapsulation failed (a helper refused to remove the outer headers).
    DecapFailed = 16,
    /// A new connection whose tuple, as its endpoint would see it, is a live connection's, and
    /// so is every move of its client port that was tried (netfilter drops these too).
    TupleInUse = 17,
}

/// Number of drop reasons, the size of the drop counter map.
pub const DROP_REASON_COUNT: u32 = 18;

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [Self; DROP_REASON_COUNT as usize] = [
        Self::MalformedIpv4,
        Self::MalformedL4,
        Self::FragmentUntranslatable,
        Self::NoEndpoints,
        Self::EndpointSlotMissing,
        Self::ConntrackInsertFailed,
        Self::NatRewriteFailed,
        Self::NoLeaseForDestination,
        Self::EncapFailed,
        Self::NoRouteToNode,
        Self::VxlanUnknownSource,
        Self::VxlanMalformed,
        Self::NoLocalEndpoints,
        Self::SourceRangeDenied,
        Self::VxlanCongestionNotEct,
        Self::VxlanOtherVni,
        Self::DecapFailed,
        Self::TupleInUse,
    ];

    /// Stable snake_case name, used by `weft inspect drops` and metric labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::MalformedIpv4 => "malformed_ipv4",
            Self::MalformedL4 => "malformed_l4",
            Self::FragmentUntranslatable => "fragment_untranslatable",
            Self::NoEndpoints => "no_endpoints",
            Self::EndpointSlotMissing => "endpoint_slot_missing",
            Self::ConntrackInsertFailed => "conntrack_insert_failed",
            Self::NatRewriteFailed => "nat_rewrite_failed",
            Self::NoLeaseForDestination => "no_lease_for_destination",
            Self::EncapFailed => "encap_failed",
            Self::NoRouteToNode => "no_route_to_node",
            Self::VxlanUnknownSource => "vxlan_unknown_source",
            Self::VxlanMalformed => "vxlan_malformed",
            Self::NoLocalEndpoints => "no_local_endpoints",
            Self::SourceRangeDenied => "source_range_denied",
            Self::VxlanCongestionNotEct => "vxlan_congestion_not_ect",
            Self::VxlanOtherVni => "vxlan_other_vni",
            Self::DecapFailed => "decap_failed",
            Self::TupleInUse => "tuple_in_use",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DROP_REASON_COUNT, DropReason};

    #[test]
    fn discriminants_index_all_in_order() {
        for (index, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?}");
        }
        assert_eq!(DropReason::ALL.len(), DROP_REASON_COUNT as usize);
    }
}
