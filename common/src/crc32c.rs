//! SCTP's checksum, CRC32c (RFC 9260 appendix A), and its incremental update for NAT.
//!
//! Unlike TCP and UDP, SCTP's checksum covers no pseudo-header, so rewriting an address leaves
//! it alone; rewriting a port changes it. A CRC is linear over GF(2): for two packets of one
//! length that differ only in their first four bytes (the ports), the checksums differ by the
//! CRC (without initial value and final inversion) of the four changed bytes followed by the
//! rest of the packet as zeros, and feeding `n` zero bytes through a CRC multiplies it by
//! `x^(8n)` modulo the polynomial. So a port rewrite costs a few polynomial multiplications,
//! not a pass over the payload.
//!
//! Everything is in the reflected bit order CRC32c uses: bit 31 holds `x^0`.

/// CRC32c's polynomial (Castagnoli), reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a(x) * b(x) mod P(x)`, bit by bit (for the tables below, built at compile time).
#[must_use]
pub const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 0;
    while bit < 32 {
        product ^= b & 0u32.wrapping_sub((a >> (31 - bit)) & 1);
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        bit += 1;
    }
    product
}

/// `x^(8 * 2^k) mod P(x)` for `k` in `0..16`: shifting a CRC through `2^k` zero bytes.
const ZERO_BYTES_POW2: [u32; 16] = {
    // x^1 is bit 30; squaring three times gives x^8.
    let mut power = 1 << 30;
    let mut i = 0;
    while i < 3 {
        power = mul_mod_p(power, power);
        i += 1;
    }
    let mut table = [0; 16];
    let mut k = 0;
    while k < 16 {
        table[k] = power;
        power = mul_mod_p(power, power);
        k += 1;
    }
    table
};

/// Multiplication by `ZERO_BYTES_POW2[k]`, nibble by nibble: `SHIFT[k][j][v]` is the product
/// with `v << 4j`. Products are linear, so a 32-bit operand is the XOR of its eight nibbles'.
///
/// Tables rather than bit loops, for the verifier: a loop it can follow value by value costs
/// it thousands of steps on every path that reaches a port rewrite, and too many paths do.
/// Loads from a table are opaque to it. 8 KiB, computed at compile time.
static SHIFT: [[[u32; 16]; 8]; 16] = {
    let mut table = [[[0; 16]; 8]; 16];
    let mut k = 0;
    while k < 16 {
        let mut j = 0;
        while j < 8 {
            let mut v = 0;
            while v < 16 {
                table[k][j][v] = mul_mod_p(ZERO_BYTES_POW2[k], (v as u32) << (4 * j));
                v += 1;
            }
            j += 1;
        }
        k += 1;
    }
    table
};

/// The CRC register after `byte`, bit by bit.
#[must_use]
const fn feed(mut crc: u32, byte: u8) -> u32 {
    crc ^= byte as u32;
    let mut bit = 0;
    while bit < 8 {
        crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
        bit += 1;
    }
    crc
}

/// The CRC register after one byte, by table: `BYTES[i]` is the register `i` fed through 8
/// bits.
static BYTES: [u32; 256] = {
    let mut table = [0; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = feed(0, i as u8);
        i += 1;
    }
    table
};

/// `BYTES[index & 0xff]`, with a bound check the verifier sees. LLVM computes the masked index
/// of `(crc ^ byte) & 0xff` as `(crc & 0xff) ^ byte`, which Linux 5.10's verifier cannot bound
/// (a map value offset with an "unbounded min value"); `black_box` hides the range from LLVM,
/// so the check stays in the program and bounds the index for every verifier.
#[inline(always)]
fn byte_entry(index: u32) -> u32 {
    let index = core::hint::black_box((index & 0xff) as usize);
    BYTES.get(index).copied().unwrap_or(0)
}

