//! `BPF_PROG_TEST_RUN` fixtures for the service programs: an input frame, the expected verdict,
//! the expected output frame (checked field by field, checksums recomputed from scratch), the
//! expected mark, and the expected drop counter. Maps are filled by the agent's own reconciler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use weft::datapath::conntrack::monotonic_now_ns;
use weft_common::{
    MASQUERADE_MARK,
    conntrack::{PORT_MOVES, flags, moved_port},
    drop_reason::DropReason,
    maps::{CtValue, FRAGMENT_TIMEOUT_NS, ct_direction, frag_state},
    programs::{FROM_PODS, TO_POD},
};
use weft_tests::{
    harness::{Datapath, VERDICT_DROP, VERDICT_PASS, VERDICT_REDIRECT},
    packet::{
        ACK, FIN, IcmpError, PSH, RST, SYN, assert_rejects, checksum, fragmented, icmp_error,
        icmp_errors, parse, parse_icmp_error, reassembled, tcp, udp,
    },
    seed::{
        self, BACKENDS, TARGET_PORT, VIP, cluster_cidr, endpoint_slice, nginx_manifest, service,
    },
};

fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(172, 30, 20, 9), 40000)
}

fn backend_addrs() -> Vec<SocketAddrV4> {
    BACKENDS
        .iter()
        .map(|ip| SocketAddrV4::new(*ip, TARGET_PORT))
        .collect()
}

/// A UDP service beside the seed's nginx: 10.254.0.10:53 -> :5353 on .6 and .7.
fn with_dns() -> String {
    let dns = [BACKENDS[0], BACKENDS[1]];
    format!(
        "{}---\n{}---\n{}",
        nginx_manifest(&BACKENDS),
        service("dns", Ipv4Addr::new(10, 254, 0, 10), 53, "UDP", 5353),
        endpoint_slice("dns", "UDP", 5353, &dns)
    )
}

/// What a fixture expects.
enum Expect {
    /// Passed on byte for byte.
    Unchanged,
    /// Destination rewritten to one of these endpoints; nothing else changed.
    Dnat { to: Vec<SocketAddrV4>, mark: u32 },
    /// Dropped, counted under this reason.
    Drop(DropReason),
    /// Answered with a TCP reset or an ICMP port unreachable, sent back; counted as a drop for
    /// want of endpoints.
    Rejected,
}

struct Fixture {
    name: &'static str,
    manifests: String,
    program: &'static str,
    input: Vec<u8>,
    mark_in: u32,
    expect: Expect,
}

fn fixture(name: &'static str, program: &'static str, input: Vec<u8>, expect: Expect) -> Fixture {
    Fixture {
        name,
        manifests: nginx_manifest(&BACKENDS),
        program,
        input,
        mark_in: 0,
        expect,
    }
}

