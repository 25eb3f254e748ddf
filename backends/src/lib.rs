//! Backends for DeepSeek-V3 on Burn.
//!
//! [`DsBackend`] holds the operations that deserve their own kernels (FP8 block-scaled matmul,
//! FP8 activation quantization, MoE dispatch / grouped expert matmul / combine) and the fused
//! element-wise blocks ([`fused`]: RMSNorm, SwiGLU, softmax, log-softmax). Each has a
//! plain-tensor default body; Burn's CubeCL backends (`CubeBackend<WgpuRuntime | CudaRuntime,
//! ..>`, features `wgpu` / `cuda`) run CubeCL kernels for the former, one source for both, Flex
//! runs one-pass host loops for the latter and its decode products, and `Autodiff<B>` gives the
//! fused blocks and the low-precision Linear one node each. [`BackendKind`] and [`on_backend`] select a backend at run time for
//! `--backend` flags, with a probe that reports a missing GPU as one error line.

pub mod attention;
pub mod comm;
pub mod e4m3;
pub mod fused;
mod kind;
mod ops;
mod quant;
pub mod quant_linear;
mod rng;

#[cfg(feature = "cubecl")]
pub mod cube;

pub use kind::{on_backend, BackendError, BackendKind, FloatDtype, OnBackend, UnknownBackend};
pub use ops::{DsBackend, Fp8Activations, Fp8Weight, GroupedWeight, MoeDispatch, ShapeError};
pub use quant::{GemmPrecision, QuantCounters, QuantCounts, QuantGemm};
pub use rng::SplitMix64;

/// The CPU backend used by default (pure Rust, the fastest CPU backend of Burn 0.21 here).
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// wgpu through CubeCL, without Fusion (so the custom kernels run).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// CUDA through CubeCL, without Fusion; `F` is the float dtype (f32, bf16 or f16).
#[cfg(feature = "cuda")]
pub type Cuda<F = f32> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;

mod autodiff_fused;
mod autodiff_quant;
mod flex;
mod flex_attention;
mod flex_fp8;
mod flex_fused;
mod flex_gemm;
mod flex_pool;

/// Flex runs the plain-tensor defaults, except for one-row products (decode) and independent
/// jobs, which use its thread pool (see `flex.rs`, `flex_pool.rs`), the FP8 / bf16 rounding,
/// done on the host in one pass (`flex_fp8.rs`), the fused element-wise blocks
/// (`flex_fused.rs`) and MLA's attention (`flex_attention.rs`).
impl DsBackend for burn::backend::Flex {
    /// Flex runs a product under ~7M multiply-adds on one thread, so decode would read the
    /// weights at one core's speed. A few rows (decode batches, MTP verification): the kernel
    /// in `flex.rs`, which reads each weight once for all rows and splits the columns over the
    /// pool; up to 4 rows of f32 weights and 16 of bf16.
    /// Up to 16 rows of f32 weights otherwise: the columns split over the pool. Many rows
    /// (prefill, training) on two or more threads: row blocks of single-threaded `gemm` calls
    /// as jobs on the pool (`flex_gemm.rs`), the same bits as Flex's matmul.
    fn dense_matmul(
        x: burn::tensor::Tensor<Self, 2>,
        w: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        use rayon::prelude::*;
        let ([m, k], n) = (x.dims(), w.dims()[1]);
        let kernel_rows = if w.dtype() == burn::tensor::DType::BF16 {
            flex::MAX_ROWS
        } else {
            flex::MAX_ROWS_F32
        };
        if m <= kernel_rows {
            if let Some(y) = flex::rows_times_matrix(&x, &w) {
                return y;
            }
        }
        // bf16 weights (and any other mismatch) are widened for the general paths; a transposed
        // view (a weight used where it lies in the file) is widened in its own row order and
        // viewed back, not gathered through its strides (Flex's matmul takes the strided view).
        let w = if w.dtype() == x.dtype() {
            w
        } else if flex::is_transposed(&w) {
            w.transpose().cast(x.dtype()).transpose()
        } else {
            w.cast(x.dtype())
        };
        let threads = flex_pool::threads();
        // Below ~512K weights the pool's wake-up costs more than the second core saves.
        // Many rows: row-block jobs of single-threaded `gemm` calls (`flex_gemm.rs`), which
        // scale over the pool better than `gemm`'s own split. A worker with a share of one
        // thread multiplies on its own thread (Flex's matmul would split a large product over
        // the whole pool).
        if m * k * n >= 192 * 192 * 192 {
            let one_job = threads < 2;
            if let Some(y) = flex_gemm::row_blocked_product(&x, &w, one_job) {
                return y;
            }
        }
        if threads < 2 || m > 16 || k * n < 1 << 19 || m * k * n >= 192 * 192 * 192 {
            return x.matmul(w);
        }
        let chunk = n.div_ceil(threads).next_multiple_of(16);
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        let parts: Vec<_> = starts
            .into_par_iter()
            .map(|a| x.clone().matmul(w.clone().narrow(1, a, chunk.min(n - a))))
            .collect();
        burn::tensor::Tensor::cat(parts, 1)
    }

