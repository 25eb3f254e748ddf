//! Reinforcement learning with GRPO ([`crate::grpo`]): the optimisation side of `dsv3 rl`.
//!
//! One step of [`GrpoTrainer::step`] takes groups of sampled completions with their rewards —
//! sampling runs in the inference engine and rewards are rules ([`crate::reward`]), both the
//! caller's part, since this crate does not depend on the inference crate — and:
//!
//! 1. normalises each group's rewards into advantages ([`crate::grpo::group_advantages`]);
//! 2. computes the completion tokens' log-probabilities under the policy (with gradient), the
//!    policy that sampled them (`π_old`) and the frozen reference model (the starting weights);
//! 3. runs `iterations` (μ) AdamW updates on the clipped GRPO loss with the `k3` KL penalty
//!    ([`crate::grpo::loss`]), gradients clipped to a global norm.
//!
//! With μ = 1 (TRL's default) `π_old` is the policy itself, detached: the ratio is 1 and only its
//! gradient matters. Log-probabilities are taken at the sampling temperature (logits / τ), as
//! TRL's `GRPOTrainer` does, so that `π_old` is the distribution the tokens were drawn from.
//! With β = 0 no reference model is kept.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use dsv3_backends::fused::log_softmax;
use dsv3_backends::{DsAutodiffBackend, DsBackend};
use dsv3_model::{DeepseekV3, ForwardOptions};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::grpo;
use crate::optim::{self, Optim};
use crate::plot::{err, font, loss_top, panel, Series};

/// GRPO settings (DeepSeekMath §4.1 and TRL's names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// Peak learning rate: linear warm-up over `warmup_steps` steps, then constant.
    pub lr: f64,
    /// Steps of linear learning-rate warm-up (0: none). Adam's first updates are about
    /// `lr · sign(gradient)` in every coordinate whatever the gradient's size, and a policy
    /// gradient from a few dozen samples is mostly noise: warming up keeps those steps small.
    pub warmup_steps: usize,
    /// ε of the clipped ratio (`epsilon`).
    pub epsilon: f64,
    /// β, weight of the KL penalty against the reference (`beta`); 0 keeps no reference.
    pub beta: f64,
    /// μ, updates per batch of samples (`num_iterations`).
    pub iterations: usize,
    /// Sampling temperature τ; log-probabilities are taken of softmax(logits / τ).
    pub temperature: f64,
    /// Global gradient-norm clip (`max_grad_norm`).
    pub grad_clip: f64,
    pub weight_decay: f64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            warmup_steps: 0,
            epsilon: 0.2,
            beta: 0.04,
            iterations: 1,
            temperature: 1.0,
            grad_clip: 1.0,
            weight_decay: 0.0,
        }
    }
}

impl GrpoConfig {
    /// # Errors
    /// [`TrainError::Invalid`] naming the first setting outside its domain.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        let pos = |x: f64| x.is_finite() && x > 0.0;
        if !pos(self.lr) {
            return bad(format!("lr = {} must be a finite number > 0", self.lr));
        }
        if !(self.epsilon.is_finite() && (0.0..1.0).contains(&self.epsilon)) {
            return bad(format!("epsilon = {} must be in [0, 1)", self.epsilon));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta = {} must be >= 0", self.beta));
        }
        if self.iterations == 0 {
            return bad("iterations must be >= 1".into());
        }
        if !pos(self.temperature) {
            return bad(format!(
                "temperature = {} must be > 0 (GRPO samples)",
                self.temperature
            ));
        }
        if !pos(self.grad_clip) {
            return bad(format!("grad_clip = {} must be > 0", self.grad_clip));
        }
        Ok(())
    }
}

/// One prompt's sampled completions (ids after the prompt, a stop id included) and their
/// rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub prompt: Vec<u32>,
    pub completions: Vec<Vec<u32>>,
    pub rewards: Vec<f64>,
}