fn fixtures() -> Vec<Fixture> {
    let vip = seed::frontend();
    let syn = tcp(client(), vip, SYN);
    vec![
        fixture(
            "TCP SYN to the VIP is DNATed to a backend",
            FROM_PODS,
            syn.build(),
            Expect::Dnat {
                to: backend_addrs(),
                mark: 0,
            },
        ),
        fixture(
            "TCP data with a payload to the VIP is DNATed",
            FROM_PODS,
            tcp(client(), vip, ACK | PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
            Expect::Dnat {
                to: backend_addrs(),
                mark: 0,
            },
        ),
        fixture(
            "a reply nobody asked for passes unchanged",
            TO_POD,
            tcp(backend_addrs()[0], client(), SYN | ACK).build(),
            Expect::Unchanged,
        ),
        fixture(
            "a port the service does not expose is not touched",
            FROM_PODS,
            tcp(client(), SocketAddrV4::new(VIP, 80), SYN).build(),
            Expect::Unchanged,
        ),
        fixture(
            "a protocol the service does not expose is not touched",
            FROM_PODS,
            udp(client(), vip, b"x").build(),
            Expect::Unchanged,
        ),
        fixture(
            "pod-to-pod traffic passes unchanged",
            FROM_PODS,
            tcp(
                client(),
                SocketAddrV4::new(Ipv4Addr::new(172, 30, 44, 2), 80),
                SYN,
            )
            .build(),
            Expect::Unchanged,
        ),
        fixture(
            "a client outside --cluster-cidr gets the masquerade mark",
            FROM_PODS,
            tcp(
                SocketAddrV4::new(Ipv4Addr::new(10, 167, 226, 38), 51000),
                vip,
                SYN,
            )
            .build(),
            Expect::Dnat {
                to: backend_addrs(),
                mark: MASQUERADE_MARK,
            },
        ),
        Fixture {
            manifests: nginx_manifest(&BACKENDS[..1]),
            ..fixture(
                "hairpin: a backend reaching itself gets the masquerade mark",
                FROM_PODS,
                tcp(SocketAddrV4::new(BACKENDS[0], 41000), vip, SYN).build(),
                Expect::Dnat {
                    to: backend_addrs()[..1].to_vec(),
                    mark: MASQUERADE_MARK,
                },
            )
        },
        Fixture {
            mark_in: 0x1,
            ..fixture(
                "marks already on the packet are kept beside the masquerade bit",
                FROM_PODS,
                tcp(
                    SocketAddrV4::new(Ipv4Addr::new(10, 167, 226, 38), 51001),
                    vip,
                    SYN,
                )
                .build(),
                Expect::Dnat {
                    to: backend_addrs(),
                    mark: MASQUERADE_MARK | 0x1,
                },
            )
        },
        Fixture {
            manifests: nginx_manifest(&[]),
            ..fixture(
                "a TCP connection to a service with no endpoints is reset, counted",
                FROM_PODS,
                syn.build(),
                Expect::Rejected,
            )
        },
        Fixture {
            manifests: nginx_manifest(&[]),
            ..fixture(
                "data on a connection to a service with no endpoints is reset too",
                FROM_PODS,
                tcp(client(), vip, ACK | PSH).payload(b"late").build(),
                Expect::Rejected,
            )
        },
        Fixture {
            manifests: nginx_manifest(&[]),
            ..fixture(
                "a reset to a service with no endpoints is not answered, only dropped",
                FROM_PODS,
                tcp(client(), vip, 0x04).build(),
                Expect::Drop(DropReason::NoEndpoints),
            )
        },
        Fixture {
            manifests: format!(
                "{}---\n{}",
                service("dns", Ipv4Addr::new(10, 254, 0, 10), 53, "UDP", 5353),
                endpoint_slice("dns", "UDP", 5353, &[])
            ),
            ..fixture(
                "UDP to a service with no endpoints gets an ICMP port unreachable, counted",
                FROM_PODS,
                udp(
                    client(),
                    SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53),
                    b"query",
                )
                .build(),
                Expect::Rejected,
            )
        },
        Fixture {
            manifests: with_dns(),
            ..fixture(
                "UDP to a UDP service is DNATed with a valid checksum",
                FROM_PODS,
                udp(
                    client(),
                    SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53),
                    b"query",
                )
                .build(),
                Expect::Dnat {
                    to: vec![
                        SocketAddrV4::new(BACKENDS[0], 5353),
                        SocketAddrV4::new(BACKENDS[1], 5353),
                    ],
                    mark: 0,
                },
            )
        },
        Fixture {
            manifests: with_dns(),
            ..fixture(
                "UDP without a checksum keeps checksum 0",
                FROM_PODS,
                udp(
                    client(),
                    SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53),
                    b"query",
                )
                .without_udp_checksum()
                .build(),
                Expect::Dnat {
                    to: vec![
                        SocketAddrV4::new(BACKENDS[0], 5353),
                        SocketAddrV4::new(BACKENDS[1], 5353),
                    ],
                    mark: 0,
                },
            )
        },
        fixture(
            "IP options move the TCP header and DNAT still finds it",
            FROM_PODS,
            tcp(client(), vip, SYN)
                .options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                .build(),
            Expect::Dnat {
                to: backend_addrs(),
                mark: 0,
            },
        ),
        fixture(
            "the first fragment of a datagram for a service is DNATed",
            FROM_PODS,
            tcp(client(), vip, SYN).fragment(0x2000).build(),
            Expect::Dnat {
                to: backend_addrs(),
                mark: 0,
            },
        ),
        fixture(
            "a later fragment of a datagram nothing is known of passes",
            FROM_PODS,
            tcp(client(), vip, SYN).fragment(0x0010).build(),
            Expect::Unchanged,
        ),
        fixture(
            // (BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than 20 header bytes.)
            "an IPv4 header whose options are cut off is dropped, counted",
            FROM_PODS,
            tcp(client(), vip, SYN)
                .options(&[1, 1, 1, 1, 1, 1, 1, 0])
                .build()[..14 + 24]
                .to_vec(),
            Expect::Drop(DropReason::MalformedIpv4),
        ),
        fixture(
            "an IPv4 header with IHL below 5 is dropped, counted",
            FROM_PODS,
            {
                let mut frame = syn.build();
                frame[14] = 0x44;
                frame
            },
            Expect::Drop(DropReason::MalformedIpv4),
        ),
        fixture(
            "a truncated TCP header to another destination passes, for the stack to judge",
            FROM_PODS,
            tcp(
                client(),
                SocketAddrV4::new(Ipv4Addr::new(172, 30, 44, 2), 80),
                SYN,
            )
            .build()[..14 + 20 + 10]
                .to_vec(),
            Expect::Unchanged,
        ),
        fixture(
            "a truncated TCP header is dropped, counted",
            FROM_PODS,
            syn.build()[..14 + 20 + 10].to_vec(),
            Expect::Drop(DropReason::MalformedL4),
        ),
        fixture(
            "an ARP frame passes unchanged",
            FROM_PODS,
            {
                let mut arp = vec![0xff; 6];
                arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
                arp.extend_from_slice(&[0; 28]);
                arp
            },
            Expect::Unchanged,
        ),
        fixture(
            "an IPv6 frame passes unchanged",
            FROM_PODS,
            {
                let mut frame = vec![0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
                frame.extend_from_slice(&[0x60; 40]);
                frame
            },
            Expect::Unchanged,
        ),
        fixture(
            "a frame shorter than an Ethernet header passes unchanged",
            TO_POD,
            vec![0u8; 14],
            Expect::Unchanged,
        ),
    ]
}

/// Asserts that `output` is `input` with only the addresses and ports rewritten (to
/// `expected_src`, `expected_dst`) and valid checksums.
fn assert_rewritten(
    name: &str,
    input: &[u8],
    output: &[u8],
    expected_src: SocketAddrV4,
    expected_dst: SocketAddrV4,
) {
    let (before, after) = (parse(input), parse(output));
    assert_eq!(output.len(), input.len(), "{name}: length");
    assert_eq!(
        (after.src, after.dst),
        (expected_src, expected_dst),
        "{name}: addresses"
    );
    assert_eq!(after.proto, before.proto, "{name}: protocol");
    assert_eq!(after.payload, before.payload, "{name}: payload");
    assert!(after.ip_checksum_ok, "{name}: IPv4 checksum");
    assert!(after.l4_checksum_ok, "{name}: transport checksum");
    if before.l4_checksum == 0 {
        assert_eq!(
            after.l4_checksum, 0,
            "{name}: UDP checksum 0 means none and stays 0"
        );
    }
    assert_eq!(output[..14], input[..14], "{name}: Ethernet header");
}

