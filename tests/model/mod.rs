//! The model against float64 references: golden logits, routing and MTP outputs; the numerics of
//! its parts (rope, router, e4m3, config parsing); save/load; the weight forms it can be held in;
//! the expert-parallel path in one process.

mod expert_parallel;
mod golden;
mod numerics;
mod save_load;
pub(crate) mod weight_forms;

pub(crate) use golden::{check_golden, check_golden_within};
