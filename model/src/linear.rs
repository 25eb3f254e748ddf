//! The model's bias-free linear layer: Burn's `Linear` (same field `weight`, `[in, out]`, same
//! forward) plus an optional FP8 form, where the weight stays in memory as e4m3 codes with
//! 128×128 block scales (about 1 byte per weight instead of 2 for bf16 or 4 for f32) and is
//! multiplied through [`DsBackend::fp8_matmul`], dequantized inside the kernel.

use burn::module::{Module, Param, ParamId};
use burn::nn::Initializer;
use burn::tensor::Tensor;
use dsv3_backends::{DsBackend, Fp8Weight, QuantGemm};

/// A bias-free linear layer with DeepSeek's init (normal, std = `initializer_range`), created
/// exactly as Burn's `LinearConfig` would (same lazy initializer call).
pub(crate) fn linear<B: DsBackend>(
    d_in: usize,
    d_out: usize,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    Linear::new(Initializer::Normal { mean: 0.0, std }.init_with(
        [d_in, d_out],
        Some(d_in),
        Some(d_out),
        device,
    ))
}

#[derive(Module, Debug)]
pub struct Linear<B: DsBackend> {
    /// `[in, out]`. In FP8 form a `[1, 1]` placeholder: the weight lives in `fp8`.
    pub weight: Param<Tensor<B, 2>>,
    /// The FP8 form (`[1, out, in]` codes and scales), when loaded with `--weights fp8`.
    /// Not a parameter: visitors, the optimizer and `save` never see it.
    pub fp8: Option<Fp8Weight<B>>,
    /// Training in bf16 or FP8 (DeepSeek-V3 report §3.3): the float weight's three GEMMs run
    /// in that format ([`DsBackend::quantized_linear`]); `None`: f32. Not saved.
    #[module(skip)]
    pub gemm: Option<QuantGemm>,
}

impl<B: DsBackend> Linear<B> {
    /// A float layer over `weight: [in, out]`.
    pub fn new(weight: Param<Tensor<B, 2>>) -> Self {
        Self {
            weight,
            fp8: None,
            gemm: None,
        }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.fp8 {
            None => {
                let w = self.weight.val();
                let dims = x.dims();
                let m = dims[..D - 1].iter().product::<usize>();
                let mut out = dims;
                out[D - 1] = w.dims()[1];
                let x = x.reshape([m, dims[D - 1]]);
                match &self.gemm {
                    None => B::dense_matmul(x, w),
                    Some(g) => B::quantized_linear(x, w, g),
                }
                .reshape(out)
            }
            Some(w) => {
                let dims = x.dims();
                let k = dims[D - 1];
                let m = dims[..D - 1].iter().product::<usize>();
                let y = B::fp8_matmul(x.reshape([m, k]), w);
                let mut out = dims;
                out[D - 1] = w.rows;
                y.reshape(out)
            }
        }
    }

    /// Switches to the FP8 form: the float weight is dropped for a placeholder.
    pub fn set_fp8(&mut self, w: Fp8Weight<B>) {
        let device = w.codes.device();
        self.weight = Param::initialized(ParamId::new(), Tensor::zeros([1, 1], &device));
        self.fp8 = Some(w);
    }

    /// Drops the weight (both forms) for a placeholder, e.g. once it was stacked elsewhere.
    pub fn clear(&mut self) {
        // `lazy_device`: a weight not yet materialised (a fresh `init`) is never drawn.
        let device = self.weight.lazy_device();
        self.weight = Param::initialized(ParamId::new(), Tensor::zeros([1, 1], &device));
        self.fp8 = None;
    }

    /// `[in, out]` weights in the model's float type (dequantized from the FP8 form, or
    /// widened from bf16 storage, if the layer holds one).
    pub fn weight_in_out(&self) -> Tensor<B, 2> {
        match &self.fp8 {
            None => {
                let w = self.weight.val();
                let float = <B::FloatElem as burn::tensor::Element>::dtype();
                if w.dtype() == float {
                    w
                } else {
                    w.cast(float)
                }
            }
            Some(w) => w.dequantize().reshape([w.rows, w.cols]).transpose(),
        }
    }

    /// Back to the float form (for saving, or for code that needs `weight`).
    pub fn dequantize(&mut self) {
        if self.fp8.is_some() {
            let w = self.weight_in_out();
            self.weight = Param::initialized(ParamId::new(), w);
            self.fp8 = None;
        }
    }

    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.fp8 {
            None => {
                let [i, o] = self.weight.lazy_shape().dims::<2>();
                (i, o)
            }
            Some(w) => (w.cols, w.rows),
        }
    }

    /// Bytes of the weight as held (FP8 codes + scales, or the float tensor).
    pub fn weight_bytes(&self) -> usize {
        match &self.fp8 {
            None => {
                let w = self.weight.val();
                w.shape().num_elements() * w.dtype().size()
            }
            Some(w) => w.bytes(),
        }
    }
}
