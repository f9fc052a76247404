//! The overlay's per-packet work, shared by the hooks that do it: VXLAN decapsulation on the
//! uplink's ingress, delivery of what it carried straight into a pod of this node, learning
//! where those pods are, and encapsulation towards another node (at a pod's port, or on the
//! uplink's egress for what the node routes there).
//!
//! The entry points are functions of their own in each program (not inlined), so that their
//! stack frames and service translation's are not added up past the verifier's 512 bytes.
//!
//! Everything here keeps GSO super-packets whole. Decapsulation removes the outer headers with
//! `BPF_F_ADJ_ROOM_FIXED_GSO` (the segment size is the inner packet's already); encapsulation
//! grows the packet with the tunnel flags, so the kernel (or the NIC) segments it after the
//! last hook, each segment with its own outer headers.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_CSUM_LEVEL_DEC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_tunnel_key,
    },
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_csum_level, bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use weft_common::{
    MASQUERADE_MARK, csum,
    drop_reason::DropReason,
    ip_proto,
    maps::{LocalPod, OverlayConfig, RemoteNode},
    packet::{
        ETH_HLEN, ETH_P_IP, Frame, Ipv4Header, PacketBytes as _, ipv4, parse_ipv4, source_mac,
    },
    vxlan::{self, Encap, Received, Tunneled},
};

use crate::{
    maps::{LOCAL_PODS, PEER_PORTS, SUBNETS, VTEPS, verdict},
    packet::Skb,
    service,
};

/// `AF_INET`, for the FIB lookup.
const AF_INET: u8 = 2;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header's length, in the flags' top byte.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (newer kernels): decapsulation also clears the skb's UDP
/// tunnel GSO state, as the kernel's own VXLAN receive path does. Older kernels refuse the
/// flag, and the state stays behind (see [`decapsulate`]).
const ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
/// `EALREADY`: `bpf_skb_adjust_room` refuses to encapsulate an skb marked as encapsulated.
pub(crate) const EALREADY: i64 = 114;
/// `PACKET_OTHERHOST`: a frame the uplink received for another host's MAC.
const PACKET_OTHERHOST: u32 = 3;
/// Offsets of the TTL and TOS bytes in an IPv4 header.
const IPV4_TOS: usize = 1;
const IPV4_TTL: usize = 8;
/// Bytes of the Ethernet, IPv4 (with the longest options) and VXLAN headers, then an inner
/// Ethernet and IPv4 header: what decapsulation reads.
const VXLAN_HEADERS_MAX: u32 = 14 + 60 + 16 + 14 + 20;

/// What the uplink's ingress makes of a frame for the overlay.
pub(crate) enum Arrival {
    /// Not the overlay's to take: it goes on as any frame from outside the node.
    NotOurs,
    /// A member's VXLAN, decapsulated in place: the frame now is the inner packet.
    Decapsulated,
    /// A member's VXLAN left whole for the node's VXLAN device (the kernel path): a GSO
    /// aggregate this kernel cannot decapsulate safely for where it goes.
    ToKernel,
}

