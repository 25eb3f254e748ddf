//! [`DsBackend`]: the operations of DeepSeek-V3 that deserve their own kernels, each with a
//! default body in plain Burn tensor operations that every backend can run (and differentiate,
//! under `Autodiff`). The CubeCL backends override the FP8 and MoE ones (see `cube/`), Flex the
//! fused element-wise ones (`flex_fused.rs`) and MLA's attention (`flex_attention.rs`); the
//! defaults are also the reference the kernels are tested against.
//!
//! Layouts (all row-major):
//! - FP8 weights ([`Fp8Weight`]): `E` matrices `W_e [N, K]` (the checkpoint's `[out, in]`), codes
//!   packed four to a 32-bit int along `K` (`[E, N, ceil(K/4)]`), scales `[E, ceil(N/b),
//!   ceil(K/b)]` with `W[n, k] = e4m3(code) · scale[n/b, k/b]`; partial edge blocks allowed.
//! - Grouped (MoE) rows: the `S = T·k` (token, slot) pairs sorted by expert, stable in slot order
//!   ([`MoeDispatch`]); rows of expert `e` are `offsets[e]..offsets[e+1]`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::attention::{self, MlaAttention, MlaAttentionGrads};
use crate::comm::{CommError, RowExchange};
use crate::e4m3;
use crate::fused;
use crate::quant::{floor_log2, pow2, QuantCounts, QuantGemm};

/// FP8 e4m3 weights with block scales, as kept in device memory (about 1 byte per weight).
#[derive(Module, Debug)]
pub struct Fp8Weight<B: Backend> {
    /// `[E, N, ceil(K/4)]` packed codes (column `k` in byte `k % 4` of word `k / 4`).
    pub codes: Tensor<B, 3, Int>,
    /// `[E, ceil(N/block), ceil(K/block)]` dequantization multipliers (`weight_scale_inv`).
    pub scales: Tensor<B, 3>,
    /// `N`: output features (rows of each matrix).
    pub rows: usize,
    /// `K`: input features (columns of each matrix).
    pub cols: usize,
    /// `b`: side of the square scale blocks (DeepSeek-V3: 128); a positive multiple of 4.
    pub block: usize,
}

/// A shape or size that an operation cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

impl<B: Backend> Fp8Weight<B> {
    /// Builds `E` matrices from their codes (`E·N·K` bytes, row-major) and scales
    /// (`E·ceil(N/b)·ceil(K/b)` values).
    ///
    /// # Errors
    /// [`ShapeError`] when `block` is not a positive multiple of 4, or `codes`/`scales` do not
    /// hold exactly the lengths above for `shape = [E, N, K]`.
    pub fn from_codes(
        codes: &[u8],
        scales: &[f32],
        shape: [usize; 3],
        block: usize,
        device: &B::Device,
    ) -> Result<Self, ShapeError> {
        let [e, n, k] = shape;
        if block == 0 || !block.is_multiple_of(4) {
            return Err(ShapeError(format!(
                "FP8 block size must be a positive multiple of 4, got {block}"
            )));
        }
        if codes.len() != e * n * k {
            return Err(ShapeError(format!(
                "FP8 codes: expected {e}x{n}x{k} = {} bytes, found {}",
                e * n * k,
                codes.len()
            )));
        }
        let (nb, kb) = (n.div_ceil(block), k.div_ceil(block));
        if scales.len() != e * nb * kb {
            return Err(ShapeError(format!(
                "FP8 scales: expected {e}x{nb}x{kb} = {} values, found {}",
                e * nb * kb,
                scales.len()
            )));
        }
        let words = e4m3::pack(codes, e * n, k);
        Ok(Self {
            codes: Tensor::from_data(TensorData::new(words, [e, n, k.div_ceil(4)]), device),
            scales: Tensor::from_data(TensorData::new(scales.to_vec(), [e, nb, kb]), device),
            rows: n,
            cols: k,
            block,
        })
    }

    pub fn experts(&self) -> usize {
        self.codes.dims()[0]
    }

    /// Bytes held on the device (codes and scales, at their storage dtypes).
    pub fn bytes(&self) -> usize {
        self.codes.shape().num_elements() * self.codes.dtype().size()
            + self.scales.shape().num_elements() * self.scales.dtype().size()
    }

