//! weft's eBPF programs. One module per hook; shared per-packet logic in small modules. (The
//! bench's empty programs are another object, `weft-floor`, so they never ship in this one.)
//!
//! | hook | program | job |
//! |---|---|---|
//! | TC ingress of every pod's bridge port | [`tc_from_pods`] | service DNAT, conntrack, masquerade mark, rejects; VXLAN encapsulation to remote pods, straight to the uplink |
//! | TC egress of every pod's bridge port | [`tc_to_pod`] | reverse NAT of replies (and of ICMP errors about connections) to local pods |
//! | cgroup `connect4` / `sendmsg4` / `recvmsg4` / `getpeername4` | [`cgroup_sock_addr`] | services for the node's own sockets |
//! | TC ingress of the uplink | [`tc_from_uplink`] | VXLAN decapsulation (into local pods directly), service DNAT for clients outside the node (NodePort, external IPs) |
//! | TC egress of the uplink | [`tc_to_uplink`] | reverse NAT of replies leaving the node, VXLAN encapsulation to remote pod subnets |
//! | TC ingress of the `external` VXLAN device | [`tc_from_tunnel`] | the overlay's rules on what the kernel decapsulated; service DNAT |
//! | XDP on the uplink (optional) | [`xdp_uplink`] | early drops of VXLAN from non-members and of malformed VXLAN |
//! | none (bench only) | [`floor`] | empty TC and XDP programs: the cost of running any program |
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    not(target_arch = "bpf"),
    expect(unused_crate_dependencies, reason = "the host build is an empty stub")
)]

#[cfg(target_arch = "bpf")]
mod cgroup_sock_addr;
#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod frag;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod service;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc_from_pods;
#[cfg(target_arch = "bpf")]
mod tc_from_tunnel;
#[cfg(target_arch = "bpf")]
mod tc_from_uplink;
#[cfg(target_arch = "bpf")]
mod tc_to_pod;
#[cfg(target_arch = "bpf")]
mod tc_to_uplink;
#[cfg(target_arch = "bpf")]
mod vxlan;
#[cfg(target_arch = "bpf")]
mod xdp_uplink;

/// The kernel requires a GPL-compatible licence for some helpers (e.g. `bpf_ktime_get_ns`'s
/// neighbours in the tracing set); weft's eBPF code is dual licensed so it can use them all.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

/// The host build of this binary is an empty stub so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
