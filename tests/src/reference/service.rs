//! Services on TC: `tc_from_pods` and `tc_from_uplink` translate client packets to a
//! frontend (DNAT to its endpoint, the masquerade mark for off-cluster clients and hairpins,
//! a reset or port unreachable when the service has no endpoints); `tc_to_pod` (and the first
//! half of `tc_to_uplink`) restores the frontend as the source of a tracked connection's
//! replies. ICMP errors about a tracked connection get the same translation in what they quote.
//! A TCP or UDP datagram of a tracked connection in fragments is translated whole: the first
//! fragment as any packet, the later ones (address only) by the ports the fragment map
//! holds for the datagram; a first fragment whose later ones came first, an SCTP one and a
//! later one whose connection is gone are dropped.
//! Frames too damaged to judge are the stack's: they pass, except an invalid IPv4 header on the
//! client side and a cut transport header to a frontend, which are dropped.

use std::net::SocketAddrV4;

use weft_common::{
    conntrack::{PORT_MOVES, keeps_class, moved_port, opens},
    drop_reason::DropReason,
    maps::{
        ct_direction::{FORWARD, REPLY},
        frag_state::{LATER_FIRST, TRANSLATED},
    },
};

use super::{
    Fixture, ICMP, Ip, L3, L4, MASQUERADE, Outcome, SCTP, TCP, Tuple, UDP, Unknown, VERDICT_DROP,
    VERDICT_PASS, VERDICT_REDIRECT, checksum, crc32c, in_network, l4_header_len, moved, parse_ip,
    parse_l4, rechecksum, sum,
};

