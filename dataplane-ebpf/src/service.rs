//! Service translation on TC, shared by the hooks that see clients' packets (a pod's bridge port,
//! the uplink) and those that see replies (towards a pod, out of the uplink); ICMP errors about
//! the connections (see `icmp`) and the later fragments of their datagrams (see `frag`) follow
//! them.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use weft_common::{
    MASQUERADE_MARK,
    drop_reason::DropReason,
    ip_proto,
    maps::{CtKey, ct_direction},
    packet::{
        Fragment, Frame, Ipv4Header, PacketBytes as _, Transport, parse_ipv4, parse_transport,
    },
};

use crate::{
    ct::{self, Choice},
    frag, icmp, lb,
    maps::{config, count_drop, verdict},
    nat::{self, Side},
    packet::Skb,
    reject, sock,
};

/// Where a client packet's clients come from, which decides who counts as inside the cluster.
#[derive(Clone, Copy)]
pub(crate) enum Clients {
    /// Local pods: inside unless the cluster CIDR is set and excludes them.
    Pods,
    /// Anything reaching the node from outside: inside only when the cluster CIDR is set and
    /// holds them (pods of other nodes).
    Outside,
}

/// Translates a client packet to a service frontend: DNAT to the connection's endpoint (chosen
/// and tracked on its first packet), plus the masquerade mark where it needs one. Returns the
/// TC action: `TC_ACT_UNSPEC` to go on (translated or not a service's), a redirect for a
/// rejection sent back, `TC_ACT_SHOT` for a drop (counted).
///
/// A function of its own in the program (not inlined), so its stack frame and the overlay's
/// are not added up: together they would pass the verifier's 512 bytes.
#[inline(never)]
pub(crate) fn to_endpoint(ctx: &TcContext, clients: Clients) -> i32 {
    verdict(translate(ctx, clients))
}

#[inline(always)]
fn translate(ctx: &TcContext, clients: Clients) -> Result<i32, DropReason> {
    let skb = Skb(ctx);
    if !skb.pull_headers() {
        return Ok(TC_ACT_UNSPEC);
    }
    let ip = match parse_ipv4(&skb) {
        Frame::Ipv4(ip) => ip,
        Frame::NotIpv4 => return Ok(TC_ACT_UNSPEC),
        // The node's stack would drop it just the same (bad version, length or options).
        Frame::MalformedIpv4 => return Err(DropReason::MalformedIpv4),
    };
    let ports = match parse_transport(&skb, &ip) {
        Transport::Ports(ports) => ports,
        Transport::Other => {
            if ip.fragment == Fragment::Later {
                return later_fragment_to_endpoint(ctx, &skb, &ip);
            }
            if ip.proto == ip_proto::ICMP {
                icmp::to_endpoint(ctx, &ip)?;
            }
            return Ok(TC_ACT_UNSPEC);
        }
        Transport::Truncated => {
            // Cut short: drop it only when it is for a service; the rest is the stack's to judge.
            let for_service = skb.read::<4>(ip.l4_offset).is_some_and(|ports| {
                let port = u16::from_be_bytes([ports[2], ports[3]]);
                lb::frontend(&lb::frontend_key(ip.dst, port, ip.proto)).is_some()
            });
            return if for_service {
                Err(DropReason::MalformedL4)
            } else {
                Ok(TC_ACT_UNSPEC)
            };
        }
    };
    let frontend = lb::frontend_key(ip.dst, ports.dst_port, ip.proto);
    let Some(service) = lb::frontend(&frontend) else {
        if let Clients::Pods = clients {
            direct_from_pod(ctx, &ip, ports.src_port, ports.dst_port, ports.tcp_flags)?;
        }
        return Ok(TC_ACT_UNSPEC);
    };
    if ip.fragment == Fragment::First {
        frag::first(&skb, &ip, &ports, ct_direction::FORWARD)?;
    }
    let key = tuple(&ip, ports.src_port, ports.dst_port, ct_direction::FORWARD);
    let now = ct::now_ns();
    let choose = || {
        if !lb::source_allowed(&frontend, &service, ip.src) {
            return Err(DropReason::SourceRangeDenied);
        }
        let config = config();
        let inside = match clients {
            Clients::Pods => config.in_cluster(ip.src),
            Clients::Outside => config.known_in_cluster(ip.src),
        };
        let selection = service.select(inside);
        let endpoint = lb::pick(&service, &selection, ip.src, now)?;
        Ok(Choice {
            endpoint,
            masquerade: selection.masquerade,
        })
    };
    let forward = ct::forward(&key, ports.tcp_flags, now, choose, |reply: &CtKey| {
        matches!(clients, Clients::Pods) && sock::pod_holds(ctx, reply)
    });
    let forward = match forward {
        Ok(forward) => forward,
        Err(DropReason::NoEndpoints) => {
            count_drop(DropReason::NoEndpoints);
            return Ok(reject::answer(ctx, &ip));
        }
        Err(reason) => return Err(reason),
    };
    if forward.masquerade {
        mark_for_masquerade(ctx);
    }
    nat::rewrite(
        ctx,
        &ip,
        Side::Destination,
        (ip.dst, ports.dst_port),
        (forward.addr, forward.port),
    )?;
    if forward.client_port != ports.src_port {
        move_port(ctx, &ip, Side::Source, ports.src_port, forward.client_port)?;
    }
    Ok(TC_ACT_UNSPEC)
}

