//! Integration tests, in one binary (each Burn-linking test binary is hundreds of MB).
//!
//! The fixtures under `tests/fixtures/` were made by `tests/fixtures/gen_fixtures.py` from HF
//! transformers' `DeepseekV3ForCausalLM` run in float64 (with its float32 casts patched out) and an
//! independent float64 implementation of the spec. CI needs no Python: the files are committed.

mod backends;
mod cli;
mod common;
mod field;
mod fixtures;
mod infer;
mod numerics;
mod roundtrip;
mod train;