    fn parallel_jobs() -> usize {
        flex_pool::threads()
    }

    /// The worker's share of the pool: `⌊threads / workers⌋`, at least 1 (`flex_pool.rs`).
    fn as_worker<R>(workers: usize, f: impl FnOnce() -> R) -> R {
        flex_pool::with_share(rayon::current_num_threads() / workers.max(1), f)
    }

    fn concurrent_micro_batches() -> bool {
        true
    }

    fn quantized_linear(
        x: burn::tensor::Tensor<Self, 2>,
        w: burn::tensor::Tensor<Self, 2>,
        gemm: &QuantGemm,
    ) -> burn::tensor::Tensor<Self, 2> {
        quant_linear::forward(x, w, gemm).0
    }

    fn fp8_quantize(
        x: burn::tensor::Tensor<Self, 2>,
        block: usize,
        ue8m0: bool,
    ) -> Fp8Activations<Self> {
        flex_fp8::quantize_rows(x, block, ue8m0).0
    }

    fn fp8_quantize_counted(
        x: burn::tensor::Tensor<Self, 2>,
        block: usize,
        ue8m0: bool,
    ) -> (Fp8Activations<Self>, QuantCounts) {
        flex_fp8::quantize_rows(x, block, ue8m0)
    }

    fn fp8_dequantize(q: &Fp8Activations<Self>) -> burn::tensor::Tensor<Self, 2> {
        flex_fp8::dequantize_rows(q)
    }

    fn fp8_quantize_weight(
        w: burn::tensor::Tensor<Self, 2>,
        block: usize,
        pow2_scales: bool,
        _count: bool,
    ) -> (Fp8Weight<Self>, QuantCounts) {
        assert!(
            block > 0 && block.is_multiple_of(4),
            "FP8 block size must be a positive multiple of 4"
        );
        flex_fp8::quantize_blocks(w, block, pow2_scales)
    }

    fn fp8_dequantize_weight(w: &Fp8Weight<Self>) -> burn::tensor::Tensor<Self, 3> {
        flex_fp8::dequantize_blocks(w)
    }

    fn round_bf16(x: burn::tensor::Tensor<Self, 2>) -> burn::tensor::Tensor<Self, 2> {
        flex_fp8::round_bf16(x)
    }

    fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        flex_pool::map(items, f)
    }

    fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        flex_pool::on_pool(f)
    }

    fn rms_norm(
        x: burn::tensor::Tensor<Self, 2>,
        weight: burn::tensor::Tensor<Self, 1>,
        eps: f64,
    ) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::rms_norm(x.clone(), weight.clone(), eps)
            .unwrap_or_else(|| fused::default_rms_norm(x, weight, eps))
    }

    fn rms_norm_backward(
        x: burn::tensor::Tensor<Self, 2>,
        weight: burn::tensor::Tensor<Self, 1>,
        eps: f64,
        grad: burn::tensor::Tensor<Self, 2>,
    ) -> (burn::tensor::Tensor<Self, 2>, burn::tensor::Tensor<Self, 1>) {
        flex_fused::rms_norm_backward(x.clone(), weight.clone(), eps, grad.clone())
            .unwrap_or_else(|| fused::default_rms_norm_backward(x, weight, eps, grad))
    }

    fn swiglu(
        gate: burn::tensor::Tensor<Self, 2>,
        up: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::swiglu(gate.clone(), up.clone())
            .unwrap_or_else(|| fused::default_swiglu(gate, up))
    }

    fn swiglu_backward(
        gate: burn::tensor::Tensor<Self, 2>,
        up: burn::tensor::Tensor<Self, 2>,
        grad: burn::tensor::Tensor<Self, 2>,
    ) -> (burn::tensor::Tensor<Self, 2>, burn::tensor::Tensor<Self, 2>) {
        flex_fused::swiglu_backward(gate.clone(), up.clone(), grad.clone())
            .unwrap_or_else(|| fused::default_swiglu_backward(gate, up, grad))
    }

    fn softmax_rows(x: burn::tensor::Tensor<Self, 2>) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::softmax_rows(x.clone()).unwrap_or_else(|| fused::default_softmax_rows(x))
    }

    fn softmax_rows_backward(
        y: burn::tensor::Tensor<Self, 2>,
        grad: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::softmax_rows_backward(y.clone(), grad.clone())
            .unwrap_or_else(|| fused::default_softmax_rows_backward(y, grad))
    }

    fn log_softmax_rows(x: burn::tensor::Tensor<Self, 2>) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::log_softmax_rows(x.clone())
            .unwrap_or_else(|| fused::default_log_softmax_rows(x))
    }

    fn log_softmax_rows_backward(
        y: burn::tensor::Tensor<Self, 2>,
        grad: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        flex_fused::log_softmax_rows_backward(y.clone(), grad.clone())
            .unwrap_or_else(|| fused::default_log_softmax_rows_backward(y, grad))
    }

    /// One job per (sequence, head) reading the operands in place (`flex_attention.rs`).
    fn mla_attention(
        x: &attention::MlaAttention<Self>,
        mask: Option<&burn::tensor::Tensor<Self, 4>>,
    ) -> burn::tensor::Tensor<Self, 4> {
        match flex_attention::mla_attention(x, mask, false) {
            Some((y, _)) => y,
            None => attention::default_mla_attention_probs(x, mask).0,
        }
    }

    fn mla_attention_probs(
        x: &attention::MlaAttention<Self>,
        mask: Option<&burn::tensor::Tensor<Self, 4>>,
    ) -> (burn::tensor::Tensor<Self, 4>, burn::tensor::Tensor<Self, 4>) {
        match flex_attention::mla_attention(x, mask, true) {
            Some((y, Some(p))) => (y, p),
            _ => attention::default_mla_attention_probs(x, mask),
        }
    }

    fn mla_attention_backward(
        x: &attention::MlaAttention<Self>,
        probs: burn::tensor::Tensor<Self, 4>,
        grad: burn::tensor::Tensor<Self, 4>,
    ) -> attention::MlaAttentionGrads<Self> {
        flex_attention::mla_attention_backward(x, probs.clone(), grad.clone())
            .unwrap_or_else(|| attention::default_mla_attention_backward(x, probs, grad))
    }
}

