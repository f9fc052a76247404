//! The overlay's `BPF_PROG_TEST_RUN` fixture: a node at 192.168.50.1 whose datapath holds the
//! lease of node .2 (172.30.44.0/24), an uplink namespace for the encapsulation's FIB lookup,
//! and the VXLAN frames a remote node sends. Shared by the overlay fixture tests and the bench.

use std::net::{Ipv4Addr, SocketAddrV4};

use weft::model::NodeLease;
use weft_common::maps::{OverlayConfig, overlay_flags};

use crate::{
    harness::Datapath,
    netns::{Netns, unique},
    packet::{SYN, checksum, tcp},
};

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// This node and the remote one: underlay addresses, VtepMACs, and the uplink's and next hop's MACs.
pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const OUR_VTEP: [u8; 6] = [0x0e, 0xfe, 192, 168, 50, 1];
pub const REMOTE_VTEP: [u8; 6] = [0xb6, 0xc7, 0x0f, 0x7f, 0x66, 0xa7];
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb0];
/// The MAC of the fixture's pods (the source MAC of the test frames).
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// This node's overlay settings (Network 172.30.0.0/16, VNI 1, port 8472).
#[must_use]
pub fn overlay() -> OverlayConfig {
    OverlayConfig {
        public_ip: OUR_IP.octets(),
        network_addr: [172, 30, 0, 0],
        network_prefix_len: 16,
        flags: overlay_flags::EBPF_HOST_ROUTING,
        port: 8472,
        vni: 1,
        vtep_mac: OUR_VTEP,
        uplink_mac: UPLINK_MAC,
        local_subnet_addr: [172, 30, 20, 0],
        local_subnet_prefix_len: 24,
        _pad: 0,
        inner_mtu: 1450,
        uplink_ifindex: 0,
        tunnel_ifindex: 0,
        bridge_mac: BRIDGE_MAC,
        _pad2: [0; 2],
    }
}

/// A datapath of this node with node .2's lease for 172.30.44.0/24, its uplink the device
/// with ifindex `uplink` (see [`uplink_namespace`]).
#[must_use]
pub fn datapath(uplink: u32) -> Datapath {
    let mut datapath = Datapath::new("", None);
    datapath.set_overlay(&OverlayConfig {
        uplink_ifindex: uplink,
        ..overlay()
    });
    datapath.set_lease(
        "172.30.44.0/24".parse().unwrap(),
        NodeLease {
            public_ip: REMOTE_IP,
            vtep_mac: REMOTE_VTEP,
        },
    );
    datapath
}

/// A namespace whose uplink `up0` (UPLINK_MAC, OUR_IP) knows the remote node's MAC, so the
/// encapsulation's FIB lookup has a known answer, and whose `up0p` (its peer) stands for a
/// pod's port. Forwarding is on, as the agent sets it (the kernel's FIB lookup helper refuses
/// to answer for a device that does not forward). Returns the namespace and the uplink's
/// ifindex.
pub fn uplink_namespace() -> (Netns, u32) {
    let ns = Netns::create(&unique("wfix")).expect("fixture namespace");
    ns.exec("sysctl", &["-w", "net.ipv4.ip_forward=1"])
        .expect("forwarding");
    let uplink_mac = mac_text(UPLINK_MAC);
    ns.ip(&[
        "link",
        "add",
        "name",
        "up0",
        "address",
        &uplink_mac,
        "type",
        "veth",
        "peer",
        "name",
        "up0p",
    ])
    .expect("uplink");
    ns.ip(&["addr", "add", "192.168.50.1/24", "dev", "up0"])
        .expect("uplink address");
    ns.ip(&["link", "set", "up0", "up"]).expect("uplink up");
    ns.ip(&["link", "set", "up0p", "up"]).expect("peer up");
    ns.ip(&[
        "neigh",
        "add",
        "192.168.50.2",
        "lladdr",
        &mac_text(NEXT_HOP_MAC),
        "dev",
        "up0",
        "nud",
        "permanent",
    ])
    .expect("next hop");
    let index = ns
        .run(|| nix::net::if_::if_nametoindex("up0"))
        .expect("uplink index");
    (ns, index)
}

/// The ifindex of `up0p` in an [`uplink_namespace`]: a pod's port for the fixtures.
#[must_use]
pub fn pod_port(ns: &Netns) -> u32 {
    ns.run(|| nix::net::if_::if_nametoindex("up0p"))
        .expect("pod port index")
}

/// `aa:bb:..` for `ip`.
#[must_use]
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Pod `172.30.third.last:port`.
#[must_use]
pub fn pod(last: u8, third: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(172, 30, third, last), port)
}

/// A VXLAN frame as a remote node sends it to this one.
#[must_use]
pub fn vxlan_frame(
    source: Ipv4Addr,
    port: u16,
    vni: u32,
    inner: &[u8],
    udp_checksum: u16,
) -> Vec<u8> {
    let total = (20 + 8 + 8 + inner.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&source.octets());
    ip.extend_from_slice(&OUR_IP.octets());
    let sum = checksum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&sum);
    let mut frame = Vec::new();
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&NEXT_HOP_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&45000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&(total - 20).to_be_bytes());
    frame.extend_from_slice(&udp_checksum.to_be_bytes());
    let vni = vni.to_be_bytes();
    frame.extend_from_slice(&[0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
    frame.extend_from_slice(inner);
    frame
}

/// The inner frame a remote node sends: to our VtepMAC, from its own.
#[must_use]
pub fn inner_frame() -> Vec<u8> {
    let mut frame = tcp(pod(5, 44, 80), pod(5, 20, 40000), SYN)
        .payload(b"reply")
        .build();
    frame[0..6].copy_from_slice(&OUR_VTEP);
    frame[6..12].copy_from_slice(&REMOTE_VTEP);
    frame
}
