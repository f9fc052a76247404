//! TC ingress of the uplink: every frame the node receives from the network.
//!
//! VXLAN from the overlay's members is decapsulated here, and what it carried for a pod of
//! this node goes straight into the pod (with `--host-routing=ebpf`); the rest of what it
//! carried goes on to the stack like any frame from outside (see `vxlan`). A GSO aggregate
//! this kernel cannot decapsulate safely goes on whole, to the node's VXLAN device.
//!
//! Clients outside the node reach services here: NodePorts on the node's addresses, external
//! IPs and load-balancer IPs routed to the node, and ClusterIPs routed to it. The translation is
//! the one pods get (`tc_from_pods`), except that a client counts as inside the cluster only
//! when the cluster CIDR holds it. Replies are restored on the way out, by `tc_to_uplink` (or by
//! `tc_to_pod` when the client is a local pod).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};

use crate::{
    maps::{count_drop, overlay},
    service::{self, Clients},
    vxlan::{self, Arrival},
};

#[classifier]
pub fn tc_from_uplink(ctx: TcContext) -> i32 {
    let overlay = overlay();
    match vxlan::decapsulate(&ctx, &overlay) {
        Ok(Arrival::NotOurs) => service::to_endpoint(&ctx, Clients::Outside),
        Ok(Arrival::ToKernel) => TC_ACT_UNSPEC,
        Ok(Arrival::Decapsulated) => {
            let verdict = service::to_endpoint(&ctx, Clients::Outside);
            if verdict != TC_ACT_UNSPEC {
                return verdict;
            }
            vxlan::into_pod(&ctx, &overlay)
        }
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}
