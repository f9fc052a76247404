//! The names of the eBPF programs: the functions of `dataplane-ebpf/`, one per hook, as the
//! agent loads, attaches and pins them and as the tests run them.

/// TC ingress of each pod's bridge port: service DNAT, VXLAN encapsulation to remote pods.
pub const FROM_PODS: &str = "tc_from_pods";
/// TC egress of each pod's bridge port: reverse NAT.
pub const TO_POD: &str = "tc_to_pod";
/// TC egress of the uplink: reverse NAT of replies leaving the node, VXLAN encapsulation.
pub const TO_UPLINK: &str = "tc_to_uplink";
/// TC ingress of the uplink: VXLAN decapsulation, service DNAT for clients outside the node.
pub const FROM_UPLINK: &str = "tc_from_uplink";
/// TC ingress of the node's `external` VXLAN device: the overlay's rules on what the kernel
/// decapsulated.
pub const FROM_TUNNEL: &str = "tc_from_tunnel";
/// XDP on the uplink (optional): early drops of VXLAN from non-members and malformed VXLAN.
pub const XDP_UPLINK: &str = "xdp_uplink";

/// The packet programs, which the agent pins so tools can run them (`weft trace`).
pub const PACKET_PROGRAMS: [&str; 6] = [
    FROM_PODS,
    TO_POD,
    TO_UPLINK,
    FROM_UPLINK,
    FROM_TUNNEL,
    XDP_UPLINK,
];

/// cgroup socket hooks for the node's own sockets.
pub const SOCKET_HOOKS: [&str; 4] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
];
