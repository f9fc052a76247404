//! Connection tracking rules shared by the datapath (per packet) and the agent (garbage
//! collection, `weft inspect conntrack`).
//!
//! A translated connection is two entries in [`crate::maps::CONNTRACK_MAP`]:
//! - FORWARD, keyed by the client's tuple towards the frontend. It is authoritative: it holds the
//!   endpoint, the state bits below and the last time the connection was seen.
//! - REPLY, keyed by the endpoint's tuple back to the client. It holds the frontend to restore in
//!   replies, and is used only while its FORWARD entry is live and still leads back to it;
//!   otherwise it is stale and the datapath removes it. It also keeps the FORWARD state and the
//!   time of the last reply that checked this, so replies within [`REFRESH_INTERVAL_NS`] of a
//!   check need no second lookup.
//!
//! Timeouts follow what kube-proxy configures netfilter with: TCP established 24 h, half-closed
//! (CLOSE_WAIT) 1 h, UDP 30 s before a reply and 120 s after one; SCTP follows netfilter's
//! defaults (30 s unanswered, 210 s idle once answered: heartbeats come every 30 s).

use crate::{ip_proto, packet::tcp_flags};

/// State bits of a FORWARD entry.
pub mod flags {
    /// Forward packets get [`crate::MASQUERADE_MARK`] (off-cluster client or hairpin).
    pub const MASQUERADE: u8 = 0x01;
    /// The endpoint has answered.
    pub const SEEN_REPLY: u8 = 0x02;
    /// The client sent FIN.
    pub const FIN_FORWARD: u8 = 0x04;
    /// The endpoint sent FIN.
    pub const FIN_REPLY: u8 = 0x08;
    /// Either side sent RST.
    pub const RST: u8 = 0x10;
}

const SECOND_NS: u64 = 1_000_000_000;

/// TCP before the endpoint answers (SYN sent).
pub const TCP_SYN_TIMEOUT_NS: u64 = 60 * SECOND_NS;
/// TCP once both sides have spoken (kube-proxy's `tcpEstablishedTimeout`).
pub const TCP_ESTABLISHED_TIMEOUT_NS: u64 = 24 * 3600 * SECOND_NS;
/// TCP after one side sent FIN (kube-proxy's `tcpCloseWaitTimeout`).
pub const TCP_HALF_CLOSED_TIMEOUT_NS: u64 = 3600 * SECOND_NS;
/// TCP after both FINs or an RST (netfilter keeps TIME_WAIT for 120 s; a new SYN reopens sooner).
pub const TCP_CLOSED_TIMEOUT_NS: u64 = 10 * SECOND_NS;
/// UDP before a reply (netfilter's `udp_timeout`).
pub const UDP_TIMEOUT_NS: u64 = 30 * SECOND_NS;
/// UDP after a reply (netfilter's `udp_timeout_stream`).
pub const UDP_REPLIED_TIMEOUT_NS: u64 = 120 * SECOND_NS;
/// SCTP once the endpoint has answered (netfilter's `nf_conntrack_sctp_timeout_established`).
pub const SCTP_REPLIED_TIMEOUT_NS: u64 = 210 * SECOND_NS;
/// Minimum interval between writes of `last_seen_ns`, so busy flows do not write per packet.
pub const REFRESH_INTERVAL_NS: u64 = SECOND_NS;

/// Whether a TCP connection is fully closed (both FINs, or an RST).
#[inline(always)]
#[must_use]
pub const fn tcp_closed(state: u8) -> bool {
    state & flags::RST != 0
        || state & (flags::FIN_FORWARD | flags::FIN_REPLY)
            == (flags::FIN_FORWARD | flags::FIN_REPLY)
}

/// Whether a reply with `tcp` flags opens a new connection on the tuple of a tracked one in
/// `state`: a SYN-ACK from the endpoint can never belong to a connection that has closed, so it
/// is the handshake of a direct connection that reuses the client's port (the endpoint's
/// TIME_WAIT takes it), and must not be given the old frontend as its source.
#[inline(always)]
#[must_use]
pub const fn reply_opens_anew(state: u8, proto: u8, tcp: u8) -> bool {
    proto == ip_proto::TCP && tcp & tcp_flags::SYN != 0 && tcp_closed(state)
}