/// Decapsulates a member's VXLAN for this node, in place. VXLAN from an address that holds no
/// lease, cut short, or carrying no IPv4 is dropped (`Err`); anything else is not touched.
///
/// The kernel's VXLAN receive path is followed where it shows: the outer header's ECN is
/// carried inward (RFC 6040), one level of verified checksum is consumed with the outer UDP
/// header, and the skb keeps its GSO geometry. What stays behind on kernels without
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` is the skb's UDP tunnel GSO state (`skb->encapsulation`, the
/// tunnel GSO type, inner header offsets): harmless for a TCP aggregate that [`into_pod`]
/// hands straight to a pod's TCP, but the stack's forwarding reads it (the MTU check measures
/// segments by those offsets; UDP segmentation takes the packet for a tunnel's), so any other
/// GSO aggregate is left whole to the node's VXLAN device, which clears that state as it
/// decapsulates. Measured: forwarding such aggregates through the stack ran at a third of the
/// kernel device's rate.
#[inline(never)]
pub(crate) fn decapsulate(ctx: &TcContext, overlay: &OverlayConfig) -> Result<Arrival, DropReason> {
    // SAFETY: reading fields of this program's context.
    let (pkt_type, gso_size) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).gso_size) };
    if overlay.public_ip == [0; 4] || pkt_type == PACKET_OTHERHOST {
        return Ok(Arrival::NotOurs);
    }
    let want = ctx.len().min(VXLAN_HEADERS_MAX);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    let skb = Skb(ctx);
    let tunneled = match vxlan::classify(&skb, overlay, |src| VTEPS.get_ptr(src).is_some()) {
        Received::NotOurs => return Ok(Arrival::NotOurs),
        Received::Drop(reason) => return Err(reason),
        Received::Member(tunneled) => tunneled,
    };
    let inner_at = ETH_HLEN + tunneled.encap_len;
    // Cut short inside, there is no TOS to carry in, and the shrink below refuses to leave
    // less than an IPv4 header: dropped as `DecapFailed`.
    let inner: Option<[u8; 20]> = ctx.load(inner_at).ok();
    let tos = match inner {
        Some(inner) => Some(
            vxlan::decapsulated_tos(tunneled.outer_tos, inner[IPV4_TOS])
                .ok_or(DropReason::VxlanCongestionNotEct)?,
        ),
        None => None,
    };
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO) | u64::from(BPF_F_ADJ_ROOM_NO_CSUM_RESET);
    let len = -(tunneled.encap_len as i32);
    if ctx
        .adjust_room(len, BPF_ADJ_ROOM_MAC, flags | ADJ_ROOM_DECAP_L4_UDP)
        .is_err()
    {
        let for_a_learned_pod = inner.is_some_and(|inner| {
            inner[9] == ip_proto::TCP
                && overlay.ebpf_host_routing()
                && local_pod([inner[16], inner[17], inner[18], inner[19]]).is_some()
        });
        if gso_size != 0 && !for_a_learned_pod && overlay.tunnel_ifindex != 0 {
            return Ok(Arrival::ToKernel);
        }
        if ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, flags).is_err() {
            // A GSO skb the kernel will not shrink here (its type): the VXLAN device can.
            return if gso_size != 0 && overlay.tunnel_ifindex != 0 {
                Ok(Arrival::ToKernel)
            } else {
                Err(DropReason::DecapFailed)
            };
        }
    }
    // SAFETY: a helper on this program's own context.
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_DEC)) };
    if let (Some(inner), Some(tos)) = (inner, tos)
        && tos != inner[IPV4_TOS]
    {
        let from = u16::from_ne_bytes([inner[0], inner[IPV4_TOS]]);
        let to = u16::from_ne_bytes([inner[0], tos]);
        ctx.l3_csum_replace(ETH_HLEN + ipv4::CHECKSUM, u64::from(from), u64::from(to), 2)
            .and_then(|()| ctx.store(ETH_HLEN + IPV4_TOS, &tos, 0))
            .map_err(|_| DropReason::DecapFailed)?;
    }
    readdress(ctx, overlay, &tunneled)?;
    Ok(Arrival::Decapsulated)
}

/// The decapsulated frame is addressed to the uplink (so the stack takes it and routes it
/// on) from the sending node's VtepMAC, as the inner frame was.
#[inline(always)]
fn readdress(
    ctx: &TcContext,
    overlay: &OverlayConfig,
    tunneled: &Tunneled,
) -> Result<(), DropReason> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&overlay.uplink_mac);
    macs[6..].copy_from_slice(&tunneled.inner_src_mac);
    Skb(ctx).write(0, macs).ok_or(DropReason::DecapFailed)
}

/// Delivers a packet the overlay carried to a pod of this node straight into the pod's
/// namespace (`bpf_redirect_peer`), past the node's routing, bridge and netfilter, with what
/// those would have done: the reverse NAT of a reply the pod's port would restore
/// (`tc_to_pod` is skipped), the forwarding's TTL decrement, the gateway's MAC as the source.
/// Returns `TC_ACT_UNSPEC`, leaving the packet to the stack, for what the stack must see: a pod not
/// learned yet, a packet to masquerade, a TTL that runs out, `--host-routing=kernel`.
///
/// Not inlined (its frame is not added to its caller's), and returns a plain verdict, a drop
/// counted: an enum returned across a BPF call can carry undefined bits the verifier refuses.
#[inline(never)]
pub(crate) fn into_pod(ctx: &TcContext, overlay: &OverlayConfig) -> i32 {
    verdict(deliver_into_pod(ctx, overlay))
}

#[inline(always)]
fn deliver_into_pod(ctx: &TcContext, overlay: &OverlayConfig) -> Result<i32, DropReason> {
    let Some(ip) = routed_by_ebpf(ctx, overlay) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let skb = Skb(ctx);
    let Some(pod) = local_pod(ip.dst) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let Some(ttl) = forwardable_ttl(&skb) else {
        return Ok(TC_ACT_UNSPEC);
    };
    service::to_client(ctx)?;
    decrement_ttl(ctx, ttl)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&pod.mac);
    macs[6..].copy_from_slice(&overlay.bridge_mac);
    Skb(ctx)
        .write(0, macs)
        .ok_or(DropReason::NatRewriteFailed)?;
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect_peer(pod.ifindex, 0) } as i32)
}

/// Records which port a pod of this node sends from, and its MAC, from an IPv4 or ARP frame
/// its port received: where [`into_pod`] delivers its packets. Only addresses of this node's
/// subnet, behind ports that are veths, are learned, and the map is written only when
/// something changed.
#[inline(always)]
pub(crate) fn learn_pod(ctx: &TcContext, overlay: &OverlayConfig) {
    if !overlay.ebpf_host_routing() {
        return;
    }
    let skb = Skb(ctx);
    let Some(ethernet) = skb.read::<{ ETH_HLEN }>(0) else {
        return;
    };
    // The sender's address: IPv4's source, or ARP's sender protocol address.
    let sender_at = match u16::from_be_bytes([ethernet[12], ethernet[13]]) {
        ETH_P_IP => ETH_HLEN + ipv4::SRC_ADDR,
        ETH_P_ARP => ETH_HLEN + 14,
        _ => return,
    };
    let Some(addr) = skb.read::<4>(sender_at) else {
        return;
    };
    // SAFETY: reading a field of this program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if !overlay.in_local_subnet(addr) || PEER_PORTS.get_ptr(ifindex).is_none() {
        return;
    }
    let pod = LocalPod {
        ifindex,
        mac: source_mac(&ethernet),
        _pad: [0; 2],
    };
    if local_pod(addr) != Some(pod) {
        // A full map evicts its least recently used pod; a failure leaves the stack's path.
        let _ = LOCAL_PODS.insert(addr, pod, 0);
    }
}

/// The pod of this node with address `addr`, as last learned.
#[inline(always)]
fn local_pod(addr: [u8; 4]) -> Option<LocalPod> {
    // SAFETY: the pointer is to a live entry of the map, read once; an update replaces a hash
    // map's entry whole (under RCU), so the copy is the old pod or the new one, never a mix.
    LOCAL_PODS.get_ptr(addr).map(|pod| unsafe { *pod })
}

/// `ETH_P_ARP`.
const ETH_P_ARP: u16 = 0x0806;

/// Sends a pod's packet for a pod of another node straight from the pod's port into the
/// overlay: what the stack would do, routing it to the uplink where `tc_to_uplink`
/// encapsulates it, without the bridge, the routing and netfilter. Returns `TC_ACT_UNSPEC`,
/// leaving the packet to the stack, for what the stack must see: a packet to masquerade, one larger than
/// the overlay carries (the stack fragments it or answers with ICMP), a TTL that runs out, a
/// subnet no node holds (the uplink counts its drop), `--host-routing=kernel`.
///
/// Not inlined (its frame is not added to its caller's), and returns a plain verdict, a drop
/// counted: an enum returned across a BPF call can carry undefined bits the verifier refuses.
#[inline(never)]
pub(crate) fn from_pod(ctx: &TcContext, overlay: &OverlayConfig) -> i32 {
    verdict(send_from_pod(ctx, overlay))
}

#[inline(always)]
fn send_from_pod(ctx: &TcContext, overlay: &OverlayConfig) -> Result<i32, DropReason> {
    let Some(ip) = routed_by_ebpf(ctx, overlay) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let skb = Skb(ctx);
    // SAFETY: reading a field of this program's context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if !overlay.is_remote_pod(ip.dst)
        || !overlay.in_local_subnet(ip.src)
        || !fits(&skb, &ip, ctx.len(), gso_size, overlay.inner_mtu)
    {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(ttl) = forwardable_ttl(&skb) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let Some(node) = remote_node(ip.dst) else {
        return Ok(TC_ACT_UNSPEC);
    };
    // A reply to a client of another node whose connection the uplink translated.
    service::to_client(ctx)?;
    decrement_ttl(ctx, ttl)?;
    match encapsulate(ctx, overlay, &node) {
        Ok(()) => {}
        // Marked as encapsulated already (a packet this node decapsulated, sent back by a
        // pod that forwards): the stack's path sends it through the VXLAN device.
        Err(Some(EALREADY)) => return Ok(TC_ACT_UNSPEC),
        Err(_) => return Err(DropReason::EncapFailed),
    }
    forward(ctx, overlay, &node)
}

/// The packet's IPv4 header when the datapath may route it past the node's stack: eBPF host
/// routing is on, nothing asks for masquerade (nftables must see that), and it is IPv4.
#[inline(always)]
fn routed_by_ebpf(ctx: &TcContext, overlay: &OverlayConfig) -> Option<Ipv4Header> {
    // SAFETY: reading a field of this program's context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if !overlay.ebpf_host_routing() || mark & MASQUERADE_MARK != 0 {
        return None;
    }
    let skb = Skb(ctx);
    if !skb.pull_headers() {
        return None;
    }
    match parse_ipv4(&skb) {
        Frame::Ipv4(ip) => Some(ip),
        Frame::NotIpv4 | Frame::MalformedIpv4 => None,
    }
}

/// Whether the packet fits the overlay: its length, or each segment of a GSO packet, within
/// the inner MTU.
#[inline(always)]
fn fits(skb: &Skb<'_>, ip: &Ipv4Header, len: u32, gso_size: u32, inner_mtu: u16) -> bool {
    let inner_mtu = u32::from(inner_mtu);
    if gso_size == 0 {
        return len - ETH_HLEN as u32 <= inner_mtu;
    }
    let l4_header_len = match ip.proto {
        ip_proto::TCP => match skb.read::<1>(ip.l4_offset + 12) {
            Some(offset) => u32::from(offset[0] >> 4) * 4,
            None => return false,
        },
        ip_proto::UDP => 8,
        _ => return false,
    };
    (ip.l4_offset - ETH_HLEN) as u32 + l4_header_len + gso_size <= inner_mtu
}

/// The packet's TTL when a router may forward it (above 1); `None` when the stack must answer
/// it with an ICMP time exceeded.
#[inline(always)]
fn forwardable_ttl(skb: &Skb<'_>) -> Option<u8> {
    let ttl = skb.read::<2>(ETH_HLEN + IPV4_TTL)?;
    (ttl[0] > 1).then_some(ttl[0])
}

/// Decrements the TTL as forwarding does, updating the header checksum.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), DropReason> {
    let skb = Skb(ctx);
    let at = ETH_HLEN + IPV4_TTL;
    let checksum_at = ETH_HLEN + ipv4::CHECKSUM;
    let word = skb.read::<2>(at).ok_or(DropReason::NatRewriteFailed)?;
    let checksum = skb
        .read::<2>(checksum_at)
        .ok_or(DropReason::NatRewriteFailed)?;
    let decremented = [ttl - 1, word[1]];
    let checksum = csum::replace(u16::from_be_bytes(checksum), &word, &decremented);
    skb.write(at, decremented)
        .and_then(|()| skb.write(checksum_at, checksum.to_be_bytes()))
        .ok_or(DropReason::NatRewriteFailed)
}

/// The node whose lease holds `dst`'s subnet.
#[inline(always)]
pub(crate) fn remote_node(dst: [u8; 4]) -> Option<RemoteNode> {
    SUBNETS.get(&Key::new(32, dst)).copied()
}

/// Encapsulates the packet in VXLAN to `node`, exactly as Linux VXLAN (`flannel.1`) frames it:
/// outer IPv4/UDP to its PublicIP and port, the overlay's VNI, inner MACs the VtepMACs, outer
/// source port from the flow hash as Linux picks it. The outer Ethernet header is left for
/// [`forward`]. `Err` carries the helper's error number, if it was the one that failed.
#[inline(always)]
pub(crate) fn encapsulate(
    ctx: &TcContext,
    overlay: &OverlayConfig,
    node: &RemoteNode,
) -> Result<(), Option<i64>> {
    let inner: [u8; 20] = ctx.load(ETH_HLEN).map_err(|_| None)?;
    // SAFETY: a helper on this program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let headers = vxlan::headers(&Encap {
        src: overlay.public_ip,
        dst: node.public_ip,
        src_port: vxlan::source_port(hash),
        dst_port: overlay.port,
        vni: overlay.vni,
        inner_src_mac: overlay.vtep_mac,
        inner_dst_mac: node.vtep_mac,
        ip_id: u16::from_be_bytes([inner[4], inner[5]]),
        tos: inner[IPV4_TOS],
        inner_len: ctx.len() - ETH_HLEN as u32,
    });
    // The segment size stays: the pod routes' MTU leaves room for the encapsulation already,
    // so each segment fills the uplink's MTU exactly.
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        | ENCAP_L2_ETH_LEN;
    let grow = vxlan::ENCAP_LEN as i32;
    // Kernels before 5.12 refuse the L2_ETH flag (it marks the inner protocol as Ethernet for
    // GSO); without it they still segment right: the inner MAC length says where IPv4 starts.
    if let Err(e) = ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags) {
        if -e == EALREADY {
            return Err(Some(EALREADY));
        }
        let older = flags & !u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH);
        ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, older)
            .map_err(|e| Some(-e))?;
    }
    ctx.store(ETH_HLEN, &headers, 0).map_err(|_| None)
}

/// Hands a packet for `node` that cannot be encapsulated here (see [`encapsulate`]) to the
/// node's VXLAN device, which encapsulates it as the kernel does; `None` when there is none.
#[inline(always)]
pub(crate) fn to_tunnel_device(
    ctx: &TcContext,
    overlay: &OverlayConfig,
    node: &RemoteNode,
) -> Option<i32> {
    if overlay.tunnel_ifindex == 0 {
        return None;
    }
    // SAFETY: `bpf_tunnel_key` is plain data; all-zero is its documented initial state.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = overlay.vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node.public_ip);
    key.tunnel_ttl = vxlan::OUTER_TTL;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&node.vtep_mac);
    macs[6..].copy_from_slice(&overlay.vtep_mac);
    ctx.store(0, &macs, 0).ok()?;
    // SAFETY: `key` is initialised; the size is the layout every kernel since 4.x accepts
    // (up to `tunnel_label`).
    let set = unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &raw mut key, TUNNEL_KEY_LEN, 0) };
    // SAFETY: a helper taking plain integers.
    (set == 0).then(|| unsafe { bpf_redirect(overlay.tunnel_ifindex, 0) } as i32)
}

/// `offsetof(struct bpf_tunnel_key, tunnel_label)`: a key size every kernel takes.
pub(crate) const TUNNEL_KEY_LEN: u32 = 24;

/// Addresses the outer Ethernet header to the next hop towards `node` and sends the packet out
/// of the uplink: on, when the program runs there, else redirected to it. The next hop is the
/// one the agent resolved for the node; only while it has none is the route looked up (FIB),
/// and a next hop not resolved yet is left to the kernel to resolve.
#[inline(always)]
pub(crate) fn forward(
    ctx: &TcContext,
    overlay: &OverlayConfig,
    node: &RemoteNode,
) -> Result<i32, DropReason> {
    // SAFETY: reading a field of this program's context.
    let on = unsafe { (*ctx.skb.skb).ifindex };
    let uplink = overlay.uplink_ifindex;
    if node.next_hop_ifindex != 0 && node.next_hop_ifindex == uplink {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&node.next_hop_mac);
        macs[6..].copy_from_slice(&overlay.uplink_mac);
        ctx.store(0, &macs, 0)
            .map_err(|_| DropReason::EncapFailed)?;
        return Ok(send(uplink, on));
    }
    // SAFETY: `bpf_fib_lookup` is plain data; all-zero is its documented initial state.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = uplink;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(overlay.public_ip);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(node.public_ip);
    // SAFETY: `fib` is a valid, initialised lookup structure of the size passed.
    let found = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match found as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&fib.dmac);
            macs[6..].copy_from_slice(&fib.smac);
            ctx.store(0, &macs, 0)
                .map_err(|_| DropReason::EncapFailed)?;
            Ok(send(fib.ifindex, on))
        }
        // The next hop is known but not yet resolved: let the kernel resolve it and send.
        // SAFETY: a helper taking an interface index and no parameters.
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        _ => Err(DropReason::NoRouteToNode),
    }
}

/// Out of `device`: on, when the program runs there (`on`), else redirected to it.
#[inline(always)]
fn send(device: u32, on: u32) -> i32 {
    if device == on {
        TC_ACT_UNSPEC
    } else {
        // SAFETY: a helper taking plain integers.
        unsafe { bpf_redirect(device, 0) as i32 }
    }
}
