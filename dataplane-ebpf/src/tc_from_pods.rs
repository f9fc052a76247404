//! TC ingress of every pod's bridge port: every frame a local pod sends.
//!
//! A packet for a service frontend is translated to one of the service's endpoints (DNAT), its
//! connection is tracked so every later packet goes to the same endpoint, and it gets the
//! masquerade mark when the service asks for it or its client is the endpoint itself.
//! Replies are restored by `tc_to_pod` on the client's side.
//!
//! With `--host-routing=ebpf`, a packet for a pod of another node is then encapsulated here and
//! sent straight out of the uplink (see `vxlan`), and the port the pod sends from is learned,
//! so what the overlay brings back for it is delivered straight into it. Everything else goes
//! on unchanged, to the bridge.
//!
//! The hook is the port's ingress because it runs before the bridge: with `br_netfilter` (as on
//! every kubeadm node) netfilter's conntrack sees frames at the bridge already, and it must see
//! the translated tuple, or the masquerade it applies cannot be undone for the replies.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

use crate::{
    maps::overlay,
    service::{self, Clients},
    vxlan,
};

#[classifier]
pub fn tc_from_pods(ctx: TcContext) -> i32 {
    let overlay = overlay();
    vxlan::learn_pod(&ctx, &overlay);
    let verdict = service::to_endpoint(&ctx, Clients::Pods);
    if verdict != TC_ACT_UNSPEC {
        return verdict;
    }
    vxlan::from_pod(&ctx, &overlay)
}