const SECOND: u64 = 1_000_000_000;

/// The monotonic time (the clock conntrack and the fragment map use), once it is past `age`:
/// the clock starts at boot, and a guest booted moments ago has no time `age` back to date
/// an entry to.
fn clock_past(age: u64) -> u64 {
    loop {
        let now = monotonic_now_ns();
        if now > age {
            return now;
        }
        thread::sleep(Duration::from_nanos(age - now) + Duration::from_millis(10));
    }
}

#[test]
fn service_fixture_table() {
    for fixture in fixtures() {
        let Fixture {
            name,
            manifests,
            program,
            input,
            mark_in,
            expect,
        } = fixture;
        let mut datapath = Datapath::new(&manifests, Some(cluster_cidr()));
        let run = datapath.run(program, &input, mark_in);
        match expect {
            Expect::Unchanged => {
                assert_eq!(run.verdict, VERDICT_PASS, "{name}: verdict");
                assert_eq!(run.output, input, "{name}: output");
                assert_eq!(run.mark, mark_in, "{name}: mark");
                assert!(datapath.drops().is_empty(), "{name}: no drops");
            }
            Expect::Dnat { to, mark } => {
                assert_eq!(run.verdict, VERDICT_PASS, "{name}: verdict");
                let dst = parse(&run.output).dst;
                assert!(
                    to.contains(&dst),
                    "{name}: DNAT to {dst}, expected one of {to:?}"
                );
                assert_rewritten(name, &input, &run.output, parse(&input).src, dst);
                assert_eq!(run.mark, mark, "{name}: mark");
                assert!(datapath.drops().is_empty(), "{name}: no drops");
            }
            Expect::Drop(reason) => {
                assert_eq!(run.verdict, VERDICT_DROP, "{name}: verdict");
                assert_eq!(
                    datapath.drops(),
                    BTreeMap::from([(reason, 1)]),
                    "{name}: drop counters"
                );
            }
            Expect::Rejected => {
                assert_eq!(run.verdict, VERDICT_REDIRECT, "{name}: verdict");
                assert_rejects(name, &input, &run.output);
                assert_eq!(
                    datapath.drops(),
                    BTreeMap::from([(DropReason::NoEndpoints, 1)]),
                    "{name}: drop counters"
                );
            }
        }
    }
}

#[test]
fn a_reply_from_the_chosen_backend_is_reverse_natted_and_others_are_not() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    let used = parse(
        &datapath
            .run(FROM_PODS, &tcp(client(), vip, SYN).build(), 0)
            .output,
    )
    .dst;
    for backend in backend_addrs() {
        let reply = tcp(backend, client(), SYN | ACK).payload(b"hello").build();
        let run = datapath.run(TO_POD, &reply, 0);
        assert_eq!(run.verdict, VERDICT_PASS);
        if backend == used {
            assert_rewritten("reply", &reply, &run.output, vip, client());
        } else {
            assert_eq!(
                run.output, reply,
                "a reply from {backend}, which the connection does not use"
            );
        }
    }
    // A UDP reply (with checksum 0) is restored too and keeps checksum 0.
    let mut datapath = Datapath::new(&with_dns(), Some(cluster_cidr()));
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53);
    let used = parse(
        &datapath
            .run(FROM_PODS, &udp(client(), dns, b"q").build(), 0)
            .output,
    )
    .dst;
    let reply = udp(used, client(), b"answer")
        .without_udp_checksum()
        .build();
    assert_rewritten(
        "UDP reply",
        &reply,
        &datapath.run(TO_POD, &reply, 0).output,
        dns,
        client(),
    );
    assert!(datapath.drops().is_empty());
}

#[test]
fn every_packet_of_a_connection_goes_to_its_backend() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    let first = parse(
        &datapath
            .run(FROM_PODS, &tcp(client(), vip, SYN).build(), 0)
            .output,
    )
    .dst;
    for flags in [ACK, ACK | PSH, ACK | PSH, ACK, FIN | ACK] {
        let frame = tcp(client(), vip, flags).payload(b"data").build();
        assert_eq!(parse(&datapath.run(FROM_PODS, &frame, 0).output).dst, first);
    }
    // Both directions are tracked, and the state followed the client's FIN.
    let entries = datapath.conntrack();
    assert_eq!(entries.len(), 2);
    let (forward_key, forward) = entries
        .iter()
        .find(|(k, _)| k.direction == ct_direction::FORWARD)
        .unwrap();
    assert_eq!(
        SocketAddrV4::new(forward.nat_addr.into(), forward.nat_port),
        first
    );
    assert_eq!(
        (forward_key.src_port, forward_key.dst_port),
        (client().port(), vip.port())
    );
    assert_eq!(
        weft_common::conntrack::state_name(6, forward.flags),
        "CLOSE_WAIT"
    );
    let (reply_key, reply) = entries
        .iter()
        .find(|(k, _)| k.direction == ct_direction::REPLY)
        .unwrap();
    assert_eq!(
        SocketAddrV4::new(reply_key.src_addr.into(), reply_key.src_port),
        first
    );
    assert_eq!(
        SocketAddrV4::new(reply.nat_addr.into(), reply.nat_port),
        vip
    );
}