/// How long a FORWARD entry in `state` lives without traffic.
#[inline(always)]
#[must_use]
pub const fn lifetime_ns(proto: u8, state: u8) -> u64 {
    let replied = state & flags::SEEN_REPLY != 0;
    if proto == ip_proto::TCP {
        if tcp_closed(state) {
            TCP_CLOSED_TIMEOUT_NS
        } else if state & (flags::FIN_FORWARD | flags::FIN_REPLY) != 0 {
            TCP_HALF_CLOSED_TIMEOUT_NS
        } else if replied {
            TCP_ESTABLISHED_TIMEOUT_NS
        } else {
            TCP_SYN_TIMEOUT_NS
        }
    } else if !replied {
        UDP_TIMEOUT_NS
    } else if proto == ip_proto::SCTP {
        SCTP_REPLIED_TIMEOUT_NS
    } else {
        UDP_REPLIED_TIMEOUT_NS
    }
}

/// Whether a FORWARD entry last seen at `last_seen_ns` has expired at `now_ns`.
#[inline(always)]
#[must_use]
pub const fn is_expired(proto: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > lifetime_ns(proto, state)
}

/// The FORWARD state after a packet with `tcp` flags (0 for UDP) in the given direction.
#[inline(always)]
#[must_use]
pub const fn next_state(state: u8, proto: u8, tcp: u8, reply: bool) -> u8 {
    let mut next = state;
    if reply {
        next |= flags::SEEN_REPLY;
    }
    if proto == ip_proto::TCP {
        if tcp & tcp_flags::RST != 0 {
            next |= flags::RST;
        }
        if tcp & tcp_flags::FIN != 0 {
            next |= if reply {
                flags::FIN_REPLY
            } else {
                flags::FIN_FORWARD
            };
        }
    }
    next
}

/// Whether a client packet starts a new connection over a FORWARD entry that still exists: a
/// bare SYN on a closed TCP connection (the client reused its port).
#[inline(always)]
#[must_use]
pub const fn reopens(state: u8, proto: u8, tcp: u8) -> bool {
    proto == ip_proto::TCP
        && tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
        && tcp_closed(state)
}

/// Moves tried, in order, for a connection whose tuple would clash with another's.
pub const PORT_MOVES: u8 = 8;

/// The client port `port` moved by `port_move` (0 leaves it), as the endpoint sees it: an
/// exclusive-or, so the same call on the moved port gives the client's back. As netfilter does,
/// a move keeps a port in its class (below 1024 or not): the bits it flips are the lowest four
/// below 1024 and bits 10 to 13 above, and a move that would leave the class or give port 0 is
/// never chosen (see [`keeps_class`]).
#[inline(always)]
#[must_use]
pub const fn moved_port(port: u16, port_move: u8) -> u16 {
    if port >= 1024 {
        port ^ ((port_move as u16 & 0xf) << 10)
    } else {
        port ^ (port_move as u16 & 0xf)
    }
}

/// Whether `port_move` takes `port` to another port of the same class, so that
/// [`moved_port`] undoes it.
#[inline(always)]
#[must_use]
pub const fn keeps_class(port: u16, port_move: u8) -> bool {
    let moved = moved_port(port, port_move);
    moved != port && moved != 0 && (moved >= 1024) == (port >= 1024)
}

/// Whether a client packet can open a connection on a tuple nothing tracks, so that a clash
/// with a tracked connection's tuple is judged on it: a bare TCP SYN, any UDP datagram.
#[inline(always)]
#[must_use]
pub const fn opens(proto: u8, tcp: u8) -> bool {
    match proto {
        ip_proto::TCP => tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN,
        ip_proto::UDP => true,
        _ => false,
    }
}

