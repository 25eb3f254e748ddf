//! DeepSeek-V3 written once against Burn's backend abstraction.
//!
//! The model computes exactly what the repository's `docs/spec.md` states: MLA attention with q/kv low-rank projections and decoupled rope,
//! DeepSeekMoE with the sigmoid group-limited router and its aux-loss-free bias, YaRN, dense first
//! layers and the MTP modules. Weights bind by their Hugging Face names.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use dsv3_model::{load, ForwardOptions, LoadOptions};
//!
//! let device = Default::default();
//! let (model, _report) = load::<Flex>("path/to/model".as_ref(), &device, &LoadOptions::default())?;
//! let tokens = model.tokens_tensor(&[0, 15, 7])?;
//! let out = model.forward(tokens, 0, None, &ForwardOptions::default());
//! println!("{:?}", out.logits.dims()); // [1, 3, vocab]
//! # Ok::<(), dsv3_model::ModelError>(())
//! ```
//!
//! How it is put together (one file per concept, imports flowing one way):
//! [`DeepseekV3`] holds the embedding, a list of [`DecoderLayer`]s (MLA attention, [`Mla`], and
//! a dense [`Mlp`] or a [`Moe`] layer), the final norm, `lm_head` and the [`MtpLayer`]s (each
//! wrapping one more `DecoderLayer`). [`DeepseekV3::forward`] is the one walk over the blocks;
//! [`ForwardOptions`] asks it for routing, router affinities (training) or per-block outputs.
//! [`Span`] carries the positions and mask of a forward's tokens, [`LatentStore`] the latent
//! cache. [`load`]/[`save`] bind parameters to checkpoint tensors by name ([`checkpoint`] reads
//! safetensors, [`fp8`] the block-scaled e4m3 format).

// The crate's API is what the root re-exports; `checkpoint` and `fp8` are also public as
// modules: the safetensors reader and the FP8 block format are useful on their own.
mod block;
mod cache;
pub mod checkpoint;
mod config;
mod error;
mod expert_parallel;
pub mod fp8;
mod held;
mod linear;
mod load;
mod mla;
mod mlp;
mod model;
mod moe;
mod mtp;
mod names;
mod norm;
mod positions;
mod rope;
mod rotation;

pub use block::{BlockOutput, DecoderLayer, FeedForward, FfnOutput, ForwardOptions};
pub use cache::{LatentKv, LatentStore};
pub use config::{DeepseekV3Config, ParamCounts, QuantizationConfig, RopeScaling, Yarn};
pub use error::{ConfigError, LoadError, ModelError};
pub use expert_parallel::{
    expert_of, expert_owner, owned_experts, EpStats, ExpertParallel, Holding,
};
pub use held::HeldLayers;
pub use linear::Linear;
pub use load::{
    load, load_from, load_from_with, load_with, save, save_expert_parallel, save_index,
    save_tensors, LoadOptions, LoadReport, SaveDtype, WeightOptions, WeightStorage,
};
pub use mla::{AttentionMode, Mla, MlaConfig};
pub use mlp::{Mlp, MlpConfig};
pub use model::{DeepseekV3, DeepseekV3Model, ForwardOutput, LayerRouting, LayerScores, MtpOutput};
pub use moe::{route, Moe, MoeConfig, MoeGate, PackedExperts, RouterConfig, Routing};
pub use mtp::{MtpLayer, MtpLayerConfig, MtpLayerOutput, SharedHead};
pub use norm::{RmsNorm, RmsNormConfig};
pub use positions::{padded_causal_mask, Span};
pub use rope::{
    check_positions, softmax_scale, yarn_correction_range, yarn_mscale, RotaryEmbedding,
    MAX_POSITION,
};

/// Re-exported so users name one Burn.
pub use burn;