    /// Matrices `first..first+count` only.
    pub fn narrow(&self, first: usize, count: usize) -> Self {
        Self {
            codes: self.codes.clone().narrow(0, first, count),
            scales: self.scales.clone().narrow(0, first, count),
            rows: self.rows,
            cols: self.cols,
            block: self.block,
        }
    }

    /// Stacks weights of equal shape along the expert axis.
    ///
    /// # Errors
    /// [`ShapeError`] when `parts` is empty or the parts differ in `rows`, `cols` or `block`.
    pub fn cat(parts: Vec<Self>) -> Result<Self, ShapeError> {
        let first = parts
            .first()
            .ok_or_else(|| ShapeError("cannot stack zero FP8 weights".into()))?;
        let (rows, cols, block) = (first.rows, first.cols, first.block);
        if parts
            .iter()
            .any(|p| (p.rows, p.cols, p.block) != (rows, cols, block))
        {
            return Err(ShapeError(
                "FP8 weights of different shapes cannot be stacked".into(),
            ));
        }
        let (codes, scales) = parts.into_iter().map(|p| (p.codes, p.scales)).unzip();
        Ok(Self {
            codes: Tensor::cat(codes, 0),
            scales: Tensor::cat(scales, 0),
            rows,
            cols,
            block,
        })
    }

    /// `[E, N, K]` float weights, exactly `f32(e4m3) × scale` (plain tensor operations).
    pub fn dequantize(&self) -> Tensor<B, 3> {
        let [_, n, _] = self.codes.dims();
        let (k, b) = (self.cols, self.block);
        let device = self.codes.device();
        let values = self.decode();
        // Each element's block scale, gathered (row block, then column block): no copy of the
        // padded block grid.
        let scales = self
            .scales
            .clone()
            .select(1, block_index::<B>(n, b, &device))
            .select(2, block_index::<B>(k, b, &device));
        values * scales
    }

    /// `[E, N, K]` e4m3 values of the codes (unscaled), by table lookup.
    fn decode(&self) -> Tensor<B, 3> {
        let [e, n, kw] = self.codes.dims();
        let k = self.cols;
        let device = self.codes.device();
        let bytes: Vec<Tensor<B, 4, Int>> = (0..4)
            .map(|j| {
                self.codes
                    .clone()
                    .bitwise_right_shift_scalar((8 * j).elem())
                    .bitwise_and_scalar(0xFF.elem())
                    .unsqueeze_dim(3)
            })
            .collect();
        let codes = Tensor::cat(bytes, 3)
            .reshape([e, n, kw * 4])
            .narrow(2, 0, k)
            .reshape([e * n * k]);
        let table =
            Tensor::<B, 1>::from_data(TensorData::new(e4m3::TABLE.to_vec(), [256]), &device);
        table.select(0, codes).reshape([e, n, k])
    }

    /// Quantizes one float matrix `w: [N, K]` (the `[out, in]` layout) in `block × block`
    /// blocks as DeepSeek-V3's weights are (spec §8; report §3.3.2): per block `scale =
    /// max(amax, 1e-4) / 448` (a power of two, rounded up, with `pow2_scales`), `code =
    /// e4m3(w / scale)`, round to nearest even. Partial edge blocks use their real elements
    /// only. Plain tensor operations, on the device.
    ///
    /// # Errors
    /// [`ShapeError`] when `block` is not a positive multiple of 4.
    pub fn quantize(w: Tensor<B, 2>, block: usize, pow2_scales: bool) -> Result<Self, ShapeError> {
        if block == 0 || !block.is_multiple_of(4) {
            return Err(ShapeError(format!(
                "FP8 block size must be a positive multiple of 4, got {block}"
            )));
        }
        let [n, k] = w.dims();
        let (nb, kb) = (n.div_ceil(block), k.div_ceil(block));
        let device = w.device();
        let mut padded = w;
        if nb * block > n {
            padded = Tensor::cat(vec![padded, Tensor::zeros([nb * block - n, k], &device)], 0);
        }
        if kb * block > k {
            padded = Tensor::cat(
                vec![padded, Tensor::zeros([nb * block, kb * block - k], &device)],
                1,
            );
        }
        let blocks = padded.reshape([nb, block, kb, block]);
        let amax = blocks.clone().abs().max_dim(3).max_dim(1); // [nb, 1, kb, 1]
        let scale = fp8_scale(amax, pow2_scales);
        let v = (blocks / scale.clone()).reshape([nb * block, kb * block]);
        let codes = encode_packed(v)
            .narrow(0, 0, n)
            .narrow(1, 0, k.div_ceil(4))
            .reshape([1, n, k.div_ceil(4)]);
        Ok(Self {
            codes,
            scales: scale.reshape([1, nb, kb]),
            rows: n,
            cols: k,
            block,
        })
    }
}

