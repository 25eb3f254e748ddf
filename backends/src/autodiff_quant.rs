//! The low-precision Linear under `Autodiff`: the forward GEMM runs on the inner backend and
//! a custom backward node runs the input-gradient and weight-gradient GEMMs in the same
//! format ([`crate::quant_linear`]), from the operands the forward quantized (kept in FP8 or
//! bf16), instead of differentiating through the rounding.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::quant_linear::{self, QuantGemm, Saved};
use crate::DsBackend;

/// Backward of `y = x · w` with both gradients from the saved low-precision operands.
#[derive(Debug)]
struct QuantLinear;

impl<B: DsBackend> Backward<B, 2> for QuantLinear {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Ops {
            parents,
            node,
            state,
        } = ops;
        let tensor = |g| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(g));
        binary::<B, _, _>(
            parents,
            node,
            grads,
            |g| {
                quant_linear::grad_input(&state, tensor(g))
                    .into_primitive()
                    .tensor()
            },
            |g| {
                quant_linear::grad_weight(&state, tensor(g))
                    .into_primitive()
                    .tensor()
            },
        );
    }
}

/// [`DsBackend::quantized_linear`] for `Autodiff<B, C>`.
pub(crate) fn quantized_linear<B: DsBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    gemm: &QuantGemm,
) -> Tensor<Autodiff<B, C>, 2> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let inner = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
    let (y, saved) =
        quant_linear::forward(inner(x.primitive.clone()), inner(w.primitive.clone()), gemm);
    let y = y.into_primitive().tensor();
    let out = match QuantLinear
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
