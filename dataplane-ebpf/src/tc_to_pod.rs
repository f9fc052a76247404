//! TC egress of every pod's bridge port: every frame delivered to a local pod, whether the node
//! routed it or the bridge switched it from a pod beside it.
//!
//! A reply from an endpoint to a client whose connection was translated gets the frontend back
//! as its source, so the client sees the service address it connected to. The hook sits on the
//! ports rather than on the bridge because replies between two pods of one node never leave the
//! bridge.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};

use crate::{maps::count_drop, service};

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    match service::to_client(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}
