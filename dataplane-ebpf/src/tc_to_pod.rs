//! TC egress of every pod's bridge port: every frame delivered to a local pod, whether the node
//! routed it or the bridge switched it from a pod beside it.
//!
//! A reply from an endpoint to a client whose connection `tc_from_pods` translated gets the
//! frontend back as its source, so the client sees the service address it connected to. The
//! hook sits on the ports rather than on the bridge because replies between two pods of one
//! node never leave the bridge.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    drop_reason::DropReason,
    maps::{CtKey, ct_direction},
    packet::{Fragment, Frame, Transport, parse_ipv4, parse_transport},
};

use crate::{
    ct,
    maps::count_drop,
    nat::{self, Side},
    packet::Skb,
};

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    match restore_frontend(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn restore_frontend(ctx: &TcContext) -> Result<(), DropReason> {
    let skb = Skb(ctx);
    // Malformed frames are the receiving pod's stack's to drop; this hook only restores replies.
    if !skb.pull_headers() {
        return Ok(());
    }
    let Frame::Ipv4(ip) = parse_ipv4(&skb) else {
        return Ok(());
    };
    let Transport::Ports(ports) = parse_transport(&skb, &ip) else {
        return Ok(());
    };
    let key = CtKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: ports.src_port,
        dst_port: ports.dst_port,
        proto: ip.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    if ip.fragment == Fragment::First {
        // The fragments that follow carry no ports and could not be restored with it, so the
        // datagram could not be reassembled by the client: drop it whole, as the forward path does.
        return if ct::is_reply(&key) {
            Err(DropReason::FragmentedService)
        } else {
            Ok(())
        };
    }
    let Some(frontend) = ct::reply(&key, ports.tcp_flags, ct::now_ns()) else {
        return Ok(());
    };
    nat::rewrite(ctx, &ip, Side::Source, (ip.src, ports.src_port), frontend)
}
