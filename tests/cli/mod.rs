//! The `dsv3` commands end to end, run in-process as the binary runs them (parsing included).

mod backends;
mod generate;
mod inspect_score;
mod pipeline;
mod post;
mod rl;
mod train;
