//! Integration tests, in one binary (each Burn-linking test binary is hundreds of MB), one
//! module per concept:
//! - `model`: the model against float64 goldens (HF transformers and an independent float64
//!   implementation), numerics of its parts, save/load, the weight forms;
//! - `files`: files as users have them (released configs, tokenizer layouts, converted
//!   checkpoints);
//! - `kernels`: the backend extension's operations against their plain-tensor defaults (the
//!   CubeCL kernels on wgpu; CUDA where a GPU is lent);
//! - `attention`: MLA's attention as one operation (Flex's jobs and the plain form) against
//!   float64, forward and gradients;
//! - `fused`: the fused element-wise operations (RMSNorm, SwiGLU, softmax) against float64 and
//!   their plain forms, forward and gradients;
//! - `infer`: the latent cache, generation and sampling;
//! - `train`: the objective and its gradients, balancing, checkpoints, data;
//! - `cli`: the `dsv3` commands end to end;
//! - `dist` (feature `mpi`): the binary under `mpirun`: expert-parallel scoring and expert- and
//!   data-parallel training against the single-process runs.
//!
//! The fixtures under `tests/fixtures/` were made by `tests/fixtures/gen_fixtures.py` and
//! `gen_released.py` from HF transformers' `DeepseekV3ForCausalLM` run in float64 (with its float32
//! casts patched out) and an independent float64 implementation of the spec. CI needs no Python:
//! the files are committed.

mod attention;
mod cli;
mod common;
#[cfg(feature = "mpi")]
mod dist;
mod files;
mod fused;
mod infer;
mod kernels;
mod model;
mod train;