#[test]
fn new_connections_spread_evenly_over_the_backends() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let mut counts: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
    for port in 0..3000u16 {
        let src = SocketAddrV4::new(*client().ip(), 10000 + port);
        let run = datapath.run(FROM_PODS, &tcp(src, seed::frontend(), SYN).build(), 0);
        *counts.entry(parse(&run.output).dst).or_default() += 1;
    }
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        backend_addrs().into_iter().collect()
    );
    // Each share is binomial(3000, 1/3): 1000 +- 26 (1 sigma); 850..1150 is beyond 5.8 sigma.
    for (backend, count) in &counts {
        assert!(
            (850..=1150).contains(count),
            "{backend} got {count} of 3000: {counts:?}"
        );
    }
}

#[test]
fn an_endpoint_update_changes_new_connections_only() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    // Open connections until one lands on .8, then take .8 out of the service.
    let established = (0..200u16)
        .map(|i| SocketAddrV4::new(*client().ip(), 20000 + i))
        .find(|src| {
            parse(
                &datapath
                    .run(FROM_PODS, &tcp(*src, vip, SYN).build(), 0)
                    .output,
            )
            .dst == backend_addrs()[2]
        })
        .expect("some connection lands on .8");
    datapath.set_manifests(&nginx_manifest(&BACKENDS[..2]));
    // The established connection keeps its backend, as with kube-proxy's conntrack.
    let data = tcp(established, vip, ACK).payload(b"more").build();
    assert_eq!(
        parse(&datapath.run(FROM_PODS, &data, 0).output).dst,
        backend_addrs()[2]
    );
    // New connections never reach it.
    for i in 0..300u16 {
        let src = SocketAddrV4::new(*client().ip(), 30000 + i);
        let dst = parse(
            &datapath
                .run(FROM_PODS, &tcp(src, vip, SYN).build(), 0)
                .output,
        )
        .dst;
        assert_ne!(
            dst,
            backend_addrs()[2],
            "new connection {i} went to the removed backend"
        );
    }
}

#[test]
fn a_udp_checksum_that_folds_to_zero_is_sent_as_ffff() {
    // One endpoint, so the rewritten packet is known in advance.
    let manifests = format!(
        "{}---\n{}",
        service("dns", Ipv4Addr::new(10, 254, 0, 10), 53, "UDP", 5353),
        endpoint_slice("dns", "UDP", 5353, &BACKENDS[..1])
    );
    let mut datapath = Datapath::new(&manifests, Some(cluster_cidr()));
    let endpoint = SocketAddrV4::new(BACKENDS[0], 5353);
    // A two-byte payload equal to the translated packet's checksum makes its sum 0xffff, so the
    // checksum itself computes to 0, which UDP must send as 0xffff (0 means "none").
    let probe = parse(&udp(client(), endpoint, &[0, 0]).build()).l4_checksum;
    let input = udp(
        client(),
        SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53),
        &probe.to_be_bytes(),
    )
    .build();
    let run = datapath.run(FROM_PODS, &input, 0);
    let output = parse(&run.output);
    assert_eq!(output.dst, endpoint);
    assert_eq!(output.l4_checksum, 0xffff);
    assert!(output.l4_checksum_ok);
}

#[test]
fn a_closed_connection_reopened_with_a_syn_picks_again() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    let mut moved = 0;
    for i in 0..30u16 {
        let client = SocketAddrV4::new(*client().ip(), 50000 + i);
        let first = parse(
            &datapath
                .run(FROM_PODS, &tcp(client, vip, SYN).build(), 0)
                .output,
        )
        .dst;
        datapath.run(TO_POD, &tcp(first, client, SYN | ACK).build(), 0);
        datapath.run(FROM_PODS, &tcp(client, vip, FIN | ACK).build(), 0);
        datapath.run(TO_POD, &tcp(first, client, FIN | ACK).build(), 0);
        let state = |datapath: &Datapath| {
            let entries = datapath.conntrack();
            let (_, forward) = entries
                .iter()
                .find(|(key, _)| {
                    key.direction == ct_direction::FORWARD && key.src_port == client.port()
                })
                .expect("the connection is tracked");
            weft_common::conntrack::state_name(6, forward.flags)
        };
        assert_eq!(state(&datapath), "CLOSED");
        // Same client port again: a new connection, tracked from scratch and picked afresh.
        let again = parse(
            &datapath
                .run(FROM_PODS, &tcp(client, vip, SYN).build(), 0)
                .output,
        )
        .dst;
        assert_eq!(state(&datapath), "SYN_SENT");
        if again != first {
            moved += 1;
            // The old endpoint's reply entry is stale now: its replies are not rewritten.
            let stale = tcp(first, client, ACK).build();
            assert_eq!(datapath.run(TO_POD, &stale, 0).output, stale);
        }
    }
    // Each reopen picks one of three at random: all 30 keeping theirs has odds of (1/3)^30.
    assert!(moved > 0, "no reopened connection picked another endpoint");
}

