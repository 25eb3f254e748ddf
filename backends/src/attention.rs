//! MLA's attention with per-head keys as one operation ([`crate::DsBackend::mla_attention`]):
//! the scores, mask, softmax and value product that the plain form writes as ~10 tensor
//! operations, with copies to concatenate the rotary and non-rotary parts of queries and keys
//! and to move the heads to the front and back. Flex runs it as one job per (sequence, head),
//! each reading the operands in place through their strides and writing its rows of the output
//! (`flex_attention.rs`); `Autodiff` records one node whose backward is one more such pass.
//!
//! The operands stay in the projections' own tokens-major layout (`[B, T, H, ·]`, how
//! `q_b_proj` and `kv_b_proj` write them and how `o_proj` reads the output), so the model passes
//! views and receives the output ready for `o_proj`. The plain form here is the default (what
//! the CubeCL backends run) and the reference the Flex form is tested against.
//!
//! Source: DeepSeek-V2/V3 §2.1 (MLA), HF `DeepseekV3Attention.forward` (eager path), spec §3.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::fused::softmax;
use crate::DsBackend;

/// The operands of MLA's attention with per-head keys, for sequences `B`, queries `T`, keys
/// `S`, heads `H`, widths `dn` (`qk_nope_head_dim`), `dr` (`qk_rope_head_dim`), `dv`
/// (`v_head_dim`). Any strides (views are read in place).
#[derive(Clone, Debug)]
pub struct MlaAttention<B: Backend> {
    /// `[B, T, H, dn]`: the queries' non-rotary part.
    pub q_nope: Tensor<B, 4>,
    /// `[B, T, H, dr]`: the queries' rotary part, rotated.
    pub q_pe: Tensor<B, 4>,
    /// `[B, S, H, dn + dv]`: `kv_b_proj`'s output, per head the keys' non-rotary part then
    /// the values.
    pub kv: Tensor<B, 4>,
    /// `[B, S, dr]`: the rotary key, one per token, shared by the heads.
    pub k_pe: Tensor<B, 3>,
    /// Multiplies the scores before the mask (`1/sqrt(dn + dr)`, times YaRN's `mscale²`).
    pub scale: f64,
}

/// The gradients of [`MlaAttention`]'s four tensors, each of its operand's shape.
#[derive(Clone, Debug)]
pub struct MlaAttentionGrads<B: Backend> {
    pub q_nope: Tensor<B, 4>,
    pub q_pe: Tensor<B, 4>,
    pub kv: Tensor<B, 4>,
    pub k_pe: Tensor<B, 3>,
}

impl<B: Backend> MlaAttention<B> {
    /// `(B, T, S, H, dn, dr, dv)`.
    pub fn dims(&self) -> (usize, usize, usize, usize, usize, usize, usize) {
        let [b, t, h, dn] = self.q_nope.dims();
        let [_, s, _, w] = self.kv.dims();
        (b, t, s, h, dn, self.k_pe.dims()[2], w.saturating_sub(dn))
    }
}

/// `[B, X, H, d]` → `[B, H, X, d]` (a view).
fn heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.swap_dims(1, 2)
}

/// Plain form of [`crate::DsBackend::mla_attention_probs`]: per sequence and head,
/// `P = softmax(scale · (q_nope·k_nopeᵀ + q_pe·k_peᵀ) + mask)` and `P · v`. Returns the output
/// `[B, T, H, dv]` and `P: [B, H, T, S]`. The mask `[B|1, 1, T, S]` is added (0 or −∞).
pub fn default_mla_attention_probs<B: DsBackend>(
    x: &MlaAttention<B>,
    mask: Option<&Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (b, _, s, h, dn, dr, dv) = x.dims();
    let q = Tensor::cat(vec![x.q_nope.clone(), x.q_pe.clone()], 3);
    let k_pe = x.k_pe.clone().unsqueeze_dim::<4>(2).expand([b, s, h, dr]);
    let k = Tensor::cat(vec![x.kv.clone().narrow(3, 0, dn), k_pe], 3);
    let scores = heads(q).matmul(heads(k).swap_dims(2, 3)) * x.scale; // [B, H, T, S]
    let scores = match mask {
        Some(m) => scores + m.clone(),
        None => scores,
    };
    let p = softmax(scores);
    let out = p.clone().matmul(heads(x.kv.clone().narrow(3, dn, dv)));
    (heads(out), p)
}

/// Plain form of [`crate::DsBackend::mla_attention_backward`]: with `dS = P ⊙ (dP − Σ dP ⊙ P)`
/// the softmax's backward of `dP = grad · vᵀ`, `∂q_nope = scale · dS · k_nope`,
/// `∂q_pe = scale · dS · k_pe`, `∂k_nope = scale · dSᵀ · q_nope`, `∂v = Pᵀ · grad`, and
/// `∂k_pe = scale · Σ_heads dSᵀ · q_pe`.
pub fn default_mla_attention_backward<B: DsBackend>(
    x: &MlaAttention<B>,
    probs: Tensor<B, 4>,
    grad: Tensor<B, 4>,
) -> MlaAttentionGrads<B> {
    let (b, t, s, h, dn, dr, dv) = x.dims();
    let g = heads(grad); // [B, H, T, dv]
    let v = heads(x.kv.clone().narrow(3, dn, dv));
    let d_v = probs.clone().swap_dims(2, 3).matmul(g.clone()); // [B, H, S, dv]
    let dp = g.matmul(v.swap_dims(2, 3)); // [B, H, T, S]
    let rows = b * h * t;
    let ds = B::softmax_rows_backward(probs.reshape([rows, s]), dp.reshape([rows, s]))
        .reshape([b, h, t, s])
        * x.scale;
    let k_nope = heads(x.kv.clone().narrow(3, 0, dn));
    let k_pe = x.k_pe.clone().unsqueeze_dim::<4>(1); // [B, 1, S, dr]
    let dq_nope = ds.clone().matmul(k_nope);
    let dq_pe = ds.clone().matmul(k_pe);
    let dst = ds.swap_dims(2, 3); // [B, H, S, T]
    let dk_nope = dst.clone().matmul(heads(x.q_nope.clone()));
    let dk_pe = dst
        .matmul(heads(x.q_pe.clone()))
        .sum_dim(1)
        .reshape([b, s, dr]);
    MlaAttentionGrads {
        q_nope: heads(dq_nope),
        q_pe: heads(dq_pe),
        kv: heads(Tensor::cat(vec![dk_nope, d_v], 3)),
        k_pe: dk_pe,
    }
}
