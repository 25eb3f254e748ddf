//! What low-precision training saves at scale: memory per GPU of weights, gradients, optimizer
//! state and the activations saved for the Linear layers' backward, for f32, bf16 and FP8
//! training (DeepSeek-V3 report §3.3), under a pipeline × expert × ZeRO-1 data-parallel layout
//! (the report's: 16-way pipeline, 64-way expert parallelism, 2048 GPUs; §3.2).
//!
//! Accounting (bytes per parameter; "quantized" = the Linear layers of the decoder blocks, as
//! in the checkpoints' FP8 set, spec §8; the rest — embeddings, head, router, norms, MTP
//! projection — stays in higher precision):
//! - compute weights: f32 4; bf16 2; FP8 1 + one f32 scale per 128×128 block for the
//!   quantized layers and bf16 2 for the rest;
//! - master weights: f32 4, held by the optimizer (the f32 run's weights are its masters);
//! - gradients: f32 4 (the report keeps them in FP32 for accumulation);
//! - AdamW moments: 2 × 4 in f32 or 2 × 2 in bf16 (`--optimizer-state bf16`);
//! - ZeRO-1 splits the master weights and moments over the replicas of each parameter;
//! - activations: the input of every quantized Linear per token (what its backward keeps): 4,
//!   2, or 1 + 4/128 bytes per value; inputs shared by two projections (q_a/kv_a, gate/up)
//!   counted once; each routed expert a token reaches keeps its own copy.
//!   Other saved activations (norms, attention core, router) are not counted.

use dsv3_model::DeepseekV3Config;

use crate::config::Precision;
use crate::error::TrainError;

/// How the GPUs split the model: `pp` pipeline stages, `ep` expert-parallel ranks per stage,
/// the rest data-parallel replicas (ZeRO-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub gpus: u64,
    pub pp: u64,
    pub ep: u64,
}

impl Layout {
    /// The report's training cluster: 2048 H800s, 16-way pipeline, 64-way expert parallelism.
    pub const REPORT: Layout = Layout {
        gpus: 2048,
        pp: 16,
        ep: 64,
    };

    /// # Errors
    /// [`TrainError::Invalid`] when a size is 0 or `gpus` is not a multiple of `pp · ep`.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.gpus == 0
            || self.pp == 0
            || self.ep == 0
            || !self.gpus.is_multiple_of(self.pp * self.ep)
        {
            return Err(TrainError::Invalid(format!(
                "{} GPUs do not split into {} pipeline stages × {} expert-parallel ranks",
                self.gpus, self.pp, self.ep
            )));
        }
        Ok(())
    }
}

/// Parameter counts of the trained model by kind (main layers and the MTP modules' blocks and
/// projections; the MTP modules share the embedding and head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSplit {
    /// Linear weights of the decoder blocks outside the routed experts.
    pub quantized_dense: u64,
    /// Routed experts' weights (all quantized).
    pub experts: u64,
    /// Everything kept in higher precision.
    pub other: u64,
}

/// Bytes of one GPU's share, for one precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemory {
    pub precision: Precision,
    pub weights: f64,
    pub master: f64,
    pub grads: f64,
    /// AdamW moments, f32 and bf16 storage.
    pub moments_f32: f64,
    pub moments_bf16: f64,
    /// Saved Linear inputs per token per decoder layer (mean over the layers).
    pub activations_per_token_layer: f64,
    /// Saved Linear inputs of one 4096-token sequence through one stage's layers.
    pub activations_per_sequence: f64,
}

