//! Ethernet/IPv4/TCP/UDP parsing, generic over how bytes are read.
//!
//! The datapath implements [`PacketBytes`] over `__sk_buff` data with bounds checks the verifier
//! accepts; host tests implement it over a byte slice. Parsing returns offsets and copied header
//! fields, never pointers, so helpers that move packet data (store, checksum) cannot leave a parse
//! result dangling.

use crate::{csum, ip_proto};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// Offset of the EtherType in an Ethernet header.
const ETH_TYPE_OFFSET: usize = 12;

/// Offsets inside an IPv4 header.
pub mod ipv4 {
    pub const IDENTIFICATION: usize = 4;
    pub const CHECKSUM: usize = 10;
    pub const SRC_ADDR: usize = 12;
    pub const DST_ADDR: usize = 16;
    pub const MIN_HEADER_LEN: usize = 20;
    pub const MAX_HEADER_LEN: usize = 60;
}

/// Offsets inside TCP, UDP and SCTP headers.
pub mod l4 {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECKSUM: usize = 16;
    pub const UDP_CHECKSUM: usize = 6;
    pub const TCP_MIN_HEADER_LEN: usize = 20;
    pub const UDP_HEADER_LEN: usize = 8;
    /// SCTP's common header: ports, verification tag, checksum (CRC32c, little-endian).
    pub const SCTP_HEADER_LEN: usize = 12;
    pub const SCTP_CHECKSUM: usize = 8;
}

/// ICMP (RFC 792): the header, and the types of error messages, which quote the header and
/// the first bytes of the datagram they are about.
pub mod icmp {
    pub const HEADER_LEN: usize = 8;
    pub const CHECKSUM: usize = 2;
    /// Destination unreachable, fragmentation needed (path MTU discovery) among its codes.
    pub const DEST_UNREACH: u8 = 3;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// TCP header flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The source MAC of an Ethernet header.
#[inline(always)]
#[must_use]
pub const fn source_mac(ethernet: &[u8; ETH_HLEN]) -> [u8; 6] {
    [
        ethernet[6],
        ethernet[7],
        ethernet[8],
        ethernet[9],
        ethernet[10],
        ethernet[11],
    ]
}

/// Read access to a frame's bytes, starting at the Ethernet header.
pub trait PacketBytes {
    /// The `N` bytes at `offset`, or `None` when the frame is shorter.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketBytes for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        self.get(offset..end)?.try_into().ok()
    }
}

/// Where a datagram sits in a fragmented IPv4 datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: carries the transport header, more fragments follow.
    First,
    /// A later fragment: no transport header.
    Later,
}

/// The fields of an IPv4 header the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Offset of the transport header (Ethernet header plus IHL * 4).
    pub l4_offset: usize,
    /// The total length field: header and payload, or 0 for a BIG TCP super-packet.
    pub total_len: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// The TOS byte (DSCP and ECN).
    pub tos: u8,
    pub fragment: Fragment,
}

/// What a frame is, as far as the datapath cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not IPv4 (ARP, IPv6, ...): not ours.
    NotIpv4,
    /// IPv4, but the header is truncated or invalid.
    MalformedIpv4,
    Ipv4(Ipv4Header),
}

/// Parses the Ethernet and IPv4 headers.
#[inline(always)]
pub fn parse_ipv4<P: PacketBytes + ?Sized>(packet: &P) -> Frame {
    let Some(ether_type) = packet.read::<2>(ETH_TYPE_OFFSET) else {
        return Frame::NotIpv4;
    };
    if u16::from_be_bytes(ether_type) != ETH_P_IP {
        return Frame::NotIpv4;
    }
    let Some(header) = packet.read::<{ ipv4::MIN_HEADER_LEN }>(ETH_HLEN) else {
        return Frame::MalformedIpv4;
    };
    let version = header[0] >> 4;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    // A total length of 0 is how the kernel marks an IPv4 BIG TCP super-packet (> 64 KiB).
    if version != 4
        || header_len < ipv4::MIN_HEADER_LEN
        || (total_len != 0 && total_len < header_len)
    {
        return Frame::MalformedIpv4;
    }
    // Options must be present in full, or the transport offset points into nothing.
    if packet.read::<1>(ETH_HLEN + header_len - 1).is_none() {
        return Frame::MalformedIpv4;
    }
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    let fragment = match (more_fragments, fragment_offset) {
        (false, 0) => Fragment::Whole,
        (true, 0) => Fragment::First,
        _ => Fragment::Later,
    };
    Frame::Ipv4(Ipv4Header {
        l4_offset: ETH_HLEN + header_len,
        total_len: total_len as u16,
        src: [header[12], header[13], header[14], header[15]],
        dst: [header[16], header[17], header[18], header[19]],
        proto: header[9],
        tos: header[1],
        fragment,
    })
}