/// Feeds `crc` (a CRC register without initial value or final inversion) through `zeros`
/// zero bytes (`zeros` below 64 KiB, as every IPv4 packet is).
///
/// Every step multiplies and keeps the product only where `zeros` has the bit: a branch per
/// bit would have the verifier walk all 2^16 combinations.
#[inline(always)]
#[must_use]
pub fn shift_through_zeros(mut crc: u32, zeros: u32) -> u32 {
    let mut k = 0;
    while k < 16 {
        let table = &SHIFT[k];
        let mut product = 0;
        let mut j = 0;
        while j < 8 {
            product ^= table[j][((crc >> (4 * j)) & 0xf) as usize];
            j += 1;
        }
        let keep = 0u32.wrapping_sub((zeros >> k) & 1);
        crc = (product & keep) | (crc & !keep);
        k += 1;
    }
    crc
}

/// The CRC of `bytes` with no initial value and no final inversion (the linear part).
#[inline(always)]
#[must_use]
pub fn linear(bytes: &[u8]) -> u32 {
    let mut crc = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        crc = byte_entry(crc ^ u32::from(bytes[i])) ^ (crc >> 8);
        i += 1;
    }
    crc
}

/// What to XOR into an SCTP packet's checksum (as a `u32` read little-endian from the packet)
/// when its first four bytes change from `old` to `new`; `packet_len` is the SCTP packet's
/// length (common header included).
#[inline(always)]
#[must_use]
pub fn ports_delta(old: [u8; 4], new: [u8; 4], packet_len: u32) -> u32 {
    let changed = [
        old[0] ^ new[0],
        old[1] ^ new[1],
        old[2] ^ new[2],
        old[3] ^ new[3],
    ];
    shift_through_zeros(linear(&changed), packet_len.saturating_sub(4))
}

/// The CRC32c of `bytes`, as SCTP computes it over a packet whose checksum field is zero; SCTP
/// stores it little-endian.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, byte| feed(crc, *byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // RFC 3720 B.4 / the common CRC-32C check value.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(&[0u8; 32]), 0x8A91_36AA);
    }

    fn packet(len: usize, seed: u32) -> [u8; 1500] {
        let mut p = [0u8; 1500];
        let mut x = seed;
        for byte in p.iter_mut().take(len) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *byte = (x >> 16) as u8;
        }
        // The checksum field (bytes 8..12) is zero while the CRC is computed.
        p[8..12].fill(0);
        p
    }

    #[test]
    fn a_port_rewrite_updates_the_checksum_as_a_full_recomputation_would() {
        for (len, seed) in [(12, 1), (16, 2), (100, 3), (1452, 4), (13, 5), (1500, 6)] {
            let mut p = packet(len, seed);
            let before = checksum(&p[..len]);
            let old = [p[0], p[1], p[2], p[3]];
            let new = [0x11, 0x50, p[2] ^ 0x5a, 0x01];
            p[..4].copy_from_slice(&new);
            let after = checksum(&p[..len]);
            assert_eq!(
                before ^ ports_delta(old, new, len as u32),
                after,
                "length {len}"
            );
        }
    }

    #[test]
    fn an_unchanged_port_changes_nothing() {
        assert_eq!(ports_delta([1, 2, 3, 4], [1, 2, 3, 4], 200), 0);
    }

    #[test]
    fn shifting_by_tables_matches_multiplying_bit_by_bit() {
        let crc = 0x1234_5678;
        for zeros in [0, 1, 7, 255, 256, 1400, 65_535] {
            let mut expected = crc;
            for (k, power) in ZERO_BYTES_POW2.iter().enumerate() {
                if zeros & (1 << k) != 0 {
                    expected = mul_mod_p(*power, expected);
                }
            }
            assert_eq!(shift_through_zeros(crc, zeros), expected, "{zeros} zeros");
        }
    }

    #[test]
    fn multiplication_by_one_is_identity() {
        let one = 1 << 31;
        assert_eq!(mul_mod_p(one, 0xdead_beef), 0xdead_beef);
        assert_eq!(mul_mod_p(0xdead_beef, one), 0xdead_beef);
    }
}
