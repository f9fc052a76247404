//! Services for sockets: cgroup `connect4`, `sendmsg4`, `recvmsg4` and `getpeername4` on the
//! cgroup v2 root (Cilium's socket load balancing).
//!
//! A socket of the node's network namespace, or of one of this node's pods (`--socket-lb=all`),
//! that connects or sends to a frontend is pointed at an endpoint before the kernel routes
//! anything, so no packet is translated: the kernel picks a source port that is free towards the
//! endpoint itself, and a pod's direct connection to that endpoint can never clash with it.
//! `recvmsg4` and `getpeername4` show the frontend again, so applications see the address they
//! used. Sockets of other namespaces are left to TC.
//!
//! A pod socket is translated only where the result is what TC would do with its packets, and
//! left to TC otherwise: the pod's address is the client (session affinity, source ranges), a
//! frontend that masquerades (`--masquerade-all`, a pod outside `--cluster-cidr`) or refuses the
//! connection is TC's, so is a pod that backs the service (hairpin), and so is a connected UDP
//! socket (an endpoint that leaves is purged from conntrack and its next datagram balanced
//! again; a socket would stay connected to it).
//!
//! For the node's own sockets, a service port with no endpoints fails the call with
//! `ECONNREFUSED`, what kube-proxy's `REJECT` gives a local socket; one whose `Local` traffic
//! policy leaves no endpoint for the node fails it with `EHOSTUNREACH` (kube-proxy drops, and
//! the caller waits for a timeout). Before Linux 5.18 a hook cannot choose the error, and both
//! fail with `EPERM` (as Cilium's do).

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use weft_common::{
    drop_reason::DropReason,
    ip_proto,
    maps::{SockNatKey, SockNatValue, ct_direction},
};

use crate::{
    ct, lb,
    maps::{POD_NAMESPACES, SOCK_NAT, config, count_drop},
};

/// Return values of cgroup socket address programs.
const ALLOW: i32 = 1;
/// Fails the call, with EPERM unless the program set another error.
const REJECT: i32 = 0;
/// The affinity client of the node's own sockets: the node is one client, as kube-proxy sees
/// it (its traffic leaves from the node's address).
const NODE_CLIENT: [u8; 4] = [0; 4];
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// 1 when the kernel lets socket hooks choose the call's error (`bpf_set_retval`, Linux 5.18+),
/// set by the agent as it loads the programs. The global is read-only, so the verifier knows
/// its value and drops the call as dead code when it is 0: older kernels load the program too.
#[unsafe(no_mangle)]
static HAS_SET_RETVAL: u8 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    // Unconnected UDP: every datagram a socket sends to one frontend goes to one endpoint, as
    // netfilter's conntrack would keep it.
    translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

/// Who is connecting, if this node translates the socket: the node itself, or one of its pods.
#[derive(Clone, Copy)]
enum Client {
    Node,
    Pod([u8; 4]),
}

#[inline(always)]
fn client_of(ctx: &SockAddrContext) -> Option<Client> {
    let node = config().host_netns_cookie;
    if node == 0 {
        return Some(Client::Node);
    }
    // SAFETY: a helper call on this program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == node {
        return Some(Client::Node);
    }
    // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
    POD_NAMESPACES
        .get_ptr(netns)
        .map(|addr| Client::Pod(unsafe { *addr }))
}