#[test]
fn a_reply_within_a_second_of_the_last_check_needs_only_its_reply_entry() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    let client = SocketAddrV4::new(*client().ip(), 50200);
    let endpoint = parse(
        &datapath
            .run(FROM_PODS, &tcp(client, vip, SYN).build(), 0)
            .output,
    )
    .dst;
    datapath.run(TO_POD, &tcp(endpoint, client, SYN | ACK).build(), 0);
    let entry = |datapath: &Datapath, direction: u8| {
        datapath
            .conntrack()
            .into_iter()
            .find(|(key, _)| key.direction == direction)
            .expect("both entries exist")
    };
    let (reply_key, reply) = entry(&datapath, ct_direction::REPLY);
    assert_eq!(
        reply.flags,
        flags::SEEN_REPLY,
        "the reply entry keeps the state its check found"
    );
    let now = clock_past(5 * SECOND);
    let (forward_key, mut forward) = entry(&datapath, ct_direction::FORWARD);
    // FORWARD last refreshed 5 s ago, REPLY checked just now: a plain reply is restored from
    // REPLY alone and leaves FORWARD as it was. The check is dated ahead of the clock, so a
    // slow guest (QEMU without KVM) cannot age it past the interval before the program runs.
    forward.last_seen_ns = now - 5 * SECOND;
    let checked = CtValue {
        last_seen_ns: now + 10 * SECOND,
        ..reply
    };
    datapath.set_conntrack(&[(forward_key, forward), (reply_key, checked)]);
    let data = tcp(endpoint, client, PSH | ACK).payload(b"x").build();
    assert_rewritten(
        "fast reply",
        &data,
        &datapath.run(TO_POD, &data, 0).output,
        vip,
        client,
    );
    assert_eq!(entry(&datapath, ct_direction::FORWARD).1, forward);
    // Checked 2 s ago: the reply looks FORWARD up, refreshes it and records the check.
    let stale_check = CtValue {
        last_seen_ns: now - 2 * SECOND,
        ..reply
    };
    datapath.set_conntrack(&[(forward_key, forward), (reply_key, stale_check)]);
    assert_rewritten(
        "checked reply",
        &data,
        &datapath.run(TO_POD, &data, 0).output,
        vip,
        client,
    );
    assert!(entry(&datapath, ct_direction::FORWARD).1.last_seen_ns >= now);
    assert!(entry(&datapath, ct_direction::REPLY).1.last_seen_ns >= now);
    // A FIN is never taken on trust: it reaches FORWARD even right after a check.
    let fin = tcp(endpoint, client, FIN | ACK).build();
    assert_rewritten(
        "FIN",
        &fin,
        &datapath.run(TO_POD, &fin, 0).output,
        vip,
        client,
    );
    let closing = entry(&datapath, ct_direction::FORWARD).1.flags;
    assert_eq!(
        closing & flags::FIN_REPLY,
        flags::FIN_REPLY,
        "{closing:#04x}"
    );
}

#[test]
fn a_direct_connection_reusing_a_closed_service_connections_tuple_is_left_alone() {
    let mut datapath = Datapath::new(&nginx_manifest(&BACKENDS), Some(cluster_cidr()));
    let vip = seed::frontend();
    let client = SocketAddrV4::new(*client().ip(), 50100);
    let endpoint = parse(
        &datapath
            .run(FROM_PODS, &tcp(client, vip, SYN).build(), 0)
            .output,
    )
    .dst;
    let answered = datapath.run(TO_POD, &tcp(endpoint, client, SYN | ACK).build(), 0);
    assert_eq!(
        parse(&answered.output).src,
        vip,
        "the service's own handshake"
    );
    datapath.run(FROM_PODS, &tcp(client, vip, FIN | ACK).build(), 0);
    datapath.run(TO_POD, &tcp(endpoint, client, FIN | ACK).build(), 0);
    // A late ACK of the closed connection still gets its frontend back...
    let late = datapath.run(TO_POD, &tcp(endpoint, client, ACK).build(), 0);
    assert_eq!(parse(&late.output).src, vip);
    // ...but the client now connects to the endpoint directly from the same port (the
    // endpoint's TIME_WAIT accepts the SYN): its SYN-ACK and what follows are the direct
    // connection's, untouched.
    let direct = tcp(client, endpoint, SYN).build();
    assert_eq!(datapath.run(FROM_PODS, &direct, 0).output, direct);
    for flags in [SYN | ACK, ACK, PSH | ACK] {
        let reply = tcp(endpoint, client, flags).build();
        assert_eq!(
            datapath.run(TO_POD, &reply, 0).output,
            reply,
            "a direct reply with flags {flags:#04x} is not rewritten"
        );
    }
}

/// Asserts that `output` is the ICMP error `input` with its outer source `from`, destination
/// `to`, and quoted datagram `quoted` (source, destination), every checksum valid, the quoted
/// transport checksum `l4_checksum` where quoted, and nothing else changed.
fn assert_icmp_rewritten(
    name: &str,
    input: &[u8],
    output: &[u8],
    (from, to): (Ipv4Addr, Ipv4Addr),
    quoted: (SocketAddrV4, SocketAddrV4),
    l4_checksum: Option<u16>,
) {
    let (before, after) = (parse_icmp_error(input), parse_icmp_error(output));
    assert_eq!(output.len(), input.len(), "{name}: length");
    assert_eq!(
        (after.from, after.to),
        (from, to),
        "{name}: outer addresses"
    );
    assert_eq!(
        (after.quoted_src, after.quoted_dst),
        quoted,
        "{name}: quoted addresses"
    );
    assert_eq!(
        (after.kind, after.code),
        (before.kind, before.code),
        "{name}"
    );
    assert!(after.ip_checksum_ok, "{name}: IPv4 checksum");
    assert!(after.icmp_checksum_ok, "{name}: ICMP checksum");
    assert!(after.quoted_ip_checksum_ok, "{name}: quoted IPv4 checksum");
    assert_eq!(
        after.quoted_l4_checksum, l4_checksum,
        "{name}: quoted checksum"
    );
    assert_eq!(output[..14], input[..14], "{name}: Ethernet header");
}

