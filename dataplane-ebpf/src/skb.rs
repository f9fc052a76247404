//! Direct, bounds-checked access to a socket buffer's bytes.

use aya_ebpf::programs::TcContext;
use weft_common::packet::PacketBytes;

/// Headers the programs parse: Ethernet, IPv4 with the longest options, and a TCP header.
const HEADERS_MAX: u32 = 14 + 60 + 20;

/// A frame's linear data, as [`PacketBytes`].
pub(crate) struct Skb<'a>(pub(crate) &'a TcContext);

impl Skb<'_> {
    /// Makes the headers readable with direct packet access. Packets from veths normally have
    /// them in the linear area already; a GSO or fragmented skb may not, and then the pull costs
    /// a copy once.
    #[inline(always)]
    pub(crate) fn pull_headers(&self) {
        let ctx = self.0;
        let want = ctx.len().min(HEADERS_MAX);
        if ((ctx.data_end() - ctx.data()) as u32) < want {
            // On failure the parse below sees a short frame and treats it as such.
            let _ = ctx.pull_data(want);
        }
    }
}

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        let end = self.0.data_end();
        if start + offset + N > end {
            return None;
        }
        // SAFETY: `start + offset .. start + offset + N` lies inside the packet's linear data,
        // as just checked (and as the verifier checks again).
        Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
    }
}