/// Under autodiff the defaults are differentiated through; the inner backend's kernels are not
/// used (no backward is written for them), except the expert exchange, whose backward is the
/// reverse exchange, the low-precision Linear, whose backward runs its two gradient GEMMs
/// in the same format on the inner backend (`autodiff_quant.rs`), the float Linear's
/// `dense_matmul`, and the fused element-wise operations (RMSNorm, SwiGLU, softmax,
/// log-softmax), each one node whose forward and backward are the inner backend's
/// (`autodiff_fused.rs`).
impl<B: DsBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> DsBackend
    for burn::backend::Autodiff<B, C>
{
    fn all_to_all_rows(
        x: burn::tensor::Tensor<Self, 2>,
        ex: &comm::RowExchange,
    ) -> Result<burn::tensor::Tensor<Self, 2>, comm::CommError> {
        use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
        use burn::tensor::{Tensor, TensorPrimitive};

        /// The exchange's backward: every rank sends each row's gradient back to where the row
        /// came from. Ranks run their backward passes in the same layer order (the tape runs by
        /// depth), so the collectives pair up; a mismatch panics (a backward cannot return).
        #[derive(Debug)]
        struct Exchange;
        impl<B: DsBackend> Backward<B, 1> for Exchange {
            type State = comm::RowExchange;
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut burn::backend::autodiff::grads::Gradients,
                _: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
            ) {
                let Ops {
                    parents,
                    node,
                    state,
                } = ops;
                let back = state.reversed();
                unary::<B, _>(parents, node, grads, |g| {
                    let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(g));
                    B::all_to_all_rows(g, &back)
                        .unwrap_or_else(|e| panic!("backward of the expert exchange: {e}"))
                        .into_primitive()
                        .tensor()
                });
            }
        }
        let x = x.into_primitive().tensor();
        let inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let out = B::all_to_all_rows(inner, ex)?.into_primitive().tensor();
        let out = match Exchange
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(ex.clone(), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn quantized_linear(
        x: burn::tensor::Tensor<Self, 2>,
        w: burn::tensor::Tensor<Self, 2>,
        gemm: &QuantGemm,
    ) -> burn::tensor::Tensor<Self, 2> {
        autodiff_quant::quantized_linear::<B, C>(x, w, gemm)
    }

    fn concurrent_micro_batches() -> bool {
        B::concurrent_micro_batches()
    }

    fn as_worker<R>(workers: usize, f: impl FnOnce() -> R) -> R {
        B::as_worker(workers, f)
    }

    /// One node whose forward and both gradient products are the inner backend's
    /// `dense_matmul` (`autodiff_fused.rs`); a weight of another dtype (bf16 storage) is
    /// widened and differentiated through the plain product.
    fn dense_matmul(
        x: burn::tensor::Tensor<Self, 2>,
        w: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        if w.dtype() != x.dtype() {
            let w = w.cast(x.dtype());
            return x.matmul(w);
        }
        autodiff_fused::dense_matmul::<B, C>(x, w)
    }

    fn rms_norm(
        x: burn::tensor::Tensor<Self, 2>,
        weight: burn::tensor::Tensor<Self, 1>,
        eps: f64,
    ) -> burn::tensor::Tensor<Self, 2> {
        autodiff_fused::rms_norm::<B, C>(x, weight, eps)
    }

    fn swiglu(
        gate: burn::tensor::Tensor<Self, 2>,
        up: burn::tensor::Tensor<Self, 2>,
    ) -> burn::tensor::Tensor<Self, 2> {
        autodiff_fused::swiglu::<B, C>(gate, up)
    }

    fn softmax_rows(x: burn::tensor::Tensor<Self, 2>) -> burn::tensor::Tensor<Self, 2> {
        autodiff_fused::softmax_rows::<B, C>(x, false)
    }

    fn log_softmax_rows(x: burn::tensor::Tensor<Self, 2>) -> burn::tensor::Tensor<Self, 2> {
        autodiff_fused::softmax_rows::<B, C>(x, true)
    }

    /// One node whose forward keeps the probabilities and whose backward is the inner
    /// backend's `mla_attention_backward` (`autodiff_fused.rs`).
    fn mla_attention(
        x: &attention::MlaAttention<Self>,
        mask: Option<&burn::tensor::Tensor<Self, 4>>,
    ) -> burn::tensor::Tensor<Self, 4> {
        autodiff_fused::mla_attention::<B, C>(x, mask)
    }
}

/// An autodiff backend whose inner backend is also a [`DsBackend`] (what training needs:
/// `B::InnerBackend` runs evaluation and sampling).
pub trait DsAutodiffBackend:
    DsBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: DsBackend>
{
}

impl<B> DsAutodiffBackend for B where
    B: DsBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: DsBackend>
{
}