/// What a router or the endpoint sends back about a client's packet reaches the client quoting
/// the frontend the client used, so its socket takes it (path MTU discovery among others);
/// what a client sends back about a reply reaches the endpoint quoting the endpoint.
#[test]
fn icmp_errors_about_service_connections_quote_what_each_side_sent() {
    let mut datapath = Datapath::new(&with_dns(), Some(cluster_cidr()));
    let vip = seed::frontend();
    let sent = tcp(client(), vip, ACK | PSH)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();
    let translated = datapath.run(FROM_PODS, &sent, 0).output;
    let used = parse(&translated).dst;
    let router = Ipv4Addr::new(172, 30, 20, 1);
    for (kind, error) in icmp_errors() {
        for (sender, from) in [(*used.ip(), *vip.ip()), (router, router)] {
            // The whole segment quoted, its checksum with it; and only 8 bytes of it.
            for (quote_len, l4_checksum) in
                [(usize::MAX, Some(parse(&sent).l4_checksum)), (28, None)]
            {
                let name = format!("{kind} from {sender}, quoting {quote_len} bytes");
                let input = icmp_error(sender, *client().ip(), error, &translated, quote_len);
                let run = datapath.run(TO_POD, &input, 0);
                assert_eq!(run.verdict, VERDICT_PASS, "{name}: verdict");
                assert_icmp_rewritten(
                    &name,
                    &input,
                    &run.output,
                    (from, *client().ip()),
                    (client(), vip),
                    l4_checksum,
                );
            }
        }
    }

    // The client's port is closed when the answer of a UDP service arrives: the endpoint
    // learns it, quoting its own address.
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53);
    let query = udp(client(), dns, b"q").build();
    let endpoint = parse(&datapath.run(FROM_PODS, &query, 0).output).dst;
    let answer = udp(dns, client(), b"answer").build();
    let sent_answer = udp(endpoint, client(), b"answer").build();
    let (_, unreachable) = icmp_errors()[1];
    let input = icmp_error(*client().ip(), *dns.ip(), unreachable, &answer, usize::MAX);
    let run = datapath.run(FROM_PODS, &input, 0);
    assert_eq!(run.verdict, VERDICT_PASS);
    assert_icmp_rewritten(
        "port unreachable about an answer",
        &input,
        &run.output,
        (*client().ip(), *endpoint.ip()),
        (endpoint, client()),
        Some(parse(&sent_answer).l4_checksum),
    );
    assert!(datapath.drops().is_empty(), "{:?}", datapath.drops());

    // Left alone: an error about a connection nobody tracks, one addressed elsewhere than the
    // frontend or the client, one quoting a later fragment (no ports), an echo request.
    let stranger = tcp(
        SocketAddrV4::new(Ipv4Addr::new(172, 30, 20, 8), 40000),
        used,
        ACK,
    )
    .build();
    let untouched = [
        icmp_error(
            router,
            Ipv4Addr::new(172, 30, 20, 8),
            error_of(0),
            &stranger,
            usize::MAX,
        ),
        icmp_error(
            *client().ip(),
            Ipv4Addr::new(10, 254, 0, 99),
            unreachable,
            &answer,
            usize::MAX,
        ),
        icmp_error(
            router,
            Ipv4Addr::new(172, 30, 20, 8),
            error_of(0),
            &translated,
            usize::MAX,
        ),
        icmp_error(
            router,
            *client().ip(),
            error_of(0),
            &tcp(client(), used, ACK).fragment(0x0010).build(),
            usize::MAX,
        ),
        icmp_error(
            router,
            *client().ip(),
            (8, 0, [0; 4]),
            &translated,
            usize::MAX,
        ),
    ];
    for input in untouched {
        for program in [TO_POD, FROM_PODS] {
            let run = datapath.run(program, &input, 0);
            assert_eq!(
                (run.verdict, &run.output),
                (VERDICT_PASS, &input),
                "{program}"
            );
        }
    }
}

fn error_of(index: usize) -> IcmpError {
    icmp_errors()[index].1
}

/// A UDP datagram of `len` bytes, in fragments of at most 1,480 bytes of payload (a 1,500-byte
/// MTU), as a pod's stack sends it.
fn udp_fragments(src: SocketAddrV4, dst: SocketAddrV4, len: usize, id: u16) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|n| (n * 7) as u8).collect();
    fragmented(&udp(src, dst, &payload).build(), id, 1480)
}

/// Runs `program` on each frame, in order; every one must pass.
fn run_all(datapath: &mut Datapath, program: &str, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|frame| {
            let run = datapath.run(program, frame, 0);
            assert_eq!(run.verdict, VERDICT_PASS, "a fragment passes");
            run.output
        })
        .collect()
}

