//! The GRPO objective (Group Relative Policy Optimization; Shao et al. 2024, "DeepSeekMath",
//! eq. 3 and 4; used for DeepSeek-R1 and V3's RL stage) — the loss; the `rl` module runs it:
//!
//! - **group-normalised advantage** of completion `i` among the `G` of one prompt:
//!   `Â_i = (r_i − mean(r)) / (std(r) + 1e-4)`, std with Bessel's correction (TRL's
//!   `GRPOTrainer`); every token of a completion gets its completion's advantage;
//! - **clipped policy ratio**: `min(ρ·Â, clip(ρ, 1 − ε, 1 + ε)·Â)` with `ρ = exp(log π − log π_old)`;
//! - **KL penalty** against the frozen reference with Schulman's unbiased, non-negative `k3`
//!   estimator: `exp(log π_ref − log π) − (log π_ref − log π) − 1`;
//! - loss = `−1/G · Σ_i 1/|o_i| · Σ_t [min(..) − β·KL]` over the completion tokens (mask 1).

use burn::tensor::{backend::Backend, Tensor};

use crate::error::TrainError;

/// The std guard of the advantage (TRL's).
pub const ADVANTAGE_EPS: f64 = 1e-4;

/// Group-normalised advantages of one prompt's completions.
///
/// # Errors
/// [`TrainError::Invalid`] when fewer than 2 rewards are given (a group of one has no
/// spread to normalise by) or a reward is not finite.
pub fn group_advantages(rewards: &[f64]) -> Result<Vec<f64>, TrainError> {
    let g = rewards.len();
    if g < 2 {
        return Err(TrainError::Invalid(format!(
            "a GRPO group needs at least 2 completions per prompt (got {g})"
        )));
    }
    if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
        return Err(TrainError::Invalid(format!("reward {r} is not finite")));
    }
    let mean = rewards.iter().sum::<f64>() / g as f64;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g - 1) as f64;
    let std = var.sqrt();
    Ok(rewards
        .iter()
        .map(|r| (r - mean) / (std + ADVANTAGE_EPS))
        .collect())
}

/// `k3`: `exp(ref − logp) − (ref − logp) − 1` per token (≥ 0, 0 where the two agree).
pub fn kl_k3<B: Backend>(logp: Tensor<B, 2>, ref_logp: Tensor<B, 2>) -> Tensor<B, 2> {
    let d = ref_logp - logp;
    d.clone().exp() - d - 1.0
}

/// The GRPO loss of one group. `logp`, `old_logp`, `ref_logp`: `[G, T]` log-probabilities of
/// the sampled completion tokens under the policy being trained (with gradient), the policy
/// that sampled them, and the frozen reference; `advantages`: `[G]`; `mask`: `[G, T]`, 1 on
/// completion tokens (padding and prompt 0). `epsilon`: the clip range ε; `beta`: the KL
/// weight β.
pub fn loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    ref_logp: Tensor<B, 2>,
    advantages: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    epsilon: f64,
    beta: f64,
) -> Tensor<B, 1> {
    let [g, t] = logp.dims();
    let a = advantages.reshape([g, 1]).expand([g, t]);
    let ratio = (logp.clone() - old_logp).exp();
    let unclipped = ratio.clone() * a.clone();
    let clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * a;
    let surrogate = unclipped.min_pair(clipped);
    let per_token = surrogate - kl_k3(logp, ref_logp).mul_scalar(beta);
    let lengths = mask.clone().sum_dim(1).clamp_min(1.0);
    let per_completion = (per_token * mask).sum_dim(1) / lengths;
    per_completion.mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = dsv3_backends::Cpu;

    fn t2(v: &[f32], g: usize, t: usize) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [g, t]), &Default::default())
    }

    #[test]
    fn advantages_by_hand() {
        // rewards 1, 0, 0, 1: mean 1/2, sample std √(4·(1/4)/3) = 1/√3.
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0]).unwrap();
        let s = (1.0f64 / 3.0).sqrt() + ADVANTAGE_EPS;
        for (got, want) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]) {
            assert!((got - want).abs() < 1e-12);
        }
        // Equal rewards: no signal.
        assert_eq!(group_advantages(&[2.0, 2.0]).unwrap(), vec![0.0, 0.0]);
        let e = group_advantages(&[1.0]).unwrap_err().to_string();
        assert!(e.contains("at least 2"), "{e}");
    }

    /// Two completions of 2 and 1 tokens (the second padded), ε = 0.2, β = 0.1.
    /// Completion 0, Â = +1: ratios e^{0.5} ≈ 1.6487 (clipped to 1.2) and e^{−0.1} ≈ 0.9048
    /// (kept: min(0.9048, 0.9048)); completion 1, Â = −1: ratio e^{0.3} ≈ 1.3499, min(−1.3499,
    /// −1.2) = −1.3499 (the pessimistic side). KL k3 with ref − logp = d: e^d − d − 1.
    #[test]
    fn loss_by_hand() {
        let logp = [-1.0f32, -2.0, -0.7, 0.0];
        let old = [-1.5f32, -1.9, -1.0, 0.0];
        let refp = [-1.2f32, -2.0, -0.5, 0.0];
        let mask = [1f32, 1.0, 1.0, 0.0];
        let got: f32 = loss(
            t2(&logp, 2, 2),
            t2(&old, 2, 2),
            t2(&refp, 2, 2),
            Tensor::from_data([1.0f32, -1.0], &Default::default()),
            t2(&mask, 2, 2),
            0.2,
            0.1,
        )
        .into_scalar();
        let k3 = |lp: f64, r: f64| (r - lp).exp() - (r - lp) - 1.0;
        let s0 = (1.2 - 0.1 * k3(-1.0, -1.2)) + ((-0.1f64).exp() - 0.1 * k3(-2.0, -2.0));
        let s1 = -(0.3f64.exp()) - 0.1 * k3(-0.7, -0.5);
        let want = -((s0 / 2.0 + s1) / 2.0);
        // f32 arithmetic on values of order 1: a few ulps.
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        // k3 is 0 where policy and reference agree, positive elsewhere.
        let k: Vec<f32> = kl_k3(t2(&[-1.0, -2.0], 1, 2), t2(&[-1.0, -1.5], 1, 2))
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(k[0], 0.0);
        assert!((k[1] as f64 - k3(-2.0, -1.5)).abs() < 1e-6);
    }
}
