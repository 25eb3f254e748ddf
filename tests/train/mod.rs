//! Training: the objective and its gradients, balancing, checkpoints and resume, data.

mod balancing;
mod checkpoints;
mod data;
mod fp8;
mod objective;
mod pipeline;
mod pipeline_held;
mod pipeline_split;
mod sft;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use dsv3_backends::CpuAutodiff;
use dsv3_model::DeepseekV3;
use dsv3_train::data::{Dataset, Document};
use dsv3_train::trainer::Trainer;
use dsv3_train::TrainConfig;

use crate::common::*;

pub(crate) type AD = CpuAutodiff;

/// Deterministic pseudo-English documents (enough for several windows).
pub(crate) fn docs(n: usize) -> Vec<Document> {
    let words = [
        "the",
        "router",
        "picks",
        "experts",
        "for",
        "each",
        "token",
        "and",
        "latent",
        "cache",
        "holds",
        "keys",
        "of",
        "attention",
    ];
    let mut rng = SplitMix64::new(11);
    (0..n)
        .map(|i| Document {
            name: format!("doc{i}"),
            text: (0..40)
                .map(|_| words[rng.below(words.len())])
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect()
}

pub(crate) fn tiny_cfg() -> TrainConfig {
    TrainConfig {
        steps: 30,
        seq_len: 16,
        batch_size: 2,
        grad_accum: 1,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        val_every: 4,
        eval_windows: 4,
        ..TrainConfig::default()
    }
}

pub(crate) fn tiny_model() -> dsv3_model::DeepseekV3Config {
    dsv3_train::preset("tiny").unwrap().model
}

pub(crate) fn trainer(cfg: TrainConfig, n_docs: usize) -> Trainer<AD> {
    let data = Dataset::pack(&docs(n_docs), cfg.seq_len, cfg.val_every).unwrap();
    Trainer::<AD>::new(&tiny_model(), cfg, data, &device()).unwrap()
}

/// Every parameter's values, in module order, with its path.
pub(crate) fn params<B: dsv3_backends::DsBackend>(m: &DeepseekV3<B>) -> Vec<(String, Vec<f32>)> {
    struct V(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0
                .push(p.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    let paths = m.param_names();
    paths.into_iter().map(|(_, p)| p).zip(v.0).collect()
}

pub(crate) fn set_bias(m: &mut DeepseekV3<AD>, layer: usize, values: &[f32]) {
    let moe = m
        .moe_mut(layer)
        .unwrap_or_else(|| panic!("layer {layer} is not a MoE layer"));
    let id = moe.gate.e_score_correction_bias.id;
    let t = Tensor::<AD, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), &device())
        .require_grad();
    moe.gate.e_score_correction_bias = Param::initialized(id, t);
}
