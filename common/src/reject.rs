//! The answers a service with no endpoints gives, as kube-proxy's `REJECT` rules give them: a
//! TCP reset for TCP, an ICMP port unreachable for UDP and SCTP. Both are built in place of the
//! packet that asked, from its own headers, and sent back the way it came; the source is the
//! service address the client used, so its stack matches the answer to its socket.

use crate::{
    csum::{fold, ipv4_header, sum_words},
    ip_proto,
    packet::tcp_flags,
};

/// Length of a reset: an IPv4 header and a TCP header, neither with options.
pub const TCP_RESET_LEN: usize = 40;
/// What an ICMP error quotes of the packet it answers: its IPv4 header (without options) and
/// the first 8 bytes of its transport header (the ports).
pub const ICMP_QUOTE_LEN: usize = 28;
/// What an ICMP error adds in front of its quote: an IPv4 header and the ICMP header.
pub const ICMP_HEADERS_LEN: usize = 28;

const TTL: u8 = 64;
const DONT_FRAGMENT: u16 = 0x4000;

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, total_len: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[6..8].copy_from_slice(&DONT_FRAGMENT.to_be_bytes());
    h[8] = TTL;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let checksum = ipv4_header(&h);
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
    h
}

/// The reset answering a TCP segment (RFC 9293 section 3.10.7.1, "CLOSED" state): `src`/`dst`
/// and `tcp` are the segment's addresses and header, `payload_len` its data length.
#[inline(always)]
#[must_use]
pub fn tcp_reset(
    src: [u8; 4],
    dst: [u8; 4],
    tcp: &[u8; 20],
    payload_len: u32,
) -> [u8; TCP_RESET_LEN] {
    let flags = tcp[13];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    // With an ACK the reset takes its sequence number from it; without, it acknowledges the
    // whole segment (SYN and FIN count one each).
    let (reset_seq, reset_ack, reset_flags) = if flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        let len = payload_len
            + u32::from(flags & tcp_flags::SYN != 0)
            + u32::from(flags & tcp_flags::FIN != 0);
        (0, seq.wrapping_add(len), tcp_flags::RST | tcp_flags::ACK)
    };
    let mut out = [0u8; TCP_RESET_LEN];
    out[..20].copy_from_slice(&ipv4(dst, src, ip_proto::TCP, TCP_RESET_LEN as u16));
    let t = &mut out[20..];
    t[0..2].copy_from_slice(&tcp[2..4]);
    t[2..4].copy_from_slice(&tcp[0..2]);
    t[4..8].copy_from_slice(&reset_seq.to_be_bytes());
    t[8..12].copy_from_slice(&reset_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = reset_flags;
    // The pseudo-header: addresses, protocol and the TCP length (20).
    let sum = sum_words(&dst) + sum_words(&src) + u32::from(ip_proto::TCP) + 20 + sum_words(t);
    let checksum = !fold(sum);
    t[16..18].copy_from_slice(&checksum.to_be_bytes());
    out
}

/// The IPv4 and ICMP headers of a port unreachable answering the packet `quote` was taken
/// from; they go in front of the quote.
#[inline(always)]
#[must_use]
pub fn icmp_port_unreachable(quote: &[u8; ICMP_QUOTE_LEN]) -> [u8; ICMP_HEADERS_LEN] {
    const DESTINATION_UNREACHABLE: u8 = 3;
    const PORT_UNREACHABLE: u8 = 3;
    let src = [quote[12], quote[13], quote[14], quote[15]];
    let dst = [quote[16], quote[17], quote[18], quote[19]];
    let mut out = [0u8; ICMP_HEADERS_LEN];
    out[..20].copy_from_slice(&ipv4(
        dst,
        src,
        ip_proto::ICMP,
        (ICMP_HEADERS_LEN + ICMP_QUOTE_LEN) as u16,
    ));
    out[20] = DESTINATION_UNREACHABLE;
    out[21] = PORT_UNREACHABLE;
    let checksum = !fold(sum_words(&out[20..]) + sum_words(quote));
    out[22..24].copy_from_slice(&checksum.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [172, 30, 20, 9];
    const SERVICE: [u8; 4] = [10, 254, 40, 119];

    fn tcp(flags: u8, seq: u32, ack: u32) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&4432u16.to_be_bytes());
        h[4..8].copy_from_slice(&seq.to_be_bytes());
        h[8..12].copy_from_slice(&ack.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    /// Whether the one's-complement sum over `words` (checksum included) verifies.
    fn verifies(sum: u32) -> bool {
        fold(sum) == 0xffff
    }

    #[test]
    fn a_syn_is_answered_with_reset_ack_of_its_sequence_number() {
        let out = tcp_reset(CLIENT, SERVICE, &tcp(tcp_flags::SYN, 1000, 0), 0);
        assert_eq!(&out[12..16], &SERVICE);
        assert_eq!(&out[16..20], &CLIENT);
        assert!(verifies(sum_words(&out[..20])), "IPv4 header checksum");
        let t = &out[20..];
        assert_eq!(u16::from_be_bytes([t[0], t[1]]), 4432);
        assert_eq!(u16::from_be_bytes([t[2], t[3]]), 40000);
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), 0);
        assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), 1001);
        assert_eq!(t[13], tcp_flags::RST | tcp_flags::ACK);
        let pseudo = sum_words(&SERVICE) + sum_words(&CLIENT) + 6 + 20;
        assert!(verifies(pseudo + sum_words(t)), "TCP checksum");
    }

    #[test]
    fn a_segment_with_ack_is_answered_with_a_bare_reset_at_that_number() {
        let out = tcp_reset(CLIENT, SERVICE, &tcp(tcp_flags::ACK, 5, 77), 100);
        let t = &out[20..];
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), 77);
        assert_eq!(t[13], tcp_flags::RST);
    }

    #[test]
    fn data_and_fin_count_in_the_acknowledgement() {
        let out = tcp_reset(CLIENT, SERVICE, &tcp(tcp_flags::FIN, u32::MAX, 0), 10);
        let t = &out[20..];
        assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), 10);
    }

    #[test]
    fn port_unreachable_quotes_the_datagram_and_verifies() {
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[0] = 0x45;
        quote[9] = ip_proto::UDP;
        quote[12..16].copy_from_slice(&CLIENT);
        quote[16..20].copy_from_slice(&SERVICE);
        quote[20..28].copy_from_slice(&[0x9c, 0x40, 0x11, 0x50, 0, 20, 0xab, 0xcd]);
        let out = icmp_port_unreachable(&quote);
        assert_eq!(&out[12..16], &SERVICE);
        assert_eq!(&out[16..20], &CLIENT);
        assert_eq!(out[9], ip_proto::ICMP);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 56);
        assert!(verifies(sum_words(&out[..20])));
        assert_eq!((out[20], out[21]), (3, 3));
        assert!(verifies(sum_words(&out[20..]) + sum_words(&quote)));
    }
}