/// A pod's packet to no frontend: its client port moved if its connection's tuple clashes with
/// a tracked connection's (see `ct`). TCP and UDP only: SCTP keeps its port, as its CRC32c
/// makes every rewrite cost more than a clash is likely.
#[inline(always)]
fn direct_from_pod(
    ctx: &TcContext,
    ip: &Ipv4Header,
    src_port: u16,
    dst_port: u16,
    tcp: u8,
) -> Result<(), DropReason> {
    if ip.proto != ip_proto::TCP && ip.proto != ip_proto::UDP {
        return Ok(());
    }
    let key = tuple(ip, src_port, dst_port, ct_direction::FORWARD);
    match ct::direct(&key, tcp, ct::now_ns(), |reply: &CtKey| {
        sock::pod_holds(ctx, reply)
    })? {
        Some(moved) if moved != src_port => move_port(ctx, ip, Side::Source, src_port, moved),
        _ => Ok(()),
    }
}

/// Rewrites `side`'s port alone, with the transport checksum.
#[inline(always)]
fn move_port(
    ctx: &TcContext,
    ip: &Ipv4Header,
    side: Side,
    from: u16,
    to: u16,
) -> Result<(), DropReason> {
    let addr = match side {
        Side::Source => ip.src,
        Side::Destination => ip.dst,
    };
    nat::rewrite(ctx, ip, side, (addr, from), (addr, to))
}

/// Restores the frontend as the source of a reply from an endpoint to a client whose
/// connection was translated. Malformed frames are not this hook's to judge: they pass.
#[inline(always)]
pub(crate) fn to_client(ctx: &TcContext) -> Result<(), DropReason> {
    let skb = Skb(ctx);
    if !skb.pull_headers() {
        return Ok(());
    }
    let Frame::Ipv4(ip) = parse_ipv4(&skb) else {
        return Ok(());
    };
    if ip.proto == ip_proto::ICMP {
        return icmp::to_client(ctx, &ip);
    }
    if ip.fragment == Fragment::Later {
        return later_fragment_to_client(&skb, &ip);
    }
    let Transport::Ports(ports) = parse_transport(&skb, &ip) else {
        return Ok(());
    };
    let key = tuple(&ip, ports.src_port, ports.dst_port, ct_direction::REPLY);
    let Some(reply) = ct::reply(&key, ports.tcp_flags, ct::now_ns()) else {
        return Ok(());
    };
    if ip.fragment == Fragment::First {
        frag::first(&skb, &ip, &ports, ct_direction::REPLY)?;
    }
    let endpoint = (ip.src, ports.src_port);
    if reply.frontend != endpoint {
        nat::rewrite(ctx, &ip, Side::Source, endpoint, reply.frontend)?;
    }
    if reply.client_port != ports.dst_port {
        move_port(
            ctx,
            &ip,
            Side::Destination,
            ports.dst_port,
            reply.client_port,
        )?;
    }
    Ok(())
}

/// A later fragment of a client's datagram whose first fragment was translated: to the same
/// endpoint, with the same mark.
#[inline(always)]
fn later_fragment_to_endpoint(
    ctx: &TcContext,
    skb: &Skb<'_>,
    ip: &Ipv4Header,
) -> Result<i32, DropReason> {
    let Some((src_port, dst_port)) = frag::later(skb, ip, ct_direction::FORWARD) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let key = tuple(ip, src_port, dst_port, ct_direction::FORWARD);
    let forward =
        ct::related_forward(&key, ct::now_ns()).ok_or(DropReason::FragmentUntranslatable)?;
    if forward.masquerade {
        mark_for_masquerade(ctx);
    }
    nat::rewrite_address(skb, Side::Destination, ip.dst, forward.addr)?;
    Ok(TC_ACT_UNSPEC)
}

/// A later fragment of a reply whose first fragment was restored: restored the same way.
#[inline(always)]
fn later_fragment_to_client(skb: &Skb<'_>, ip: &Ipv4Header) -> Result<(), DropReason> {
    let Some((src_port, dst_port)) = frag::later(skb, ip, ct_direction::REPLY) else {
        return Ok(());
    };
    let key = tuple(ip, src_port, dst_port, ct_direction::REPLY);
    let reply = ct::related_reply(&key, ct::now_ns()).ok_or(DropReason::FragmentUntranslatable)?;
    nat::rewrite_address(skb, Side::Source, ip.src, reply.frontend.0)
}

/// The conntrack key of a packet of `ip` with these ports, in `direction`.
#[inline(always)]
fn tuple(ip: &Ipv4Header, src_port: u16, dst_port: u16, direction: u8) -> CtKey {
    CtKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port,
        dst_port,
        proto: ip.proto,
        direction,
        _pad: [0; 2],
    }
}

/// Adds the masquerade mark to the packet's mark.
#[inline(always)]
fn mark_for_masquerade(ctx: &TcContext) {
    // SAFETY: reading a field of the context the kernel handed this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | MASQUERADE_MARK);
}
