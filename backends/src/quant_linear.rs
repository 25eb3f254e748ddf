//! Low-precision GEMMs of a Linear layer in training (DeepSeek-V3 report §3.3, "FP8 Training"):
//! `y = x · w` with its two backward GEMMs, each on rounded operands and accumulated in f32.
//!
//! - **FP8** (report §3.3.2, Fig. 6–7): every operand of the three GEMMs is e4m3 with its own
//!   scales, tiles along the GEMM's reduction dimension.
//!   - forward `y = x · w`: `x [M, K]` in 1×128 tiles along `K`, `w [K, N]` in 128×128 blocks;
//!   - input gradient `dx = dy · wᵀ`: `dy [M, N]` in 1×128 tiles along `N`, the same quantized
//!     `w` (a block grid is its own transpose, so `w` is quantized once for both);
//!   - weight gradient `dw = xᵀ · dy`: both in 128×1 tiles along the tokens `M`. The input is
//!     saved for the backward in FP8 (its 1×128 form, about one byte per value) and converted
//!     to 128×1 tiles there, as the report does.
//!
//!   Scale `max(amax, 1e-4) / 448` per tile or block, optionally a power of two (rounded up),
//!   as V3.1 (`scale_fmt = "ue8m0"`). The product is computed as the exact dequantized values
//!   times each other in f32, which is what a tensor-core FP8 GEMM with f32 accumulation
//!   computes up to the order of the sums; the report's promotion to f32 every 128 products
//!   is subsumed (every product is accumulated in f32 here).
//! - **BF16** (the report's baseline): the operands of the same three GEMMs rounded to bf16
//!   (round to nearest even), accumulated in f32; the input is saved in bf16.
//!
//! [`QuantCounters`] counts what FP8 does to the values: flushed to zero (underflow), not
//! representable (overflow), and tiles whose scale hit its floor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor};

use crate::ops::{floor_log2, pow2, DsBackend, Fp8Activations, Fp8Weight};

/// Tile length and block side of DeepSeek-V3's FP8 training (report §3.3.2).
pub const FP8_TILE: usize = 128;

/// The number format of a Linear layer's three training GEMMs (f32 layers do not use this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPrecision {
    /// Operands rounded to bf16, f32 accumulation.
    Bf16,
    /// Operands in e4m3 with 1×128 tile / 128×128 block scales, f32 accumulation;
    /// `pow2_scales`: scales rounded up to powers of two (UE8M0).
    Fp8 { pow2_scales: bool },
}

/// A Linear layer's low-precision setting: the format and, optionally, where to count FP8
/// events (shared by every layer of a model).
#[derive(Debug, Clone)]
pub struct QuantGemm {
    pub precision: GemmPrecision,
    pub counters: Option<Arc<QuantCounters>>,
}

/// Running FP8 event counts, summed over every quantization (forward and backward operands).
#[derive(Debug, Default)]
pub struct QuantCounters {
    values: AtomicU64,
    underflow: AtomicU64,
    overflow: AtomicU64,
    tiles: AtomicU64,
    clipped_tiles: AtomicU64,
}

/// A snapshot of [`QuantCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QuantCounts {
    /// Values quantized.
    pub values: u64,
    /// Non-zero values that became 0 (below half the smallest subnormal after scaling).
    pub underflow: u64,
    /// Values that e4m3 cannot represent: non-finite inputs (with `amax` scaling every finite
    /// value lands within ±448, and power-of-two scales only round the scale up).
    pub overflow: u64,
    /// Tiles and blocks quantized.
    pub tiles: u64,
    /// Tiles and blocks whose `amax` was below 1e-4, so the scale was clipped to its floor.
    pub clipped_tiles: u64,
}

impl QuantCounts {
    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            values: self.values - earlier.values,
            underflow: self.underflow - earlier.underflow,
            overflow: self.overflow - earlier.overflow,
            tiles: self.tiles - earlier.tiles,
            clipped_tiles: self.clipped_tiles - earlier.clipped_tiles,
        }
    }
}

impl QuantCounters {
    pub fn snapshot(&self) -> QuantCounts {
        QuantCounts {
            values: self.values.load(Ordering::Relaxed),
            underflow: self.underflow.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
            tiles: self.tiles.load(Ordering::Relaxed),
            clipped_tiles: self.clipped_tiles.load(Ordering::Relaxed),
        }
    }

