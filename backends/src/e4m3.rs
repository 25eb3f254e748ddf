//! Host-side `float8_e4m3fn` helpers the backend operations need: the 256-entry decode table
//! (the plain-tensor default decodes by table lookup) and packing of codes four to a 32-bit
//! word (every backend stores them as ordinary 32-bit int tensors, one byte per weight).
//!
//! The model crate's loader uses this same codec (`dsv3_model::fp8` re-exports it); the
//! integration tests check the table against torch's decode of all 256 codes.

/// Decodes one code: `(−1)^s 2^(e−7) (1 + m/8)`, subnormals `(−1)^s 2^−6 m/8`, 0x7F/0xFF NaN.
pub const fn decode(code: u8) -> f32 {
    let sign = ((code as u32) & 0x80) << 24;
    let e = ((code >> 3) & 0xF) as u32;
    let m = (code & 0x7) as u32;
    let bits = if e == 15 && m == 7 {
        sign | 0x7FF0_0000
    } else if e == 0 {
        if m == 0 {
            sign
        } else {
            let p = 31 - m.leading_zeros();
            sign | ((p + 118) << 23) | ((m << (23 - p)) & 0x7F_FFFF)
        }
    } else {
        sign | ((e + 120) << 23) | (m << 20)
    };
    f32::from_bits(bits)
}

/// All 256 codes decoded.
pub const TABLE: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode(i as u8);
        i += 1;
    }
    t
};

/// Largest finite e4m3 magnitude (the activation scale is `amax / 448`).
pub const MAX: f32 = 448.0;

/// Packs `rows × cols` codes (row-major) into `rows × ceil(cols/4)` words: column `k` goes to
/// byte `k % 4` (little-endian) of word `k / 4`; a partial last word is zero-padded.
pub fn pack(codes: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    let words = cols.div_ceil(4);
    let mut out = Vec::with_capacity(rows * words);
    for row in codes.chunks_exact(cols.max(1)).take(rows) {
        for q in row.chunks(4) {
            let mut b = [0u8; 4];
            b[..q.len()].copy_from_slice(q);
            out.push(i32::from_le_bytes(b));
        }
    }
    out.resize(rows * words, 0);
    out
}

/// Inverse of [`pack`].
pub fn unpack(words: &[i32], rows: usize, cols: usize) -> Vec<u8> {
    let per_row = cols.div_ceil(4);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for k in 0..cols {
            out.push(words[r * per_row + k / 4].to_le_bytes()[k % 4]);
        }
    }
    out
}

/// Round-to-nearest-even encode of an f32 to `float8_e4m3fn`, saturating: the workspace's one
/// encoder (weights and activations; the CubeCL kernel `encode_e4m3` computes the same function).
///
/// Behaviour (checked against torch 2.15 `x.to(torch.float8_e4m3fn)` on CPU, which this matches
/// bit for bit on the cases in the tests):
/// - finite values round to nearest, ties to even (single rounding straight from f32, including
///   into the subnormal range; values below half the smallest subnormal 2^-10 go to ±0);
/// - `|x| > 448` (finite or ±inf) **saturates** to ±448 (0x7E / 0xFE). Values in (448, 464]
///   would round to 448 anyway. (Older torch releases, i.e. c10's scalar
///   `fp8e4m3fn_from_fp32_value`, returned NaN for |x| > 464 instead; we follow current torch.)
/// - NaN maps to NaN keeping its sign: 0x7F, or 0xFF for a negative NaN (as torch does).
/// - `-0.0` encodes as 0x80.
#[inline]
pub fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return 0x7F | sign;
    }
    // 448 = 0x43E0_0000; anything at or above it (inf included) saturates.
    if abs >= 0x43E0_0000 {
        return 0x7E | sign;
    }
    let code = if abs < (121 << 23) {
        // |x| < 2^-6: subnormal range (c10's trick). 2^14 has an f32 ulp of 2^-9, the fp8
        // subnormal step, so `|x| + 2^14` is rounded by the FPU (RNE) to 2^14 + m·2^-9, and the
        // low bits of the sum are the code m ∈ 0..=8 (8 is 0x08, the smallest normal).
        const DENORM_MAGIC: u32 = 141 << 23; // 2^14
        let sum = f32::from_bits(abs) + f32::from_bits(DENORM_MAGIC);
        (sum.to_bits() - DENORM_MAGIC) as u8
    } else {
        // Normal range: rebias the exponent and round the 20 dropped mantissa bits to even.
        let mant_odd = (abs >> 20) & 1;
        let r = abs
            .wrapping_add(((7u32).wrapping_sub(127)) << 23)
            .wrapping_add(0x7_FFFF + mant_odd);
        (r >> 20) as u8
    };
    // Rounding up from just below 448 cannot pass 448 (464 is the first value that would), and
    // 448 itself was handled above, so `code` is at most 0x7E here.
    code | sign
}

/// `s` rounded up to a power of two (`2^ceil(log2 s)`, the `ue8m0` scale format), exactly.
pub fn ceil_pow2(s: f32) -> f32 {
    let b = s.to_bits();
    if b & 0x7F_FFFF == 0 {
        s
    } else {
        f32::from_bits((b & 0x7F80_0000) + 0x80_0000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_inverts_decode_and_rounds_to_even() {
        for c in 0..=255u8 {
            if c & 0x7F == 0x7F {
                continue; // NaNs (checked below)
            }
            assert_eq!(encode(decode(c)), c, "code {c:#04x}");
        }
        // Halfway between 1.0 (0x38) and 1.125 (0x39): ties to even (0x38).
        assert_eq!(encode(1.0625), 0x38);
        // Halfway between 1.125 and 1.25: ties to even (0x3A).
        assert_eq!(encode(1.1875), 0x3A);
        assert_eq!(encode(1e9), 0x7E);
        assert_eq!(encode(-1e9), 0xFE);
        assert_eq!(encode(2f32.powi(-11)), 0); // below half the smallest subnormal
        assert_eq!(
            (encode(-0.0), encode(f32::NAN), encode(-f32::NAN)),
            (0x80, 0x7F, 0xFF)
        );
    }

    #[test]
    fn pack_round_trips_partial_words() {
        let codes: Vec<u8> = (0..3 * 7).map(|i| (i * 37 % 256) as u8).collect();
        let p = pack(&codes, 3, 7);
        assert_eq!(p.len(), 3 * 2);
        assert_eq!(unpack(&p, 3, 7), codes);
    }

    #[test]
    fn ceil_pow2_is_exact() {
        assert_eq!(ceil_pow2(1.0), 1.0);
        assert_eq!(ceil_pow2(1.0000001), 2.0);
        assert_eq!(ceil_pow2(0.3), 0.5);
        assert_eq!(ceil_pow2(2f32.powi(-20)), 2f32.powi(-20));
    }
}