/// Splits the parameters (see [`ParamSplit`]).
pub fn split(cfg: &DeepseekV3Config) -> ParamSplit {
    let h = cfg.hidden_size as u64;
    let nh = cfg.num_attention_heads as u64;
    let (dn, dr, dv) = (
        cfg.qk_nope_head_dim as u64,
        cfg.qk_rope_head_dim as u64,
        cfg.v_head_dim as u64,
    );
    let r = cfg.kv_lora_rank as u64;
    let q = match cfg.q_lora_rank {
        Some(rq) => h * rq as u64 + rq as u64 * nh * (dn + dr),
        None => h * nh * (dn + dr),
    };
    let attn = q + h * (r + dr) + r * nh * (dn + dv) + nh * dv * h;
    let mi = cfg.moe_intermediate_size as u64;
    let n_dense = cfg.first_k_dense_replace.min(cfg.num_hidden_layers) as u64;
    let n_moe = cfg.num_hidden_layers as u64 - n_dense + cfg.num_nextn_predict_layers as u64;
    let layers = n_dense + n_moe;
    let quantized_dense = layers * attn
        + n_dense * 3 * h * cfg.intermediate_size as u64
        + n_moe * 3 * h * mi * cfg.n_shared_experts as u64;
    let experts = n_moe * cfg.n_routed_experts as u64 * 3 * h * mi;
    let with_mtp = cfg.param_counts(true);
    // The MTP modules' own embedding and head copies are the main model's (shared).
    let v = cfg.vocab_size as u64;
    let total = with_mtp.total - cfg.num_nextn_predict_layers as u64 * 2 * v * h;
    ParamSplit {
        quantized_dense,
        experts,
        other: total - quantized_dense - experts,
    }
}

/// Mean over the decoder layers of the Linear-input values saved per token.
pub fn linear_inputs_per_token(cfg: &DeepseekV3Config) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = match cfg.q_lora_rank {
        Some(rq) => h + rq as f64, // x (q_a and kv_a), the normed q latent (q_b)
        None => h,
    };
    let attn = q + cfg.kv_lora_rank as f64 + (cfg.num_attention_heads * cfg.v_head_dim) as f64;
    let dense = attn + h + cfg.intermediate_size as f64;
    let mi = cfg.moe_intermediate_size as f64;
    let moe =
        attn + (h + mi * cfg.n_shared_experts as f64) + cfg.num_experts_per_tok as f64 * (h + mi);
    let n_dense = cfg.first_k_dense_replace.min(cfg.num_hidden_layers) as f64;
    let n_moe = cfg.num_hidden_layers as f64 - n_dense;
    (n_dense * dense + n_moe * moe) / cfg.num_hidden_layers.max(1) as f64
}

/// One GPU's memory for f32, bf16 and FP8 training of `cfg` under `layout`.
///
/// # Errors
/// [`TrainError::Invalid`] for a layout that does not fit ([`Layout::validate`]).
pub fn per_gpu(cfg: &DeepseekV3Config, layout: Layout) -> Result<Vec<GpuMemory>, TrainError> {
    layout.validate()?;
    let p = split(cfg);
    let pp = layout.pp as f64;
    // Dense parameters: one stage's share, replicated on every GPU of the stage.
    let dense_replicas = (layout.gpus / layout.pp) as f64;
    // Experts: a stage's experts split over `ep` ranks, replicated over the rest.
    let expert_replicas = (layout.gpus / (layout.pp * layout.ep)) as f64;
    let (qd, other) = (p.quantized_dense as f64 / pp, p.other as f64 / pp);
    let ex = p.experts as f64 / (pp * layout.ep as f64);
    let held = qd + other + ex;
    let sharded = (qd + other) / dense_replicas + ex / expert_replicas;
    let per_value = linear_inputs_per_token(cfg);
    let layers_per_stage = (cfg.num_hidden_layers as f64 / pp).ceil();
    Ok([Precision::F32, Precision::Bf16, Precision::Fp8]
        .into_iter()
        .map(|precision| {
            let (weights, master, act) = match precision {
                Precision::F32 => (4.0 * held, 0.0, 4.0),
                Precision::Bf16 => (2.0 * held, 4.0 * sharded, 2.0),
                Precision::Fp8 => (
                    (1.0 + 4.0 / 16384.0) * (qd + ex) + 2.0 * other,
                    4.0 * sharded,
                    1.0 + 4.0 / 128.0,
                ),
            };
            GpuMemory {
                precision,
                weights,
                master,
                grads: 4.0 * held,
                moments_f32: 8.0 * sharded,
                moments_bf16: 4.0 * sharded,
                activations_per_token_layer: act * per_value,
                activations_per_sequence: act * per_value * 4096.0 * layers_per_stage,
            }
        })
        .collect())
}
