//! Empty programs, one per hook type weft uses on packets: what `cargo xtask bench` measures
//! as the floor (the cost of running any program at all) beside each real path. An object of
//! their own, so the agent's never carries them.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    not(target_arch = "bpf"),
    expect(unused_crate_dependencies, reason = "the host build is an empty stub")
)]

#[cfg(target_arch = "bpf")]
mod programs {
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

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // Unreachable: the programs cannot panic.
        loop {}
    }
}

/// The host build of this binary is an empty stub so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
