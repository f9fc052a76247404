//! `BPF_PROG_TEST_RUN` fixtures for the overlay: VXLAN encapsulation on the uplink's TC egress
//! and at a pod's port (output checked byte for byte against frames built here by hand),
//! decapsulation on the uplink's TC ingress, delivery straight into a learned pod, the XDP
//! filter and the VXLAN device's hook, with leases filled by the agent's own reconciler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use weft::model::NextHop;
use weft_common::programs::{FROM_PODS, FROM_TUNNEL, FROM_UPLINK, TO_UPLINK, XDP_UPLINK};
use weft_common::{
    drop_reason::DropReason,
    maps::{LocalPod, OverlayConfig},
};
use weft_tests::{
    harness::{Datapath, VERDICT_DROP, VERDICT_PASS, VERDICT_REDIRECT},
    netns::Netns,
    overlay_fixture::{
        BRIDGE_MAC, NEXT_HOP_MAC, OUR_IP, OUR_VTEP, POD_MAC, REMOTE_IP, REMOTE_VTEP, UPLINK_MAC,
        XDP_DROP, XDP_PASS, datapath, inner_frame, overlay, pod, pod_port, uplink_namespace,
        vxlan_frame,
    },
    packet::{ACK, SYN, checksum, tcp},
};

/// The frame Linux VXLAN would send for `inner` (an Ethernet frame) from this node to the
/// remote one, built field by field here, with `source_port` as the outer UDP source port.
fn expected_encap(inner: &[u8], source_port: u16) -> Vec<u8> {
    let inner_ip = &inner[14..];
    let total = (20 + 8 + 8 + 14 + inner_ip.len()) as u16;
    let mut ip = vec![0x45, inner_ip[1]];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&inner_ip[4..6]); // identification, copied from the inner packet
    ip.extend_from_slice(&[0, 0, 64, 17, 0, 0]); // DF clear, TTL 64, UDP, checksum below
    ip.extend_from_slice(&OUR_IP.octets());
    ip.extend_from_slice(&REMOTE_IP.octets());
    let sum = checksum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&sum);
    let mut frame = Vec::new();
    frame.extend_from_slice(&NEXT_HOP_MAC);
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&source_port.to_be_bytes());
    frame.extend_from_slice(&8472u16.to_be_bytes());
    frame.extend_from_slice(&(total - 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum (RFC 7348)
    frame.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]); // I flag, VNI 1
    frame.extend_from_slice(&REMOTE_VTEP);
    frame.extend_from_slice(&OUR_VTEP);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(inner_ip);
    frame
}

/// The outer UDP source port of an encapsulated frame.
fn source_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// `frame` as a router forwards it: TTL one less, header checksum recomputed.
fn forwarded(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[22] -= 1;
    out[24..26].fill(0);
    let sum = checksum(&out[14..34]);
    out[24..26].copy_from_slice(&sum.to_be_bytes());
    out
}

/// A change to the fixture node's overlay settings.
type Tweak = fn(&mut OverlayConfig);

/// The fixture node's datapath with its uplink in a fresh namespace; `tweak` changes its
/// overlay settings.
fn node(tweak: impl FnOnce(&mut OverlayConfig)) -> (Datapath, Netns, u32) {
    let (ns, uplink) = uplink_namespace();
    let mut datapath = datapath(uplink);
    let mut config = OverlayConfig {
        uplink_ifindex: uplink,
        ..overlay()
    };
    tweak(&mut config);
    datapath.set_overlay(&config);
    (datapath, ns, uplink)
}