/// The socket address in the context: (address, port in host order, protocol).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext) -> ([u8; 4], u16, u8) {
    // SAFETY: reading fields of the context the kernel handed this program.
    unsafe {
        let sa = ctx.sock_addr;
        (
            (*sa).user_ip4.to_ne_bytes(),
            u16::from_be((*sa).user_port as u16),
            (*sa).protocol as u8,
        )
    }
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
    // SAFETY: writing the two fields these hooks may rewrite.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip4 = u32::from_ne_bytes(addr);
        (*sa).user_port = u32::from(port.to_be());
    }
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let Some(client) = client_of(ctx) else {
        return ALLOW;
    };
    let (addr, port, proto) = user_addr(ctx);
    let frontend_key = lb::frontend_key(addr, port, proto);
    let Some(service) = lb::frontend(&frontend_key) else {
        return ALLOW;
    };
    let (client_addr, selection) = match client {
        Client::Node => (NODE_CLIENT, service.select(true)),
        Client::Pod(pod) => {
            // As TC judges the pod's packets: a pod outside --cluster-cidr is masqueraded.
            let selection = service.select(config().in_cluster(pod));
            if (proto == ip_proto::UDP && !sticky)
                || selection.masquerade
                || !lb::source_allowed(&frontend_key, &service, pod)
            {
                return ALLOW;
            }
            (pod, selection)
        }
    };
    // SAFETY: a helper call on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward_key = SockNatKey {
        cookie,
        addr,
        port,
        proto,
        direction: ct_direction::FORWARD,
    };
    let previous = if sticky {
        // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
        SOCK_NAT.get_ptr(forward_key).map(|value| unsafe { *value })
    } else {
        None
    };
    let endpoint = match previous {
        Some(value) => (value.addr, value.port),
        None => match lb::pick(&service, &selection, client_addr, ct::now_ns()) {
            // A pod that backs the service is TC's: its hairpin connections are masqueraded
            // (kube-proxy's semantics), and TC's uniform pick is not skewed by a second one.
            Ok(endpoint)
                if matches!(client, Client::Pod(_))
                    && lb::is_member(selection.set_id, client_addr, endpoint.port) =>
            {
                return ALLOW;
            }
            Ok(endpoint) => (endpoint.addr, endpoint.port),
            // TC rejects a pod's packets (and counts them) as it would without this hook.
            Err(_) if matches!(client, Client::Pod(_)) => return ALLOW,
            Err(reason) => {
                count_drop(reason);
                return refuse(reason);
            }
        },
    };
    let reply_key = SockNatKey {
        cookie,
        addr: endpoint.0,
        port: endpoint.1,
        proto,
        direction: ct_direction::REPLY,
    };
    let frontend = SockNatValue {
        addr,
        port,
        _pad: 0,
    };
    let mut recorded = SOCK_NAT.insert(reply_key, frontend, u64::from(BPF_ANY));
    if sticky && previous.is_none() {
        let chosen = SockNatValue {
            addr: endpoint.0,
            port: endpoint.1,
            _pad: 0,
        };
        recorded = recorded.and_then(|()| SOCK_NAT.insert(forward_key, chosen, u64::from(BPF_ANY)));
    }
    if recorded.is_err() {
        count_drop(DropReason::ConntrackInsertFailed);
        return REJECT;
    }
    set_user_addr(ctx, endpoint.0, endpoint.1);
    ALLOW
}

/// Fails the call with the error that says why.
#[inline(always)]
fn refuse(reason: DropReason) -> i32 {
    let errno = match reason {
        DropReason::NoEndpoints => ECONNREFUSED,
        DropReason::NoLocalEndpoints => EHOSTUNREACH,
        _ => return REJECT,
    };
    // SAFETY: a volatile read of a global the loader wrote (so the compiler keeps the test),
    // then a helper taking a plain integer.
    unsafe {
        if core::ptr::read_volatile(&raw const HAS_SET_RETVAL) != 0 {
            bpf_set_retval(-errno);
        }
    }
    REJECT
}

#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    // Only sockets this node translated have an entry (the socket cookie is unique).
    let (addr, port, proto) = user_addr(ctx);
    // SAFETY: a helper call on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockNatKey {
        cookie,
        addr,
        port,
        proto,
        direction: ct_direction::REPLY,
    };
    if let Some(frontend) = SOCK_NAT.get_ptr(key) {
        // SAFETY: the pointer comes from a successful lookup; the value is copied out at once.
        let frontend = unsafe { *frontend };
        set_user_addr(ctx, frontend.addr, frontend.port);
    }
}