/// Activations quantized to FP8 in `1×block` tiles along the row.
#[derive(Debug, Clone)]
pub struct Fp8Activations<B: Backend> {
    /// `[M, ceil(K/4)]` packed codes.
    pub codes: Tensor<B, 2, Int>,
    /// `[M, ceil(K/block)]` per-tile scales (`x ≈ code · scale`).
    pub scales: Tensor<B, 2>,
    pub cols: usize,
    pub block: usize,
}

impl<B: Backend> Fp8Activations<B> {
    /// `[M, K]` float values `f32(code) · scale` (plain tensor operations).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [m, kw] = self.codes.dims();
        let w = Fp8Weight {
            codes: self.codes.clone().reshape([1, m, kw]),
            // One "block row" per row: each row's tile scales apply to that row only.
            scales: self.scales.clone().reshape([1, m, self.scales.dims()[1]]),
            rows: m,
            cols: self.cols,
            block: self.block,
        };
        let device = self.codes.device();
        let values = w.decode();
        let scales = w
            .scales
            .select(2, block_index::<B>(self.cols, self.block, &device));
        (values * scales).reshape([m, self.cols])
    }
}

/// `[i / block for i in 0..len]`: the block of each index along an axis.
fn block_index<B: Backend>(len: usize, block: usize, device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i32> = (0..len).map(|i| (i / block) as i32).collect();
    Tensor::from_data(TensorData::new(v, [len]), device)
}

/// Expert weights for a grouped matmul: `E` matrices, float or FP8.
#[derive(Module, Debug)]
pub struct GroupedWeight<B: Backend> {
    /// `[E, K, N]` (Burn's `[in, out]` Linear layout per expert).
    pub dense: Option<Tensor<B, 3>>,
    /// FP8 codes and scales, `[E, N, K]` logical layout.
    pub fp8: Option<Fp8Weight<B>>,
}

impl<B: Backend> GroupedWeight<B> {
    pub fn dense(w: Tensor<B, 3>) -> Self {
        Self {
            dense: Some(w),
            fp8: None,
        }
    }
    pub fn fp8(w: Fp8Weight<B>) -> Self {
        Self {
            dense: None,
            fp8: Some(w),
        }
    }
    /// `(E, K, N)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        match (&self.dense, &self.fp8) {
            (Some(d), _) => {
                let [e, k, n] = d.dims();
                (e, k, n)
            }
            (None, Some(f)) => (f.experts(), f.cols, f.rows),
            (None, None) => (0, 0, 0),
        }
    }
    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match (&self.dense, &self.fp8) {
            (Some(d), _) => d.shape().num_elements() * d.dtype().size(),
            (None, Some(f)) => f.bytes(),
            (None, None) => 0,
        }
    }
    /// Expert `e`'s matrix as `[K, N]` floats (dequantized if FP8).
    pub fn expert_in_out(&self, e: usize) -> Tensor<B, 2> {
        match (&self.dense, &self.fp8) {
            (Some(d), _) => {
                let [_, k, n] = d.dims();
                d.clone().narrow(0, e, 1).reshape([k, n])
            }
            (None, Some(f)) => f
                .narrow(e, 1)
                .dequantize()
                .reshape([f.rows, f.cols])
                .transpose(),
            (None, None) => unreachable!("GroupedWeight holds dense or FP8 weights"),
        }
    }
}

/// Where each (token, slot) pair goes in the expert-sorted order. `S = tokens · k`; slot `s`
/// belongs to token `s / k`.
#[derive(Debug, Clone)]
pub struct MoeDispatch<B: Backend> {
    /// `[S]`: the slot at each sorted position (sorted by expert, then slot).
    pub order: Tensor<B, 1, Int>,
    /// `[S]`: the token of each sorted position (`order / k`).
    pub tokens: Tensor<B, 1, Int>,
    /// `[S]`: the expert of each sorted position.
    pub experts: Tensor<B, 1, Int>,
    /// `[S]`: the sorted position of each slot (inverse of `order`).
    pub position: Tensor<B, 1, Int>,
    /// `[E + 1]`: rows of expert `e` are `offsets[e]..offsets[e+1]`.
    pub offsets: Tensor<B, 1, Int>,
    pub num_experts: usize,
    pub k: usize,
}

