//! DeepSeek-V3 pretraining on Burn.
//!
//! - [`data`]: text files, directories, JSONL; packing with a separator; validation split;
//!   seeded order. [`tokenizer`]: byte-level, saved as a Hugging Face `tokenizer.json`.
//!   [`corpus`]: the embedded default corpus.
//! - [`forward`] + [`loss`]: next-token CE + λ·MTP CE + the sequence-wise balance loss.
//! - [`balance`]: the aux-loss-free bias update. [`optim`]: AdamW, schedule, global clipping.
//! - [`trainer`]: one step / one validation pass; [`checkpoint`]: atomic HF-layout checkpoints
//!   with optimiser and data-order state; [`run()`]: a whole run as `dsv3 train` does it;
//!   [`metrics`] and [`plot`]: JSONL log, progress bar, PNG.

pub mod balance;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod error;
pub mod forward;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod run;
pub mod tokenizer;
pub mod trainer;

pub use config::{preset, Preset, TrainConfig, PRESETS};
pub use error::TrainError;
pub use run::{run, DataSource, RunOptions, RunSummary};
pub use tokenizer::ByteTokenizer;
pub use trainer::{EvalStats, StepStats, Trainer};
