//! Test frames: Ethernet/IPv4/TCP/UDP/SCTP built and checked independently of the datapath (the
//! checksums here are computed from scratch, so a wrong incremental update cannot hide).

use std::net::{Ipv4Addr, SocketAddrV4};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
/// The SCTP verification tag test frames carry.
const SCTP_TAG: [u8; 4] = [0x0a, 0x0b, 0x0c, 0x0d];

/// RFC 1071 Internet checksum of `data` (folded, complemented).
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(12 + l4.len());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&[0, proto]);
    buf.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    buf.extend_from_slice(l4);
    buf
}

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// The IPv4 flags/fragment-offset field.
    pub fragment: u16,
    /// Send UDP with checksum 0 ("none").
    pub udp_without_checksum: bool,
}

/// A TCP segment from `src` to `dst` with `flags`.
#[must_use]
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Packet {
    Packet {
        src,
        dst,
        proto: TCP,
        tcp_flags: flags,
        payload: Vec::new(),
        options: Vec::new(),
        fragment: 0,
        udp_without_checksum: false,
    }
}

/// A UDP datagram from `src` to `dst`.
#[must_use]
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Packet {
    Packet {
        proto: UDP,
        payload: payload.to_vec(),
        ..tcp(src, dst, 0)
    }
}

/// An SCTP packet from `src` to `dst` whose chunks are `payload`.
#[must_use]
pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Packet {
    Packet {
        proto: SCTP,
        payload: payload.to_vec(),
        ..tcp(src, dst, 0)
    }
}

