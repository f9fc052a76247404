//! `BPF_PROG_TEST_RUN` fixtures for the overlay programs: VXLAN encapsulation on the uplink's
//! TC egress (output checked byte for byte against a frame built here by hand) and
//! decapsulation in its XDP hook, with leases filled by the agent's own reconciler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use weft::dataplane::{TO_UPLINK, XDP_UPLINK};
use weft_common::drop_reason::DropReason;
use weft_tests::{
    harness::{VERDICT_DROP, VERDICT_PASS},
    overlay_fixture::{
        NEXT_HOP_MAC, OUR_IP, OUR_VTEP, REMOTE_IP, REMOTE_VTEP, UPLINK_MAC, XDP_DROP, XDP_PASS,
        datapath, inner_frame, pod, uplink_namespace, vxlan_frame,
    },
    packet::{SYN, checksum, tcp},
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

#[test]
fn a_packet_for_a_remote_pod_is_encapsulated_exactly_as_linux_vxlan_frames_it() {
    let mut datapath = datapath();
    let (ns, uplink) = uplink_namespace();
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
    let mut datapath = datapath();
    let (ns, uplink) = uplink_namespace();
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
    let mut datapath = datapath();
    let (ns, uplink) = uplink_namespace();
    let orphan = tcp(pod(5, 20, 40000), pod(5, 99, 80), SYN).build();
    let run = ns.run(|| datapath.run_on(TO_UPLINK, &orphan, uplink));
    assert_eq!(run.verdict, VERDICT_DROP);
    assert_eq!(
        datapath.drops(),
        BTreeMap::from([(DropReason::NoLeaseForDestination, 1)])
    );
}

#[test]
fn vxlan_from_a_member_is_decapsulated_and_addressed_to_the_uplink() {
    let mut datapath = datapath();
    let inner = inner_frame();
    // Linux checksums its VXLAN UDP header by default, flannel.1 included; 0 means none.
    for udp_checksum in [0, 0xbeef] {
        let (action, output) = datapath.run_xdp(
            XDP_UPLINK,
            &vxlan_frame(REMOTE_IP, 8472, 1, &inner, udp_checksum),
        );
        assert_eq!(action, XDP_PASS);
        let mut expected = inner.clone();
        expected[0..6].copy_from_slice(&UPLINK_MAC);
        assert_eq!(
            output, expected,
            "the inner frame, readdressed to the uplink"
        );
    }
    assert!(datapath.drops().is_empty());
}

#[test]
fn vxlan_decap_fixture_table() {
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
    let cases: Vec<(&str, Vec<u8>, u32, Option<DropReason>)> = vec![
        (
            "another VNI passes untouched",
            vxlan_frame(REMOTE_IP, 8472, 2, &inner, 0),
            XDP_PASS,
            None,
        ),
        (
            "another UDP port passes untouched",
            vxlan_frame(REMOTE_IP, 4789, 1, &inner, 0),
            XDP_PASS,
            None,
        ),
        (
            "VXLAN for another address passes untouched",
            not_for_us,
            XDP_PASS,
            None,
        ),
        ("a fragment passes untouched", fragment, XDP_PASS, None),
        // Found by the differential fuzzer: these were decapsulated.
        (
            "an outer IPv4 header with a bad checksum passes untouched, for the stack to drop",
            bad_checksum,
            XDP_PASS,
            None,
        ),
        (
            "an outer total length of 0 passes untouched, for the stack to drop",
            total_len(0),
            XDP_PASS,
            None,
        ),
        (
            "VXLAN whose outer total length ends inside the inner Ethernet header is dropped",
            total_len(20 + 8 + 8 + 10),
            XDP_DROP,
            Some(DropReason::VxlanMalformed),
        ),
        (
            "a UDP header past the outer total length is not ours to judge",
            total_len(20 + 4),
            XDP_PASS,
            None,
        ),
        (
            "VXLAN from an address that holds no lease is dropped",
            vxlan_frame(Ipv4Addr::new(192, 168, 50, 9), 8472, 1, &inner, 0),
            XDP_DROP,
            Some(DropReason::VxlanUnknownSource),
        ),
        (
            "a cut VXLAN header is dropped",
            valid[..14 + 20 + 8 + 4].to_vec(),
            XDP_DROP,
            Some(DropReason::VxlanMalformed),
        ),
        (
            "a cut inner Ethernet header is dropped",
            valid[..14 + 20 + 8 + 8 + 10].to_vec(),
            XDP_DROP,
            Some(DropReason::VxlanMalformed),
        ),
        (
            "a non-IPv4 inner frame is dropped",
            arp_inside,
            XDP_DROP,
            Some(DropReason::VxlanMalformed),
        ),
        (
            "a cut outer UDP header is not ours to judge",
            valid[..14 + 20 + 4].to_vec(),
            XDP_PASS,
            None,
        ),
    ];
    for (name, frame, action, drop) in cases {
        let mut datapath = datapath();
        let (got, output) = datapath.run_xdp(XDP_UPLINK, &frame);
        assert_eq!(got, action, "{name}: action");
        if action == XDP_PASS {
            assert_eq!(output, frame, "{name}: output");
        }
        let expected: BTreeMap<DropReason, u64> =
            drop.into_iter().map(|reason| (reason, 1)).collect();
        assert_eq!(datapath.drops(), expected, "{name}: drop counters");
    }
}