/// Which end of a packet a translation rewrites.
#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl Fixture {
    /// `tc_from_pods`: a local pod's frame. A packet for a pod of another node then goes
    /// straight into the overlay (see [`super::vxlan`]).
    #[must_use]
    pub fn tc_from_pods(&self, frame: &[u8], mark: u32) -> Outcome {
        let translated = self.to_endpoint(frame, mark, Clients::Pods);
        let mut outcome = if translated.verdict == VERDICT_PASS {
            self.send_from_pod(&translated).unwrap_or(translated)
        } else {
            translated
        };
        outcome.pods = self.learns(frame);
        outcome
    }

    /// `tc_from_uplink`: a frame from the network, the overlay's decapsulated first (see
    /// [`super::vxlan`]). With the cluster CIDR set, a client from outside counts as inside the
    /// cluster exactly as a pod does: when the CIDR holds it.
    #[must_use]
    pub fn tc_from_uplink(&self, frame: &[u8], mark: u32) -> Outcome {
        self.receive_overlay(frame, mark)
            .unwrap_or_else(|| self.to_endpoint(frame, mark, Clients::Outside))
    }

    /// `tc_to_pod`: a frame delivered to a local pod.
    #[must_use]
    pub fn tc_to_pod(&self, frame: &[u8], mark: u32) -> Outcome {
        self.to_client(frame, mark)
    }

    pub(super) fn to_endpoint(&self, frame: &[u8], mark: u32, clients: Clients) -> Outcome {
        let mut outcome = self.translate_to_endpoint(frame, mark, clients);
        outcome.fragments = fragment_with_ports(frame);
        outcome
    }

    fn translate_to_endpoint(&self, frame: &[u8], mark: u32, clients: Clients) -> Outcome {
        let ip = match parse_ip(frame) {
            L3::NotIpv4 => return Outcome::pass(VERDICT_PASS, frame, mark),
            L3::Malformed => {
                return Outcome::drop(VERDICT_DROP, frame, mark, DropReason::MalformedIpv4);
            }
            L3::Ipv4(ip) => ip,
        };
        let tuple = match parse_l4(frame, &ip) {
            L4::Other if ip.later_fragment() => {
                return self.later_fragment(frame, &ip, mark, FORWARD);
            }
            L4::Other if ip.proto == ICMP => return self.error_about_reply(frame, &ip, mark),
            L4::Other => return Outcome::pass(VERDICT_PASS, frame, mark),
            L4::Truncated => {
                // Dropped only when the ports it has say it is for a frontend.
                let for_service = frame.get(ip.l4..ip.l4 + 4).is_some_and(|ports| {
                    let port = u16::from_be_bytes([ports[2], ports[3]]);
                    self.frontend(ip.dst, port, ip.proto).is_some()
                });
                return if for_service {
                    Outcome::drop(VERDICT_DROP, frame, mark, DropReason::MalformedL4)
                } else {
                    Outcome::pass(VERDICT_PASS, frame, mark)
                };
            }
            L4::Ports(tuple) => tuple,
        };
        let Some((service, masquerade_all)) = self.frontend(ip.dst, tuple.dport, ip.proto) else {
            return match clients {
                Clients::Pods => self.direct_from_pod(frame, &ip, &tuple, mark),
                Clients::Outside => Outcome::pass(VERDICT_PASS, frame, mark),
            };
        };
        if ip.first_fragment() && self.untranslatable_first_fragment(frame, &ip, FORWARD) {
            return Outcome::drop(
                VERDICT_DROP,
                frame,
                mark,
                DropReason::FragmentUntranslatable,
            );
        }
        let (endpoint, masquerade, client_port) = match self.forward(&tuple) {
            Some(connection) => (connection.endpoint, connection.masquerade, tuple.sport),
            None => {
                let Some(endpoint) = service.endpoint_addr() else {
                    let mut outcome = reject(frame, &ip, mark);
                    outcome.conntrack = true;
                    return outcome;
                };
                let Some(client_port) = self.free_client_port(&tuple, endpoint) else {
                    return tuple_in_use(frame, mark);
                };
                let inside = in_network(ip.src);
                (
                    endpoint,
                    masquerade_all || !inside || endpoint.ip().octets() == ip.src,
                    client_port,
                )
            }
        };
        let mut output = frame.to_vec();
        let mut unknown = rewrite(
            &mut output,
            &ip,
            Side::Destination,
            endpoint.ip().octets(),
            endpoint.port(),
        );
        if client_port != tuple.sport {
            unknown.extend(rewrite(&mut output, &ip, Side::Source, ip.src, client_port));
        }
        Outcome::translated(
            output,
            if masquerade { mark | MASQUERADE } else { mark },
            unknown,
        )
    }

    /// Restores the frontend in a reply of a tracked connection; anything else is left alone.
    pub(super) fn to_client(&self, frame: &[u8], mark: u32) -> Outcome {
        let mut outcome = self.restore_to_client(frame, mark);
        outcome.fragments = fragment_with_ports(frame);
        outcome
    }

    fn restore_to_client(&self, frame: &[u8], mark: u32) -> Outcome {
        let L3::Ipv4(ip) = parse_ip(frame) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        if ip.proto == ICMP {
            return self.error_about_client_packet(frame, &ip, mark);
        }
        if ip.later_fragment() {
            return self.later_fragment(frame, &ip, mark, REPLY);
        }
        let L4::Ports(tuple) = parse_l4(frame, &ip) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        let Some(connection) = self.reply(&tuple) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        if ip.first_fragment() && self.untranslatable_first_fragment(frame, &ip, REPLY) {
            return untranslatable_fragment_after_lookup(frame, mark);
        }
        let mut output = frame.to_vec();
        let unknown = rewrite(
            &mut output,
            &ip,
            Side::Source,
            connection.frontend.ip().octets(),
            connection.frontend.port(),
        );
        Outcome::translated(output, mark, unknown)
    }
}

/// Whose packets a hook translates to frontends.
#[derive(Clone, Copy)]
pub(super) enum Clients {
    /// A local pod's: its direct connections' client ports are moved when they clash.
    Pods,
    /// Anything reaching the node from outside.
    Outside,
}

impl Fixture {
    /// A pod's TCP or UDP packet to no frontend: moved to another client port when it opens a
    /// connection (a bare SYN, any datagram) on the reply tuple of a tracked connection, as the
    /// tracked connection's replies would otherwise take its own; otherwise left alone.
    fn direct_from_pod(&self, frame: &[u8], ip: &Ip, tuple: &Tuple, mark: u32) -> Outcome {
        let tcp_flags = if ip.proto == TCP {
            frame[ip.l4 + 13]
        } else {
            0
        };
        let reply = Tuple {
            src: tuple.dst,
            dst: tuple.src,
            sport: tuple.dport,
            dport: tuple.sport,
            proto: tuple.proto,
        };
        if !matches!(ip.proto, TCP | UDP)
            || !opens(ip.proto, tcp_flags)
            || self.reply(&reply).is_none()
        {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        }
        let Some(client_port) = self.free_client_port(tuple, tuple.dst()) else {
            return tuple_in_use(frame, mark);
        };
        let mut output = frame.to_vec();
        let unknown = rewrite(&mut output, ip, Side::Source, ip.src, client_port);
        Outcome::translated(output, mark, unknown)
    }

