//! TC ingress of every pod's bridge port: every frame a local pod sends.
//!
//! A packet for a service frontend is translated to one of the service's endpoints (DNAT), its
//! connection is tracked so every later packet goes to the same endpoint, and it gets the
//! masquerade mark when its client is off-cluster or is the endpoint itself. Everything else
//! goes on unchanged. Replies are restored by `tc_to_pod` on the client's side.
//!
//! The hook is the port's ingress because it runs before the bridge: with `br_netfilter` (as on
//! every kubeadm node) netfilter's conntrack sees frames at the bridge already, and it must see
//! the translated tuple, or the masquerade it applies cannot be undone for the replies.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    MASQUERADE_MARK,
    drop_reason::DropReason,
    maps::{CtKey, ct_direction},
    packet::{Fragment, Frame, PacketBytes as _, Transport, parse_ipv4, parse_transport},
};

use crate::{
    ct, lb,
    maps::{config, count_drop},
    nat::{self, Side},
    packet::Skb,
};

#[classifier]
pub fn tc_from_pods(ctx: TcContext) -> i32 {
    match translate_to_endpoint(&ctx) {
        // UNSPEC hands the packet to the next TC program, or to the stack when there is none.
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn translate_to_endpoint(ctx: &TcContext) -> Result<(), DropReason> {
    let skb = Skb(ctx);
    if !skb.pull_headers() {
        return Ok(());
    }
    let ip = match parse_ipv4(&skb) {
        Frame::Ipv4(ip) => ip,
        Frame::NotIpv4 => return Ok(()),
        // The node's stack would drop it just the same (bad version, length or options).
        Frame::MalformedIpv4 => return Err(DropReason::MalformedIpv4),
    };
    let ports = match parse_transport(&skb, &ip) {
        Transport::Ports(ports) => ports,
        Transport::Other => return Ok(()),
        Transport::Truncated => {
            // Cut short: drop it only when it is for a service; the rest is the stack's to judge.
            let for_service = skb.read::<4>(ip.l4_offset).is_some_and(|ports| {
                lb::frontend(ip.dst, u16::from_be_bytes([ports[2], ports[3]]), ip.proto).is_some()
            });
            return if for_service {
                Err(DropReason::MalformedL4)
            } else {
                Ok(())
            };
        }
    };
    let Some(service) = lb::frontend(ip.dst, ports.dst_port, ip.proto) else {
        return Ok(());
    };
    if ip.fragment == Fragment::First {
        return Err(DropReason::FragmentedService);
    }
    let key = CtKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: ports.src_port,
        dst_port: ports.dst_port,
        proto: ip.proto,
        direction: ct_direction::FORWARD,
        _pad: [0; 2],
    };
    let forward = ct::forward(&key, ports.tcp_flags, &service, &config(), ct::now_ns())?;
    if forward.masquerade {
        // SAFETY: reading a field of the context the kernel handed this program.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | MASQUERADE_MARK);
    }
    nat::rewrite(
        ctx,
        &ip,
        Side::Destination,
        (ip.dst, ports.dst_port),
        (forward.addr, forward.port),
    )
}