/// A Burn backend the model runs on, with the operations that have kernels.
///
/// Implemented for Flex and `Autodiff<B>` (the defaults) and, with the `wgpu`/`cuda` features,
/// for every `CubeBackend` (the CubeCL kernels).
pub trait DsBackend: Backend {
    /// `x [M, K] · w [K, N]`: the product behind every float Linear layer. A hook for backends
    /// whose matmul leaves cores idle on thin products (decode multiplies one row per token).
    /// `w` may be stored narrower than `x` (bf16 weights): it is widened for the product.
    fn dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let w = if w.dtype() == x.dtype() {
            w
        } else {
            w.cast(x.dtype())
        };
        x.matmul(w)
    }

    /// The expert-parallel all-to-all of rows (dispatch, and combine as its reverse):
    /// `x [Σ ex.send_rows, H]`, rows sorted by destination rank, becomes the
    /// `[Σ ex.recv_rows, H]` rows this rank receives, in source-rank order. The default goes
    /// through host memory in f32 (MPI's path); under `Autodiff` the gradient is the reverse
    /// exchange of the output's gradient.
    ///
    /// # Errors
    /// What the communicator returns ([`CommError`]), e.g. counts that do not match `x`.
    fn all_to_all_rows(x: Tensor<Self, 2>, ex: &RowExchange) -> Result<Tensor<Self, 2>, CommError> {
        let [rows, h] = x.dims();
        if rows != ex.send_rows.iter().sum::<usize>() {
            return Err(CommError::Invalid {
                op: "all_to_all_rows",
                detail: format!("{rows} rows but the exchange sends {:?}", ex.send_rows),
            });
        }
        let (dtype, device) = (x.dtype(), x.device());
        let v: Vec<f32> =
            x.into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| CommError::Invalid {
                    op: "all_to_all_rows",
                    detail: format!("{e:?}"),
                })?;
        let out = ex.run(&v, h)?;
        let recv = ex.recv_rows.iter().sum::<usize>();
        let y = Tensor::<Self, 2>::from_data(TensorData::new(out, [recv, h]), &device);
        Ok(if y.dtype() == dtype { y } else { y.cast(dtype) })
    }

    /// How many [`Self::par_map`] jobs run at once (1: in order). Code may split work into
    /// that many pieces where splitting costs extra operations (e.g. attention over long
    /// contexts), and keep it whole where jobs would only run one after another.
    fn parallel_jobs() -> usize {
        1
    }

    /// Whether a training step may compute independent micro-batches in parallel host threads
    /// (each its own autodiff graph; `TrainConfig::workers`). A CPU backend gains from it (most
    /// of a small model's ops run on one core each); a GPU runs them one after another on one
    /// device anyway, and each thread adds streams and memory pools of its own (on CUDA, two
    /// workers exhausted 141 GB by step ~31 of the `small` preset; one stays at ~5 GB).
    fn concurrent_micro_batches() -> bool {
        false
    }

    /// Runs `f` as one of `workers` concurrent micro-batch workers
    /// ([`Self::concurrent_micro_batches`]), on the worker's own thread. A CPU backend gives
    /// it its share of the thread pool, so that the workers do not contend for the same
    /// threads; the default runs `f` as it is.
    fn as_worker<R>(workers: usize, f: impl FnOnce() -> R) -> R {
        let _ = workers;
        f()
    }

    /// Runs `f` on a thread of the backend's CPU thread pool and returns its result. The jobs
    /// `f` hands out then start from a pool thread, which runs its share itself and wakes a
    /// sibling only if one sleeps; from any other thread each batch of jobs wakes the pool and
    /// puts the caller to sleep until they finish (a decode step of the `small` preset hands out
    /// about ten). Inference sessions run each forward through it. The default runs `f` as it
    /// is; so does a CPU backend with one thread or when already on its pool.
    fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// `items.map(f)`, for independent pieces of work (e.g. the experts of one MoE layer). The
    /// default runs them in order; a CPU backend may run them on its thread pool, which is how
    /// decode reads several small expert matrices at once.
    fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        items.into_iter().map(f).collect()
    }

    /// `x [M, K] · W_0ᵀ → [M, N]` for FP8 weights `w` (one matrix), dequantized on the fly.
    /// Only matrix 0 of `w` is used.
    fn fp8_matmul(x: Tensor<Self, 2>, w: &Fp8Weight<Self>) -> Tensor<Self, 2> {
        let (n, k) = (w.rows, w.cols);
        let wt = Self::fp8_dequantize_weight(&w.narrow(0, 1))
            .reshape([n, k])
            .transpose();
        x.matmul(wt)
    }

    /// `x [M, K] · w [K, N] → [M, N]` in a low-precision format: the training GEMMs of a
    /// Linear layer in bf16 or FP8 (DeepSeek-V3 report §3.3; `quant_linear.rs`). Flex and the
    /// CubeCL backends run the forward GEMM (`quant_linear::forward`); under `Autodiff` the
    /// backward runs the input-gradient and weight-gradient GEMMs in the same format.
    fn quantized_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        gemm: &QuantGemm,
    ) -> Tensor<Self, 2>;

    /// [`Self::fp8_quantize`], also counting what the rounding did ([`QuantCounts`]: values,
    /// underflows, overflows, tiles, tiles whose amax is below the 1e-4 floor).
    fn fp8_quantize_counted(
        x: Tensor<Self, 2>,
        block: usize,
        ue8m0: bool,
    ) -> (Fp8Activations<Self>, QuantCounts) {
        let q = Self::fp8_quantize(x.clone(), block, ue8m0);
        let counts = crate::quant::count_rows(&x, &Self::fp8_dequantize(&q), block);
        (q, counts)
    }

    /// `[M, K]` float values of quantized activations, `f32(code) · scale`.
    fn fp8_dequantize(q: &Fp8Activations<Self>) -> Tensor<Self, 2> {
        q.dequantize()
    }

    /// One float matrix `w: [N, K]` quantized in `block × block` blocks
    /// ([`Fp8Weight::quantize`]), with its counts when `count` (else zeros).
    ///
    /// # Panics
    /// If `block` is not a positive multiple of 4.
    fn fp8_quantize_weight(
        w: Tensor<Self, 2>,
        block: usize,
        pow2_scales: bool,
        count: bool,
    ) -> (Fp8Weight<Self>, QuantCounts) {
        let q = Fp8Weight::quantize(w.clone(), block, pow2_scales)
            .expect("FP8 block size must be a positive multiple of 4");
        let counts = if count {
            crate::quant::count_blocks(&w, &Self::fp8_dequantize_weight(&q), block)
        } else {
            QuantCounts::default()
        };
        (q, counts)
    }

    /// `[E, N, K]` float values of FP8 weights ([`Fp8Weight::dequantize`]).
    fn fp8_dequantize_weight(w: &Fp8Weight<Self>) -> Tensor<Self, 3> {
        w.dequantize()
    }

    /// `x` rounded to the nearest bf16 value (ties to even), in `x`'s dtype.
    fn round_bf16(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        crate::quant::round_bf16(x)
    }

    /// RMSNorm of each row of `x [N, D]` (spec §2): `x · w / sqrt(mean(x²) + ε)`, `w: [D]`.
    /// The model calls it through [`crate::fused::rms_norm`] (any rank).
    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        fused::default_rms_norm(x, weight, eps)
    }

    /// Gradients `(∂x [N, D], ∂w [D])` of [`DsBackend::rms_norm`] for the output gradient `grad`.
    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        fused::default_rms_norm_backward(x, weight, eps, grad)
    }

    /// SwiGLU's `silu(gate) · up`, `[N, F]` (spec §5).
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::default_swiglu(gate, up)
    }

    /// Gradients `(∂gate, ∂up)` of [`DsBackend::swiglu`] for the output gradient `grad`.
    fn swiglu_backward(
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        fused::default_swiglu_backward(gate, up, grad)
    }

    /// Softmax of each row of `x [N, S]` (attention's probabilities).
    fn softmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::default_softmax_rows(x)
    }

    /// `∂x` of [`DsBackend::softmax_rows`] from its output `y` and the output gradient `grad`.
    fn softmax_rows_backward(y: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::default_softmax_rows_backward(y, grad)
    }

    /// Log-softmax of each row of `x [N, V]` (the cross-entropy's log-probabilities).
    fn log_softmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::default_log_softmax_rows(x)
    }

    /// `∂x` of [`DsBackend::log_softmax_rows`] from its output `y` and the output gradient.
    fn log_softmax_rows_backward(y: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::default_log_softmax_rows_backward(y, grad)
    }

    /// MLA's attention with per-head keys ([`MlaAttention`]: per sequence and head,
    /// `softmax(scale · (q_nope·k_nopeᵀ + q_pe·k_peᵀ) + mask) · v`), the form prompts and
    /// training use. `mask: [B|1, 1, T, S]` is added to the scaled scores (0 or −∞). Returns
    /// `[B, T, H, dv]`, the layout `o_proj` reads.
    fn mla_attention(x: &MlaAttention<Self>, mask: Option<&Tensor<Self, 4>>) -> Tensor<Self, 4> {
        Self::mla_attention_probs(x, mask).0
    }

    /// [`Self::mla_attention`] also returning the probabilities `P: [B, H, T, S]` (what the
    /// backward needs).
    fn mla_attention_probs(
        x: &MlaAttention<Self>,
        mask: Option<&Tensor<Self, 4>>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        attention::default_mla_attention_probs(x, mask)
    }

    /// Gradients of [`Self::mla_attention`]'s operands from its probabilities and the output
    /// gradient `grad: [B, T, H, dv]` ([`attention::default_mla_attention_backward`]).
    fn mla_attention_backward(
        x: &MlaAttention<Self>,
        probs: Tensor<Self, 4>,
        grad: Tensor<Self, 4>,
    ) -> MlaAttentionGrads<Self> {
        attention::default_mla_attention_backward(x, probs, grad)
    }

    /// Quantizes `x [M, K]` to e4m3 in `1×block` tiles: `amax = max(max|x_tile|, 1e-4)`,
    /// `scale = amax / 448` (rounded up to a power of two with `ue8m0`), `code = e4m3(x/scale)`
    /// (round to nearest even, saturating). Partial last tiles use their real elements only.
    fn fp8_quantize(x: Tensor<Self, 2>, block: usize, ue8m0: bool) -> Fp8Activations<Self> {
        default_fp8_quantize(x, block, ue8m0)
    }

    /// Sorts the (token, slot) pairs of `ids: [T, k]` (expert ids `< num_experts`) by expert.
    fn moe_dispatch(ids: Tensor<Self, 2, Int>, num_experts: usize) -> MoeDispatch<Self> {
        default_moe_dispatch(ids, num_experts)
    }

    /// `x [S, K]` (rows in dispatch order) times each row's expert matrix → `[S, N]`.
    ///
    /// The default reads the `E + 1` offsets to the host and runs one matmul per non-empty
    /// expert: fine on a CPU backend, where the host is the device.
    fn grouped_matmul(
        x: Tensor<Self, 2>,
        w: &GroupedWeight<Self>,
        dispatch: &MoeDispatch<Self>,
    ) -> Tensor<Self, 2> {
        default_grouped_matmul(x, w, dispatch)
    }

    /// `base [T, H] + Σ_j weights[t, j] · y[position[t·k + j]]` (the sum over `j` in slot order,
    /// then added to `base`).
    fn moe_combine(
        y: Tensor<Self, 2>,
        dispatch: &MoeDispatch<Self>,
        weights: Tensor<Self, 2>,
        base: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        default_moe_combine(y, dispatch, weights, base)
    }
}