    /// Adds `c`.
    pub fn add(&self, c: QuantCounts) {
        self.values.fetch_add(c.values, Ordering::Relaxed);
        self.underflow.fetch_add(c.underflow, Ordering::Relaxed);
        self.overflow.fetch_add(c.overflow, Ordering::Relaxed);
        self.tiles.fetch_add(c.tiles, Ordering::Relaxed);
        self.clipped_tiles
            .fetch_add(c.clipped_tiles, Ordering::Relaxed);
    }
}

/// The counts of one quantization of `x` whose dequantized form is `q`, with tile or block
/// maxima `amax` (plain tensor operations).
fn count<B: Backend, const D: usize, const E: usize>(
    x: &Tensor<B, D>,
    q: &Tensor<B, D>,
    amax: Tensor<B, E>,
) -> QuantCounts {
    let sum = |t: Tensor<B, D, burn::tensor::Bool>| -> u64 {
        t.int().sum().into_scalar().elem::<i64>() as u64
    };
    let underflow = sum(x
        .clone()
        .not_equal_elem(0.0)
        .bool_and(q.clone().equal_elem(0.0)));
    let overflow = sum(x.clone().is_finite().bool_not());
    QuantCounts {
        values: x.shape().num_elements() as u64,
        underflow,
        overflow,
        tiles: amax.shape().num_elements() as u64,
        clipped_tiles: amax
            .lower_elem(1e-4)
            .int()
            .sum()
            .into_scalar()
            .elem::<i64>() as u64,
    }
}

/// Counts of quantizing `x: [M, K]` in 1×`block` tiles to `q` (dequantized).
pub(crate) fn count_rows<B: Backend>(
    x: &Tensor<B, 2>,
    q: &Tensor<B, 2>,
    block: usize,
) -> QuantCounts {
    count(x, q, tile_amax(x, block))
}

/// Counts of quantizing `w: [N, K]` in `block × block` blocks to `q` (`[1, N, K]` dequantized).
pub(crate) fn count_blocks<B: Backend>(
    w: &Tensor<B, 2>,
    q: &Tensor<B, 3>,
    block: usize,
) -> QuantCounts {
    let [n, k] = w.dims();
    let (nb, kb) = (n.div_ceil(block), k.div_ceil(block));
    // Block maxima from the 1×block tile maxima: the max over each `block` rows.
    let rows = tile_amax(w, block); // [n, kb]
    let rows = if nb * block > n {
        Tensor::cat(
            vec![rows, Tensor::zeros([nb * block - n, kb], &w.device())],
            0,
        )
    } else {
        rows
    };
    let amax = rows.reshape([nb, block, kb]).max_dim(1);
    count(w, &q.clone().reshape([n, k]), amax)
}

/// `max |x|` of each 1×`block` tile of `x: [M, K]` → `[M, ceil(K/block)]`.
fn tile_amax<B: Backend>(x: &Tensor<B, 2>, block: usize) -> Tensor<B, 2> {
    let [m, k] = x.dims();
    let t = k.div_ceil(block);
    let a = x.clone().abs();
    let a = if t * block > k {
        Tensor::cat(vec![a, Tensor::zeros([m, t * block - k], &x.device())], 1)
    } else {
        a
    };
    a.reshape([m, t, block]).max_dim(2).reshape([m, t])
}

/// `x: [M, K]` quantized in 1×128 tiles along `K` ([`DsBackend::fp8_quantize`]), counted.
pub fn quantize_rows<B: DsBackend>(
    x: Tensor<B, 2>,
    pow2_scales: bool,
    counters: Option<&QuantCounters>,
) -> Fp8Activations<B> {
    match counters {
        Some(c) => {
            let (q, n) = B::fp8_quantize_counted(x, FP8_TILE, pow2_scales);
            c.add(n);
            q
        }
        None => B::fp8_quantize(x, FP8_TILE, pow2_scales),
    }
}

/// `w: [N, K]` (the `[out, in]` layout) quantized in 128×128 blocks
/// ([`DsBackend::fp8_quantize_weight`]), counted.
pub fn quantize_weight<B: DsBackend>(
    w: Tensor<B, 2>,
    pow2_scales: bool,
    counters: Option<&QuantCounters>,
) -> Fp8Weight<B> {
    let (q, n) = B::fp8_quantize_weight(w, FP8_TILE, pow2_scales, counters.is_some());
    if let Some(c) = counters {
        c.add(n);
    }
    q
}

