//! Direct, bounds-checked access to packet bytes, for TC (`__sk_buff`) and XDP (`xdp_md`).

use aya_ebpf::programs::{TcContext, XdpContext};
use weft_common::packet::PacketBytes;

/// Headers the programs parse: Ethernet, IPv4 with the longest options, and a TCP header.
const HEADERS_MAX: u32 = 14 + 60 + 20;

/// A frame's linear data, as [`PacketBytes`].
pub(crate) struct Skb<'a>(pub(crate) &'a TcContext);

impl Skb<'_> {
    /// Makes the headers readable with direct packet access; returns whether they are. Packets
    /// from veths normally have them in the linear area already; a GSO or fragmented skb may
    /// not, and then the pull costs a copy once. A failed pull (no memory) leaves a frame the
    /// programs must pass on rather than judge.
    #[inline(always)]
    pub(crate) fn pull_headers(&self) -> bool {
        let ctx = self.0;
        let want = ctx.len().min(HEADERS_MAX);
        if ((ctx.data_end() - ctx.data()) as u32) < want {
            let _ = ctx.pull_data(want);
        }
        (ctx.data_end() - ctx.data()) as u32 >= want
    }

    /// Writes `bytes` at `offset` of the linear data with a direct store; `None` when they do
    /// not lie inside it. Stores here must come before any helper that may move the packet
    /// (checksum and store helpers among them): those invalidate direct access.
    #[inline(always)]
    pub(crate) fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Option<()> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if start + offset + N > end {
            return None;
        }
        // SAFETY: `start + offset .. start + offset + N` lies inside the packet data, as just
        // checked (and as the verifier checks again); TC programs may write their packet.
        unsafe { core::ptr::write_unaligned((start + offset) as *mut [u8; N], bytes) };
        Some(())
    }
}

/// Reads `N` bytes at `offset` of the packet data `start..end`.
#[inline(always)]
fn read_between<const N: usize>(start: usize, end: usize, offset: usize) -> Option<[u8; N]> {
    if start + offset + N > end {
        return None;
    }
    // SAFETY: `start + offset .. start + offset + N` lies inside the packet data, as just
    // checked (and as the verifier checks again).
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        read_between(self.0.data(), self.0.data_end(), offset)
    }
}

/// A frame's bytes read through the load helper (`bpf_skb_load_bytes`), as [`PacketBytes`]: any
/// offset of the skb, linear or not, and no packet pointer for the verifier to follow. For rare
/// packets whose headers sit at offsets too variable for direct access to be proven safe.
pub(crate) struct Loaded<'a>(pub(crate) &'a TcContext);

impl PacketBytes for Loaded<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

/// An XDP frame, as [`PacketBytes`].
pub(crate) struct Xdp<'a>(pub(crate) &'a XdpContext);

impl PacketBytes for Xdp<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        read_between(self.0.data(), self.0.data_end(), offset)
    }
}