    /// The client port a new connection from `tuple`'s client to `endpoint` has on the wire:
    /// its own, or the first move of it (see `weft_common::conntrack::moved_port`) that no
    /// tracked connection to that endpoint has as its client port; `None` when every move is
    /// taken.
    fn free_client_port(&self, tuple: &Tuple, endpoint: SocketAddrV4) -> Option<u16> {
        (0..=PORT_MOVES)
            .filter(|by| *by == 0 || keeps_class(tuple.sport, *by))
            .map(|by| moved_port(tuple.sport, by))
            .find(|port| {
                let client = SocketAddrV4::new(tuple.src.into(), *port);
                !self
                    .connections
                    .iter()
                    .any(|c| c.proto == tuple.proto && c.endpoint == endpoint && c.client == client)
            })
    }

    /// Whether the first fragment of a datagram that would be translated cannot be: SCTP (its
    /// CRC32c covers the whole datagram, which the fragment does not hold), or later fragments
    /// came first through `direction`'s hooks.
    fn untranslatable_first_fragment(&self, frame: &[u8], ip: &Ip, direction: u8) -> bool {
        ip.proto == SCTP
            || self
                .datagram(frame, ip, direction)
                .is_some_and(|d| d.state == LATER_FIRST)
    }

    /// A later fragment of a TCP or UDP datagram whose first fragment was translated in
    /// `direction`: the address its connection gives that side (the destination of a
    /// client's datagram, the source of a reply), and the masquerade mark; dropped when the
    /// connection is gone. Any other fragment is left alone.
    fn later_fragment(&self, frame: &[u8], ip: &Ip, mark: u32, direction: u8) -> Outcome {
        let datagram = self
            .datagram(frame, ip, direction)
            .filter(|d| d.state == TRANSLATED && matches!(ip.proto, TCP | UDP));
        let Some(d) = datagram else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        let tuple = Tuple {
            src: ip.src,
            dst: ip.dst,
            sport: d.src_port,
            dport: d.dst_port,
            proto: ip.proto,
        };
        let translation = if direction == FORWARD {
            self.forward(&tuple).map(|c| {
                let mark = if c.masquerade {
                    mark | MASQUERADE
                } else {
                    mark
                };
                (Side::Destination, c.endpoint.ip().octets(), mark)
            })
        } else {
            self.reply(&tuple)
                .map(|c| (Side::Source, c.frontend.ip().octets(), mark))
        };
        let Some((side, addr, mark)) = translation else {
            return untranslatable_fragment_after_lookup(frame, mark);
        };
        let mut output = frame.to_vec();
        let at = match side {
            Side::Source => 14 + 12,
            Side::Destination => 14 + 16,
        };
        output[at..at + 4].copy_from_slice(&addr);
        refresh(frame, &mut output, 14..14 + ip.header_len, 24);
        Outcome::translated(output, mark, Vec::new())
    }

    /// An ICMP error about a client's packet (quoting client -> endpoint), addressed to the
    /// client: the quote shows the frontend again, and the outer source too when the endpoint
    /// sent the error.
    fn error_about_client_packet(&self, frame: &[u8], ip: &Ip, mark: u32) -> Outcome {
        let Some(quote) = quoted(frame, ip) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        let Some(connection) = self.reply(&quote.answer()) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        let outer = (ip.src == quote.tuple.dst).then_some(Side::Source);
        rewrite_error(
            frame,
            ip,
            &quote,
            Side::Destination,
            connection.frontend,
            outer,
            mark,
        )
    }

    /// An ICMP error about a reply (quoting frontend -> client), addressed to the frontend: on
    /// to the endpoint, the quote showing the endpoint.
    fn error_about_reply(&self, frame: &[u8], ip: &Ip, mark: u32) -> Outcome {
        let Some(quote) = quoted(frame, ip) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        let Some(connection) = self.forward(&quote.answer()) else {
            return Outcome::pass(VERDICT_PASS, frame, mark);
        };
        rewrite_error(
            frame,
            ip,
            &quote,
            Side::Source,
            connection.endpoint,
            Some(Side::Destination),
            mark,
        )
    }
}

