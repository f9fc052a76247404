//! The contract between weft's eBPF programs and its agent, plus the pure logic both sides share.
//!
//! Everything stored in a BPF map is defined in [`maps`]: `#[repr(C)]`, explicit padding, byte
//! order stated per field, sizes asserted at compile time. The pure modules ([`packet`],
//! [`conntrack`], [`csum`], [`crc32c`], [`reject`], [`vxlan`]) hold logic the datapath runs per
//! packet and that host unit tests must reach, so they are `no_std`, allocation-free and generic
//! over how packet bytes are read.
#![no_std]

pub mod conntrack;
pub mod crc32c;
pub mod csum;
pub mod drop_reason;
pub mod maps;
pub mod packet;
pub mod programs;
pub mod reject;
pub mod vxlan;

/// The mark bit kube-proxy uses to ask for masquerade (`KUBE-MARK-MASQ`, `0x4000/0x4000`).
///
/// weft sets the same bit so that the node's one nftables rule (and flannel's `FLANNEL-POSTRTG`,
/// which returns early on it) treat weft's flows exactly as they treat kube-proxy's.
pub const MASQUERADE_MARK: u32 = 0x4000;

/// IANA protocol numbers of the transports a service can expose.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}
