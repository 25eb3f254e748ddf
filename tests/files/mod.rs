//! Files as users really have them: configs re-saved by transformers or written by other tools,
//! the released configs of every model of this architecture (scaled down with every other field
//! kept, against float64 goldens from `tests/fixtures/gen_released.py`), tokenizer directories
//! saved by current transformers, and checkpoints converted or trimmed by other tools.

mod checkpoints;
mod configs;
mod tokenizers;

pub(crate) use tokenizers::byte_tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dsv3_model::{load, DeepseekV3Config, ForwardOptions, LoadOptions, LoadReport};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::common::*;

pub(crate) const RELEASED: [&str; 7] = [
    "deepseek-v3",
    "deepseek-v3-0324",
    "deepseek-r1",
    "deepseek-r1-0528",
    "deepseek-v3.1",
    "kimi-k2",
    "moonlight-16b-a3b",
];

pub(crate) fn released_config(name: &str) -> PathBuf {
    fixtures().join("configs").join(format!("{name}.json"))
}

pub(crate) fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub(crate) fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

pub(crate) fn parse(v: &Value) -> Result<DeepseekV3Config, String> {
    let cfg: DeepseekV3Config = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

pub(crate) fn loads(dir: &Path) -> (dsv3_model::DeepseekV3<B>, LoadReport) {
    load::<B>(dir, &device(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

pub(crate) fn logits(model: &dsv3_model::DeepseekV3<B>, ids: &[u32]) -> Vec<f32> {
    let out = model.forward(
        model.tokens_tensor(ids).unwrap(),
        0,
        None,
        &ForwardOptions::default(),
    );
    to_vec(out.logits)
}

pub(crate) fn golden_ids(fixture_dir: &Path) -> Vec<u32> {
    Golden::read(&fixture_dir.join("golden.safetensors")).ids()
}

/// Rewrites a safetensors file: `edit` sees each tensor and returns what to store under which
/// name (`None` drops it); `metadata` replaces the `__metadata__` map.
pub(crate) fn rewrite_safetensors(
    path: &Path,
    metadata: Option<HashMap<String, String>>,
    mut edit: impl FnMut(&str, Dtype, &[usize], &[u8]) -> Option<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, view.dtype(), view.shape(), view.data()) {
            out.push(t);
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    drop(st);
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

pub(crate) fn keep(
    name: &str,
    d: Dtype,
    s: &[usize],
    b: &[u8],
) -> Option<(String, Dtype, Vec<usize>, Vec<u8>)> {
    Some((name.to_string(), d, s.to_vec(), b.to_vec()))
}

/// Logit tolerance against the released goldens. A float32 run of the reference itself lands
/// within 1.21e-5 of them (released/README.md) and ours within 2.24e-5 (MTP, absorbed
/// attention: the longest float32 chain); 4e-5 keeps a 2x margin and still fails on the
/// smallest real fault found with these files: Moonlight's rms_norm_eps (1e-5) applied to the
/// latent norms moves the logits by 7.7e-5.
pub(crate) const RELEASED_TOL: f64 = 4e-5;

pub(crate) fn released_fixture(name: &str) -> PathBuf {
    fixtures().join("released").join(name)
}
