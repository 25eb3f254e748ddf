//! FP8 `float8_e4m3fn` codes and DeepSeek-V3's 128×128 block quantization (spec §8).
//!
//! Format: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities.
//! Normal values are `(−1)^s · 2^(e−7) · (1 + m/8)`, subnormals (`e = 0`) are `(−1)^s · 2^−6 · m/8`,
//! `S.1111.111` (0x7F, 0xFF) is NaN and the largest finite magnitude is 448 (0x7E).
//!
//! Block quantization: a weight `W` of shape `[M, N]` is stored as codes `W_q` (same shape) plus a
//! float32 grid `weight_scale_inv` of shape `[ceil(M/B), ceil(N/B)]` (B = 128 in the release),
//! and `W[i, j] = f32(W_q[i, j]) * weight_scale_inv[i / B, j / B]`. Edge blocks are partial.
//!
//! Nothing here depends on Burn.

/// Largest finite `float8_e4m3fn` magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Bit pattern of the canonical (positive) NaN code.
pub const E4M3_NAN: u8 = 0x7F;

/// Errors of the block (de)quantizers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fp8Error {
    /// `block` was 0.
    #[error("FP8 block size must be positive, got 0")]
    ZeroBlock,
    /// The code buffer does not hold `rows * cols` bytes.
    #[error("FP8 codes: expected {rows}x{cols} = {expected} bytes, found {found}")]
    CodesLen {
        rows: usize,
        cols: usize,
        expected: usize,
        found: usize,
    },
    /// The scale buffer is not `[ceil(rows/block), ceil(cols/block)]`.
    #[error(
        "FP8 scales for a {rows}x{cols} weight with block {block} must have shape \
         [{scale_rows}, {scale_cols}] = {expected} values, found {found}"
    )]
    ScaleShape {
        rows: usize,
        cols: usize,
        block: usize,
        scale_rows: usize,
        scale_cols: usize,
        expected: usize,
        found: usize,
    },
}

/// All 256 `float8_e4m3fn` codes decoded to f32: the workspace's one codec
/// (`dsv3_backends::e4m3`), so the loader and the kernels cannot disagree on a code.
pub use dsv3_backends::e4m3::{decode as e4m3_to_f32, encode as f32_to_e4m3, TABLE as E4M3_TO_F32};

