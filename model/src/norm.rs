//! RMSNorm: `x / sqrt(mean(x²) + eps) * weight`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

#[derive(Config, Debug)]
pub struct RmsNormConfig {
    pub size: usize,
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl RmsNormConfig {
    pub fn init<B: DsBackend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            weight: Initializer::Ones.init([self.size], device),
            eps: self.eps,
        }
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm<B: DsBackend> {
    /// `[size]`, checkpoint name `*.weight`.
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: DsBackend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        dsv3_backends::fused::rms_norm(x, self.weight.val(), self.eps)
    }
}
