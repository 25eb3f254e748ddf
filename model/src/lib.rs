//! DeepSeek-V3 written once against Burn's backend abstraction.
//!
//! The model computes exactly what `../shared/deepseek-v3-spec.md` (kept in the repository as
//! `docs/spec.md`) states: MLA attention with q/kv low-rank projections and decoupled rope,
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

pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fp8;
pub mod linear;
pub mod load;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
mod names;
pub mod norm;
pub mod positions;
pub mod rope;

pub use block::{BlockOutput, DecoderLayer, FeedForward, ForwardOptions};
pub use cache::{LatentKv, LatentStore};
pub use config::DeepseekV3Config;
pub use error::{ConfigError, LoadError, ModelError};
pub use load::{
    load, load_from, load_from_with, load_with, save, LoadOptions, LoadReport, SaveDtype,
    WeightOptions, WeightStorage,
};
pub use mla::AttentionMode;
pub use model::{DeepseekV3, ForwardOutput, LayerRouting, LayerScores, MtpOutput};
pub use moe::Routing;
pub use positions::{padded_causal_mask, Span};

/// Re-exported so users name one Burn.
pub use burn;
