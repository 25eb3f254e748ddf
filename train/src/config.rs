//! Training hyper-parameters and the named presets (model shape + training settings).

use dsv3_model::DeepseekV3Config;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::tokenizer;

/// Everything about a run except the model shape and the data. Saved in every checkpoint so
/// `--resume` continues with the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Total optimiser steps of the run (a resumed run stops here too).
    pub steps: usize,
    /// Tokens per sequence (the model sees `seq_len` inputs; windows hold one more).
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one step.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// λ: weight of the MTP loss (averaged over depths).
    pub mtp_lambda: f64,
    /// α: weight of the sequence-wise balance loss (per MoE layer).
    pub balance_alpha: f64,
    /// γ: bias update speed of the aux-loss-free balancing (0 = off).
    pub bias_gamma: f64,
    /// Every `val_every`-th window of the corpus is held out for validation.
    pub val_every: usize,
    /// Validation windows evaluated at most (0 = all).
    pub eval_windows: usize,
    pub eval_every: usize,
    pub log_every: usize,
    /// 0 = only at the end.
    pub checkpoint_every: usize,
    /// Complete checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// Naive or absorbed (the same function; naive is cheaper to train). Serialized as
    /// `"naive"`/`"absorbed"`.
    pub attention: dsv3_model::AttentionMode,
    /// Micro-batches computed in parallel threads (at most `grad_accum`). Flex parallelises only
    /// large matmuls; this model's many small ops run on one thread, so independent micro-batches
    /// are how a step uses more cores. The result does not depend on it (gradients are summed
    /// in micro-batch order). Backends without [`DsBackend::concurrent_micro_batches`] (the
    /// GPUs) run one at a time whatever this says.
    ///
    /// [`DsBackend::concurrent_micro_batches`]: dsv3_backends::DsBackend::concurrent_micro_batches
    pub workers: usize,
    /// Number format of the decoder blocks' Linear GEMMs (forward, input gradient, weight
    /// gradient): f32, bf16 or FP8 (DeepSeek-V3 report §3.3). Master weights stay f32.
    pub precision: Precision,
    /// FP8 scales rounded up to powers of two (UE8M0, as DeepSeek-V3.1); `precision = fp8` only.
    pub fp8_pow2_scales: bool,
    /// Storage of AdamW's two moments: f32, or bf16 as the report keeps them (§3.3.3).
    pub optimizer_state: StateDtype,
}

/// Number format of the Linear layers' training GEMMs. Serialized as `"f32"`, `"bf16"`, `"fp8"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// Operands rounded to bf16, f32 accumulation: the report's baseline.
    Bf16,
    /// e4m3 operands, 1×128 activation tiles and 128×128 weight blocks, f32 accumulation.
    Fp8,
}

/// Storage dtype of the optimiser's moments. Serialized as `"f32"`, `"bf16"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }

    /// The Linear layers' setting (`None` for f32), counting FP8 events in `counters`.
    pub fn gemm(
        &self,
        pow2_scales: bool,
        counters: &std::sync::Arc<dsv3_backends::QuantCounters>,
    ) -> Option<dsv3_backends::QuantGemm> {
        let precision = match self {
            Self::F32 => return None,
            Self::Bf16 => dsv3_backends::GemmPrecision::Bf16,
            Self::Fp8 => dsv3_backends::GemmPrecision::Fp8 { pow2_scales },
        };
        Some(dsv3_backends::QuantGemm {
            precision,
            counters: (*self == Self::Fp8).then(|| counters.clone()),
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::F32, Self::Bf16, Self::Fp8]
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown precision {s:?} (f32, bf16 or fp8)"))
    }
}

impl std::str::FromStr for StateDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown optimizer state dtype {s:?} (f32 or bf16)")),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            seq_len: 128,
            batch_size: 8,
            grad_accum: 2,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_steps: 20,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
            bias_gamma: 1e-3,
            val_every: 20,
            eval_windows: 0,
            eval_every: 100,
            log_every: 10,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            seed: 0,
            attention: dsv3_model::AttentionMode::Naive,
            workers: 2,
            precision: Precision::F32,
            fp8_pow2_scales: false,
            optimizer_state: StateDtype::F32,
        }
    }
}