/// The datagram an ICMP error quotes.
struct Quote {
    /// Offsets of the quoted IPv4 header and transport header in the frame.
    ip: usize,
    l4: usize,
    header_len: usize,
    tuple: Tuple,
}

impl Quote {
    /// The tuple of the packets that answer the quoted one.
    fn answer(&self) -> Tuple {
        Tuple {
            src: self.tuple.dst,
            dst: self.tuple.src,
            sport: self.tuple.dport,
            dport: self.tuple.sport,
            proto: self.tuple.proto,
        }
    }
}

/// The quote of an ICMP error the datapath translates: an unfragmented error (destination
/// unreachable, time exceeded, parameter problem) the frame holds whole, addressed to the
/// quoted datagram's sender, quoting an IPv4 header of a TCP, UDP or SCTP datagram that is no
/// later fragment, and its ports, inside its length.
fn quoted(frame: &[u8], ip: &Ip) -> Option<Quote> {
    if ip.more_fragments
        || ip.fragment_offset != 0
        || ip.total_len == 0
        || 14 + ip.total_len > frame.len()
        || !matches!(frame.get(ip.l4..ip.l4 + 2)?[0], 3 | 11 | 12)
    {
        return None;
    }
    let at = ip.l4 + 8;
    let header = frame.get(at..at + 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if header[0] >> 4 != 4
        || header_len < 20
        || fragment_offset != 0
        || !matches!(header[9], TCP | UDP | SCTP)
    {
        return None;
    }
    let l4 = at + header_len;
    if l4 + 4 > 14 + ip.total_len {
        return None;
    }
    let ports = frame.get(l4..l4 + 4)?;
    if ip.dst != header[12..16] {
        return None;
    }
    Some(Quote {
        ip: at,
        l4,
        header_len,
        tuple: Tuple {
            src: header[12..16].try_into().expect("4 bytes"),
            dst: header[16..20].try_into().expect("4 bytes"),
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: header[9],
        },
    })
}

/// Rewrites the quote's `side` to `to` and the outer `outer` address to `to`'s address, with
/// the checksums: the quoted and outer IPv4 headers' and the ICMP message's recomputed (or
/// their errors kept), the quoted TCP or UDP checksum moved by the change of the addresses and
/// port it covers when quoted in the datagram (a UDP 0 staying 0). A quoted SCTP CRC32c is
/// not touched: the quote does not hold what it covers.
fn rewrite_error(
    frame: &[u8],
    ip: &Ip,
    quote: &Quote,
    side: Side,
    to: std::net::SocketAddrV4,
    outer: Option<Side>,
    mark: u32,
) -> Outcome {
    let before = frame.to_vec();
    let mut output = frame.to_vec();
    let (addr_at, port_at) = match side {
        Side::Source => (quote.ip + 12, quote.l4),
        Side::Destination => (quote.ip + 16, quote.l4 + 2),
    };
    output[addr_at..addr_at + 4].copy_from_slice(&to.ip().octets());
    output[port_at..port_at + 2].copy_from_slice(&to.port().to_be_bytes());
    let field_at = quote.ip + 10;
    refresh(
        &before,
        &mut output,
        quote.ip..quote.ip + quote.header_len,
        field_at,
    );
    let checksum_at = match quote.tuple.proto {
        TCP => Some(quote.l4 + 16),
        UDP => Some(quote.l4 + 6),
        _ => None,
    }
    .filter(|at| at + 2 <= 14 + ip.total_len);
    if let Some(at) = checksum_at {
        let field = u16::from_be_bytes([before[at], before[at + 1]]);
        if !(quote.tuple.proto == UDP && field == 0) {
            let covered = |bytes: &[u8]| {
                sum(&bytes[addr_at..addr_at + 4]) + sum(&bytes[port_at..port_at + 2])
            };
            let mut updated = moved(field, covered(&before), covered(&output));
            if quote.tuple.proto == UDP && updated == 0 {
                updated = 0xffff;
            }
            output[at..at + 2].copy_from_slice(&updated.to_be_bytes());
        }
    }
    let message = ip.l4..14 + ip.total_len;
    refresh(&before, &mut output, message, ip.l4 + 2);
    if let Some(outer) = outer {
        let at = match outer {
            Side::Source => 14 + 12,
            Side::Destination => 14 + 16,
        };
        output[at..at + 4].copy_from_slice(&to.ip().octets());
        refresh(&before, &mut output, 14..14 + ip.header_len, 24);
    }
    Outcome::translated(output, mark, Vec::new())
}

/// Sets the checksum field at `field_at` of the data `covered` for its change from `before` to
/// `output` ([`rechecksum`]).
fn refresh(before: &[u8], output: &mut [u8], covered: std::ops::Range<usize>, field_at: usize) {
    let field = u16::from_be_bytes([before[field_at], before[field_at + 1]]);
    let without_field = |bytes: &[u8]| sum(&bytes[covered.clone()]) - u64::from(field);
    let old = without_field(before);
    output[field_at..field_at + 2].copy_from_slice(&[0, 0]);
    let new = sum(&output[covered.clone()]);
    output[field_at..field_at + 2].copy_from_slice(&rechecksum(field, old, new).to_be_bytes());
}

/// Rewrites `side`'s address and port and sets every checksum the packet carries (IPv4
/// header; TCP and UDP over the pseudo-header, a UDP checksum of 0 staying 0; SCTP's CRC32c
/// over the packet the IPv4 length gives), each recomputed from scratch.
fn rewrite(
    frame: &mut [u8],
    ip: &Ip,
    side: Side,
    addr: [u8; 4],
    port: u16,
) -> Vec<(std::ops::Range<usize>, Unknown)> {
    let before = frame.to_vec();
    let (addr_at, port_at) = match side {
        Side::Source => (14 + 12, ip.l4),
        Side::Destination => (14 + 16, ip.l4 + 2),
    };
    frame[addr_at..addr_at + 4].copy_from_slice(&addr);
    frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());

    // The IPv4 header checksum, over the header with its field zeroed.
    let header = 14..14 + ip.header_len;
    let field = u16::from_be_bytes([before[24], before[25]]);
    let without_field = |bytes: &[u8]| sum(&bytes[header.clone()]) - u64::from(field);
    let ip_checksum = rechecksum(
        field,
        without_field(&before),
        sum(&frame[header.clone()]) - u64::from(field),
    );
    frame[24..26].copy_from_slice(&ip_checksum.to_be_bytes());

    // The transport checksum covers the segment the IPv4 length gives, and at least the
    // header the datapath reads (a shorter length is the stack's to drop; the ports are
    // rewritten either way).
    let header_len = l4_header_len(ip.proto).expect("a transport with ports");
    let segment = ip.l4..ip.end(&before).max(ip.l4 + header_len);
    let mut unknown = Vec::new();
    match ip.proto {
        TCP | UDP => {
            let at = ip.l4 + if ip.proto == TCP { 16 } else { 6 };
            let field = u16::from_be_bytes([before[at], before[at + 1]]);
            if !(ip.proto == UDP && field == 0) {
                // A first fragment's checksum covers the whole datagram: it can only be moved.
                let rechecksum = if ip.first_fragment() {
                    moved
                } else {
                    rechecksum
                };
                let pseudo = |bytes: &[u8]| {
                    sum(&bytes[26..34])
                        + u64::from(ip.proto)
                        + (segment.len() as u64)
                        + sum(&bytes[segment.clone()])
                        - u64::from(field)
                };
                let mut updated = rechecksum(field, pseudo(&before), pseudo(frame));
                if ip.proto == UDP && updated == 0 {
                    // 0 means "no checksum" in UDP; a computed 0 is sent as its other form.
                    updated = 0xffff;
                }
                frame[at..at + 2].copy_from_slice(&updated.to_be_bytes());
            }
        }
        SCTP => {
            let at = ip.l4 + 8;
            let field = u32::from_le_bytes(before[at..at + 4].try_into().expect("4 bytes"));
            let length = ip.total_len.saturating_sub(ip.header_len);
            if ip.total_len == 0 || length < 12 {
                unknown.push((at..at + 4, Unknown::SctpChecksumOfRunt));
            } else if field != 0 {
                // The packet of `length` bytes (zeros past the frame's end: they are the same
                // before and after), checksum field zeroed.
                let packet = |bytes: &[u8]| {
                    let mut packet = vec![0u8; length];
                    let present = bytes.len().saturating_sub(ip.l4).min(length);
                    packet[..present].copy_from_slice(&bytes[ip.l4..ip.l4 + present]);
                    packet[8..12].fill(0);
                    crc32c(&packet)
                };
                let (old, new) = (packet(&before), packet(frame));
                // Right: recomputed; wrong: the same error kept (a CRC is linear).
                let updated = if field == old { new } else { field ^ old ^ new };
                frame[at..at + 4].copy_from_slice(&updated.to_le_bytes());
            }
        }
        _ => unreachable!("only transports with ports are translated"),
    }
    unknown
}