#[test]
fn a_packet_for_a_remote_pod_is_encapsulated_exactly_as_linux_vxlan_frames_it() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let inner = tcp(pod(5, 20, 40000), pod(5, 44, 80), SYN)
        .payload(b"hello")
        .build();
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &inner, uplink));
    assert_eq!(run.verdict, VERDICT_PASS, "{:?}", datapath.drops());
    let port = source_port(&run.output);
    assert!(
        (32768..61000).contains(&port),
        "source port {port} in Linux's range"
    );
    assert_eq!(run.output, expected_encap(&inner, port));
    // The same flow keeps its port; different flows spread over the range.
    let again = ns.run(|| datapath.run_on(TO_UPLINK, &inner, uplink));
    assert_eq!(source_port(&again.output), port);
    let ports: BTreeSet<u16> = (0..64u16)
        .map(|i| {
            let flow = tcp(pod(5, 20, 41000 + i), pod(5, 44, 80), SYN).build();
            source_port(&ns.run(|| datapath.run_on(TO_UPLINK, &flow, uplink)).output)
        })
        .collect();
    assert!(
        ports.len() > 32,
        "64 flows used only {} source ports",
        ports.len()
    );
    assert!(datapath.drops().is_empty());
}

#[test]
fn traffic_outside_the_pod_network_passes_the_uplink_untouched() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let underlay = tcp(
        SocketAddrV4::new(OUR_IP, 40000),
        SocketAddrV4::new(REMOTE_IP, 2379),
        SYN,
    )
    .build();
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &underlay, uplink));
    assert_eq!((run.verdict, run.output), (VERDICT_PASS, underlay));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &arp, uplink));
    assert_eq!((run.verdict, run.output), (VERDICT_PASS, arp));
    assert!(datapath.drops().is_empty());
}

#[test]
fn a_packet_for_a_subnet_no_node_holds_is_dropped_and_counted() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let orphan = tcp(pod(5, 20, 40000), pod(5, 99, 80), SYN).build();
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &orphan, uplink));
    assert_eq!(run.verdict, VERDICT_DROP);
    assert_eq!(
        datapath.drops(),
        BTreeMap::from([(DropReason::NoLeaseForDestination, 1)])
    );
}

/// The inner frame decapsulation leaves: addressed to the uplink from the sender's VtepMAC.
fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let mut expected = inner.to_vec();
    expected[0..6].copy_from_slice(&UPLINK_MAC);
    expected[6..12].copy_from_slice(&REMOTE_VTEP);
    expected
}

/// One row of a receive table: what goes in, the verdict, the output when not a drop (`None`:
/// the input, untouched), and the drop counted.
struct Row {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    output: Option<Vec<u8>>,
    drop: Option<DropReason>,
}

fn row(name: &'static str, frame: Vec<u8>, verdict: u32, drop: Option<DropReason>) -> Row {
    Row {
        name,
        frame,
        verdict,
        output: None,
        drop,
    }
}