/// What one step measured (before its updates, over all completions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GrpoStats {
    pub step: usize,
    /// Mean and (population) standard deviation of the rewards.
    pub reward: f64,
    pub reward_std: f64,
    /// Mean `k3` KL to the reference per completion token (0 when β = 0).
    pub kl: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
    /// The GRPO loss of the first update.
    pub loss: f64,
    /// Learning rate of the step's updates.
    pub lr: f64,
    /// Global gradient norm before clipping, first update.
    pub grad_norm: f64,
    /// Groups whose rewards were all equal (zero advantage: no signal).
    pub flat_groups: usize,
}

/// The policy being trained, its optimiser, and the frozen reference.
pub struct GrpoTrainer<B: DsAutodiffBackend> {
    pub policy: DeepseekV3<B>,
    optim: Optim<B>,
    reference: Option<DeepseekV3<B::InnerBackend>>,
    pub cfg: GrpoConfig,
    /// Completed steps.
    pub step: usize,
    device: B::Device,
}

impl<B: DsAutodiffBackend> GrpoTrainer<B> {
    /// Starts from `model`, which is also the reference (a frozen copy, when β > 0).
    ///
    /// # Errors
    /// [`GrpoConfig::validate`].
    pub fn new(
        model: DeepseekV3<B>,
        cfg: GrpoConfig,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        // AdamW with PyTorch's (and TRL's) betas rather than pre-training's β2 = 0.95.
        let train_cfg = crate::TrainConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            ..Default::default()
        };
        let reference = (cfg.beta > 0.0).then(|| model.valid());
        Ok(Self {
            policy: model,
            optim: optim::adamw(&train_cfg),
            reference,
            cfg,
            step: 0,
            device: device.clone(),
        })
    }

    /// Learning rate of step `step` (1-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        match self.cfg.warmup_steps {
            0 => self.cfg.lr,
            w => self.cfg.lr * (step.min(w) as f64 / w as f64),
        }
    }

    /// The policy on the inference backend (what sampling runs on).
    pub fn sampler(&self) -> DeepseekV3<B::InnerBackend> {
        self.policy.valid()
    }

    /// One GRPO step on `groups` (advantages, then μ updates).
    ///
    /// # Errors
    /// [`TrainError::Invalid`]: no group, a group with fewer than 2 completions or a reward
    /// count that differs from its completions', an empty prompt, a token outside the
    /// vocabulary, or a non-finite reward. [`TrainError::NonFinite`] when the loss or the
    /// gradient is not finite (the policy is left as it was).
    pub fn step(&mut self, groups: &[Group]) -> Result<GrpoStats, TrainError> {
        if groups.is_empty() {
            return Err(TrainError::Invalid(
                "a GRPO step needs at least one group".into(),
            ));
        }
        let vocab = self.policy.config.vocab_size;
        let mut batches = Vec::with_capacity(groups.len());
        for (i, g) in groups.iter().enumerate() {
            if g.completions.len() != g.rewards.len() {
                return Err(TrainError::Invalid(format!(
                    "group {i}: {} completions but {} rewards",
                    g.completions.len(),
                    g.rewards.len()
                )));
            }
            if g.prompt.is_empty() {
                return Err(TrainError::Invalid(format!("group {i}: empty prompt")));
            }
            if let Some(&t) = g
                .prompt
                .iter()
                .chain(g.completions.iter().flatten())
                .find(|&&t| t as usize >= vocab)
            {
                return Err(TrainError::Invalid(format!(
                    "group {i}: token id {t} is not below vocab_size = {vocab}"
                )));
            }
            let adv = grpo::group_advantages(&g.rewards)
                .map_err(|e| TrainError::Invalid(format!("group {i}: {e}")))?;
            batches.push(GroupBatch::<B>::new(g, adv, &self.device));
        }
        let step = self.step + 1;
        let lr = self.lr_at(step);
        let n: usize = groups.iter().map(|g| g.rewards.len()).sum();
        let rewards = groups.iter().flat_map(|g| g.rewards.iter().copied());
        let reward = rewards.clone().sum::<f64>() / n as f64;
        let reward_std = (rewards.map(|r| (r - reward).powi(2)).sum::<f64>() / n as f64).sqrt();
        let completion_len = groups
            .iter()
            .flat_map(|g| g.completions.iter().map(Vec::len))
            .sum::<usize>() as f64
            / n as f64;
        let flat_groups = batches.iter().filter(|b| b.flat).count();

        // π_old and π_ref, once per step, without gradient.
        let tau = self.cfg.temperature;
        let old: Option<Vec<Tensor<B::InnerBackend, 2>>> = (self.cfg.iterations > 1).then(|| {
            let sampler = self.sampler();
            batches
                .iter()
                .map(|b| {
                    token_logps(
                        &sampler,
                        b.inputs.clone().inner(),
                        b.targets.clone().inner(),
                        tau,
                    )
                })
                .collect()
        });
        let refs: Option<Vec<Tensor<B::InnerBackend, 2>>> = self.reference.as_ref().map(|r| {
            batches
                .iter()
                .map(|b| token_logps(r, b.inputs.clone().inner(), b.targets.clone().inner(), tau))
                .collect()
        });

        let (mut first_loss, mut first_norm, mut kl_sum, mut kl_tokens) = (None, None, 0.0, 0.0);
        for it in 0..self.cfg.iterations {
            let mut acc = GradientsAccumulator::<DeepseekV3<B>>::new();
            let mut loss_sum = 0.0;
            for (j, b) in batches.iter().enumerate() {
                let logp = token_logps(&self.policy, b.inputs.clone(), b.targets.clone(), tau);
                let old_logp = match &old {
                    Some(o) => Tensor::from_inner(o[j].clone()),
                    None => logp.clone().detach(),
                };
                let ref_logp = match &refs {
                    Some(r) => Tensor::from_inner(r[j].clone()),
                    None => logp.clone().detach(),
                };
                if it == 0 && refs.is_some() {
                    let k = grpo::kl_k3(logp.clone().detach(), ref_logp.clone()) * b.mask.clone();
                    kl_sum += scalar(k.sum());
                    kl_tokens += scalar(b.mask.clone().sum());
                }
                let loss = grpo::loss(
                    logp,
                    old_logp,
                    ref_logp,
                    b.advantages.clone(),
                    b.mask.clone(),
                    self.cfg.epsilon,
                    self.cfg.beta,
                )
                .div_scalar(batches.len() as f64);
                let value = scalar(loss.clone());
                if !value.is_finite() {
                    return Err(TrainError::NonFinite {
                        what: "GRPO loss",
                        step,
                        location: format!("group {j}"),
                    });
                }
                loss_sum += value;
                let grads = GradientsParams::from_grads(loss.backward(), &self.policy);
                acc.accumulate(&self.policy, grads);
            }
            let mut grads = acc.grads();
            let norm = optim::clip_global_norm(&self.policy, &mut grads, self.cfg.grad_clip);
            norm.check(step)?;
            self.policy = self.optim.step(lr, self.policy.clone(), grads);
            first_loss.get_or_insert(loss_sum);
            first_norm.get_or_insert(norm.norm);
        }
        self.step = step;
        Ok(GrpoStats {
            step,
            reward,
            reward_std,
            kl: if kl_tokens > 0.0 {
                kl_sum / kl_tokens
            } else {
                0.0
            },
            completion_len,
            loss: first_loss.unwrap_or(0.0),
            lr,
            grad_norm: first_norm.unwrap_or(0.0),
            flat_groups,
        })
    }
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_or(f64::NAN, |v| v[0])
}

