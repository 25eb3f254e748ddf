//! The fused element-wise operations (`fused.rs`) under `Autodiff`: one node each, whose
//! forward is the inner backend's operation and whose backward is the inner backend's
//! `*_backward` (one pass on Flex), instead of one node per plain operation. Also the float
//! Linear's product, whose gradient products go through the inner `dense_matmul` too.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::attention::MlaAttention;
use crate::DsBackend;

type Float<B> = burn::tensor::ops::FloatTensor<B>;

fn inner<B: Backend, const D: usize>(p: Float<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> Float<B> {
    t.into_primitive().tensor()
}

/// Backward of `y = rms_norm(x, w)`: both gradients from one pass.
#[derive(Debug)]
struct RmsNorm;

impl<B: DsBackend> Backward<B, 2> for RmsNorm {
    type State = (Float<B>, Float<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, eps) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (gx, gw) = B::rms_norm_backward(inner(x), inner(w), eps, inner(grad));
        let [px, pw] = ops.parents;
        if let Some(p) = px {
            grads.register::<B>(p.id, prim(gx));
        }
        if let Some(p) = pw {
            grads.register::<B>(p.id, prim(gw));
        }
    }
}

/// [`DsBackend::rms_norm`] for `Autodiff<B, C>`.
pub(crate) fn rms_norm<B: DsBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    weight: Tensor<Autodiff<B, C>, 1>,
    eps: f64,
) -> Tensor<Autodiff<B, C>, 2> {
    let (x, w) = (
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let y = B::rms_norm(inner(x.primitive.clone()), inner(w.primitive.clone()), eps);
    let out = match RmsNorm
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive, eps), prim(y)),
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of `y = silu(gate) · up`: both gradients from one pass.
#[derive(Debug)]
struct SwiGlu;

impl<B: DsBackend> Backward<B, 2> for SwiGlu {
    type State = (Float<B>, Float<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (dg, du) = B::swiglu_backward(inner(gate), inner(up), inner(grad));
        let [pg, pu] = ops.parents;
        if let Some(p) = pg {
            grads.register::<B>(p.id, prim(dg));
        }
        if let Some(p) = pu {
            grads.register::<B>(p.id, prim(du));
        }
    }
}

/// [`DsBackend::swiglu`] for `Autodiff<B, C>`.
pub(crate) fn swiglu<B: DsBackend, C: CheckpointStrategy>(
    gate: Tensor<Autodiff<B, C>, 2>,
    up: Tensor<Autodiff<B, C>, 2>,
) -> Tensor<Autodiff<B, C>, 2> {
    let (g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let y = B::swiglu(inner(g.primitive.clone()), inner(u.primitive.clone()));
    let out = match SwiGlu
        .prepare::<C>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive), prim(y)),
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of a row softmax (`log == false`) or log-softmax (`log == true`) from its output.
#[derive(Debug)]
struct Softmax;

impl<B: DsBackend> Backward<B, 1> for Softmax {
    type State = (Float<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, log) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [px] = ops.parents;
        if let Some(p) = px {
            let gx = if log {
                B::log_softmax_rows_backward(inner(y), inner(grad))
            } else {
                B::softmax_rows_backward(inner(y), inner(grad))
            };
            grads.register::<B>(p.id, prim(gx));
        }
    }
}

