//! Pipeline parallelism (DeepSeek-V3 report §3.2.1, "DualPipe and computation-communication
//! overlap"; DeepSeek's DualPipe repository).
//!
//! - [`schedule`]: 1F1B, ZB1P, DualPipe and DualPipeV as every rank's ordered action list
//!   (F, B, B-input, W, F&B, sends and receives), with each schedule's preconditions.
//! - [`sim`]: an event-driven run of a schedule with per-action costs: makespan, per-rank
//!   bubble and peak activations, deadlock detection; compared with the report's Table 2.
//! - [`split`]: the backward split into B (input gradient) and W (weight gradient) for
//!   Burn, with the queue of deferred weight gradients.
//! - [`exec`]: one training step of a schedule for real, over a communicator.
//! - [`timeline`]: the simulated run drawn as a PNG (ranks as rows, as in the report's
//!   Figure 5).

pub mod exec;
pub mod schedule;
pub mod sim;
pub mod split;
pub mod timeline;

pub use schedule::{Action, Chunk, Schedule, ScheduleKind};
pub use sim::{report_activations, simulate, Costs, SimReport, Span};

/// What can go wrong building or running a pipeline schedule. Each message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("unknown pipeline schedule {0:?} (available: 1f1b, zb1p, dualpipe, dualpipev)")]
    UnknownSchedule(String),
    #[error("a pipeline needs at least one rank (--pp 0)")]
    NoRanks,
    #[error("a pipeline step needs at least one micro-batch")]
    NoMicroBatches,
    #[error("{kind} needs an even number of pipeline ranks (PP = {ranks}): each rank pairs stage r with stage PP-1-r")]
    OddRanks { kind: ScheduleKind, ranks: usize },
    #[error("{kind} needs an even number of micro-batches (got {micro_batches}): half enter at each end")]
    OddMicroBatches {
        kind: ScheduleKind,
        micro_batches: usize,
    },
    #[error("{kind} needs at least 2·PP = {needed} micro-batches (got {micro_batches})")]
    TooFewMicroBatches {
        kind: ScheduleKind,
        micro_batches: usize,
        needed: usize,
    },
    #[error("invalid pipeline costs {0}")]
    BadCosts(String),
    #[error("pipeline deadlock: no rank can go on: {0}")]
    Deadlock(String),
    #[error("invalid pipeline schedule: {0}")]
    InvalidSchedule(String),
    #[error("cannot draw the pipeline timeline {path}: {reason}")]
    Draw {
        path: std::path::PathBuf,
        reason: String,
    },
}
