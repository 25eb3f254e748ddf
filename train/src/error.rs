//! Typed errors of training. Every message is one line that says what is wrong and where.

use std::path::PathBuf;

use dsv3_model::ModelError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("data path {0} does not exist")]
    MissingData(PathBuf),
    #[error("no text found in {0} (empty file, or a directory without readable text files)")]
    EmptyData(PathBuf),
    #[error("{path} is not UTF-8 text ({reason})")]
    NotText { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("corpus too small: {tokens} tokens, but one training and one validation sequence of {seq_len}+1 tokens need at least {needed}")]
    CorpusTooSmall {
        tokens: usize,
        seq_len: usize,
        needed: usize,
    },
    #[error("invalid training setting: {0}")]
    Invalid(String),
    /// A collective of a distributed run failed (or ranks disagreed about where they were).
    #[error("communication between the ranks failed: {0}")]
    Comm(#[from] dsv3_backends::comm::CommError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A pipeline schedule, simulation or pipeline run failed.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline_error::PipelineError),
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--resume: no complete checkpoint (step-N/ with train_state.json) in {0}")]
    NoCheckpoint(PathBuf),
    #[error("checkpoint {path} is unusable: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("{what} is not finite at step {step} (first non-finite: {location}); stopped, the last good checkpoint is kept")]
    NonFinite {
        what: &'static str,
        step: usize,
        location: String,
    },
}

impl TrainError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        e: impl std::fmt::Display,
    ) -> Self {
        TrainError::Io {
            action,
            path: path.into(),
            reason: e.to_string(),
        }
    }
}
