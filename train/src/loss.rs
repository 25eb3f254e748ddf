//! The pretraining objective of DeepSeek-V3 (paper §2.2, eq. 17–20 and 24–25):
//! `L = CE(main) + λ/D · Σ_k CE(MTP depth k) + Σ_layers α · Σ_i f_i P_i`.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use dsv3_backends::{fused::log_softmax, DsBackend};

use crate::forward::RouterTrace;

/// Negative log-likelihood of each target: `logits: [B, L, V]`, `targets: [B, L]` → `[B, L]`.
pub fn token_nll<B: DsBackend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, l, _] = logits.dims();
    log_softmax(logits)
        .gather(2, targets.reshape([b, l, 1]))
        .reshape([b, l])
        .neg()
}

/// Mean next-token cross-entropy (nats), a one-element tensor.
pub fn cross_entropy<B: DsBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    token_nll(logits, targets).mean()
}

/// Mean cross-entropy over the targets whose `mask` (`[B, L]`, 1 or 0) is 1: fine-tuning's
/// loss on the assistant's tokens only. A batch with no such target gives 0.
pub fn masked_cross_entropy<B: DsBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let count = mask.clone().sum().clamp_min(1.0);
    (token_nll(logits, targets) * mask).sum() / count
}

/// Per-sequence expert-selection frequencies `f_i = E / (K·T) · Σ_t 1[i ∈ TopK_t]`,
/// `[rows][E]`, from the chosen experts `[rows·len][k]`.
pub fn selection_frequencies(
    experts: &[Vec<u32>],
    rows: usize,
    len: usize,
    n_experts: usize,
) -> Vec<Vec<f32>> {
    let k = experts.first().map(|e| e.len()).unwrap_or(1).max(1);
    let scale = n_experts as f32 / (k * len) as f32;
    (0..rows)
        .map(|r| {
            let mut f = vec![0f32; n_experts];
            for token in &experts[r * len..(r + 1) * len] {
                for &e in token {
                    f[e as usize] += 1.0;
                }
            }
            f.iter_mut().for_each(|v| *v *= scale);
            f
        })
        .collect()
}

/// The complementary sequence-wise balance loss of one MoE layer, averaged over the sequences
/// of the batch: `α · Σ_i f_i · P_i` with `P_i = 1/T · Σ_t s_{i,t} / Σ_j s_{j,t}`. Only `P`
/// carries gradient (`f` counts choices).
pub fn sequence_balance_loss<B: Backend>(trace: &RouterTrace<B>, alpha: f64) -> Tensor<B, 1> {
    let [n, e] = trace.scores.dims();
    let (rows, len) = (trace.rows, trace.len);
    debug_assert_eq!(n, rows * len);
    let device = trace.scores.device();
    let f: Vec<f32> = selection_frequencies(&trace.experts, rows, len, e)
        .into_iter()
        .flatten()
        .collect();
    let f = Tensor::<B, 2>::from_data(TensorData::new(f, [rows, e]), &device);
    let s = trace.scores.clone();
    let normalised = s.clone() / s.sum_dim(1);
    let p = normalised
        .reshape([rows, len, e])
        .mean_dim(1)
        .reshape([rows, e]);
    (f * p).sum().mul_scalar(alpha / rows as f64)
}