/// What arrives on the uplink, and what becomes of it in `tc_from_uplink` (with `xdp_uplink`'s
/// verdict beside it: the filter drops what decapsulation drops for the same reason, and passes
/// everything else untouched).
fn receive_table() -> Vec<(Row, u32)> {
    let inner = inner_frame();
    let valid = vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0);
    let mut not_for_us = valid.clone();
    not_for_us[30..34].copy_from_slice(&[192, 168, 50, 3]);
    // The valid frame with its outer IPv4 header changed by `change`, checksum recomputed.
    let outer = |change: &dyn Fn(&mut [u8])| {
        let mut frame = valid.clone();
        change(&mut frame[14..34]);
        frame[24..26].fill(0);
        let sum = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        frame
    };
    let fragment = outer(&|ip| ip[6] = 0x20); // more fragments
    let mut bad_checksum = valid.clone();
    bad_checksum[24] ^= 0xff;
    let total_len = |len: usize| outer(&|ip| ip[2..4].copy_from_slice(&(len as u16).to_be_bytes()));
    let mut arp_inside = valid.clone();
    arp_inside[50 + 12..50 + 14].copy_from_slice(&[0x08, 0x06]);
    let mut elsewhere = valid.clone();
    elsewhere[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    // Congestion marked outside, on an ECN-capable inner packet and on one that is not.
    let marked = |inner_ecn: u8| {
        let mut inner = inner_frame();
        inner[15] |= inner_ecn;
        inner[24..26].fill(0);
        let sum = checksum(&inner[14..34]);
        inner[24..26].copy_from_slice(&sum.to_be_bytes());
        let mut frame = vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0);
        frame[15] = 0b11;
        frame[24..26].fill(0);
        let sum = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        (frame, inner)
    };
    let (congested, ect_inner) = marked(0b10);
    let mut ce_inner = ect_inner.clone();
    ce_inner[15] |= 0b11;
    ce_inner[24..26].fill(0);
    let sum = checksum(&ce_inner[14..34]);
    ce_inner[24..26].copy_from_slice(&sum.to_be_bytes());
    let (congested_not_ect, _) = marked(0);
    // Outer IPv4 options: one word of no-ops.
    let mut with_options = valid[..34].to_vec();
    with_options.extend_from_slice(&[1, 1, 1, 1]);
    with_options.extend_from_slice(&valid[34..]);
    with_options[14] = 0x46;
    let total = u16::from_be_bytes([valid[16], valid[17]]) + 4;
    with_options[16..18].copy_from_slice(&total.to_be_bytes());
    with_options[24..26].fill(0);
    let sum = checksum(&with_options[14..38]);
    with_options[24..26].copy_from_slice(&sum.to_be_bytes());
    let pass = |name, frame| (row(name, frame, VERDICT_PASS, None), XDP_PASS);
    let dropped = |name, frame, reason| (row(name, frame, VERDICT_DROP, Some(reason)), XDP_DROP);
    vec![
        (
            Row {
                output: Some(decapsulated(&inner)),
                ..row(
                    "VXLAN from a member is decapsulated",
                    valid.clone(),
                    VERDICT_PASS,
                    None,
                )
            },
            XDP_PASS,
        ),
        (
            Row {
                output: Some(decapsulated(&inner)),
                ..row(
                    "a UDP checksum (Linux sends one by default) changes nothing",
                    vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0xbeef),
                    VERDICT_PASS,
                    None,
                )
            },
            XDP_PASS,
        ),
        (
            Row {
                output: Some(decapsulated(&inner)),
                ..row(
                    "outer IPv4 options are removed with the outer header",
                    with_options,
                    VERDICT_PASS,
                    None,
                )
            },
            XDP_PASS,
        ),
        (
            Row {
                output: Some(decapsulated(&ce_inner)),
                ..row(
                    "a congestion mark outside is carried into an ECN-capable packet",
                    congested,
                    VERDICT_PASS,
                    None,
                )
            },
            XDP_PASS,
        ),
        pass(
            "another VNI passes untouched, for the VXLAN device",
            vxlan_frame(REMOTE_IP, 8472, 2, &inner, 0),
        ),
        pass(
            "another UDP port passes untouched",
            vxlan_frame(REMOTE_IP, 4789, 1, &inner, 0),
        ),
        pass("VXLAN for another address passes untouched", not_for_us),
        pass(
            "VXLAN to another host's MAC passes untouched, for the stack to drop",
            elsewhere,
        ),
        pass(
            "a fragment passes untouched, for the stack to reassemble",
            fragment,
        ),
        pass(
            "an outer IPv4 header with a bad checksum passes untouched, for the stack to drop",
            bad_checksum,
        ),
        pass(
            "an outer total length of 0 passes untouched, for the stack to drop",
            total_len(0),
        ),
        pass(
            "a UDP header past the outer total length is not ours to judge",
            total_len(20 + 4),
        ),
        pass(
            "a cut outer UDP header is not ours to judge",
            valid[..14 + 20 + 4].to_vec(),
        ),
        dropped(
            "VXLAN whose outer total length ends inside the inner Ethernet header is dropped",
            total_len(20 + 8 + 8 + 10),
            DropReason::VxlanMalformed,
        ),
        dropped(
            "VXLAN from an address that holds no lease is dropped",
            vxlan_frame(Ipv4Addr::new(192, 168, 50, 9), 8472, 1, &inner, 0),
            DropReason::VxlanUnknownSource,
        ),
        dropped(
            "a cut VXLAN header is dropped",
            valid[..14 + 20 + 8 + 4].to_vec(),
            DropReason::VxlanMalformed,
        ),
        dropped(
            "a cut inner Ethernet header is dropped",
            valid[..14 + 20 + 8 + 8 + 10].to_vec(),
            DropReason::VxlanMalformed,
        ),
        dropped(
            "a non-IPv4 inner frame is dropped",
            arp_inside,
            DropReason::VxlanMalformed,
        ),
        (
            row(
                "less than an IPv4 header inside cannot be decapsulated and is dropped",
                valid[..14 + 50 + 12].to_vec(),
                VERDICT_DROP,
                Some(DropReason::DecapFailed),
            ),
            XDP_PASS,
        ),
        (
            row(
                "a congestion mark outside a packet that is not ECN-capable is dropped",
                congested_not_ect,
                VERDICT_DROP,
                Some(DropReason::VxlanCongestionNotEct),
            ),
            XDP_PASS,
        ),
    ]
}

