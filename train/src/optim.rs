//! Optimiser pieces: Burn's AdamW (decoupled weight decay), the learning-rate schedule, and
//! **global** gradient-norm clipping.
//!
//! Burn 0.21's `GradientClippingConfig::Norm` clips each parameter tensor by its own norm;
//! DeepSeek-V3 (like PyTorch's `clip_grad_norm_`) clips by the norm of all gradients together,
//! so that is done here on the `GradientsParams` before the step, and Burn's clipping is off.

use std::f64::consts::PI;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{adaptor::OptimizerAdaptor, AdamW, AdamWConfig, GradientsParams};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Tensor};

use dsv3_backends::DsAutodiffBackend;
use dsv3_model::DeepseekV3;

use crate::config::TrainConfig;

/// Burn's AdamW over the model.
pub type Optim<B> = OptimizerAdaptor<AdamW, DeepseekV3<B>, B>;

/// AdamW with the run's betas, epsilon and weight decay (no per-tensor clipping).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    cfg: &TrainConfig,
) -> OptimizerAdaptor<AdamW, M, B> {
    AdamWConfig::new()
        .with_beta_1(cfg.beta1 as f32)
        .with_beta_2(cfg.beta2 as f32)
        .with_epsilon(cfg.eps as f32)
        .with_weight_decay(cfg.weight_decay as f32)
        .init()
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