impl Packet {
    #[must_use]
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    #[must_use]
    pub fn options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0, "IPv4 options come in 32-bit words");
        self.options = options.to_vec();
        self
    }

    #[must_use]
    pub fn fragment(mut self, field: u16) -> Self {
        self.fragment = field;
        self
    }

    #[must_use]
    pub fn without_udp_checksum(mut self) -> Self {
        self.udp_without_checksum = true;
        self
    }

    /// The frame, with every checksum correct.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src.port().to_be_bytes());
        l4.extend_from_slice(&self.dst.port().to_be_bytes());
        match self.proto {
            TCP => {
                l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
                l4.extend_from_slice(
                    &(if self.tcp_flags & ACK != 0 {
                        2000u32
                    } else {
                        0
                    })
                    .to_be_bytes(),
                );
                l4.extend_from_slice(&[5 << 4, self.tcp_flags]);
                l4.extend_from_slice(&64240u16.to_be_bytes()); // window
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            SCTP => {
                l4.extend_from_slice(&SCTP_TAG);
                l4.extend_from_slice(&[0; 4]);
            }
            _ => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
        }
        l4.extend_from_slice(&self.payload);
        let checksum_at = if self.proto == TCP { 16 } else { 6 };
        if self.proto == SCTP {
            let crc = weft_common::crc32c::checksum(&l4);
            l4[8..12].copy_from_slice(&crc.to_le_bytes());
        } else if !(self.proto == UDP && self.udp_without_checksum) {
            let mut sum = checksum(&pseudo_header(
                *self.src.ip(),
                *self.dst.ip(),
                self.proto,
                &l4,
            ));
            if self.proto == UDP && sum == 0 {
                sum = 0xffff;
            }
            l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        let header_len = 20 + self.options.len();
        let mut ip = Vec::with_capacity(header_len);
        ip.push(0x40 | (header_len / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.fragment.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&self.options);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// An ICMP error's type, code and the 4 bytes after its checksum (the next-hop MTU for
/// "fragmentation needed").
pub type IcmpError = (u8, u8, [u8; 4]);

/// An ICMP error of the [`IcmpError`] kind from `from` to `to`, quoting the first `quote_len`
/// bytes of the IPv4 datagram in `about` (a frame), as a router or host sends it: checksums
/// computed.
#[must_use]
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    (kind, code, rest): IcmpError,
    about: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let quote = &about[14..14usize.saturating_add(quote_len).min(about.len())];
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x56, 0x78, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// "Fragmentation needed" with a next-hop MTU (path MTU discovery), "port unreachable", "host
/// unreachable" and "TTL exceeded in transit", named, for [`icmp_error`].
#[must_use]
pub fn icmp_errors() -> [(&'static str, IcmpError); 4] {
    [
        ("fragmentation needed", (3, 4, [0, 0, 0x03, 0xe8])),
        ("port unreachable", (3, 3, [0; 4])),
        ("host unreachable", (3, 1, [0; 4])),
        ("TTL exceeded", (11, 0, [0; 4])),
    ]
}

/// An ICMP error frame, with its checksums verified from scratch and the datagram it quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmpError {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub kind: u8,
    pub code: u8,
    pub ip_checksum_ok: bool,
    pub icmp_checksum_ok: bool,
    /// The quoted datagram's addresses and ports.
    pub quoted_src: SocketAddrV4,
    pub quoted_dst: SocketAddrV4,
    pub quoted_ip_checksum_ok: bool,
    /// The quoted transport checksum field, when quoted.
    pub quoted_l4_checksum: Option<u16>,
}

/// Parses an ICMP error frame built by [`icmp_error`] (or rewritten by the datapath).
#[must_use]
pub fn parse_icmp_error(frame: &[u8]) -> ParsedIcmpError {
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &ip[header_len..total_len];
    let quoted = &icmp[8..];
    let quoted_len = usize::from(quoted[0] & 0x0f) * 4;
    let l4 = &quoted[quoted_len..];
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let checksum_at = match quoted[9] {
        TCP => 16,
        UDP => 6,
        _ => usize::MAX,
    };
    let addr =
        |at: usize| Ipv4Addr::new(quoted[at], quoted[at + 1], quoted[at + 2], quoted[at + 3]);
    ParsedIcmpError {
        from: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        to: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        kind: icmp[0],
        code: icmp[1],
        ip_checksum_ok: checksum(&ip[..header_len]) == 0,
        icmp_checksum_ok: checksum(icmp) == 0,
        quoted_src: SocketAddrV4::new(addr(12), port(0)),
        quoted_dst: SocketAddrV4::new(addr(16), port(2)),
        quoted_ip_checksum_ok: checksum(&quoted[..quoted_len]) == 0,
        quoted_l4_checksum: l4
            .get(checksum_at..checksum_at.saturating_add(2))
            .map(|field| u16::from_be_bytes([field[0], field[1]])),
    }
}

/// What a frame carries, with its checksums verified from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    /// The transport checksum field as found.
    pub l4_checksum: u16,
    pub payload: Vec<u8>,
}

/// Parses a TCP, UDP or SCTP frame built by [`Packet::build`] (or rewritten by the datapath).
#[must_use]
pub fn parse(frame: &[u8]) -> Parsed {
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[header_len..total_len];
    let (checksum_at, data_at) = match proto {
        TCP => (16, usize::from(l4[12] >> 4) * 4),
        SCTP => (8, 12),
        _ => (6, 8),
    };
    let l4_checksum = u16::from_be_bytes([l4[checksum_at], l4[checksum_at + 1]]);
    let l4_checksum_ok = if proto == SCTP {
        let mut zeroed = l4.to_vec();
        zeroed[8..12].fill(0);
        weft_common::crc32c::checksum(&zeroed).to_le_bytes() == l4[8..12]
    } else {
        (proto == UDP && l4_checksum == 0)
            || checksum(&pseudo_header(src_ip, dst_ip, proto, l4)) == 0
    };
    Parsed {
        src: SocketAddrV4::new(src_ip, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddrV4::new(dst_ip, u16::from_be_bytes([l4[2], l4[3]])),
        proto,
        ip_checksum_ok: checksum(&ip[..header_len]) == 0,
        l4_checksum_ok,
        l4_checksum,
        payload: l4[data_at..].to_vec(),
    }
}

/// Asserts that `answer` is what a service with no endpoints answers `asked` with, as
/// kube-proxy's `REJECT` would: a reset for TCP (acknowledging the segment, or taking its
/// acknowledgement number), an ICMP port unreachable quoting the datagram otherwise; from the
/// address asked, back to the asker, Ethernet addresses swapped, checksums valid.
pub fn assert_rejects(name: &str, asked: &[u8], answer: &[u8]) {
    assert_eq!(answer[..6], asked[6..12], "{name}: destination MAC");
    assert_eq!(answer[6..12], asked[..6], "{name}: source MAC");
    let question = parse(asked);
    let ip = &answer[14..];
    assert_eq!(ip[0], 0x45, "{name}: IPv4 header without options");
    assert_eq!(checksum(&ip[..20]), 0, "{name}: IPv4 checksum");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(answer.len(), 14 + total, "{name}: frame length");
    let (src, dst) = (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    );
    assert_eq!(
        (src, dst),
        (*question.dst.ip(), *question.src.ip()),
        "{name}: addresses"
    );
    if question.proto == TCP {
        let reset = parse(answer);
        assert_eq!(reset.proto, TCP, "{name}: a TCP reset");
        assert_eq!(
            (reset.src, reset.dst),
            (question.dst, question.src),
            "{name}"
        );
        assert!(reset.l4_checksum_ok, "{name}: TCP checksum");
        let tcp = &ip[20..];
        let asked_tcp = &asked[14 + usize::from(asked[14] & 0x0f) * 4..];
        let asked_seq = u32::from_be_bytes(asked_tcp[4..8].try_into().unwrap());
        let asked_ack = u32::from_be_bytes(asked_tcp[8..12].try_into().unwrap());
        let asked_flags = asked_tcp[13];
        let (seq, ack) = (
            u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
            u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
        );
        if asked_flags & ACK != 0 {
            assert_eq!((tcp[13], seq), (RST, asked_ack), "{name}: RST at the ack");
        } else {
            let len = question.payload.len() as u32
                + u32::from(asked_flags & SYN != 0)
                + u32::from(asked_flags & FIN != 0);
            assert_eq!(tcp[13], RST | ACK, "{name}: RST|ACK");
            assert_eq!((seq, ack), (0, asked_seq + len), "{name}: acknowledgement");
        }
    } else {
        assert_eq!(ip[9], 1, "{name}: ICMP");
        let icmp = &ip[20..total];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "{name}: port unreachable");
        assert_eq!(checksum(icmp), 0, "{name}: ICMP checksum");
        assert_eq!(icmp[8..], asked[14..14 + 28], "{name}: the quote");
    }
}

/// `frame`'s IPv4 datagram as the fragments a sender makes of it: identification `id`, the
/// payload (transport header included) cut every `size` bytes (a multiple of 8), each header's
/// checksum set.
#[must_use]
pub fn fragmented(frame: &[u8], id: u16, size: usize) -> Vec<Vec<u8>> {
    assert_eq!(size % 8, 0, "fragment offsets count 8-byte units");
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    let (headers, payload) = frame.split_at(14 + header_len);
    let pieces: Vec<&[u8]> = payload.chunks(size).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(n, piece)| {
            let mut fragment = headers.to_vec();
            fragment.extend_from_slice(piece);
            let more = if n + 1 < pieces.len() { 0x2000 } else { 0 };
            let field = more | (n * size / 8) as u16;
            fragment[16..18].copy_from_slice(&((header_len + piece.len()) as u16).to_be_bytes());
            fragment[18..20].copy_from_slice(&id.to_be_bytes());
            fragment[20..22].copy_from_slice(&field.to_be_bytes());
            fragment[24..26].fill(0);
            let sum = checksum(&fragment[14..14 + header_len]);
            fragment[24..26].copy_from_slice(&sum.to_be_bytes());
            fragment
        })
        .collect()
}

/// The datagram `fragments` (frames, in any order) make, as the receiver reassembles it: the
/// first fragment's headers, the payloads placed by offset, the length and checksum set.
#[must_use]
pub fn reassembled(fragments: &[Vec<u8>]) -> Vec<u8> {
    let offset =
        |frame: &[u8]| usize::from(u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff) * 8;
    let header_len = |frame: &[u8]| usize::from(frame[14] & 0x0f) * 4;
    let first = fragments
        .iter()
        .find(|frame| offset(frame) == 0)
        .expect("a first fragment");
    let mut payload = Vec::new();
    for frame in fragments {
        let piece = &frame[14 + header_len(frame)..];
        let at = offset(frame);
        payload.resize(payload.len().max(at + piece.len()), 0);
        payload[at..at + piece.len()].copy_from_slice(piece);
    }
    let header_len = header_len(first);
    let mut datagram = first[..14 + header_len].to_vec();
    datagram[16..18].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    datagram[20..22].fill(0);
    datagram[24..26].fill(0);
    let sum = checksum(&datagram[14..]);
    datagram[24..26].copy_from_slice(&sum.to_be_bytes());
    datagram.extend_from_slice(&payload);
    datagram
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_verify() {
        for packet in [
            tcp(addr("172.30.20.9:40000"), addr("10.254.40.119:4432"), SYN),
            udp(addr("172.30.20.9:40000"), addr("10.254.0.10:53"), b"query").options(&[1, 1, 1, 0]),
            sctp(
                addr("172.30.20.9:40000"),
                addr("10.254.0.11:38412"),
                &[1, 0, 0, 4],
            ),
        ] {
            let parsed = parse(&packet.build());
            assert!(parsed.ip_checksum_ok && parsed.l4_checksum_ok, "{parsed:?}");
            assert_eq!((parsed.src, parsed.dst), (packet.src, packet.dst));
        }
    }

    #[test]
    fn a_flipped_bit_fails_verification() {
        let mut frame = tcp(addr("172.30.20.9:40000"), addr("10.254.40.119:4432"), SYN).build();
        frame[14 + 19] ^= 1;
        let parsed = parse(&frame);
        assert!(!parsed.ip_checksum_ok && !parsed.l4_checksum_ok);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2, so the checksum is 0x220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }
}