/// A new connection dropped because its tuple and every move of its client port are taken.
fn tuple_in_use(frame: &[u8], mark: u32) -> Outcome {
    Outcome {
        conntrack: true,
        ..Outcome::drop(VERDICT_DROP, frame, mark, DropReason::TupleInUse)
    }
}

/// Whether `frame` is a fragment of a TCP, UDP or SCTP datagram, which the datapath may note in
/// its fragment map.
fn fragment_with_ports(frame: &[u8]) -> bool {
    matches!(parse_ip(frame), L3::Ipv4(ip)
        if (ip.first_fragment() || ip.later_fragment()) && matches!(ip.proto, TCP | UDP | SCTP))
}

/// The answer of a service with no endpoints, sent back where the packet came from: a reset
/// for TCP (none for a reset), an ICMP port unreachable quoting the IPv4 header and 8 bytes for
/// UDP and SCTP (none when the header has options: the quote would not be the packet's).
fn reject(frame: &[u8], ip: &Ip, mark: u32) -> Outcome {
    let dropped = Outcome::drop(VERDICT_DROP, frame, mark, DropReason::NoEndpoints);
    let mut answer = Vec::new();
    answer.extend_from_slice(&frame[6..12]);
    answer.extend_from_slice(&frame[0..6]);
    answer.extend_from_slice(&frame[12..14]);
    let ipv4 = |proto: u8, total: u16| {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        h.extend_from_slice(&ip.dst);
        h.extend_from_slice(&ip.src);
        let c = checksum(sum(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    match ip.proto {
        TCP => {
            let tcp = &frame[ip.l4..ip.l4 + 20];
            let flags = tcp[13];
            if flags & 0x04 != 0 {
                return dropped;
            }
            let seq = u32::from_be_bytes(tcp[4..8].try_into().expect("4 bytes"));
            let ack = u32::from_be_bytes(tcp[8..12].try_into().expect("4 bytes"));
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            let payload = ip.total_len.saturating_sub(ip.header_len + data_offset) as u32;
            let (seq, ack, flags) = if flags & 0x10 != 0 {
                (ack, 0, 0x04)
            } else {
                let len = payload + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
                (0, seq.wrapping_add(len), 0x14)
            };
            answer.extend_from_slice(&ipv4(TCP, 40));
            let mut reset = Vec::new();
            reset.extend_from_slice(&tcp[2..4]);
            reset.extend_from_slice(&tcp[0..2]);
            reset.extend_from_slice(&seq.to_be_bytes());
            reset.extend_from_slice(&ack.to_be_bytes());
            reset.extend_from_slice(&[0x50, flags, 0, 0, 0, 0, 0, 0]);
            let pseudo = sum(&ip.dst) + sum(&ip.src) + u64::from(TCP) + 20;
            let c = checksum(pseudo + sum(&reset));
            reset[16..18].copy_from_slice(&c.to_be_bytes());
            answer.extend_from_slice(&reset);
        }
        _ => {
            if ip.header_len != 20 {
                return dropped;
            }
            let quote = &frame[14..42];
            answer.extend_from_slice(&ipv4(ICMP, 56));
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(quote);
            let c = checksum(sum(&icmp));
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            answer.extend_from_slice(&icmp);
        }
    }
    Outcome {
        verdict: VERDICT_REDIRECT,
        output: answer,
        ..dropped
    }
}

/// A fragment dropped (counted) once conntrack was read for it.
fn untranslatable_fragment_after_lookup(frame: &[u8], mark: u32) -> Outcome {
    Outcome {
        conntrack: true,
        ..Outcome::drop(
            VERDICT_DROP,
            frame,
            mark,
            DropReason::FragmentUntranslatable,
        )
    }
}
