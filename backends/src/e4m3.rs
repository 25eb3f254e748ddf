//! Host-side `float8_e4m3fn` helpers the backend operations need: the 256-entry decode table
//! (the plain-tensor default decodes by table lookup) and packing of codes four to a 32-bit
//! word (every backend stores them as ordinary 32-bit int tensors, one byte per weight).
//!
//! The model crate's loader decodes with this same table (`dsv3_model::fp8::E4M3_TO_F32`); the
//! integration tests check it against torch's decode of all 256 codes.

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

/// Round-to-nearest-even, saturating f32 → e4m3 (the activation quantizer's encoder; the
/// kernels implement the same steps). The sign comes from `x < 0`, so `-0.0` encodes as 0x00.
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let a = x.abs().min(MAX);
    let sign = if x < 0.0 { 0x80 } else { 0 };
    if a == 0.0 {
        return sign;
    }
    // e = max(floor(log2 a), -6); r = rne(a / 2^(e-3)) ∈ [0, 16]; code = (e+7)·8 + r − 8.
    let e = ((a.to_bits() >> 23) as i32 - 127).max(-6);
    let q = a * f32::from_bits(((127 - (e - 3)) as u32) << 23);
    let f = q.floor();
    let d = q - f;
    let r = if d > 0.5 || (d == 0.5 && (f as i32) % 2 == 1) {
        f + 1.0
    } else {
        f
    };
    (((e + 7) * 8 + r as i32 - 8) as u8) | sign
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
            if c & 0x7F == 0x7F || c == 0x80 {
                continue; // NaNs; -0.0 encodes as +0
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