/// The drop counters that moved between `before` and `after`, by how much.
fn moved(
    before: &BTreeMap<DropReason, u64>,
    after: &BTreeMap<DropReason, u64>,
) -> BTreeMap<DropReason, u64> {
    after
        .iter()
        .filter_map(|(reason, n)| {
            let delta = n - before.get(reason).copied().unwrap_or(0);
            (delta > 0).then_some((*reason, delta))
        })
        .collect()
}

#[test]
fn vxlan_decap_fixture_table() {
    // One node for the whole table (nothing here leaves state behind but drop counters).
    let (mut datapath, ns, uplink) = node(|_| {});
    for (row, xdp) in receive_table() {
        let name = row.name;
        let expected: BTreeMap<DropReason, u64> =
            row.drop.into_iter().map(|reason| (reason, 1)).collect();
        // On the uplink, so the kernel classifies frames addressed to it as the host's.
        let before = datapath.drops();
        let run = ns.run(|| datapath.run_on(FROM_UPLINK, &row.frame, uplink));
        assert_eq!(run.verdict, row.verdict, "{name}: verdict");
        if row.drop.is_none() {
            let output = row.output.clone().unwrap_or_else(|| row.frame.clone());
            assert_eq!(run.output, output, "{name}: output");
        }
        assert_eq!(
            moved(&before, &datapath.drops()),
            expected,
            "{name}: drop counters"
        );

        let before = datapath.drops();
        let (action, output) = datapath.run_xdp(XDP_UPLINK, &row.frame);
        assert_eq!(action, xdp, "{name}: XDP action");
        assert_eq!(output, row.frame, "{name}: XDP leaves every frame as it is");
        let expected: BTreeMap<DropReason, u64> =
            expected.into_iter().filter(|_| xdp == XDP_DROP).collect();
        assert_eq!(
            moved(&before, &datapath.drops()),
            expected,
            "{name}: XDP drop counters"
        );
    }
}

#[test]
fn a_gso_aggregate_this_kernel_will_not_shrink_goes_whole_to_the_vxlan_device() {
    // A test run's GSO skb has a segment size but no GSO type, which decapsulation refuses
    // (as it refuses any it cannot keep whole): with a VXLAN device the frame goes on
    // untouched for the kernel to decapsulate; without one it is dropped and counted.
    let frame = vxlan_frame(REMOTE_IP, 8472, 1, &inner_frame(), 0);
    let (mut with_device, ns, uplink) = node(|config| config.tunnel_ifindex = 1);
    let run = ns.run(|| with_device.run_gso_on(FROM_UPLINK, &frame, uplink, 1398));
    assert_eq!((run.verdict, &run.output), (VERDICT_PASS, &frame));
    assert!(with_device.drops().is_empty());
    let (mut without, ns, uplink) = node(|_| {});
    let run = ns.run(|| without.run_gso_on(FROM_UPLINK, &frame, uplink, 1398));
    assert_eq!(run.verdict, VERDICT_DROP);
    assert_eq!(
        without.drops(),
        BTreeMap::from([(DropReason::DecapFailed, 1)])
    );
}