impl TrainConfig {
    /// One line naming the first setting that cannot work.
    ///
    /// # Errors
    /// [`TrainError::Invalid`]: `steps`, `batch_size`, `grad_accum`, `workers`, `log_every`,
    /// `eval_every` or `keep_checkpoints` is 0; `seq_len` or `val_every` is below 2; a learning
    /// rate, `weight_decay`, `grad_clip`, a loss weight, `bias_gamma` or `eps` is negative or
    /// not finite; a beta is outside [0, 1); or `attention` is `Auto`.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.steps == 0 {
            return bad("steps must be > 0".into());
        }
        if self.seq_len < 2 {
            return bad(format!("seq_len = {} must be >= 2", self.seq_len));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be > 0".into());
        }
        if self.workers == 0 {
            return bad("workers must be > 0 (1 = micro-batches in sequence)".into());
        }
        for (name, v) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("mtp_lambda", self.mtp_lambda),
            ("balance_alpha", self.balance_alpha),
            ("bias_gamma", self.bias_gamma),
            ("eps", self.eps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} = {v} must be a finite number >= 0"));
            }
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!(
                "betas ({}, {}) must be in [0, 1)",
                self.beta1, self.beta2
            ));
        }
        if self.val_every < 2 {
            return bad(format!("val_every = {} must be >= 2", self.val_every));
        }
        if self.log_every == 0 || self.eval_every == 0 {
            return bad("log_every and eval_every must be > 0".into());
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints must be >= 1".into());
        }
        if self.attention == dsv3_model::AttentionMode::Auto {
            return bad("attention must be \"naive\" or \"absorbed\" for training".into());
        }
        Ok(())
    }

    /// Tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.seq_len * self.batch_size * self.grad_accum
    }
}

/// A named starting point: model shape and training settings.
#[derive(Debug, Clone)]
pub struct Preset {
    pub model: DeepseekV3Config,
    pub train: TrainConfig,
}

/// Names accepted by `--preset`.
pub const PRESETS: &[&str] = &["mini", "tiny", "small"];

/// Adapts a model config to the byte-level tokenizer and the sequence length.
pub fn for_bytes(mut m: DeepseekV3Config, seq_len: usize) -> DeepseekV3Config {
    m.vocab_size = tokenizer::VOCAB;
    m.bos_token_id = Some(tokenizer::BOS);
    m.eos_token_id = Some(serde_json::json!(tokenizer::EOS));
    m.max_position_embeddings = m.max_position_embeddings.max(seq_len);
    m.quantization_config = None;
    m.torch_dtype = Some("float32".into());
    m
}

/// The presets: `tiny` (a step well under a second, for smoke tests), `mini` (the README's
/// default: trains in ≤ 10 minutes on 2 cores) and `small` (~100M-parameter shape, slow here).
pub fn preset(name: &str) -> Option<Preset> {
    match name {
        "tiny" => {
            let train = TrainConfig {
                steps: 20,
                seq_len: 32,
                batch_size: 4,
                grad_accum: 1,
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 2,
                eval_every: 10,
                eval_windows: 16,
                log_every: 5,
                checkpoint_every: 10,
                ..TrainConfig::default()
            };
            Some(Preset {
                model: for_bytes(DeepseekV3Config::tiny(), train.seq_len),
                train,
            })
        }
        "mini" => {
            let train = TrainConfig::default();
            Some(Preset {
                model: for_bytes(DeepseekV3Config::mini(), train.seq_len),
                train,
            })
        }
        "small" => {
            let train = TrainConfig {
                lr: 6e-4,
                min_lr: 6e-5,
                batch_size: 8,
                seq_len: 256,
                ..TrainConfig::default()
            };
            Some(Preset {
                model: for_bytes(DeepseekV3Config::small(), train.seq_len),
                train,
            })
        }
        _ => None,
    }
}
