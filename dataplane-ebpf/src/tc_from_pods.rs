//! TC ingress of every pod's bridge port: every frame a local pod sends.
//!
//! A packet for a service frontend is translated to one of the service's endpoints (DNAT), its
//! connection is tracked so every later packet goes to the same endpoint, and it gets the
//! masquerade mark when the service asks for it or its client is the endpoint itself.
//! Everything else goes on unchanged. Replies are restored by `tc_to_pod` on the client's side.
//!
//! The hook is the port's ingress because it runs before the bridge: with `br_netfilter` (as on
//! every kubeadm node) netfilter's conntrack sees frames at the bridge already, and it must see
//! the translated tuple, or the masquerade it applies cannot be undone for the replies.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::service::{self, Clients};

#[classifier]
pub fn tc_from_pods(ctx: TcContext) -> i32 {
    service::to_endpoint(&ctx, Clients::Pods)
}