/// [`DsBackend::softmax_rows`] (`log == false`) and [`DsBackend::log_softmax_rows`] for
/// `Autodiff<B, C>`; the backward keeps only the output.
pub(crate) fn softmax_rows<B: DsBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    log: bool,
) -> Tensor<Autodiff<B, C>, 2> {
    let x = x.into_primitive().tensor();
    let y = if log {
        B::log_softmax_rows(inner(x.primitive.clone()))
    } else {
        B::softmax_rows(inner(x.primitive.clone()))
    };
    let y = prim(y);
    let out = match Softmax
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((y.clone(), log), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of `y = x · w` (the float Linear): `dx = dy · wᵀ`, `dw = xᵀ · dy`, both through the
/// inner backend's [`DsBackend::dense_matmul`] (on Flex: row-blocked `gemm` jobs) with the
/// transposes as strided views.
#[derive(Debug)]
struct DenseMatmul;

impl<B: DsBackend> Backward<B, 2> for DenseMatmul {
    type State = (Float<B>, Float<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let grad: Tensor<B, 2> = inner(grads.consume::<B>(&ops.node));
        let [px, pw] = ops.parents;
        if let Some(p) = px {
            let gx = B::dense_matmul(grad.clone(), inner::<B, 2>(w).transpose());
            grads.register::<B>(p.id, prim(gx));
        }
        if let Some(p) = pw {
            let gw = B::dense_matmul(inner::<B, 2>(x).transpose(), grad);
            grads.register::<B>(p.id, prim(gw));
        }
    }
}

/// [`DsBackend::dense_matmul`] for `Autodiff<B, C>`, `x` and `w` of one dtype.
pub(crate) fn dense_matmul<B: DsBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
) -> Tensor<Autodiff<B, C>, 2> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let y = B::dense_matmul(inner(x.primitive.clone()), inner(w.primitive.clone()));
    let out = match DenseMatmul
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive), prim(y)),
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward of MLA's attention ([`DsBackend::mla_attention`]) from the probabilities the
/// forward kept: the inner backend's `mla_attention_backward`. The mask is a constant.
#[derive(Debug)]
struct MlaAttentionNode;

impl<B: DsBackend> Backward<B, 4> for MlaAttentionNode {
    /// `q_nope`, `q_pe`, `kv`, `k_pe`, the probabilities, the scale.
    type State = ([Float<B>; 5], f64);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([q_nope, q_pe, kv, k_pe, probs], scale) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let x = MlaAttention {
            q_nope: inner(q_nope),
            q_pe: inner(q_pe),
            kv: inner(kv),
            k_pe: inner(k_pe),
            scale,
        };
        let g = B::mla_attention_backward(&x, inner(probs), inner(grad));
        let [pqn, pqp, pkv, pkp] = ops.parents;
        for (parent, grad) in [
            (pqn, prim(g.q_nope)),
            (pqp, prim(g.q_pe)),
            (pkv, prim(g.kv)),
            (pkp, prim(g.k_pe)),
        ] {
            if let Some(p) = parent {
                grads.register::<B>(p.id, grad);
            }
        }
    }
}

/// [`DsBackend::mla_attention`] for `Autodiff<B, C>`: the inner backend's forward, keeping the
/// probabilities only when a gradient is wanted.
pub(crate) fn mla_attention<B: DsBackend, C: CheckpointStrategy>(
    x: &MlaAttention<Autodiff<B, C>>,
    mask: Option<&Tensor<Autodiff<B, C>, 4>>,
) -> Tensor<Autodiff<B, C>, 4> {
    let qn = x.q_nope.clone().into_primitive().tensor();
    let qp = x.q_pe.clone().into_primitive().tensor();
    let kv = x.kv.clone().into_primitive().tensor();
    let kp = x.k_pe.clone().into_primitive().tensor();
    let xi = MlaAttention::<B> {
        q_nope: inner(qn.primitive.clone()),
        q_pe: inner(qp.primitive.clone()),
        kv: inner(kv.primitive.clone()),
        k_pe: inner(kp.primitive.clone()),
        scale: x.scale,
    };
    let mask: Option<Tensor<B, 4>> =
        mask.map(|m| inner(m.clone().into_primitive().tensor().primitive));
    let out = match MlaAttentionNode
        .prepare::<C>([
            qn.node.clone(),
            qp.node.clone(),
            kv.node.clone(),
            kp.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, p) = B::mla_attention_probs(&xi, mask.as_ref());
            let state = [
                qn.primitive,
                qp.primitive,
                kv.primitive,
                kp.primitive,
                prim(p),
            ];
            prep.finish((state, x.scale), prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(B::mla_attention(&xi, mask.as_ref()))),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
