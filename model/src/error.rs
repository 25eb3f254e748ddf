//! Typed errors. Every message is one line that names the file, tensor or value at fault.

use std::path::PathBuf;

pub use crate::checkpoint::LoadError;

/// A `config.json` that cannot be read or describes a model this crate cannot compute.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid DeepSeek-V3 config: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Anything that can go wrong between a model directory and logits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("token id {id} at position {index} is out of range (vocab_size = {vocab})")]
    TokenOutOfRange { id: i64, index: usize, vocab: usize },
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    /// `last`: the highest position asked for.
    #[error("position {last} is out of the supported range (positions must be below {max})")]
    PositionOutOfRange { last: usize, max: usize },
    /// An MTP prediction the model or the input cannot give (the reason says which).
    #[error("no MTP prediction: {0}")]
    NoMtp(String),
    #[error("{} checkpoint tensor(s) are not used by the model (strict mode): {}", names.len(), names.join(", "))]
    UnexpectedTensors { names: Vec<String> },
    #[error("{0}")]
    Invalid(String),
    /// Loading failed and `config.json` left size fields to HF's defaults (the 671B sizes):
    /// the likely cause, named after the error.
    #[error("{source} (config.json does not set {}: HF's defaults, the 671B model's sizes, were used)", fields.join(", "))]
    UnsetSizes {
        source: Box<ModelError>,
        fields: Vec<&'static str>,
    },
}
