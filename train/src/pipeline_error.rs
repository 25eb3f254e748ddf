//! The pipeline's vocabulary that the crate's error type also speaks: the schedule names
//! ([`ScheduleKind`]) and what can go wrong building or running one ([`PipelineError`]). Kept
//! apart from the `pipeline` module so that `error.rs` (which wraps [`PipelineError`]) and the
//! pipeline code (which returns `TrainError`) do not import each other.

use std::fmt;

/// A pipeline schedule by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// One forward, one backward (PipeDream-flush): warm-up forwards, then alternate, then
    /// cool-down backwards. Backward is the full backward (input and weight gradients).
    OneFOneB,
    /// Zero-bubble ZB-H1 (Qi et al. 2023, the report's "ZB1P"): 1F1B with the backward split
    /// into B (input gradient) and W (weight gradient); stage `s` keeps `s` weight gradients
    /// pending so that the backward chain runs at B's cost, and runs them in the cool-down.
    ZeroBubble,
    /// DualPipe (report §3.2.1): micro-batches enter from both ends; two stages per rank.
    DualPipe,
    /// DualPipeV: DualPipe cut in half, `2·PP` stages on `PP` ranks in a V.
    DualPipeV,
}

impl ScheduleKind {
    /// Every schedule, in the order of the report's Table 2.
    pub const ALL: [ScheduleKind; 4] = [
        ScheduleKind::OneFOneB,
        ScheduleKind::ZeroBubble,
        ScheduleKind::DualPipe,
        ScheduleKind::DualPipeV,
    ];

    /// The command-line name: `1f1b`, `zb1p`, `dualpipe` or `dualpipev`.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::ZeroBubble => "zb1p",
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// Parses a command-line name (case-insensitive).
    ///
    /// # Errors
    /// [`PipelineError::UnknownSchedule`] for any other name.
    pub fn parse(name: &str) -> Result<Self, PipelineError> {
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| PipelineError::UnknownSchedule(name.to_string()))
    }

    /// Number of model stages the layers are cut into on `ranks` pipeline ranks (`2·PP` for
    /// DualPipeV, `PP` otherwise).
    pub fn stages(self, ranks: usize) -> usize {
        match self {
            ScheduleKind::DualPipeV => 2 * ranks,
            _ => ranks,
        }
    }

    /// The stages pipeline rank `rank` of `ranks` holds parameters for, in ascending order:
    /// its own (1F1B, ZB1P), `rank` and `PP−1−rank` (DualPipe: each stage on two ranks), or
    /// `rank` and `2·PP−1−rank` (DualPipeV's V).
    pub fn stages_of(self, ranks: usize, rank: usize) -> Vec<usize> {
        match self {
            ScheduleKind::OneFOneB | ScheduleKind::ZeroBubble => vec![rank],
            ScheduleKind::DualPipe => {
                let mut v = vec![rank, ranks - 1 - rank];
                v.sort_unstable();
                v.dedup();
                v
            }
            ScheduleKind::DualPipeV => vec![rank, 2 * ranks - 1 - rank],
        }
    }

    /// Whether each rank holds two stages' parameters of a full copy (DualPipe: 2× parameters).
    pub fn duplicates_parameters(self) -> bool {
        self == ScheduleKind::DualPipe
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScheduleKind::parse(s)
    }
}

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
    #[error("invalid pipeline costs: {0}")]
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