/// A frame the pod at 172.30.20.5 sends on `port` (so the datapath learns it there).
fn learn(datapath: &mut Datapath, ns: &Netns, port: u32) {
    datapath.add_peer_port(port);
    let hello = tcp(pod(5, 20, 40000), pod(6, 20, 80), SYN).build();
    let run = ns.run(|| datapath.run_on(FROM_PODS, &hello, port));
    assert_eq!(run.verdict, VERDICT_PASS);
}

#[test]
fn pods_are_learned_from_what_their_ports_receive_from_them() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let port = pod_port(&ns);
    // Behind a port that is not registered as a veth: never learned (nothing could be
    // delivered into it).
    let elsewhere = tcp(pod(8, 20, 40000), pod(6, 20, 80), SYN).build();
    ns.run(|| datapath.run_on(FROM_PODS, &elsewhere, uplink));
    learn(&mut datapath, &ns, port);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 7, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 7, 172, 30, 20, 7]);
    arp.extend_from_slice(&[0; 10]);
    ns.run(|| datapath.run_on(FROM_PODS, &arp, port));
    // Not of this node's subnet: not learned.
    let stranger = tcp(pod(5, 99, 40000), pod(6, 20, 80), SYN).build();
    ns.run(|| datapath.run_on(FROM_PODS, &stranger, port));
    let mut pods = datapath.local_pods();
    pods.sort_unstable_by_key(|(addr, _)| *addr);
    let at = |mac| LocalPod {
        ifindex: port,
        mac,
        _pad: [0; 2],
    };
    assert_eq!(
        pods,
        [
            ([172, 30, 20, 5], at(POD_MAC)),
            ([172, 30, 20, 7], at([2, 0, 0, 0, 0, 7]))
        ]
    );
}

#[test]
fn vxlan_for_a_learned_pod_goes_straight_into_it() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let port = pod_port(&ns);
    learn(&mut datapath, &ns, port);
    let inner = inner_frame();
    let frame = vxlan_frame(REMOTE_IP, 8472, 1, &inner, 0);
    let run = ns.run(|| datapath.run_on(FROM_UPLINK, &frame, uplink));
    assert_eq!(run.verdict, VERDICT_REDIRECT, "{:?}", datapath.drops());
    let mut expected = forwarded(&inner);
    expected[0..6].copy_from_slice(&POD_MAC);
    expected[6..12].copy_from_slice(&BRIDGE_MAC);
    assert_eq!(
        run.output, expected,
        "TTL decremented, from the pod's gateway"
    );
    assert!(datapath.drops().is_empty());
}

#[test]
fn what_the_stack_must_see_is_decapsulated_and_left_to_it() {
    let inner = inner_frame();
    let mut last_hop = inner.clone();
    last_hop[22] = 1;
    last_hop[24..26].fill(0);
    let sum = checksum(&last_hop[14..34]);
    last_hop[24..26].copy_from_slice(&sum.to_be_bytes());
    let cases: [(&str, &[u8], u32, Tweak); 4] = [
        ("--host-routing=kernel", &inner, 0, |c| c.flags = 0),
        ("a masquerade mark", &inner, 0x4000, |_| {}),
        (
            "a TTL that runs out here (the stack answers with ICMP)",
            &last_hop,
            0,
            |_| {},
        ),
        ("a pod not learned yet", &inner, 0, |_| {}),
    ];
    for (name, inner, mark, tweak) in cases {
        let (mut datapath, ns, uplink) = node(tweak);
        if !name.starts_with("a pod not learned") {
            learn(&mut datapath, &ns, pod_port(&ns));
        }
        let frame = vxlan_frame(REMOTE_IP, 8472, 1, inner, 0);
        let run = ns.run(|| datapath.run_with(FROM_UPLINK, &frame, mark, uplink, 1));
        assert_eq!(run.verdict, VERDICT_PASS, "{name}");
        assert_eq!(run.output, decapsulated(inner), "{name}");
    }
}

