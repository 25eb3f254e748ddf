//! The Hugging Face `config.json` of DeepSeek-V3, field names verbatim.
//!
//! One serde struct reads the released file (and any smaller model of the same architecture);
//! [`DeepseekV3Config::validate`] says in one line what is inconsistent.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::ConfigError;

/// YaRN / RoPE scaling parameters, as found in `rope_scaling` (legacy) or `rope_parameters` (HF 5.x).
///
/// Read leniently, as HF reads them: the type may be under `type` (DeepSeek's release),
/// `rope_type` (HF), or both (what transformers' `save_pretrained` writes, since its config class
/// copies `type` into `rope_type`); both must then agree. Integer-valued sizes may be written as
/// floats (`4096.0`). Saved with both keys, so the official remote code (which reads `type`) and
/// HF (which reads `rope_type`) both understand it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(try_from = "RawRopeScaling", into = "RawRopeScaling")]
pub struct RopeScaling {
    /// `"yarn"` or `"default"` (others are refused by [`DeepseekV3Config::validate`]).
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// HF 5.x moves `rope_theta` inside `rope_parameters`.
    pub rope_theta: Option<f64>,
}

/// The on-disk form of [`RopeScaling`]: both spellings of the type, sizes as any JSON number.
#[derive(Serialize, Deserialize)]
struct RawRopeScaling {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    factor: Option<f64>,
    /// An integer in HF's files, sometimes written as `4096.0` by other tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    original_max_position_embeddings: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;

    fn try_from(r: RawRopeScaling) -> Result<Self, String> {
        let rope_type = match (r.legacy_type, r.rope_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "rope type given twice and differently: \"type\": {a:?}, \"rope_type\": {b:?}"
                ))
            }
            (a, b) => b.or(a),
        };
        let original_max_position_embeddings = match r.original_max_position_embeddings {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(n), _) => Some(n as usize),
                (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => {
                    Some(f as usize)
                }
                _ => {
                    return Err(format!(
                        "original_max_position_embeddings = {v} is not a whole number of positions"
                    ))
                }
            },
        };
        Ok(Self {
            rope_type,
            factor: r.factor,
            original_max_position_embeddings,
            beta_fast: r.beta_fast,
            beta_slow: r.beta_slow,
            mscale: r.mscale,
            mscale_all_dim: r.mscale_all_dim,
            rope_theta: r.rope_theta,
        })
    }
}

impl From<RopeScaling> for RawRopeScaling {
    fn from(r: RopeScaling) -> Self {
        Self {
            legacy_type: r.rope_type.clone(),
            rope_type: r.rope_type,
            factor: r.factor,
            original_max_position_embeddings: r.original_max_position_embeddings.map(Into::into),
            beta_fast: r.beta_fast,
            beta_slow: r.beta_slow,
            mscale: r.mscale,
            mscale_all_dim: r.mscale_all_dim,
            rope_theta: r.rope_theta,
        }
    }
}

/// `quantization_config` of an FP8 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    #[serde(default)]
    pub quant_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_block_size: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_fmt: Option<String>,
}

/// The model's hyper-parameters. Defaults are those of HF transformers' `DeepseekV3Config`
/// (the 671B shape), so a `config.json` that omits a field means what it means to HF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeepseekV3Config {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense-layer MLP.
    pub intermediate_size: usize,
    /// Width of one routed expert (and the unit of the shared experts).
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Layers `< first_k_dense_replace` use the dense MLP.
    pub first_k_dense_replace: usize,
    /// Ignored (as by the official code and HF 5.x); kept so a saved config round-trips.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_layer_freq: Option<usize>,
    pub num_attention_heads: usize,
    /// Meaningless for MLA; must equal `num_attention_heads` when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// `null` = a direct `q_proj` (V2-Lite style).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: String,
    pub scoring_func: String,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_aux: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ep_size: Option<usize>,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Legacy key (the released checkpoint uses it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// HF 5.x key; wins over `rope_scaling` when both are present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    /// HF only: the checkpoint's rotary dims are interleaved pairs. Must be true for DeepSeek weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_interleave: Option<bool>,
    pub max_position_embeddings: usize,
    /// Number of MTP modules, stored as layers `num_hidden_layers..`.
    #[serde(alias = "num_mtp_layers")]
    pub num_nextn_predict_layers: usize,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub tie_word_embeddings: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    pub initializer_range: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_cache: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretraining_tp: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
}

