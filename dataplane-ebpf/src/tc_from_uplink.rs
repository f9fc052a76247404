//! TC ingress of the uplink: every frame the node receives from the network (after `xdp_uplink`
//! has decapsulated what the overlay carried).
//!
//! Clients outside the node reach services here: NodePorts on the node's addresses, external
//! IPs and load-balancer IPs routed to the node, and ClusterIPs routed to it. The translation is
//! the one pods get (`tc_from_pods`), except that a client counts as inside the cluster only
//! when the cluster CIDR holds it. Replies are restored on the way out, by `tc_to_uplink` (or by
//! `tc_to_pod` when the client is a local pod).

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::service::{self, Clients};

#[classifier]
pub fn tc_from_uplink(ctx: TcContext) -> i32 {
    service::to_endpoint(&ctx, Clients::Outside)
}
