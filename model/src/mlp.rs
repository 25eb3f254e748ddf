//! SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`. Dense layers, routed and shared
//! experts all have this form.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use dsv3_backends::fused::swiglu;
use dsv3_backends::DsBackend;

use crate::linear::{linear, Linear};

#[derive(Config, Debug)]
pub struct MlpConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl MlpConfig {
    pub fn init<B: DsBackend>(&self, device: &B::Device) -> Mlp<B> {
        let (h, i, s) = (self.hidden_size, self.intermediate_size, self.init_std);
        Mlp {
            gate_proj: linear(h, i, s, device),
            up_proj: linear(h, i, s, device),
            down_proj: linear(i, h, s, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: DsBackend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: DsBackend> Mlp<B> {
    pub fn linears_mut(&mut self) -> [&mut Linear<B>; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let g = self.gate_proj.forward(x.clone());
        self.down_proj.forward(swiglu(g, self.up_proj.forward(x)))
    }
}
