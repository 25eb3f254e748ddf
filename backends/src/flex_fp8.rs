//! Flex (CPU) host paths for the rounding of the training GEMMs' operands: FP8 in 1×block
//! tiles and block×block blocks, and bf16. On the CPU the device is the host, so one pass in
//! Rust replaces the ~20 element-wise tensor operations (each a separate pass on Flex) of the
//! plain defaults; the functions are the same (the tests compare them).

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

use crate::e4m3;
use crate::ops::{Fp8Activations, Fp8Weight};
use crate::quant::QuantCounts;

fn host<const D: usize>(x: Tensor<Flex, D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 values")
}

/// `max(amax, 1e-4) / 448`, rounded up to a power of two with `pow2`.
fn scale_of(amax: f32, pow2: bool) -> f32 {
    let s = amax.max(1e-4) / e4m3::MAX;
    if pow2 {
        e4m3::ceil_pow2(s)
    } else {
        s
    }
}

/// Counts one value and its code (see [`QuantCounts`]).
fn count(v: f32, code: u8, c: &mut QuantCounts) {
    if !v.is_finite() {
        c.overflow += 1;
    } else if v != 0.0 && code & 0x7F == 0 {
        c.underflow += 1;
    }
}

/// [`crate::DsBackend::fp8_quantize_counted`]: `x [M, K]` in 1×`block` tiles.
pub(crate) fn quantize_rows(
    x: Tensor<Flex, 2>,
    block: usize,
    pow2: bool,
) -> (Fp8Activations<Flex>, QuantCounts) {
    let [m, k] = x.dims();
    let device = x.device();
    let v = host(x);
    let t = k.div_ceil(block);
    let mut codes = vec![0u8; m * k];
    let mut scales = vec![0f32; m * t];
    let mut c = QuantCounts {
        values: (m * k) as u64,
        tiles: (m * t) as u64,
        ..Default::default()
    };
    for r in 0..m {
        for j in 0..t {
            let span = r * k + j * block..r * k + ((j + 1) * block).min(k);
            let amax = v[span.clone()].iter().fold(0f32, |a, x| a.max(x.abs()));
            if amax < 1e-4 {
                c.clipped_tiles += 1;
            }
            let s = scale_of(amax, pow2);
            scales[r * t + j] = s;
            for i in span {
                codes[i] = e4m3::encode(v[i] / s);
                count(v[i], codes[i], &mut c);
            }
        }
    }
    let words = e4m3::pack(&codes, m, k);
    let q = Fp8Activations {
        codes: Tensor::from_data(TensorData::new(words, [m, k.div_ceil(4)]), &device),
        scales: Tensor::from_data(TensorData::new(scales, [m, t]), &device),
        cols: k,
        block,
    };
    (q, c)
}

/// [`crate::DsBackend::fp8_dequantize`].
pub(crate) fn dequantize_rows(q: &Fp8Activations<Flex>) -> Tensor<Flex, 2> {
    let [m, _] = q.codes.dims();
    let (k, t) = (q.cols, q.scales.dims()[1]);
    let words: Vec<i32> = q
        .codes
        .clone()
        .into_data()
        .convert::<i32>()
        .into_vec()
        .expect("i32 codes");
    let codes = e4m3::unpack(&words, m, k);
    let scales = host(q.scales.clone());
    let out: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &code)| e4m3::TABLE[code as usize] * scales[(i / k) * t + (i % k) / q.block])
        .collect();
    Tensor::from_data(TensorData::new(out, [m, k]), &q.codes.device())
}

/// [`crate::DsBackend::fp8_quantize_weight`]: `w [N, K]` in `block × block` blocks.
pub(crate) fn quantize_blocks(
    w: Tensor<Flex, 2>,
    block: usize,
    pow2: bool,
) -> (Fp8Weight<Flex>, QuantCounts) {
    let [n, k] = w.dims();
    let device = w.device();
    let v = host(w);
    let (nb, kb) = (n.div_ceil(block), k.div_ceil(block));
    let mut amax = vec![0f32; nb * kb];
    for (i, x) in v.iter().enumerate() {
        let b = (i / k / block) * kb + (i % k) / block;
        amax[b] = amax[b].max(x.abs());
    }
    let mut c = QuantCounts {
        values: (n * k) as u64,
        tiles: (nb * kb) as u64,
        clipped_tiles: amax.iter().filter(|&&a| a < 1e-4).count() as u64,
        ..Default::default()
    };
    let scales: Vec<f32> = amax.iter().map(|&a| scale_of(a, pow2)).collect();
    let codes: Vec<u8> = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let code = e4m3::encode(x / scales[(i / k / block) * kb + (i % k) / block]);
            count(x, code, &mut c);
            code
        })
        .collect();
    let words = e4m3::pack(&codes, n, k);
    let q = Fp8Weight {
        codes: Tensor::from_data(TensorData::new(words, [1, n, k.div_ceil(4)]), &device),
        scales: Tensor::from_data(TensorData::new(scales, [1, nb, kb]), &device),
        rows: n,
        cols: k,
        block,
    };
    (q, c)
}

/// [`crate::DsBackend::fp8_dequantize_weight`].
pub(crate) fn dequantize_blocks(w: &Fp8Weight<Flex>) -> Tensor<Flex, 3> {
    let [e, n, _] = w.codes.dims();
    let (k, b) = (w.cols, w.block);
    let [_, nb, kb] = w.scales.dims();
    let words: Vec<i32> = w
        .codes
        .clone()
        .into_data()
        .convert::<i32>()
        .into_vec()
        .expect("i32 codes");
    let codes = e4m3::unpack(&words, e * n, k);
    let scales = host(w.scales.clone());
    let out: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            let (mat, r, c) = (i / (n * k), (i / k) % n, i % k);
            e4m3::TABLE[code as usize] * scales[mat * nb * kb + (r / b) * kb + c / b]
        })
        .collect();
    Tensor::from_data(TensorData::new(out, [e, n, k]), &w.codes.device())
}

/// [`crate::DsBackend::round_bf16`]: nearest bf16, ties to even (NaN kept).
pub(crate) fn round_bf16(x: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
    let shape = x.dims();
    let device = x.device();
    let out: Vec<f32> = host(x)
        .into_iter()
        .map(|v| {
            if v.is_nan() {
                v
            } else {
                let b = v.to_bits();
                f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(out, shape), &device)
}
