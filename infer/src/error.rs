//! Typed errors of the inference engine. Each message is one line that names the value at fault.

use std::path::PathBuf;

use dsv3_model::ModelError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A sampling or generation option outside its domain.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("context full: {needed} positions needed but the cache holds at most {max_context} (raise --max-context)")]
    ContextFull { needed: usize, max_context: usize },
    #[error("speculative decoding needs {0}")]
    Speculative(String),
    #[error("stop strings need a tokenizer (the model directory has no tokenizer.json)")]
    StopStringsNeedTokenizer,
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(
        "token id {id} is not below the model's vocab_size = {vocab} (a tokenizer of another model?)"
    )]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("cannot read tensor data from the device: {0}")]
    Readback(String),
}

impl InferError {
    pub(crate) fn invalid(name: &'static str, value: impl ToString, reason: &'static str) -> Self {
        InferError::InvalidOption {
            name,
            value: value.to_string(),
            reason,
        }
    }
}
