//! Internet checksums (RFC 1071) for headers the datapath writes from scratch, and the
//! incremental update (RFC 1624) for the IPv4 header checksum of a header it rewrites. The
//! transport checksums of rewritten packets are left to the kernel's helpers, which alone know
//! whether the skb's checksum is partial (offloaded) or complete.

/// Folds a 32-bit sum of 16-bit words into a 16-bit one's-complement sum.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The sum of `bytes` as big-endian 16-bit words (an odd last byte is padded with zero), not
/// yet folded.
#[inline(always)]
#[must_use]
pub fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        sum += u32::from(bytes[i]) << 8;
    }
    sum
}

/// The checksum of an IPv4 header whose checksum field (bytes 10-11) is zero.
#[inline(always)]
#[must_use]
pub fn ipv4_header(header: &[u8; 20]) -> u16 {
    !fold(sum_words(header))
}

/// RFC 1624, eqn. 3: the checksum `checksum` (the header field, as a big-endian number)
/// once the bytes `old` (whole 16-bit words, at an even offset) are replaced by `new`:
/// HC' = ~(~HC + ~m + m').
#[inline(always)]
#[must_use]
pub fn replace<const N: usize>(checksum: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut sum = u32::from(!checksum);
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic example header (Wikipedia, "IPv4 header checksum"), checksum field zeroed.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn an_incremental_update_matches_the_checksum_computed_afresh() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed.to_be_bytes()
        };
        for _ in 0..10_000 {
            let mut header = HEADER;
            header[12..16].copy_from_slice(&next());
            header[16..20].copy_from_slice(&next());
            let checksum = ipv4_header(&header);
            // A new destination address, then a new TTL/protocol word.
            let old: [u8; 4] = header[16..20].try_into().unwrap();
            let new = next();
            header[16..20].copy_from_slice(&new);
            assert_eq!(replace(checksum, &old, &new), ipv4_header(&header));
            let old_ttl: [u8; 2] = header[8..10].try_into().unwrap();
            let new_ttl = [old_ttl[0].wrapping_sub(1), old_ttl[1]];
            header[8..10].copy_from_slice(&new_ttl);
            assert_eq!(
                replace(
                    ipv4_header(&{
                        let mut h = header;
                        h[8..10].copy_from_slice(&old_ttl);
                        h
                    }),
                    &old_ttl,
                    &new_ttl
                ),
                ipv4_header(&header)
            );
        }
    }

    #[test]
    fn a_known_header_checksums_to_its_published_value() {
        assert_eq!(ipv4_header(&HEADER), 0xb861);
    }

    #[test]
    fn folding_carries_twice() {
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold(0xffff_ffff), 0xffff);
    }
}
