//! DeepSeek-V3 pretraining on Burn.
//!
//! - [`data`]: text files, directories, JSONL; packing with a separator; validation split;
//!   seeded order. [`ByteTokenizer`]: byte-level, saved as a Hugging Face `tokenizer.json`.
//!   [`data::embedded_documents`]: the embedded default corpus.
//! - [`forward`] + [`loss`]: next-token CE + λ·MTP CE + the sequence-wise balance loss.
//! - [`balance`]: the aux-loss-free bias update. `optim`: AdamW, schedule, global clipping.
//! - [`trainer`]: one step / one validation pass; [`checkpoint`]: atomic HF-layout checkpoints
//!   with optimiser and data-order state; [`run()`]: a whole run as `dsv3 train` does it;
//!   [`metrics`] and `plot`: JSONL log, progress bar, PNG.
//! - [`pipeline`]: pipeline-parallel schedules (1F1B, ZB1P, DualPipe, DualPipeV), their
//!   event-driven simulator and timeline PNG.
//! - Post-training: [`task`] generates a task (addition as chat turns, train and held-out
//!   sets); [`sft`] lays out tokenised conversations with their assistant masks for
//!   [`fine_tune`]; [`distill`] is the logit-distillation loss and teacher; [`grpo`] the GRPO
//!   objective, [`rl`] its trainer (groups of sampled completions → updates) and [`reward`]
//!   the rule rewards `dsv3 rl` scores completions with; [`eval`] scores as
//!   lm-evaluation-harness does (perplexity, bits per byte, acc, acc_norm, exact match).

// The pieces a custom training loop composes are public modules; the run's plumbing (seeded
// init, optimiser wiring, plots, the embedded corpus) is reached through `run`/`Trainer`.
pub mod balance;
pub mod checkpoint;
mod config;
mod corpus;
pub mod data;
pub mod distill;
mod error;
pub mod eval;
pub mod forward;
pub mod grpo;
pub mod init;
pub mod loss;
pub mod memory;
pub mod metrics;
mod objective;
mod optim;
pub mod parallel;
pub mod pipeline;
mod pipeline_error;
mod plot;
pub mod reward;
pub mod rl;
mod run;
pub mod sft;
pub mod task;
mod tokenizer;
pub mod trainer;

pub use config::{for_bytes, preset, Precision, Preset, StateDtype, TrainConfig, PRESETS};
pub use error::TrainError;
pub use parallel::Parallel;
pub use plot::compare_runs;
pub use run::{
    fine_tune, has_checkpoint, holds_saved_model, run, DataSource, FineTune, Given, RunOptions,
    RunSummary,
};
pub use tokenizer::{ByteTokenizer, VOCAB as BYTE_VOCAB};
pub use trainer::{CommStats, EvalStats, StepStats, Trainer};
