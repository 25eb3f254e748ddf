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

pub use crate::pipeline_error::{PipelineError, ScheduleKind};
pub use schedule::{Action, Chunk, Schedule};
pub use sim::{report_activations, simulate, Costs, SimReport, Span};