/// Whether the IPv4 header of `header_len` bytes (20 to 60) after the Ethernet header carries a
/// valid checksum, as the stack checks before it takes a packet.
#[inline(always)]
pub fn ipv4_checksum_ok<P: PacketBytes + ?Sized>(packet: &P, header_len: usize) -> bool {
    let Some(fixed) = packet.read::<{ ipv4::MIN_HEADER_LEN }>(ETH_HLEN) else {
        return false;
    };
    let mut sum = csum::sum_words(&fixed);
    // Options, a word at a time: a loop of constant bound, for the verifier.
    let mut at = ipv4::MIN_HEADER_LEN;
    while at < ipv4::MAX_HEADER_LEN {
        if at >= header_len {
            break;
        }
        let Some(word) = packet.read::<4>(ETH_HLEN + at) else {
            return false;
        };
        sum += csum::sum_words(&word);
        at += 4;
    }
    csum::fold(sum) == 0xffff
}

/// Ports (and TCP flags) of a TCP, UDP or SCTP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flag byte; 0 for UDP and SCTP.
    pub tcp_flags: u8,
}

/// What the transport header of an IPv4 packet gives the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP, UDP or SCTP with a complete header.
    Ports(Ports),
    /// TCP, UDP or SCTP, but the header is cut short.
    Truncated,
    /// Another protocol, or a later fragment with no transport header.
    Other,
}

/// Parses the TCP, UDP or SCTP header that follows `ip`.
#[inline(always)]
pub fn parse_transport<P: PacketBytes + ?Sized>(packet: &P, ip: &Ipv4Header) -> Transport {
    if ip.fragment == Fragment::Later {
        return Transport::Other;
    }
    match ip.proto {
        ip_proto::TCP => match packet.read::<{ l4::TCP_MIN_HEADER_LEN }>(ip.l4_offset) {
            Some(h) => Transport::Ports(Ports {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                tcp_flags: h[l4::TCP_FLAGS],
            }),
            None => Transport::Truncated,
        },
        ip_proto::UDP => match packet.read::<{ l4::UDP_HEADER_LEN }>(ip.l4_offset) {
            Some(h) => Transport::Ports(Ports {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                tcp_flags: 0,
            }),
            None => Transport::Truncated,
        },
        ip_proto::SCTP => match packet.read::<{ l4::SCTP_HEADER_LEN }>(ip.l4_offset) {
            Some(h) => Transport::Ports(Ports {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                tcp_flags: 0,
            }),
            None => Transport::Truncated,
        },
        _ => Transport::Other,
    }
}

/// The datagram an ICMP error is about, as it quotes it: where its IPv4 and transport headers
/// sit in the frame, its addresses and its ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub ip_offset: usize,
    pub l4_offset: usize,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// The TCP, UDP or SCTP datagram the ICMP error in `ip` quotes; `None` when `ip` is not an
