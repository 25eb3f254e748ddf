//! DeepSeek-V3 on Burn: the umbrella crate.
//!
//! Re-exports the library crates so a user depends on one crate:
//! [`model`] (architecture, loading, saving), [`backends`], [`infer`], [`train`].
//! The `dsv3` command-line tool is built from `src/bin/dsv3.rs`.

pub use dsv3_backends as backends;
pub use dsv3_infer as infer;
pub use dsv3_model as model;
pub use dsv3_train as train;

pub use dsv3_model::{
    load, save, DeepseekV3, DeepseekV3Config, ForwardOptions, LoadOptions, ModelError,
};

/// The `dsv3` command line. Not part of the library's API (flags change without notice): it is
/// public only so the binary and the integration tests run the same code.
#[doc(hidden)]
pub mod cli;