fn default_fp8_quantize<B: Backend>(
    x: Tensor<B, 2>,
    block: usize,
    ue8m0: bool,
) -> Fp8Activations<B> {
    let [m, k] = x.dims();
    let device = x.device();
    let t = k.div_ceil(block);
    let padded = if t * block > k {
        Tensor::cat(vec![x, Tensor::zeros([m, t * block - k], &device)], 1)
    } else {
        x
    };
    let tiles = padded.reshape([m, t, block]);
    let scale = fp8_scale(tiles.clone().abs().max_dim(2), ue8m0); // [m, t, 1]
    let packed = encode_packed((tiles / scale.clone()).reshape([m, t * block]));
    Fp8Activations {
        codes: packed.narrow(1, 0, k.div_ceil(4)),
        scales: scale.reshape([m, t]),
        cols: k,
        block,
    }
}

/// The dequantization multiplier of a tile or block from its `amax`:
/// `max(amax, 1e-4) / 448`, rounded up to a power of two with `ue8m0`.
pub(crate) fn fp8_scale<B: Backend, const D: usize>(
    amax: Tensor<B, D>,
    ue8m0: bool,
) -> Tensor<B, D> {
    let scale = amax.clamp_min(1e-4) / e4m3::MAX;
    if ue8m0 {
        pow2(floor_log2(scale.clone()) + 1.0).mask_where(is_pow2(scale.clone()), scale)
    } else {
        scale
    }
}

