//! Empty programs, one per hook type weft uses on packets: what `cargo xtask bench` measures
//! as the floor (the cost of running any program at all) beside each real path. The agent never
//! loads them.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[xdp]
pub fn xdp_floor(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
