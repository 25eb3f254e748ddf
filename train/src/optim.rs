//! Optimiser pieces: Burn's AdamW (decoupled weight decay), the learning-rate schedule, and
//! **global** gradient-norm clipping.
//!
//! Burn 0.21's `GradientClippingConfig::Norm` clips each parameter tensor by its own norm;
//! DeepSeek-V3 (like PyTorch's `clip_grad_norm_`) clips by the norm of all gradients together,
//! so that is done here on the `GradientsParams` before the step, and Burn's clipping is off.
//!
//! The moments can be stored in bf16 between steps, as the DeepSeek-V3 report does (§3.3.3,
//! "Low-Precision Optimizer States"): [`MixedAdamW`] widens them to f32 for the update and
//! rounds them to bf16 for storage; the master weights stay f32.

use std::f64::consts::PI;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{
    adaptor::OptimizerAdaptor, AdamW, AdamWConfig, AdamWState, GradientsParams, LearningRate,
    SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Tensor};

use dsv3_backends::DsAutodiffBackend;
use dsv3_model::DeepseekV3;

use crate::config::{StateDtype, TrainConfig};
use crate::error::TrainError;

/// AdamW over the model (`MixedAdamW`: Burn's AdamW, moments optionally stored in bf16).
pub type Optim<B> = OptimizerAdaptor<MixedAdamW, DeepseekV3<B>, B>;

/// Burn's AdamW, whose first and second moments are kept in bf16 between steps when
/// `bf16_moments` (report §3.3.3): each step widens them to the parameter's dtype, runs
/// AdamW's update there, and rounds the new moments to bf16 (nearest even). The state's
/// record is AdamW's, so checkpoints of either setting load into the other.
#[derive(Clone)]
pub struct MixedAdamW {
    inner: AdamW,
    bf16_moments: bool,
}

impl<B: Backend> SimpleOptimizer<B> for MixedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let float = tensor.dtype();
        let cast = |mut s: AdamWState<B, D>, to: DType| {
            let m = &mut s.momentum;
            if m.moment_1.dtype() != to {
                // Rounded to nearest even first (see `round_bf16`); widening is exact.
                let round = |t: Tensor<B, D>| match to {
                    DType::BF16 => dsv3_backends::quant_linear::round_bf16(t).cast(to),
                    _ => t.cast(to),
                };
                m.moment_1 = round(m.moment_1.clone());
                m.moment_2 = round(m.moment_2.clone());
            }
            s
        };
        let state = state.map(|s| cast(s, float));
        let (tensor, state) = self.inner.step(lr, tensor, grad, state);
        let state = match self.bf16_moments {
            true => state.map(|s| cast(s, DType::BF16)),
            false => state,
        };
        (tensor, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// AdamW with the run's betas, epsilon, weight decay and moment storage (no per-tensor
/// clipping).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    cfg: &TrainConfig,
) -> OptimizerAdaptor<MixedAdamW, M, B> {
    let inner = AdamWConfig::new()
        .with_beta_1(cfg.beta1 as f32)
        .with_beta_2(cfg.beta2 as f32)
        .with_epsilon(cfg.eps as f32)
        .with_weight_decay(cfg.weight_decay as f32)
        .build();
    OptimizerAdaptor::from(MixedAdamW {
        inner,
        bf16_moments: cfg.optimizer_state == StateDtype::Bf16,
    })
}

/// Learning rate of step `step` (1-based): linear warm-up to `lr` over `warmup_steps`, then a
/// cosine decay to `min_lr` at `steps`.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let (lr, min) = (cfg.lr, cfg.min_lr);
    if cfg.warmup_steps > 0 && step <= cfg.warmup_steps {
        return lr * step as f64 / cfg.warmup_steps as f64;
    }
    let decay = cfg.steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps.min(step)) as f64 / decay as f64).min(1.0);
    min + 0.5 * (lr - min) * (1.0 + (PI * progress).cos())
}

/// Squared norm of each parameter's gradient (parameters without one are skipped).
struct GradSquares<'a> {
    grads: &'a GradientsParams,
    out: Vec<(ParamId, f64)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq: f64 = g.square().sum().into_scalar().elem();
            self.out.push((param.id, sq));
        }
    }
}

struct GradScale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The global gradient norm, and the first block whose gradient is not finite (if any).
#[derive(Debug, Clone)]
pub struct GradNorm {
    pub norm: f64,
    pub non_finite: Option<String>,
}

impl GradNorm {
    /// # Errors
    /// [`TrainError::NonFinite`] (a gradient, at optimiser step `step`) naming the first block
    /// whose gradient is not finite, if any: the update must not be applied.
    pub fn check(&self, step: usize) -> Result<(), TrainError> {
        match &self.non_finite {
            Some(location) => Err(TrainError::NonFinite {
                what: "gradient",
                step,
                location: location.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Computes the global L2 norm of all gradients and, when it exceeds `max_norm` (> 0), scales
/// every gradient by `max_norm / (norm + 1e-6)` (as PyTorch's `clip_grad_norm_`).
pub fn clip_global_norm<B: DsAutodiffBackend>(
    model: &DeepseekV3<B>,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> GradNorm {
    let mut sq = GradSquares {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut sq);
    let total: f64 = sq.out.iter().map(|(_, s)| s).sum();
    let norm = total.sqrt();
    let non_finite = if norm.is_finite() {
        None
    } else {
        let paths = model.param_names();
        sq.out.iter().find(|(_, s)| !s.is_finite()).map(|(id, _)| {
            paths
                .iter()
                .find(|(p, _)| p == id)
                .map(|(_, n)| format!("gradient of {n}"))
                .unwrap_or_else(|| "a gradient".into())
        })
    };
    if non_finite.is_none() && max_norm > 0.0 && norm > max_norm {
        let mut s = GradScale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut s);
    }
    GradNorm { norm, non_finite }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule() {
        let cfg = TrainConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            steps: 110,
            ..TrainConfig::default()
        };
        assert!((lr_at(&cfg, 1) - 1e-4).abs() < 1e-12);
        assert!((lr_at(&cfg, 10) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&cfg, 60) - 5.5e-4).abs() < 1e-12);
        assert!((lr_at(&cfg, 110) - 1e-4).abs() < 1e-12);
        assert!((lr_at(&cfg, 500) - 1e-4).abs() < 1e-12);
    }
}
