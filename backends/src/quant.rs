//! What the low-precision training GEMMs share with the backend's operations (plain tensor
//! code, no backend extension): the GEMM format of a Linear layer, the FP8 event counters and
//! how they are counted, and exact bf16 rounding (DeepSeek-V3 report §3.3). The GEMMs
//! themselves and their backward are in `quant_linear.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

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

/// `floor(log2 x)` for positive normal `x`, exact: a float log estimate corrected by comparing
/// with exact powers of two.
pub(crate) fn floor_log2<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let e = (x.clone().log() / std::f64::consts::LN_2).floor();
    let p = pow2(e.clone());
    let too_big = x.clone().lower(p.clone());
    let too_small = x.greater_equal(p * 2.0);
    e - too_big.float() + too_small.float()
}

pub(crate) fn pow2<B: Backend, const D: usize>(e: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::full(e.shape(), 2.0, &e.device()).powf(e)
}
