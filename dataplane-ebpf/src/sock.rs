//! A local pod's sockets, looked up in its own namespace from the TC hook of its port.
//!
//! A direct connection from a pod is not tracked (see `ct`), yet a new service connection must
//! not be given its tuple at the endpoint: the endpoint would take the service connection's
//! SYN for the direct connection's, and its answer, restored as the service's, would make the
//! pod reset the direct connection. The pod's kernel knows that tuple: it is the pod's socket.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use weft_common::{
    ip_proto,
    maps::{CtKey, NO_NETNS_ID},
};

use crate::maps::PEER_PORTS;

/// `TCP_ESTABLISHED`, also the state of a connected UDP socket.
const ESTABLISHED: u32 = 1;
const LISTEN: u32 = 10;

/// Whether a socket of the pod behind the port this packet came in on receives what arrives
/// with the tuple `reply` (an endpoint's packet to the pod): a TCP connection (not a listener)
/// or a connected UDP socket. `false` when the pod's namespace has no id here.
#[inline(always)]
pub(crate) fn pod_holds(ctx: &TcContext, reply: &CtKey) -> bool {
    // SAFETY: reading a field of this program's context.
    let port = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain value, copied out of a map the agent writes whole.
    let Some(&netns) = (unsafe { PEER_PORTS.get(port) }) else {
        return false;
    };
    if netns == NO_NETNS_ID {
        return false;
    }
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(reply.src_addr),
                daddr: u32::from_ne_bytes(reply.dst_addr),
                sport: reply.src_port.to_be(),
                dport: reply.dst_port.to_be(),
            },
        },
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let skb = ctx.skb.skb.cast();
    // SAFETY: helper calls with a tuple on this stack; a socket found is released below.
    unsafe {
        let sk = match reply.proto {
            ip_proto::TCP => bpf_sk_lookup_tcp(skb, &raw mut tuple, size, u64::from(netns), 0),
            ip_proto::UDP => bpf_sk_lookup_udp(skb, &raw mut tuple, size, u64::from(netns), 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        if reply.proto == ip_proto::TCP {
            state != LISTEN
        } else {
            state == ESTABLISHED
        }
    }
}