#[test]
fn a_datagram_in_fragments_is_translated_whole_both_ways() {
    let mut datapath = Datapath::new(&with_dns(), Some(cluster_cidr()));
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53);
    let query = udp_fragments(client(), dns, 8192, 0x0101);
    assert_eq!(query.len(), 6, "8 KiB at MTU 1500");
    let sent = run_all(&mut datapath, FROM_PODS, &query);
    let endpoint = parse(&sent[0]).dst;
    assert!(
        [BACKENDS[0], BACKENDS[1]].contains(endpoint.ip()) && endpoint.port() == 5353,
        "DNAT to a DNS endpoint, not {endpoint}"
    );
    for (n, (before, after)) in query.iter().zip(&sent).enumerate().skip(1) {
        let mut expected = before.clone();
        expected[30..34].copy_from_slice(&endpoint.ip().octets());
        expected[24..26].fill(0);
        let sum = checksum(&expected[14..34]);
        expected[24..26].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            *after, expected,
            "later fragment {n}: the destination address and the header checksum change, nothing else"
        );
    }
    assert_rewritten(
        "the query as the endpoint reassembles it",
        &reassembled(&query),
        &reassembled(&sent),
        client(),
        endpoint,
    );

    let answer = udp_fragments(endpoint, client(), 3000, 0x0202);
    let restored = run_all(&mut datapath, TO_POD, &answer);
    assert_rewritten(
        "the answer as the client reassembles it",
        &reassembled(&answer),
        &reassembled(&restored),
        dns,
        client(),
    );
    assert!(datapath.drops().is_empty(), "{:?}", datapath.drops());
}

#[test]
fn fragments_that_cannot_be_translated_whole_are_dropped_counted_and_others_pass() {
    let mut datapath = Datapath::new(&with_dns(), Some(cluster_cidr()));
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53);
    let dropped = |datapath: &mut Datapath, n| {
        assert_eq!(
            datapath.drops(),
            BTreeMap::from([(DropReason::FragmentUntranslatable, n)])
        );
    };

    // Out of order: the last fragment, first, passes as it is; the first fragment is dropped.
    let late = udp_fragments(client(), dns, 3000, 7);
    for (n, expect_drop) in [(2, false), (0, true), (1, false)] {
        let run = datapath.run(FROM_PODS, &late[n], 0);
        if expect_drop {
            assert_eq!(
                run.verdict, VERDICT_DROP,
                "the first fragment, after a later one"
            );
        } else {
            assert_eq!(
                (run.verdict, &run.output),
                (VERDICT_PASS, &late[n]),
                "fragment {n}, before its first"
            );
        }
    }
    dropped(&mut datapath, 1);

    // The mark is an earlier datagram's once the kernel's reassembly timeout (30 s) is over: a
    // datagram that reuses the identification is translated.
    let marks = datapath.fragments();
    assert_eq!(marks.len(), 1, "{marks:?}");
    let (key, mut mark) = marks[0];
    assert_eq!(mark.state, frag_state::LATER_FIRST);
    mark.seen_ns = clock_past(FRAGMENT_TIMEOUT_NS + SECOND) - FRAGMENT_TIMEOUT_NS - SECOND;
    datapath.set_fragments(&[(key, mark)]);
    let reused = run_all(&mut datapath, FROM_PODS, &late);
    let endpoint = parse(&reused[0]).dst;
    assert_rewritten(
        "a datagram reusing an old identification",
        &reassembled(&late),
        &reassembled(&reused),
        client(),
        endpoint,
    );

    // A later fragment whose connection is gone is dropped.
    let orphan = udp_fragments(client(), dns, 3000, 8);
    run_all(&mut datapath, FROM_PODS, &orphan[..1]);
    datapath.set_conntrack(&[]);
    assert_eq!(datapath.run(FROM_PODS, &orphan[1], 0).verdict, VERDICT_DROP);
    dropped(&mut datapath, 2);

    // Fragments of a datagram for no service, and of one nobody asked for, pass as they are.
    let direct = udp_fragments(
        client(),
        SocketAddrV4::new(Ipv4Addr::new(172, 30, 44, 2), 53),
        3000,
        9,
    );
    assert_eq!(run_all(&mut datapath, FROM_PODS, &direct), direct);
    let unasked = udp_fragments(SocketAddrV4::new(BACKENDS[0], 5353), client(), 3000, 10);
    assert_eq!(run_all(&mut datapath, TO_POD, &unasked), unasked);
    dropped(&mut datapath, 2);
}

/// One frame of [`clashing_tuples_are_kept_apart_by_moving_the_client_port`] and what must
/// come out of it: rewritten to these addresses, or left alone, or dropped for this reason.
enum Step {
    To(SocketAddrV4, SocketAddrV4),
    Unchanged,
    Dropped(DropReason),
}