/// Rounds to the nearest bf16 value, ties to even, in the input's dtype: `round(x / u) · u`
/// with `u = 2^(floor(log2 |x|) − 7)` the bf16 spacing at `x` (both steps exact).
///
/// Not `cast(BF16)`: Flex casts through f64 with `half` 2.7's `f64_to_bf16`, whose rounding
/// ignores the low 32 bits of the f64 (the lowest 3 mantissa bits of an f32), so a value just
/// above a tie rounds down (measured: a few values in 10⁵). Values this returns cast to bf16
/// exactly.
pub fn round_bf16<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let a = x.clone().abs().clamp_min(f32::MIN_POSITIVE);
    let ulp = pow2(floor_log2(a) - 7.0);
    (x / ulp.clone()).round() * ulp
}

/// What the backward of a low-precision Linear keeps from its forward.
#[derive(Debug, Clone)]
pub enum Saved<B: Backend> {
    /// The input and the weight `[K, N]`, in bf16.
    Bf16 { x: Tensor<B, 2>, w: Tensor<B, 2> },
    /// The input in 1×128 tiles and the weight (`[N, K]` layout) in 128×128 blocks.
    Fp8 {
        x: Fp8Activations<B>,
        w: Fp8Weight<B>,
        pow2_scales: bool,
        counters: Option<Arc<QuantCounters>>,
    },
}

/// The forward GEMM `x [M, K] · w [K, N] → [M, N]` in `gemm`'s format, and what its backward
/// needs. `w` is widened to `x`'s dtype first if stored narrower.
pub fn forward<B: DsBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    gemm: &QuantGemm,
) -> (Tensor<B, 2>, Saved<B>) {
    let float = x.dtype();
    let w = if w.dtype() == float { w } else { w.cast(float) };
    match gemm.precision {
        GemmPrecision::Bf16 => {
            let (xr, wr) = (B::round_bf16(x), B::round_bf16(w));
            let y = xr.clone().matmul(wr.clone());
            let (xb, wb) = (xr.cast(DType::BF16), wr.cast(DType::BF16));
            (y, Saved::Bf16 { x: xb, w: wb })
        }
        GemmPrecision::Fp8 { pow2_scales } => {
            let counters = gemm.counters.as_deref();
            let xq = quantize_rows(x, pow2_scales, counters);
            let wq = quantize_weight(w.transpose(), pow2_scales, counters);
            let y = B::fp8_matmul(B::fp8_dequantize(&xq), &wq);
            (
                y,
                Saved::Fp8 {
                    x: xq,
                    w: wq,
                    pow2_scales,
                    counters: gemm.counters.clone(),
                },
            )
        }
    }
}

/// `dx = dy · wᵀ` (`dy: [M, N]` → `[M, K]`), the input-gradient GEMM.
pub fn grad_input<B: DsBackend>(saved: &Saved<B>, dy: Tensor<B, 2>) -> Tensor<B, 2> {
    let float = dy.dtype();
    match saved {
        Saved::Bf16 { w, .. } => B::round_bf16(dy).matmul(w.clone().cast(float).transpose()),
        Saved::Fp8 {
            w,
            pow2_scales,
            counters,
            ..
        } => {
            let dyq = B::fp8_dequantize(&quantize_rows(dy, *pow2_scales, counters.as_deref()));
            dyq.matmul(B::fp8_dequantize_weight(w).reshape([w.rows, w.cols]))
        }
    }
}

/// `dw = xᵀ · dy` (`dy: [M, N]` → `[K, N]`), the weight-gradient GEMM.
pub fn grad_weight<B: DsBackend>(saved: &Saved<B>, dy: Tensor<B, 2>) -> Tensor<B, 2> {
    let float = dy.dtype();
    match saved {
        Saved::Bf16 { x, .. } => x.clone().cast(float).transpose().matmul(B::round_bf16(dy)),
        Saved::Fp8 {
            x,
            pow2_scales,
            counters,
            ..
        } => {
            let c = counters.as_deref();
            // Both operands in tiles along the tokens: quantize the transposes by rows.
            let xt = B::fp8_dequantize(&quantize_rows(
                B::fp8_dequantize(x).transpose(),
                *pow2_scales,
                c,
            ));
            let dyt = B::fp8_dequantize(&quantize_rows(dy.transpose(), *pow2_scales, c));
            xt.matmul(dyt.transpose())
        }
    }
}