#[test]
fn a_pods_packet_for_a_remote_pod_is_encapsulated_at_its_port_and_sent_to_the_uplink() {
    let (mut datapath, ns, _) = node(|_| {});
    let port = pod_port(&ns);
    let packet = tcp(pod(5, 20, 40000), pod(5, 44, 80), ACK)
        .payload(b"hello")
        .build();
    let run = ns.run(|| datapath.run_on(FROM_PODS, &packet, port));
    assert_eq!(run.verdict, VERDICT_REDIRECT, "{:?}", datapath.drops());
    let port_used = source_port(&run.output);
    assert_eq!(
        run.output,
        expected_encap(&forwarded(&packet), port_used),
        "forwarded (TTL one less), then framed as Linux VXLAN"
    );
    assert!(datapath.drops().is_empty());
}

#[test]
fn the_next_hop_the_agent_resolved_is_used_without_a_route_lookup() {
    let (mut datapath, ns, uplink) = node(|_| {});
    let port = pod_port(&ns);
    let packet = tcp(pod(5, 20, 40000), pod(5, 44, 80), ACK).build();
    // Another MAC than the namespace's neighbour entry: the output shows which was used.
    let resolved = [0x02, 0, 0, 0, 0, 0x99];
    let hop = |ifindex| {
        BTreeMap::from([(
            REMOTE_IP,
            NextHop {
                ifindex,
                mac: resolved,
            },
        )])
    };
    datapath.set_next_hops(hop(uplink));
    for (program, on) in [(FROM_PODS, port), (TO_UPLINK, uplink)] {
        let run = ns.run(|| datapath.run_on(program, &packet, on));
        assert_eq!(
            run.output[..6],
            resolved,
            "{program}: the resolved next hop"
        );
        assert_eq!(run.output[6..12], UPLINK_MAC, "{program}: from the uplink");
    }
    // A next hop through another device is not the uplink's: the route decides.
    datapath.set_next_hops(hop(uplink + 100));
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &packet, uplink));
    assert_eq!(run.output[..6], NEXT_HOP_MAC, "looked up");
}

#[test]
fn what_the_stack_must_see_leaves_a_pods_port_untouched() {
    let to_remote = tcp(pod(5, 20, 40000), pod(5, 44, 80), ACK).build();
    let mut last_hop = to_remote.clone();
    last_hop[22] = 1;
    let too_big = tcp(pod(5, 20, 40000), pod(5, 44, 80), ACK)
        .payload(&[0; 1450 - 40 + 1])
        .build();
    let orphan = tcp(pod(5, 20, 40000), pod(5, 99, 80), ACK).build();
    let cases: [(&str, &[u8], u32, Tweak); 5] = [
        ("--host-routing=kernel", &to_remote, 0, |c| c.flags = 0),
        ("a masquerade mark", &to_remote, 0x4000, |_| {}),
        ("a TTL that runs out here", &last_hop, 0, |_| {}),
        ("bigger than the overlay carries", &too_big, 0, |_| {}),
        ("a subnet no node holds", &orphan, 0, |_| {}),
    ];
    for (name, packet, mark, tweak) in cases {
        let (mut datapath, ns, _) = node(tweak);
        let port = pod_port(&ns);
        let run = ns.run(|| datapath.run_with(FROM_PODS, packet, mark, port, 1));
        assert_eq!(
            (run.verdict, &run.output[..]),
            (VERDICT_PASS, packet),
            "{name}"
        );
        assert!(datapath.drops().is_empty(), "{name}");
    }
}

#[test]
fn what_the_vxlan_device_decapsulated_without_tunnel_metadata_is_dropped() {
    // A test run attaches no tunnel metadata, as nothing but the device's VXLAN socket does:
    // the overlay's rules cannot be checked, so the frame is not let in.
    let (mut datapath, _ns, _) = node(|_| {});
    let run = datapath.run(FROM_TUNNEL, &inner_frame(), 0);
    assert_eq!(run.verdict, VERDICT_DROP);
    assert_eq!(
        datapath.drops(),
        BTreeMap::from([(DropReason::VxlanUnknownSource, 1)])
    );
}