#[test]
fn clashing_tuples_are_kept_apart_by_moving_the_client_port() {
    let endpoint_ip = BACKENDS[0];
    let other_vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 40, 120), 8080);
    let dns_vip = SocketAddrV4::new(Ipv4Addr::new(10, 254, 0, 10), 53);
    let manifests = [
        nginx_manifest(&[endpoint_ip]),
        service(
            "other",
            *other_vip.ip(),
            other_vip.port(),
            "TCP",
            TARGET_PORT,
        ),
        endpoint_slice("other", "TCP", TARGET_PORT, &[endpoint_ip]),
        service("dns", *dns_vip.ip(), 53, "UDP", 5353),
        endpoint_slice("dns", "UDP", 5353, &[endpoint_ip]),
    ]
    .join("---\n");
    let mut datapath = Datapath::new(&manifests, Some(cluster_cidr()));
    let vip = seed::frontend();
    let endpoint = SocketAddrV4::new(endpoint_ip, TARGET_PORT);
    let dns = SocketAddrV4::new(endpoint_ip, 5353);
    let at = |port: u16| SocketAddrV4::new(*client().ip(), port);
    let moved = |port: u16, by: u8| at(moved_port(port, by));
    let (c, full) = (at(50100), 50200);
    let service_syn = |from, to| (FROM_PODS, tcp(from, to, SYN).build());
    let mut steps = vec![
        (
            "a service connection goes to the endpoint from the client's port",
            service_syn(c, vip),
            Step::To(c, endpoint),
        ),
        (
            "a direct connection from that port to that endpoint is moved to another port",
            (FROM_PODS, tcp(c, endpoint, SYN).build()),
            Step::To(moved(50100, 1), endpoint),
        ),
        (
            "the direct connection's reply gets the client's port back, not the frontend",
            (TO_POD, tcp(endpoint, moved(50100, 1), SYN | ACK).build()),
            Step::To(endpoint, c),
        ),
        (
            "the service connection's reply still gets its frontend",
            (TO_POD, tcp(endpoint, c, SYN | ACK).build()),
            Step::To(vip, c),
        ),
        (
            "the direct connection's later packets follow its move",
            (
                FROM_PODS,
                tcp(c, endpoint, ACK | PSH).payload(b"direct").build(),
            ),
            Step::To(moved(50100, 1), endpoint),
        ),
        (
            "the service connection's later packets keep the client's port",
            (
                FROM_PODS,
                tcp(c, vip, ACK | PSH).payload(b"service").build(),
            ),
            Step::To(c, endpoint),
        ),
        (
            "a second service with the same endpoint, from the same port, takes the next move",
            service_syn(c, other_vip),
            Step::To(moved(50100, 2), endpoint),
        ),
        (
            "its reply gets its own frontend and the client's port",
            (TO_POD, tcp(endpoint, moved(50100, 2), SYN | ACK).build()),
            Step::To(other_vip, c),
        ),
        (
            "a direct connection from a port no service connection uses is left alone",
            (FROM_PODS, tcp(at(50101), endpoint, SYN).build()),
            Step::Unchanged,
        ),
        (
            "a direct packet that opens nothing (no SYN) is left alone",
            (FROM_PODS, tcp(at(50102), endpoint, ACK).build()),
            Step::Unchanged,
        ),
        (
            "the service connection is reset",
            (FROM_PODS, tcp(c, vip, RST | ACK).build()),
            Step::To(c, endpoint),
        ),
        (
            "so is the direct one",
            (FROM_PODS, tcp(c, endpoint, RST | ACK).build()),
            Step::To(moved(50100, 1), endpoint),
        ),
        (
            "a new direct connection from the port clashes no more: it keeps its port",
            (FROM_PODS, tcp(c, endpoint, SYN).build()),
            Step::Unchanged,
        ),
        (
            "and so do its later packets: the old move is gone",
            (FROM_PODS, tcp(c, endpoint, ACK).build()),
            Step::Unchanged,
        ),
        (
            "its replies are left alone too",
            (TO_POD, tcp(endpoint, c, SYN | ACK).build()),
            Step::Unchanged,
        ),
        (
            "a UDP service datagram goes to the endpoint from the client's port",
            (FROM_PODS, udp(c, dns_vip, b"query").build()),
            Step::To(c, dns),
        ),
        (
            "a direct datagram from that port to that endpoint is moved",
            (FROM_PODS, udp(c, dns, b"direct").build()),
            Step::To(moved(50100, 1), dns),
        ),
        (
            "the direct datagram's answer gets the client's port back",
            (TO_POD, udp(dns, moved(50100, 1), b"answer").build()),
            Step::To(dns, c),
        ),
        (
            "the service datagram's answer gets its frontend",
            (TO_POD, udp(dns, c, b"answer").build()),
            Step::To(dns_vip, c),
        ),
    ];
    // Every move of one port taken: by service connections from the moved ports themselves,
    // then one from the port, then a direct connection that has nowhere to go.
    for by in 1..=PORT_MOVES {
        steps.push((
            "a service connection from a port some move of another would take",
            service_syn(moved(full, by), other_vip),
            Step::To(moved(full, by), endpoint),
        ));
    }
    steps.push((
        "a service connection from the port itself",
        service_syn(at(full), vip),
        Step::To(at(full), endpoint),
    ));
    steps.push((
        "a direct connection whose every move is taken is dropped, counted",
        (FROM_PODS, tcp(at(full), endpoint, SYN).build()),
        Step::Dropped(DropReason::TupleInUse),
    ));
    for (name, (program, input), expect) in steps {
        let run = datapath.run(program, &input, 0);
        match expect {
            Step::To(src, dst) => {
                assert_eq!(run.verdict, VERDICT_PASS, "{name}: verdict");
                assert_rewritten(name, &input, &run.output, src, dst);
                assert!(datapath.drops().is_empty(), "{name}: no drops");
            }
            Step::Unchanged => {
                assert_eq!(run.verdict, VERDICT_PASS, "{name}: verdict");
                assert_eq!(run.output, input, "{name}: output");
            }
            Step::Dropped(reason) => {
                assert_eq!(run.verdict, VERDICT_DROP, "{name}: verdict");
                assert_eq!(
                    datapath.drops(),
                    BTreeMap::from([(reason, 1)]),
                    "{name}: drop counters"
                );
            }
        }
    }
    // An ICMP error about a moved connection would need both ends of its quote rewritten: it
    // is left alone, never half translated.
    let about_moved = tcp(moved(50100, 1), endpoint, ACK).build();
    let (_, kind) = icmp_errors()[0];
    let error = icmp_error(endpoint_ip, *client().ip(), kind, &about_moved, 28);
    assert_eq!(datapath.run(TO_POD, &error, 0).output, error);
}