/// unfragmented ICMP error, or its quote is not an IPv4 header followed by ports (one cut
/// short, or a later fragment's, which carries no ports to match a connection by).
#[inline(always)]
pub fn parse_icmp_error<P: PacketBytes + ?Sized>(packet: &P, ip: &Ipv4Header) -> Option<Quoted> {
    if ip.proto != ip_proto::ICMP || ip.fragment != Fragment::Whole {
        return None;
    }
    // Type and code: a 2-byte read, whose bounds check the verifier follows where a 1-byte
    // one compiles to a form it does not.
    let [kind, _code] = packet.read::<2>(ip.l4_offset)?;
    if !matches!(
        kind,
        icmp::DEST_UNREACH | icmp::TIME_EXCEEDED | icmp::PARAMETER_PROBLEM
    ) {
        return None;
    }
    let ip_offset = ip.l4_offset + icmp::HEADER_LEN;
    let header = packet.read::<{ ipv4::MIN_HEADER_LEN }>(ip_offset)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let proto = header[9];
    if header[0] >> 4 != 4
        || header_len < ipv4::MIN_HEADER_LEN
        || fragment_offset != 0
        || !matches!(proto, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP)
    {
        return None;
    }
    let l4_offset = ip_offset + header_len;
    let ports = packet.read::<4>(l4_offset)?;
    Some(Quoted {
        ip_offset,
        l4_offset,
        src: [header[12], header[13], header[14], header[15]],
        dst: [header[16], header[17], header[18], header[19]],
        proto,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// Offset of the transport checksum, relative to the transport header, and whether a zero
/// checksum means "none" (UDP), which rewrites must preserve. SCTP's CRC32c is not an Internet
/// checksum and is updated by [`crate::crc32c`] instead.
#[inline(always)]
#[must_use]
pub const fn l4_checksum_offset(proto: u8) -> Option<(usize, bool)> {
    match proto {
        ip_proto::TCP => Some((l4::TCP_CHECKSUM, false)),
        ip_proto::UDP => Some((l4::UDP_CHECKSUM, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{Fragment, Frame, Ipv4Header, Ports, Transport, parse_ipv4, parse_transport};

    /// Ethernet + IPv4 (with `options` extra words) + `l4` bytes.
    fn frame(proto: u8, frag: u16, options: usize, l4: &[u8]) -> [u8; 128] {
        let mut f = [0u8; 128];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ihl = 5 + options;
        f[14] = 0x40 | ihl as u8;
        let total = (ihl * 4 + l4.len()) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&[172, 30, 20, 9]);
        f[30..34].copy_from_slice(&[10, 254, 40, 119]);
        let l4_at = 14 + ihl * 4;
        f[l4_at..l4_at + l4.len()].copy_from_slice(l4);
        f
    }

    fn tcp_header(sport: u16, dport: u16, flags: u8) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    fn header(f: &[u8]) -> Ipv4Header {
        match parse_ipv4(f) {
            Frame::Ipv4(h) => h,
            other => panic!("expected IPv4, got {other:?}"),
        }
    }

    #[test]
    fn parses_tcp_ports_and_flags() {
        let f = frame(6, 0, 0, &tcp_header(40000, 4432, 0x02));
        let ip = header(&f[..54]);
        assert_eq!(ip.src, [172, 30, 20, 9]);
        assert_eq!(ip.dst, [10, 254, 40, 119]);
        assert_eq!(ip.l4_offset, 34);
        assert_eq!(ip.fragment, Fragment::Whole);
        assert_eq!(
            parse_transport(&f[..54], &ip),
            Transport::Ports(Ports {
                src_port: 40000,
                dst_port: 4432,
                tcp_flags: 0x02
            })
        );
    }

    #[test]
    fn honours_ip_options() {
        let f = frame(17, 0, 2, &[0x9c, 0x40, 0x11, 0x50, 0, 8, 0, 0]);
        let ip = header(&f[..50]);
        assert_eq!(ip.l4_offset, 14 + 28);
        assert_eq!(
            parse_transport(&f[..50], &ip),
            Transport::Ports(Ports {
                src_port: 40000,
                dst_port: 4432,
                tcp_flags: 0
            })
        );
    }

    #[test]
    fn rejects_truncated_and_invalid_headers() {
        let f = frame(6, 0, 0, &tcp_header(1, 2, 0));
        assert_eq!(parse_ipv4(&f[..14]), Frame::MalformedIpv4);
        assert_eq!(parse_ipv4(&f[..33]), Frame::MalformedIpv4);
        let mut bad_version = f;
        bad_version[14] = 0x65;
        assert_eq!(parse_ipv4(&bad_version[..54]), Frame::MalformedIpv4);
        let mut short_ihl = f;
        short_ihl[14] = 0x44;
        assert_eq!(parse_ipv4(&short_ihl[..54]), Frame::MalformedIpv4);
        let mut short_total = f;
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse_ipv4(&short_total[..54]), Frame::MalformedIpv4);
        // Options announced but cut off.
        let with_options = frame(6, 0, 3, &[]);
        assert_eq!(parse_ipv4(&with_options[..40]), Frame::MalformedIpv4);
    }

    #[test]
    fn big_tcp_total_length_zero_is_valid() {
        let mut f = frame(6, 0, 0, &tcp_header(1, 2, 0x10));
        f[16..18].copy_from_slice(&0u16.to_be_bytes());
        assert!(matches!(parse_ipv4(&f[..54]), Frame::Ipv4(_)));
    }

    #[test]
    fn non_ipv4_and_runts_are_not_ours() {
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse_ipv4(&arp[..]), Frame::NotIpv4);
        assert_eq!(parse_ipv4(&arp[..10]), Frame::NotIpv4);
    }

    #[test]
    fn truncated_transport_is_reported() {
        let f = frame(6, 0, 0, &tcp_header(1, 2, 0));
        let ip = header(&f[..40]);
        assert_eq!(parse_transport(&f[..40], &ip), Transport::Truncated);
        let u = frame(17, 0, 0, &[0; 8]);
        let ip = header(&u[..38]);
        assert_eq!(parse_transport(&u[..38], &ip), Transport::Truncated);
    }

    #[test]
    fn fragments_are_classified() {
        let first = frame(17, 0x2000, 0, &[0; 8]);
        assert_eq!(header(&first[..42]).fragment, Fragment::First);
        let later = frame(17, 0x0010, 0, &[0; 8]);
        let ip = header(&later[..42]);
        assert_eq!(ip.fragment, Fragment::Later);
        assert_eq!(parse_transport(&later[..42], &ip), Transport::Other);
        let dont_fragment = frame(17, 0x4000, 0, &[0; 8]);
        assert_eq!(header(&dont_fragment[..42]).fragment, Fragment::Whole);
    }

    /// An ICMP error of `kind` quoting `quote` (an IPv4 header and what follows), in a frame.
    fn icmp_error(kind: u8, quote: &[u8]) -> ([u8; 128], usize) {
        let mut message = [0u8; 64];
        message[..8].copy_from_slice(&[kind, 4, 0, 0, 0, 0, 0x05, 0xaa]);
        message[8..8 + quote.len()].copy_from_slice(quote);
        let len = 8 + quote.len();
        (frame(1, 0, 0, &message[..len]), 34 + len)
    }

    #[test]
    fn icmp_errors_give_the_datagram_they_quote() {
        // The quoted datagram: a UDP packet 172.30.20.9:40000 -> 10.254.40.119:4432.
        let udp = frame(17, 0, 0, &[0x9c, 0x40, 0x11, 0x50, 0, 8, 0, 0]);
        let quote = &udp[14..42];
        for kind in [3, 11, 12] {
            let (f, len) = icmp_error(kind, quote);
            let f = &f[..len];
            let quoted = super::parse_icmp_error(f, &header(f)).expect("a quote");
            assert_eq!(
                (quoted.ip_offset, quoted.l4_offset, quoted.proto),
                (42, 62, 17)
            );
            assert_eq!(
                (quoted.src, quoted.dst),
                ([172, 30, 20, 9], [10, 254, 40, 119])
            );
            assert_eq!((quoted.src_port, quoted.dst_port), (40000, 4432));
        }
        // With options in the quoted header, the ports follow them.
        let with_options = frame(17, 0, 1, &[0x9c, 0x40, 0x11, 0x50]);
        let (f, len) = icmp_error(3, &with_options[14..42]);
        let f = &f[..len];
        let quoted = super::parse_icmp_error(f, &header(f)).expect("a quote");
        assert_eq!((quoted.l4_offset, quoted.dst_port), (66, 4432));
    }

    #[test]
    fn what_quotes_no_ports_is_no_icmp_error_to_translate() {
        let udp = frame(17, 0, 0, &[0x9c, 0x40, 0x11, 0x50, 0, 8, 0, 0]);
        let quote = &udp[14..42];
        let none =
            |(f, len): ([u8; 128], usize)| super::parse_icmp_error(&f[..len], &header(&f[..len]));
        // An echo request, a quote cut before its ports, a later fragment's quote, a quoted
        // ICMP packet, a fragmented error.
        assert_eq!(none(icmp_error(8, quote)), None);
        assert_eq!(none(icmp_error(3, &quote[..22])), None);
        let later = frame(17, 0x0010, 0, &[0; 8]);
        assert_eq!(none(icmp_error(3, &later[14..42])), None);
        let ping = frame(1, 0, 0, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(none(icmp_error(3, &ping[14..42])), None);
        let mut fragmented = icmp_error(3, quote);
        fragmented.0[20] = 0x20;
        assert_eq!(none(fragmented), None);
        let tcp = frame(6, 0, 0, &[0; 20]);
        assert!(
            none(icmp_error(11, &tcp[14..42])).is_some(),
            "a TCP quote of 8 bytes"
        );
    }

    #[test]
    fn sctp_has_ports() {
        let sctp = frame(132, 0, 0, &[0x9c, 0x40, 0x11, 0x50, 1, 2, 3, 4, 0, 0, 0, 0]);
        let ip = header(&sctp[..46]);
        assert_eq!(ip.total_len, 32);
        assert_eq!(
            parse_transport(&sctp[..46], &ip),
            Transport::Ports(Ports {
                src_port: 40000,
                dst_port: 4432,
                tcp_flags: 0
            })
        );
        assert_eq!(parse_transport(&sctp[..45], &ip), Transport::Truncated);
    }

    #[test]
    fn ipv4_checksums_cover_the_options() {
        let mut f = frame(17, 0, 2, &[0; 8]);
        let sum = crate::csum::fold(crate::csum::sum_words(&f[14..42]));
        f[24..26].copy_from_slice(&(!sum).to_be_bytes());
        assert!(super::ipv4_checksum_ok(&f[..50], 28));
        f[40] ^= 1;
        assert!(
            !super::ipv4_checksum_ok(&f[..50], 28),
            "an option byte changed"
        );
        assert!(!super::ipv4_checksum_ok(&f[..30], 28), "options cut off");
    }

    #[test]
    fn other_protocols_have_no_ports() {
        let icmp = frame(1, 0, 0, &[8, 0, 0, 0, 0, 0, 0, 0]);
        let ip = header(&icmp[..42]);
        assert_eq!(parse_transport(&icmp[..42], &ip), Transport::Other);
    }
}