/// One group laid out for the forward: `G` rows of prompt + completion, padded at the end with
/// the last token (masked out; causal attention keeps it from touching earlier positions).
struct GroupBatch<B: Backend> {
    /// `[G, L−1]` token ids fed, `[G, L−1]` ids predicted.
    inputs: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
    /// `[G, L−1]`: 1 where the target is a completion token.
    mask: Tensor<B, 2>,
    /// `[G]`.
    advantages: Tensor<B, 1>,
    /// Every advantage 0.
    flat: bool,
}

impl<B: Backend> GroupBatch<B> {
    fn new(g: &Group, advantages: Vec<f64>, device: &B::Device) -> Self {
        let p = g.prompt.len();
        let len = p + g.completions.iter().map(Vec::len).max().unwrap_or(0);
        // At least one target position, so the shapes are never empty.
        let w = len.max(p + 1);
        let rows = g.completions.len();
        let (mut ids, mut mask) = (Vec::with_capacity(rows * w), vec![0f32; rows * (w - 1)]);
        for (r, c) in g.completions.iter().enumerate() {
            let start = ids.len();
            ids.extend(g.prompt.iter().chain(c).map(|&t| t as i64));
            let last = *ids.last().expect("non-empty prompt");
            ids.resize(start + w, last);
            // Target j is token j + 1: completion tokens are p .. p + |c|.
            for j in p - 1..p - 1 + c.len() {
                mask[r * (w - 1) + j] = 1.0;
            }
        }
        let all = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, w]), device);
        let flat = advantages.iter().all(|&a| a == 0.0);
        Self {
            inputs: all.clone().narrow(1, 0, w - 1),
            targets: all.narrow(1, 1, w - 1),
            mask: Tensor::from_data(TensorData::new(mask, [rows, w - 1]), device),
            advantages: Tensor::from_data(
                TensorData::new(advantages.iter().map(|&a| a as f32).collect(), [rows]),
                device,
            ),
            flat,
        }
    }
}

