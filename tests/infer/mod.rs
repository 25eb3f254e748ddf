//! The inference engine: latent cache, sessions, generation, sampling.

mod cache;
mod generate;
mod sampling;

use std::path::PathBuf;

use burn::tensor::Tensor;
use dsv3_infer::{GenerateOptions, InferError};
use dsv3_model::{DeepseekV3, ForwardOptions, LoadOptions};

use crate::common::*;

pub(crate) fn load(name: &str) -> DeepseekV3<B> {
    dsv3_model::load::<B>(&fixture(name), &device(), &LoadOptions::default())
        .unwrap()
        .0
}

/// Greedy, never stopping on an id (the goldens' continuations are plain argmax runs).
pub(crate) fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        eos_token_ids: Some(vec![]),
        ..Default::default()
    }
}

pub(crate) fn logits_rows(t: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [_, n, v] = t.dims();
    to_vec(t).chunks(v).take(n).map(|c| c.to_vec()).collect()
}

pub(crate) fn max_diff_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The last row of a full forward (no cache) over `ids` at `offset`.
pub(crate) fn full_last_logits(model: &DeepseekV3<B>, ids: &[u32], offset: usize) -> Vec<f32> {
    let out = model.forward(
        model.tokens_tensor(ids).unwrap(),
        offset,
        None,
        &ForwardOptions::default(),
    );
    logits_rows(out.logits).pop().unwrap()
}

pub(crate) fn all_goldens() -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    for name in ["tiny-qlora", "tiny-direct", "tiny-fp8"] {
        for g in goldens(&fixture(name)) {
            v.push((name, g));
        }
    }
    v
}

pub(crate) fn expect_err(r: Result<impl std::fmt::Debug, InferError>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error mentioning {needle:?}, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
    }
}
