//! The model's element-wise blocks as single operations: RMSNorm, SwiGLU's `silu(gate) · up`,
//! softmax and log-softmax over the last axis. Written as plain tensor operations each is 4–8
//! passes over its rows forward and as many more backward (one autodiff node per operation);
//! as [`DsBackend`] operations Flex runs each in one pass (`flex_fused.rs`) and `Autodiff<B>`
//! records one node whose backward is one more (`autodiff_fused.rs`). The plain forms here are
//! the defaults (what the CubeCL backends run) and the reference the fused ones are tested
//! against.
//!
//! The functions at the top take tensors of any rank and act on the last axis; the backend
//! operations take `[rows, features]`.

use burn::tensor::activation::{
    log_softmax as plain_log_softmax, sigmoid, silu, softmax as plain_softmax,
};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::DsBackend;

/// `[rows, last]` view of a rank-`D` tensor, and its shape to restore.
fn rows<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, 2>, [usize; D]) {
    let dims = x.dims();
    let last = dims[D - 1];
    (
        x.reshape([dims.iter().product::<usize>() / last.max(1), last]),
        dims,
    )
}

/// RMSNorm over the last axis (spec §2; HF `DeepseekV3RMSNorm`): `x · w / sqrt(mean(x²) + ε)`,
/// `w: [last]`. See [`DsBackend::rms_norm`].
pub fn rms_norm<B: DsBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let (x, dims) = rows(x);
    B::rms_norm(x, weight, eps).reshape(dims)
}

/// SwiGLU's gated product `silu(gate) · up` (spec §5; HF `DeepseekV3MLP`), same shapes in and
/// out. See [`DsBackend::swiglu`].
pub fn swiglu<B: DsBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let (gate, dims) = rows(gate);
    B::swiglu(gate, rows(up).0).reshape(dims)
}

/// Softmax over the last axis. See [`DsBackend::softmax_rows`].
pub fn softmax<B: DsBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let (x, dims) = rows(x);
    B::softmax_rows(x).reshape(dims)
}

/// Log-softmax over the last axis (the cross-entropy's). See [`DsBackend::log_softmax_rows`].
pub fn log_softmax<B: DsBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let (x, dims) = rows(x);
    B::log_softmax_rows(x).reshape(dims)
}

// The plain-tensor forms: the backend operations' defaults (what the CubeCL backends run, and
// what `Autodiff` differentiates through without the fused nodes), public as the reference the
// fused forms are tested against.

/// Plain form of [`DsBackend::rms_norm`]: `x [N, D]`, `weight [D]` → `[N, D]`.
pub fn default_rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 2> {
    let ms = x.clone().square().mean_dim(1);
    x * (ms + eps).sqrt().recip() * weight.unsqueeze::<2>()
}

/// Plain form of [`DsBackend::rms_norm_backward`]. With `r = 1/sqrt(mean(x²) + ε)` and
/// `g' = g · w`: `∂x = r · g' − x · r³ · mean(g' · x)`,
/// `∂w = Σ_rows g · x · r`.
pub fn default_rms_norm_backward<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let d = x.dims()[1];
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip(); // [N, 1]
    let gw = grad.clone() * weight.unsqueeze::<2>();
    let dot = (gw.clone() * x.clone()).mean_dim(1); // [N, 1]
    let gx = gw * r.clone() - x.clone() * r.clone().powi_scalar(3) * dot;
    let gweight = (grad * x * r).sum_dim(0).reshape([d]);
    (gx, gweight)
}

/// Plain form of [`DsBackend::swiglu`]: `silu(gate) · up`, `[N, F]`.
pub fn default_swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

/// Plain form of [`DsBackend::swiglu_backward`]. With `s = σ(gate)`: `∂up = g · gate · s`, `∂gate = g · up · s · (1 + gate · (1 − s))`.
pub fn default_swiglu_backward<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let s = sigmoid(gate.clone());
    let gup = grad.clone() * gate.clone() * s.clone();
    let dsilu = s.clone() * (gate * (s.neg() + 1.0) + 1.0);
    (grad * up * dsilu, gup)
}

/// Plain form of [`DsBackend::softmax_rows`] (Burn's softmax over axis 1 of `[N, S]`).
pub fn default_softmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    plain_softmax(x, 1)
}

/// Plain form of [`DsBackend::softmax_rows_backward`]: `∂x = y · (g − Σ g · y)` from the
/// output `y`.
pub fn default_softmax_rows_backward<B: Backend>(
    y: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let dot = (grad.clone() * y.clone()).sum_dim(1);
    y * (grad - dot)
}

/// Plain form of [`DsBackend::log_softmax_rows`] (Burn's log-softmax over axis 1 of `[N, V]`).
pub fn default_log_softmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    plain_log_softmax(x, 1)
}

/// Plain form of [`DsBackend::log_softmax_rows_backward`]: `∂x = g − exp(y) · Σ g` from the
/// output `y` (log-probabilities).
pub fn default_log_softmax_rows_backward<B: Backend>(
    y: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let total = grad.clone().sum_dim(1);
    grad - y.exp() * total
}