impl Default for DeepseekV3Config {
    /// HF transformers' `DeepseekV3Config()` defaults: the 671B shape.
    fn default() -> Self {
        Self {
            architectures: vec!["DeepseekV3ForCausalLM".into()],
            model_type: "deepseek_v3".into(),
            vocab_size: 129280,
            hidden_size: 7168,
            intermediate_size: 18432,
            moe_intermediate_size: 2048,
            num_hidden_layers: 61,
            first_k_dense_replace: 3,
            moe_layer_freq: None,
            num_attention_heads: 128,
            num_key_value_heads: None,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            n_routed_experts: 256,
            n_shared_experts: 1,
            num_experts_per_tok: 8,
            n_group: 8,
            topk_group: 4,
            topk_method: "noaux_tc".into(),
            scoring_func: "sigmoid".into(),
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            seq_aux: None,
            aux_loss_alpha: None,
            ep_size: None,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            rope_interleave: None,
            max_position_embeddings: 4096,
            num_nextn_predict_layers: 0,
            attention_bias: false,
            attention_dropout: 0.0,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            initializer_range: 0.02,
            torch_dtype: None,
            quantization_config: None,
            use_cache: None,
            pretraining_tp: None,
            transformers_version: None,
        }
    }
}

/// YaRN parameters resolved from either key, with HF's defaulting rules (spec §3.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