/// The netfilter-style name of a FORWARD state, for `weft inspect conntrack`.
#[must_use]
pub const fn state_name(proto: u8, state: u8) -> &'static str {
    let replied = state & flags::SEEN_REPLY != 0;
    if proto == ip_proto::TCP {
        if tcp_closed(state) {
            "CLOSED"
        } else if state & (flags::FIN_FORWARD | flags::FIN_REPLY) != 0 {
            "CLOSE_WAIT"
        } else if replied {
            "ESTABLISHED"
        } else {
            "SYN_SENT"
        }
    } else if replied {
        "REPLIED"
    } else {
        "UNREPLIED"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tcp_flags::{ACK, FIN, RST, SYN};

    const TCP: u8 = ip_proto::TCP;
    const UDP: u8 = ip_proto::UDP;

    #[test]
    fn tcp_walks_through_its_states() {
        let mut s = next_state(0, TCP, SYN, false);
        assert_eq!(state_name(TCP, s), "SYN_SENT");
        assert_eq!(lifetime_ns(TCP, s), TCP_SYN_TIMEOUT_NS);
        s = next_state(s, TCP, SYN | ACK, true);
        assert_eq!(state_name(TCP, s), "ESTABLISHED");
        assert_eq!(lifetime_ns(TCP, s), TCP_ESTABLISHED_TIMEOUT_NS);
        s = next_state(s, TCP, FIN | ACK, false);
        assert_eq!(state_name(TCP, s), "CLOSE_WAIT");
        assert_eq!(lifetime_ns(TCP, s), TCP_HALF_CLOSED_TIMEOUT_NS);
        s = next_state(s, TCP, FIN | ACK, true);
        assert_eq!(state_name(TCP, s), "CLOSED");
        assert_eq!(lifetime_ns(TCP, s), TCP_CLOSED_TIMEOUT_NS);
    }

    #[test]
    fn only_a_syn_answering_a_closed_connection_opens_anew() {
        let established = flags::SEEN_REPLY;
        let closed = next_state(established, TCP, RST, true);
        assert!(reply_opens_anew(closed, TCP, SYN | ACK));
        assert!(
            !reply_opens_anew(closed, TCP, ACK),
            "a late ACK of the old connection"
        );
        assert!(
            !reply_opens_anew(established, TCP, SYN | ACK),
            "a retransmitted SYN-ACK"
        );
        assert!(!reply_opens_anew(closed, ip_proto::UDP, 0));
    }

    #[test]
    fn rst_from_either_side_closes() {
        let established = flags::SEEN_REPLY;
        assert!(tcp_closed(next_state(established, TCP, RST, true)));
        assert!(tcp_closed(next_state(established, TCP, RST | ACK, false)));
    }

    #[test]
    fn udp_ignores_tcp_flags_and_lives_longer_once_replied() {
        let s = next_state(0, UDP, FIN | RST, false);
        assert_eq!(s, 0);
        assert_eq!(lifetime_ns(UDP, s), UDP_TIMEOUT_NS);
        let s = next_state(s, UDP, 0, true);
        assert_eq!(lifetime_ns(UDP, s), UDP_REPLIED_TIMEOUT_NS);
    }

    #[test]
    fn sctp_lives_like_netfilter_keeps_it() {
        let s = next_state(0, ip_proto::SCTP, 0, false);
        assert_eq!(lifetime_ns(ip_proto::SCTP, s), UDP_TIMEOUT_NS);
        let s = next_state(s, ip_proto::SCTP, 0, true);
        assert_eq!(lifetime_ns(ip_proto::SCTP, s), SCTP_REPLIED_TIMEOUT_NS);
        assert_eq!(state_name(ip_proto::SCTP, s), "REPLIED");
    }

    #[test]
    fn masquerade_bit_survives_transitions() {
        let s = next_state(flags::MASQUERADE, TCP, FIN, true);
        assert_ne!(s & flags::MASQUERADE, 0);
    }

    #[test]
    fn expiry_is_strictly_after_the_lifetime() {
        let t = 5 * SECOND_NS;
        assert!(!is_expired(UDP, 0, t, t + UDP_TIMEOUT_NS));
        assert!(is_expired(UDP, 0, t, t + UDP_TIMEOUT_NS + 1));
        // A clock read before the entry's own timestamp (another CPU) is not expiry.
        assert!(!is_expired(UDP, 0, t, t - 1));
    }

    #[test]
    fn every_chosen_move_is_undone_by_itself_and_keeps_the_class() {
        for port in [
            1, 15, 80, 1023, 1024, 1025, 4096, 32768, 40000, 60999, 65535,
        ] {
            let mut seen = [port; PORT_MOVES as usize + 1];
            for port_move in 1..=PORT_MOVES {
                let moved = moved_port(port, port_move);
                seen[port_move as usize] = moved;
                if keeps_class(port, port_move) {
                    assert_eq!(moved_port(moved, port_move), port, "{port} by {port_move}");
                    assert_eq!(moved >= 1024, port >= 1024);
                }
            }
            seen.sort_unstable();
            assert!(
                seen.windows(2).all(|w| w[0] != w[1]),
                "moves of {port} differ"
            );
        }
        assert_eq!(moved_port(40000, 0), 40000);
        assert!(!keeps_class(1, 1), "port 0 is never chosen");
        assert!(!keeps_class(1024, 1), "1024 would fall below 1024");
    }

    #[test]
    fn only_a_bare_syn_on_a_closed_connection_reopens() {
        let closed = flags::SEEN_REPLY | flags::FIN_FORWARD | flags::FIN_REPLY;
        assert!(reopens(closed, TCP, SYN));
        assert!(!reopens(closed, TCP, SYN | ACK));
        assert!(!reopens(flags::SEEN_REPLY, TCP, SYN));
        assert!(!reopens(closed, UDP, SYN));
    }
}