/// e4m3 codes (round to nearest even, saturating at ±448) of `v: [rows, cols]` (values already
/// divided by their scale; `cols` a multiple of 4), packed four to a word: `[rows, cols/4]`.
pub(crate) fn encode_packed<B: Backend>(v: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    let [m, cols] = v.dims();
    let a = v.clone().abs().clamp_max(e4m3::MAX);
    // e = max(floor(log2 a), -6); r = rne(a / 2^(e-3)); code = (e+7)·8 + r − 8.
    let e = floor_log2(a.clone().clamp_min(1e-30)).clamp_min(-6.0);
    let r = (a / pow2(e.clone() - 3.0)).round();
    let code = (e + 7.0) * 8.0 + r - 8.0;
    let code = code.int() + v.lower_elem(0.0).int() * 0x80;
    // Pack bytes into 32-bit words.
    let words = cols / 4;
    let bytes = code.reshape([m, words, 4]);
    let mut packed = bytes.clone().narrow(2, 0, 1);
    for j in 1..4 {
        packed = packed.bitwise_or(
            bytes
                .clone()
                .narrow(2, j, 1)
                .bitwise_left_shift_scalar(((8 * j) as i32).elem()),
        );
    }
    packed.reshape([m, words])
}

fn is_pow2<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D, burn::tensor::Bool> {
    let p = pow2(floor_log2(x.clone()));
    x.equal(p)
}