impl DeepseekV3Config {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// - [`ConfigError::Io`]: the file cannot be read (missing, not UTF-8, permissions).
    /// - [`ConfigError::Parse`]: it is not JSON of this shape (wrong type, missing brace).
    /// - [`ConfigError::Invalid`]: it parses but fails [`Self::validate`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_unset(path).map(|(cfg, _)| cfg)
    }

    /// [`Self::from_file`], also returning the fields of [`Self::SIZE_FIELDS`] the file does
    /// not set (each then takes HF's default, the 671B model's size).
    ///
    /// # Errors
    /// As [`Self::from_file`].
    pub fn from_file_unset(path: &Path) -> Result<(Self, Vec<&'static str>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        // The struct's serde defaults hide which fields were absent: the keys say.
        let keys: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap_or_default();
        let unset = Self::SIZE_FIELDS
            .iter()
            .copied()
            .filter(|f| !keys.contains_key(*f))
            .collect();
        Ok((cfg, unset))
    }

    /// The fields that size the model's tensors, and routing's k: a file that omits one
    /// describes part of the 671B model, which a smaller checkpoint then contradicts (or, for
    /// k, silently routes each token to 8 experts).
    pub const SIZE_FIELDS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "first_k_dense_replace",
    ];

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes")
    }

    /// The rope parameters in force: `rope_parameters` if present, else legacy `rope_scaling`.
    fn rope_params(&self) -> Option<&RopeScaling> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    pub fn rope_base(&self) -> f64 {
        self.rope_params()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// YaRN settings when the rope type is `yarn`, else `None` (plain RoPE).
    pub fn yarn(&self) -> Option<Yarn> {
        let r = self.rope_params()?;
        if r.rope_type.as_deref() != Some("yarn") {
            return None;
        }
        let orig = r
            .original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings);
        let factor = r
            .factor
            .unwrap_or(self.max_position_embeddings as f64 / orig as f64);
        Some(Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast: r.beta_fast.unwrap_or(32.0),
            beta_slow: r.beta_slow.unwrap_or(1.0),
            mscale: r.mscale,
            mscale_all_dim: r.mscale_all_dim,
        })
    }

    /// Dimension of one query/key head (nope + rope parts).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Block size of FP8 weight scales (128 for DeepSeek-V3).
    pub fn fp8_block(&self) -> usize {
        self.quantization_config
            .as_ref()
            .and_then(|q| q.weight_block_size.as_ref())
            .and_then(|b| b.first().copied())
            .unwrap_or(128)
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    /// Checkpoint layer index of MTP module `k`: the released checkpoints store it as
    /// `model.layers.{num_hidden_layers + k}`. The one place that rule is written.
    pub fn mtp_layer(&self, k: usize) -> usize {
        self.num_hidden_layers + k
    }

    /// The MTP module stored as checkpoint layer `layer`, if it is one ([`Self::mtp_layer`]'s
    /// inverse; `None` for a main layer).
    pub fn mtp_module(&self, layer: usize) -> Option<usize> {
        layer.checked_sub(self.num_hidden_layers)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }

    /// Checks the config is one this implementation computes correctly.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first setting at fault: a zero size, an odd
    /// `qk_rope_head_dim`, grouped kv heads, another activation, `tie_word_embeddings`,
    /// `attention_bias`, a router the experts/groups cannot satisfy or that is not sigmoid +
    /// `noaux_tc`, a rope type other than `yarn`/`default`, or quantization other than FP8 e4m3
    /// with square blocks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("intermediate_size", self.intermediate_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return bad(format!(
                "qk_rope_head_dim = {} must be even (rotary dims come in pairs)",
                self.qk_rope_head_dim
            ));
        }
        if self.q_lora_rank == Some(0) {
            return bad("q_lora_rank must be null or > 0".into());
        }
        if let Some(kv) = self.num_key_value_heads {
            if kv != self.num_attention_heads {
                return bad(format!(
                    "num_key_value_heads = {kv} must equal num_attention_heads = {} (MLA has no grouped kv heads)",
                    self.num_attention_heads
                ));
            }
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act = {:?} is not supported (only \"silu\")",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps = {} must be positive",
                self.rms_norm_eps
            ));
        }
        if self.rope_interleave == Some(false) {
            return bad("rope_interleave = false is not supported: DeepSeek checkpoints use interleaved rotary pairs".into());
        }
        if self.tie_word_embeddings {
            return bad(
                "tie_word_embeddings = true is not supported (DeepSeek-V3 has a separate lm_head)"
                    .into(),
            );
        }
        if self.attention_bias {
            return bad(
                "attention_bias = true is not supported (DeepSeek-V3 projections have no bias)"
                    .into(),
            );
        }
        if self.first_k_dense_replace < self.num_hidden_layers {
            // There are MoE layers: check the router.
            if self.n_routed_experts == 0 || self.moe_intermediate_size == 0 {
                return bad("n_routed_experts and moe_intermediate_size must be > 0 when there are MoE layers".into());
            }
            if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
                return bad(format!(
                    "n_routed_experts = {} is not divisible by n_group = {}",
                    self.n_routed_experts, self.n_group
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return bad(format!(
                    "topk_group = {} must be in 1..=n_group = {}",
                    self.topk_group, self.n_group
                ));
            }
            let per_group = self.n_routed_experts / self.n_group;
            if self.n_group > 1 && per_group < 2 {
                return bad(format!(
                    "each group holds {per_group} expert(s); group scores sum the top 2, so n_routed_experts / n_group must be >= 2"
                ));
            }
            let reachable = per_group * self.topk_group;
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
                return bad(format!(
                    "num_experts_per_tok = {} must be in 1..={} (the experts in topk_group = {} kept groups of {})",
                    self.num_experts_per_tok, reachable, self.topk_group, per_group
                ));
            }
            if self.scoring_func != "sigmoid" {
                return bad(format!(
                    "scoring_func = {:?} is not supported (only \"sigmoid\")",
                    self.scoring_func
                ));
            }
            if self.topk_method != "noaux_tc" {
                return bad(format!(
                    "topk_method = {:?} is not supported (only \"noaux_tc\")",
                    self.topk_method
                ));
            }
            if !self.routed_scaling_factor.is_finite() {
                return bad("routed_scaling_factor must be finite".into());
            }
        }
        if let Some(y) = self.yarn() {
            if !(y.factor.is_finite() && y.factor > 0.0) {
                return bad(format!("rope factor = {} must be positive", y.factor));
            }
            if y.original_max_position_embeddings == 0 {
                return bad("original_max_position_embeddings must be > 0".into());
            }
        }
        if let Some(r) = self.rope_params() {
            if let Some(t) = r.rope_type.as_deref() {
                if t != "yarn" && t != "default" {
                    return bad(format!(
                        "rope type {t:?} is not supported (\"yarn\" or \"default\")"
                    ));
                }
            }
        }
        if self.rope_base().is_nan() || self.rope_base() <= 1.0 {
            return bad(format!("rope_theta = {} must be > 1", self.rope_base()));
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return bad(format!(
                    "quantization_config.quant_method = {:?} is not supported (only \"fp8\")",
                    q.quant_method
                ));
            }
            if let Some(f) = &q.fmt {
                if f != "e4m3" {
                    return bad(format!(
                        "quantization_config.fmt = {f:?} is not supported (only \"e4m3\")"
                    ));
                }
            }
            match &q.weight_block_size {
                Some(b) if b.len() == 2 && b[0] == b[1] && b[0] > 0 => {}
                None => {}
                Some(b) => return bad(format!("quantization_config.weight_block_size = {b:?} must be two equal positive sizes")),
            }
        }
        Ok(())
    }

    /// The released 671B model (`deepseek-ai/DeepSeek-V3` config.json).
    pub fn deepseek_v3_671b() -> Self {
        Self {
            rope_theta: Some(10000.0),
            max_position_embeddings: 163840,
            num_nextn_predict_layers: 1,
            num_key_value_heads: Some(128),
            bos_token_id: Some(0),
            eos_token_id: Some(serde_json::json!(1)),
            rope_scaling: Some(RopeScaling {
                rope_type: Some("yarn".into()),
                factor: Some(40.0),
                original_max_position_embeddings: Some(4096),
                beta_fast: Some(32.0),
                beta_slow: Some(1.0),
                mscale: Some(1.0),
                mscale_all_dim: Some(1.0),
                rope_theta: None,
            }),
            torch_dtype: Some("bfloat16".into()),
            quantization_config: Some(QuantizationConfig {
                quant_method: "fp8".into(),
                fmt: Some("e4m3".into()),
                activation_scheme: Some("dynamic".into()),
                weight_block_size: Some(vec![128, 128]),
                scale_fmt: None,
            }),
            ..Self::default()
        }
    }

    /// A tiny model of the same architecture for smoke tests (q-LoRA, YaRN, grouped routing, MTP).
    pub fn tiny() -> Self {
        let mut c = Self::deepseek_v3_671b();
        c.vocab_size = 331;
        c.hidden_size = 72;
        c.intermediate_size = 120;
        c.moe_intermediate_size = 24;
        c.num_hidden_layers = 3;
        c.first_k_dense_replace = 1;
        c.num_attention_heads = 3;
        c.num_key_value_heads = Some(3);
        c.q_lora_rank = Some(40);
        c.kv_lora_rank = 24;
        c.qk_nope_head_dim = 12;
        c.qk_rope_head_dim = 8;
        c.v_head_dim = 10;
        c.n_routed_experts = 16;
        c.n_shared_experts = 1;
        c.num_experts_per_tok = 4;
        c.n_group = 4;
        c.topk_group = 2;
        c.max_position_embeddings = 4096;
        c.rope_scaling = Some(RopeScaling {
            rope_type: Some("yarn".into()),
            factor: Some(4.0),
            original_max_position_embeddings: Some(1024),
            beta_fast: Some(32.0),
            beta_slow: Some(1.0),
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            rope_theta: None,
        });
        c.quantization_config = None;
        c.torch_dtype = Some("float32".into());
        c
    }

    /// A ~100M-parameter V3-shaped model (for benchmarks and the training default).
    pub fn small() -> Self {
        let mut c = Self::tiny();
        c.vocab_size = 8000;
        c.hidden_size = 512;
        c.intermediate_size = 1408;
        c.moe_intermediate_size = 352;
        c.num_hidden_layers = 6;
        c.first_k_dense_replace = 1;
        c.num_attention_heads = 8;
        c.num_key_value_heads = Some(8);
        c.q_lora_rank = Some(192);
        c.kv_lora_rank = 128;
        c.qk_nope_head_dim = 48;
        c.qk_rope_head_dim = 24;
        c.v_head_dim = 48;
        c.n_routed_experts = 32;
        c.n_shared_experts = 1;
        c.num_experts_per_tok = 4;
        c.n_group = 4;
        c.topk_group = 2;
        c
    }

    /// The architecture at toy size for training on a CPU (`dsv3 train`'s default): MLA with
    /// q-LoRA, 1 dense + 3 MoE layers of 16 routed experts in 4 groups (top-2 from 2 groups,
    /// 1 shared), one MTP module, YaRN as in V3.
    pub fn mini() -> Self {
        let mut c = Self::tiny();
        c.hidden_size = 192;
        c.intermediate_size = 512;
        c.moe_intermediate_size = 128;
        c.num_hidden_layers = 4;
        c.first_k_dense_replace = 1;
        c.num_attention_heads = 4;
        c.num_key_value_heads = Some(4);
        c.q_lora_rank = Some(96);
        c.kv_lora_rank = 64;
        c.qk_nope_head_dim = 32;
        c.qk_rope_head_dim = 16;
        c.v_head_dim = 32;
        c.n_routed_experts = 16;
        c.n_shared_experts = 1;
        c.num_experts_per_tok = 2;
        c.n_group = 4;
        c.topk_group = 2;
        c.num_nextn_predict_layers = 1;
        // YaRN and the context length are tiny's (as in V3: factor 4 here).
        c
    }

    /// Named presets for the CLI.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "671b" | "deepseek-v3" => Some(Self::deepseek_v3_671b()),
            "tiny" => Some(Self::tiny()),
            "mini" => Some(Self::mini()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] = &["671b", "small", "mini", "tiny"];

    /// Parameter counts: (total, active per token), MTP modules included in total only when
    /// `with_mtp`. Active counts the shared experts and `k` routed experts per MoE layer.
    pub fn param_counts(&self, with_mtp: bool) -> ParamCounts {
        let h = self.hidden_size as u64;
        let nh = self.num_attention_heads as u64;
        let qk = self.qk_head_dim() as u64;
        let attn = {
            let q = match self.q_lora_rank {
                Some(rq) => {
                    let rq = rq as u64;
                    h * rq + rq + rq * nh * qk
                }
                None => h * nh * qk,
            };
            let r = self.kv_lora_rank as u64;
            let kv = h * (r + self.qk_rope_head_dim as u64)
                + r
                + r * nh * (self.qk_nope_head_dim as u64 + self.v_head_dim as u64);
            let o = nh * self.v_head_dim as u64 * h;
            q + kv + o
        };
        let norms = 2 * h;
        let mlp = |w: u64| 3 * h * w;
        let dense = attn + norms + mlp(self.intermediate_size as u64);
        let mi = self.moe_intermediate_size as u64;
        let e = self.n_routed_experts as u64;
        let shared = mlp(mi * self.n_shared_experts as u64);
        let router = e * h + e;
        let moe_total = attn + norms + shared + router + e * mlp(mi);
        let moe_active = attn + norms + shared + router + self.num_experts_per_tok as u64 * mlp(mi);
        let n_dense = self.first_k_dense_replace.min(self.num_hidden_layers) as u64;
        let n_moe = self.num_hidden_layers as u64 - n_dense;
        let v = self.vocab_size as u64;
        let embed = v * h;
        let head = v * h + h;
        let main_total = embed + head + n_dense * dense + n_moe * moe_total;
        let main_active = embed + head + n_dense * dense + n_moe * moe_active;
        let mtp_layer = moe_total + embed + 2 * h + 2 * h * h + h + v * h;
        let mtp = self.num_nextn_predict_layers as u64 * mtp_layer;
        ParamCounts {
            total: main_total + if with_mtp { mtp } else { 0 },
            active_per_token: main_active,
            mtp,
        }
    }
}

/// Parameter counts of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: u64,
    pub active_per_token: u64,
    /// Parameters of all MTP modules (including their embedding/head copies).
    pub mtp: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in DeepseekV3Config::PRESETS {
            DeepseekV3Config::preset(p).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn released_671b_counts() {
        // The paper: 671B total (+14B MTP), 37B active.
        let c = DeepseekV3Config::deepseek_v3_671b().param_counts(false);
        assert!((c.total as f64 / 1e9 - 671.0).abs() < 1.0, "{}", c.total);
        assert!(
            (c.active_per_token as f64 / 1e9 - 37.5).abs() < 1.0,
            "{}",
            c.active_per_token
        );
    }
}