/// Number of blocks of size `block` covering `n` (`ceil(n / block)`).
#[inline]
pub fn num_blocks(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// Dequantizes a block-quantized `[rows, cols]` FP8 weight:
/// `W[i, j] = e4m3_to_f32(codes[i*cols + j]) * scales[(i/block) * ceil(cols/block) + j/block]`,
/// one f32 multiply per element (bit-identical to torch's float32 product). Partial edge blocks
/// are handled. `scales` must hold `ceil(rows/block) * ceil(cols/block)` values in row-major
/// `[ceil(rows/block), ceil(cols/block)]` order.
///
/// With `transpose` the result is written in `[cols, rows]` order (`out[j*rows + i]`) in the
/// same pass.
///
/// # Errors
/// - [`Fp8Error::ZeroBlock`]: `block` is 0.
/// - [`Fp8Error::CodesLen`]: `codes` does not hold `rows * cols` bytes.
/// - [`Fp8Error::ScaleShape`]: `scales` does not hold `ceil(rows/block) * ceil(cols/block)`
///   values.
pub fn dequantize_blocks(
    codes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: usize,
    transpose: bool,
) -> Result<Vec<f32>, Fp8Error> {
    let n = rows * cols;
    let mut out = vec![0.0f32; n];
    dequantize_blocks_into(codes, rows, cols, scales, block, transpose, &mut out)?;
    Ok(out)
}

/// Like [`dequantize_blocks`], into a caller-provided buffer of exactly `rows * cols` values.
///
/// # Errors
/// As [`dequantize_blocks`]; `out` is left untouched then.
///
/// # Panics
/// If `out.len() != rows * cols`.
pub fn dequantize_blocks_into(
    codes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: usize,
    transpose: bool,
    out: &mut [f32],
) -> Result<(), Fp8Error> {
    if block == 0 {
        return Err(Fp8Error::ZeroBlock);
    }
    let n = rows * cols;
    if codes.len() != n {
        return Err(Fp8Error::CodesLen {
            rows,
            cols,
            expected: n,
            found: codes.len(),
        });
    }
    let (sr, sc) = (num_blocks(rows, block), num_blocks(cols, block));
    if scales.len() != sr * sc {
        return Err(Fp8Error::ScaleShape {
            rows,
            cols,
            block,
            scale_rows: sr,
            scale_cols: sc,
            expected: sr * sc,
            found: scales.len(),
        });
    }
    assert_eq!(out.len(), n, "dequantize_blocks_into: output buffer size");
    if n == 0 {
        return Ok(());
    }
    let table = &E4M3_TO_F32;
    if !transpose {
        for (i, (src, dst)) in codes
            .chunks_exact(cols)
            .zip(out.chunks_exact_mut(cols))
            .enumerate()
        {
            let srow = &scales[(i / block) * sc..(i / block + 1) * sc];
            for ((s, d), &scale) in src.chunks(block).zip(dst.chunks_mut(block)).zip(srow) {
                for (o, &c) in d.iter_mut().zip(s) {
                    *o = table[c as usize] * scale;
                }
            }
        }
    } else {
        // 64×64 tiles, inner loop along the output row (contiguous writes): see the note in
        // `checkpoint::convert` (strides that are multiples of 4 KiB alias in the cache). The
        // inner run is split at block-row boundaries so that the scale is hoisted.
        const TILE: usize = 64;
        for ib in (0..rows).step_by(TILE) {
            let ie = (ib + TILE).min(rows);
            for jb in (0..cols).step_by(TILE) {
                let je = (jb + TILE).min(cols);
                for j in jb..je {
                    let sj = j / block;
                    let mut i0 = ib;
                    while i0 < ie {
                        let bi = i0 / block;
                        let i1 = ie.min((bi + 1) * block);
                        let scale = scales[bi * sc + sj];
                        let dst = &mut out[j * rows + i0..j * rows + i1];
                        for (di, o) in dst.iter_mut().enumerate() {
                            *o = table[codes[(i0 + di) * cols + j] as usize] * scale;
                        }
                        i0 = i1;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Block-quantizes a `[rows, cols]` f32 weight the way DeepSeek's release was made:
/// per block, `scale = amax(|block|) / 448` (over the block's real elements only: a partial edge
/// block is not padded, which is the same as zero padding for the amax), and
/// `codes = f32_to_e4m3(w / scale)` (f32 division, RNE). Returns `(codes, scales)` with
/// `scales` in row-major `[ceil(rows/block), ceil(cols/block)]` order; `scales` is what the
/// checkpoint calls `weight_scale_inv` (the dequantization multiplier).
///
/// Choices: an all-zero block gets scale 1.0 (any positive scale gives zero codes; 1.0 keeps the
/// scale grid free of zeros and denormals). Inputs are expected to be finite: a NaN in a block
/// gives a NaN code for that element (the amax ignores it), an infinity makes the block's scale
/// infinite.
///
/// # Panics
/// If `w.len() != rows * cols` or `block == 0`.
pub fn quantize_blocks(w: &[f32], rows: usize, cols: usize, block: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(block > 0, "quantize_blocks: block must be positive");
    assert_eq!(
        w.len(),
        rows * cols,
        "quantize_blocks: w.len() != rows*cols"
    );
    let (sr, sc) = (num_blocks(rows, block), num_blocks(cols, block));
    let mut amax = vec![0.0f32; sr * sc];
    for (i, row) in w.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let arow = &mut amax[(i / block) * sc..(i / block + 1) * sc];
        for (chunk, a) in row.chunks(block).zip(arow.iter_mut()) {
            for &x in chunk {
                // `max` ignores NaN.
                *a = a.max(x.abs());
            }
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a == 0.0 { 1.0 } else { a / E4M3_MAX })
        .collect();
    let mut codes = vec![0u8; rows * cols];
    if cols > 0 {
        for (i, (row, crow)) in w
            .chunks_exact(cols)
            .zip(codes.chunks_exact_mut(cols))
            .enumerate()
        {
            let srow = &scales[(i / block) * sc..(i / block + 1) * sc];
            for ((chunk, cchunk), &s) in row.chunks(block).zip(crow.chunks_mut(block)).zip(srow) {
                for (c, &x) in cchunk.iter_mut().zip(chunk) {
                    *c = f32_to_e4m3(x / s);
                }
            }
        }
    }
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent f64 formula for the value of a code (None for NaN).
    fn reference(code: u8) -> Option<f64> {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        let v = if e == 0 {
            2f64.powi(-6) * m / 8.0
        } else {
            2f64.powi(e - 7) * (1.0 + m / 8.0)
        };
        Some(s * v)
    }

    #[test]
    fn all_256_codes_decode_exactly() {
        let mut finite = 0;
        for c in 0..=255u8 {
            let got = e4m3_to_f32(c);
            match reference(c) {
                None => {
                    assert!(got.is_nan(), "code {c:#04x} must be NaN");
                    assert_eq!(got.to_bits() & 0x7FFF_FFFF, 0x7FF0_0000);
                    assert!(c == 0x7F || c == 0xFF);
                }
                Some(v) => {
                    finite += 1;
                    assert_eq!(got as f64, v, "code {c:#04x}");
                    // Sign of zero too.
                    assert_eq!(got.is_sign_negative(), c & 0x80 != 0, "code {c:#04x}");
                }
            }
        }
        assert_eq!(finite, 254);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
    }

    #[test]
    fn round_trip_all_finite_codes() {
        for c in 0..=255u8 {
            if c & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c, "code {c:#04x}");
        }
    }

    /// Independent encoder: the nearest finite code by exhaustive search, ties to the code with
    /// an even mantissa (RNE), saturating.
    fn reference_encode(x: f32) -> u8 {
        if x.is_nan() {
            return if x.is_sign_negative() { 0xFF } else { 0x7F };
        }
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = (x as f64).abs();
        if a >= 448.0 {
            return 0x7E | sign;
        }
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for c in 0..=0x7Eu8 {
            let d = (reference(c).unwrap() - a).abs();
            if d < best_d || (d == best_d && c & 1 == 0) {
                best = c;
                best_d = d;
            }
        }
        best | sign
    }

    #[test]
    fn encode_matches_exhaustive_reference_at_midpoints_and_samples() {
        let mut xs: Vec<f32> = Vec::new();
        for c in 0..0x7Eu8 {
            let a = e4m3_to_f32(c);
            let b = e4m3_to_f32(c + 1);
            let mid = (a + b) / 2.0; // exact in f32
            xs.extend([mid, mid.next_up(), mid.next_down(), a, b]);
        }
        // Beyond the top: (448, 464] and more.
        xs.extend([
            448.5,
            463.9,
            464.0,
            464.1,
            470.0,
            480.0,
            1e6,
            f32::MAX,
            f32::INFINITY,
        ]);
        // Tiny values around half the smallest subnormal (2^-10).
        let h = 2f32.powi(-10);
        xs.extend([h, h.next_up(), h.next_down(), 1e-30, f32::from_bits(1)]);
        // A deterministic spread over f32 bit patterns below 512.
        let mut b = 0u32;
        while b < 0x4400_0000 {
            xs.push(f32::from_bits(b));
            b += 100_003;
        }
        for &x in &xs {
            for x in [x, -x] {
                assert_eq!(f32_to_e4m3(x), reference_encode(x), "x = {x:e}");
            }
        }
    }

    #[test]
    fn encode_special_values_like_torch() {
        // Values from torch 2.15: x.to(torch.float8_e4m3fn).view(torch.uint8) on CPU.
        let cases: &[(f32, u8)] = &[
            (448.0, 126),
            (460.0, 126),
            (464.0, 126),
            (465.0, 126),
            (480.0, 126),
            (1e6, 126),
            (f32::INFINITY, 126),
            (f32::NEG_INFINITY, 254),
            (f32::NAN, 127),
            (-f32::NAN, 255),
            (-500.0, 254),
            (-0.0, 128),
            (0.0, 0),
            (0.7265625, 0x34),
            (-0.001953125, 0x81),
            (0.0009765625, 0x00), // 2^-10, a tie between 0 and 2^-9: even is 0
            (0.0009765626, 0x01),
        ];
        for &(x, c) in cases {
            assert_eq!(f32_to_e4m3(x), c, "x = {x}");
        }
    }

    fn naive_dequant(
        codes: &[u8],
        rows: usize,
        cols: usize,
        scales: &[f32],
        block: usize,
    ) -> Vec<f32> {
        let sc = cols.div_ceil(block);
        let mut out = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] =
                    e4m3_to_f32(codes[i * cols + j]) * scales[(i / block) * sc + j / block];
            }
        }
        out
    }

    fn rng(r: &mut dsv3_backends::SplitMix64) -> u64 {
        r.next_u64()
    }

    #[test]
    fn dequantize_partial_blocks_matches_naive_loop() {
        let mut seed = dsv3_backends::SplitMix64::new(0x1234_5678_9abc_def0);
        for &(rows, cols, block) in &[
            (300usize, 200usize, 128usize),
            (576, 130, 128),
            (7, 5, 2),
            (1, 1, 128),
        ] {
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| {
                    let c = rng(&mut seed) as u8;
                    if c & 0x7F == 0x7F {
                        0x3F
                    } else {
                        c
                    }
                })
                .collect();
            let (sr, sc) = (rows.div_ceil(block), cols.div_ceil(block));
            let scales: Vec<f32> = (0..sr * sc)
                .map(|_| (rng(&mut seed) % 1000 + 1) as f32 * 1.37e-5)
                .collect();
            let expect = naive_dequant(&codes, rows, cols, &scales, block);
            let got = dequantize_blocks(&codes, rows, cols, &scales, block, false).unwrap();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expect.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let gt = dequantize_blocks(&codes, rows, cols, &scales, block, true).unwrap();
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        gt[j * rows + i].to_bits(),
                        expect[i * cols + j].to_bits(),
                        "({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn dequantize_rejects_wrong_scale_shape() {
        let codes = vec![0x38u8; 300 * 200];
        // Needs [3, 2] = 6 scales.
        let err = dequantize_blocks(&codes, 300, 200, &[1.0; 4], 128, false).unwrap_err();
        assert!(matches!(
            err,
            Fp8Error::ScaleShape {
                scale_rows: 3,
                scale_cols: 2,
                expected: 6,
                found: 4,
                ..
            }
        ));
        assert!(err.to_string().contains("[3, 2]"), "{err}");
        assert_eq!(
            dequantize_blocks(&codes, 300, 200, &[1.0; 6], 0, false).unwrap_err(),
            Fp8Error::ZeroBlock
        );
        assert!(matches!(
            dequantize_blocks(&codes[1..], 300, 200, &[1.0; 6], 128, false).unwrap_err(),
            Fp8Error::CodesLen { .. }
        ));
    }

    #[test]
    fn quantize_then_dequantize_is_close_and_block_max_is_exact() {
        let (rows, cols, block) = (300, 200, 128);
        let mut seed = dsv3_backends::SplitMix64::new(42);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| ((rng(&mut seed) % 20001) as f32 - 10000.0) * 1e-4)
            .collect();
        let (codes, scales) = quantize_blocks(&w, rows, cols, block);
        assert_eq!(scales.len(), 3 * 2);
        let back = dequantize_blocks(&codes, rows, cols, &scales, block, false).unwrap();
        let sc = cols.div_ceil(block);
        for i in 0..rows {
            for j in 0..cols {
                let s = scales[(i / block) * sc + j / block];
                let (x, y) = (w[i * cols + j], back[i * cols + j]);
                // Relative step of e4m3 is 2^-3 (half of that after rounding); subnormal floor.
                assert!(
                    (x - y).abs() <= x.abs() / 16.0 + s * 2f32.powi(-10) * 1.0001,
                    "({i},{j}) {x} vs {y}"
                );
            }
        }
        // Every block's amax element encodes to ±448.
        for bi in 0..3 {
            for bj in 0..2 {
                let mut best = (0.0f32, 0usize);
                for i in bi * block..((bi + 1) * block).min(rows) {
                    for j in bj * block..((bj + 1) * block).min(cols) {
                        if w[i * cols + j].abs() > best.0 {
                            best = (w[i * cols + j].abs(), i * cols + j);
                        }
                    }
                }
                assert_eq!(codes[best.1] & 0x7F, 0x7E);
            }
        }
        // A zero block gets scale 1.0 and zero codes.
        let (c, s) = quantize_blocks(&[0.0; 6], 2, 3, 128);
        assert_eq!((c, s), (vec![0u8; 6], vec![1.0f32]));
    }
}
