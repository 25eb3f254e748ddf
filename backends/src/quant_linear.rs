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

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::ops::{DsBackend, Fp8Activations, Fp8Weight};
pub use crate::quant::{
    round_bf16, GemmPrecision, QuantCounters, QuantCounts, QuantGemm, FP8_TILE,
};

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