fn default_moe_dispatch<B: Backend>(ids: Tensor<B, 2, Int>, num_experts: usize) -> MoeDispatch<B> {
    let [t, k] = ids.dims();
    let s = t * k;
    let device = ids.device();
    let flat = ids.reshape([s]);
    let slots = Tensor::<B, 1, Int>::arange(0..s as i64, &device);
    // Unique keys (expert, slot): sorting them is a stable sort by expert.
    let key = flat.clone() * (s as i32) + slots.clone();
    let sorted = key.sort(0);
    let order = sorted.clone().remainder_scalar(s as i32);
    let experts = sorted.div_scalar(s as i32);
    let counts = Tensor::<B, 1, Int>::zeros([num_experts], &device).scatter(
        0,
        flat,
        Tensor::ones([s], &device),
        IndexingUpdateOp::Add,
    );
    let offsets = Tensor::cat(
        vec![Tensor::<B, 1, Int>::zeros([1], &device), counts.cumsum(0)],
        0,
    );
    let position = Tensor::<B, 1, Int>::zeros([s], &device).scatter(
        0,
        order.clone(),
        slots,
        IndexingUpdateOp::Add,
    );
    MoeDispatch {
        tokens: order.clone().div_scalar(k as i32),
        order,
        experts,
        position,
        offsets,
        num_experts,
        k,
    }
}

fn default_grouped_matmul<B: Backend>(
    x: Tensor<B, 2>,
    w: &GroupedWeight<B>,
    d: &MoeDispatch<B>,
) -> Tensor<B, 2> {
    let (_, _, n) = w.dims();
    let [s, _] = x.dims();
    let device = x.device();
    let offsets: Vec<i64> = d
        .offsets
        .clone()
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap_or_default();
    let mut parts = Vec::new();
    for (e, pair) in offsets.windows(2).enumerate() {
        let (lo, hi) = (pair[0] as usize, pair[1] as usize);
        if hi > lo {
            parts.push(x.clone().narrow(0, lo, hi - lo).matmul(w.expert_in_out(e)));
        }
    }
    if parts.is_empty() {
        Tensor::zeros([s, n], &device)
    } else {
        Tensor::cat(parts, 0)
    }
}

fn default_moe_combine<B: Backend>(
    y: Tensor<B, 2>,
    d: &MoeDispatch<B>,
    weights: Tensor<B, 2>,
    base: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [t, k] = weights.dims();
    let [_, h] = y.dims();
    let rows = y.select(0, d.position.clone()).reshape([t, k, h]);
    let w = weights.reshape([t, k, 1]);
    let mut acc = rows.clone().narrow(1, 0, 1) * w.clone().narrow(1, 0, 1);
    for j in 1..k {
        acc = acc + rows.clone().narrow(1, j, 1) * w.clone().narrow(1, j, 1);
    }
    base + acc.reshape([t, h])
}