/// `log softmax(logits / τ)` of each target: `[rows, T]`.
pub fn token_logps<B: DsBackend>(
    model: &DeepseekV3<B>,
    inputs: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
    temperature: f64,
) -> Tensor<B, 2> {
    let [rows, t] = inputs.dims();
    let logits = model
        .forward(inputs, 0, None, &ForwardOptions::default())
        .logits;
    log_softmax(logits.div_scalar(temperature))
        .gather(2, targets.reshape([rows, t, 1]))
        .reshape([rows, t])
}

/// One line of `metrics.jsonl` of an RL run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlRecord {
    #[serde(flatten)]
    pub stats: GrpoStats,
    /// Share of completions whose rule reward (without the format term) was 1.
    pub accuracy: f64,
    /// Held-out exact match after this step, when evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_exact_match: Option<f64>,
    pub elapsed_s: f64,
}

/// Draws the reward, accuracy and held-out exact match (left; `eval_before`, the exact match
/// before training, at step 0) and the KL and completion length (right, each scaled to its own
/// maximum, the maxima in the legend) of an RL run (`DIR/rl.png`).
///
/// # Errors
/// [`TrainError::Io`] when the PNG cannot be drawn or written.
pub fn draw(records: &[RlRecord], eval_before: Option<f64>, path: &Path) -> Result<(), TrainError> {
    let text = font();
    let e = err(path);
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let max_step = records
        .iter()
        .map(|r| r.stats.step)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let pts = |f: &dyn Fn(&RlRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.stats.step as f64, v)))
            .collect()
    };
    let rewards: Vec<Series> = vec![
        (
            "mean reward".into(),
            BLUE.to_rgba(),
            pts(&|r| Some(r.stats.reward)),
        ),
        (
            "accuracy (samples)".into(),
            GREEN.to_rgba(),
            pts(&|r| Some(r.accuracy)),
        ),
        (
            "held-out exact match".into(),
            RED.to_rgba(),
            eval_before
                .map(|e| (0.0, e))
                .into_iter()
                .chain(pts(&|r| r.eval_exact_match))
                .collect(),
        ),
    ];
    let top = loss_top(&rewards).max(1.0);
    panel(&left, "reward", max_step, 0.0..top, rewards, text).map_err(&e)?;
    let scaled = |name: &str, color: RGBColor, f: &dyn Fn(&RlRecord) -> f64| {
        let max = records
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let div = if max > 0.0 { max } else { 1.0 };
        (
            format!("{name} (max {max:.3})"),
            color.to_rgba(),
            pts(&|r| Some(f(r) / div)),
        )
    };
    let other: Vec<Series> = vec![
        scaled("KL to reference", MAGENTA, &|r| r.stats.kl),
        scaled("completion length", BLACK, &|r| r.stats.completion_len),
    ];
    panel(
        &right,
        "KL and length (÷ max)",
        max_step,
        0.0..1.05,
        other,
        text,
    )
    .map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type AB = dsv3_backends::CpuAutodiff;

    fn tiny() -> DeepseekV3<AB> {
        let cfg = dsv3_model::DeepseekV3Config::preset("tiny").unwrap();
        crate::init::seeded(
            DeepseekV3::<AB>::init(&cfg, &Default::default()).unwrap(),
            3,
        )
    }

    fn logp_of(
        m: &DeepseekV3<<AB as burn::tensor::backend::AutodiffBackend>::InnerBackend>,
        seq: &[u32],
        from: usize,
    ) -> f64 {
        let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let all = Tensor::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let lp = token_logps(
            m,
            all.clone().narrow(1, 0, n - 1),
            all.narrow(1, 1, n - 1),
            1.0,
        );
        let v: Vec<f32> = lp.into_data().to_vec().unwrap();
        v[from - 1..].iter().map(|&x| x as f64).sum()
    }

    /// A step with a rewarded and an unrewarded completion raises the first's log-likelihood
    /// and lowers the second's; the KL to the reference is 0 before any update.
    #[test]
    fn a_step_moves_probability_toward_the_rewarded_completion() {
        let prompt = vec![5u32, 9, 2];
        let (good, bad) = (vec![7u32, 7, 1], vec![3u32, 4]);
        let cfg = GrpoConfig {
            lr: 1e-3,
            ..Default::default()
        };
        let mut t = GrpoTrainer::new(tiny(), cfg, &Default::default()).unwrap();
        let seq = |c: &[u32]| prompt.iter().chain(c).copied().collect::<Vec<_>>();
        let before = t.sampler();
        let (g0, b0) = (
            logp_of(&before, &seq(&good), 3),
            logp_of(&before, &seq(&bad), 3),
        );
        let group = Group {
            prompt: prompt.clone(),
            completions: vec![good.clone(), bad.clone()],
            rewards: vec![1.0, 0.0],
        };
        let s = t.step(std::slice::from_ref(&group)).unwrap();
        assert_eq!(s.kl, 0.0);
        assert_eq!(
            (s.reward, s.reward_std, s.completion_len, s.flat_groups),
            (0.5, 0.5, 2.5, 0)
        );
        let after = t.sampler();
        let (g1, b1) = (
            logp_of(&after, &seq(&good), 3),
            logp_of(&after, &seq(&bad), 3),
        );
        assert!(g1 > g0 && b1 < b0, "good {g0} -> {g1}, bad {b0} -> {b1}");
        // Second step: the policy moved, so the KL to the reference is now positive.
        assert!(t.step(&[group]).unwrap().kl > 0.0);
    }

    #[test]
    fn bad_groups_are_refused() {
        let mut t = GrpoTrainer::new(tiny(), GrpoConfig::default(), &Default::default()).unwrap();
        let g = |c: Vec<Vec<u32>>, r: Vec<f64>| Group {
            prompt: vec![1],
            completions: c,
            rewards: r,
        };
        for (groups, want) in [
            (vec![], "at least one group"),
            (vec![g(vec![vec![2]], vec![1.0])], "at least 2 completions"),
            (
                vec![g(vec![vec![2], vec![3]], vec![1.0])],
                "2 completions but 1 rewards",
            ),
            (
                vec![g(vec![vec![2], vec![100_000]], vec![1.0, 0.0])],
                "token id 100000",
            ),
        ] {
            let e = t.step(&groups).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = GrpoConfig {
            temperature: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
    }
}
