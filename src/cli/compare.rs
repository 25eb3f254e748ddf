//! `dsv3 compare`: the same input on several backends. For each: max |Δ logits| against a
//! baseline (the float64 golden when the directory is a test fixture, else the CPU backend in
//! f32), whether the greedy continuation agrees with the first backend that ran, and prefill /
//! decode tokens per second (each timed after an identical warm-up pass, so kernel compilation is
//! not counted). A backend that is not compiled in or has no device is reported in
//! its row, not fatal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Tensor;
use clap::Args;
use dsv3_backends::{on_backend, BackendKind, DsBackend, FloatDtype, OnBackend};
use dsv3_model::{ForwardOptions, LatentKv, LoadOptions, WeightStorage};

use super::{parse_tokens, weight_options, write_err, CliError};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Model directory (config.json + safetensors checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated backends to run, in order (flex, wgpu, cuda).
    #[arg(long, default_value = "flex,wgpu,cuda", value_delimiter = ',', value_parser = BackendKind::parse)]
    pub backends: Vec<BackendKind>,
    /// Float precision for the GPU backends (f32, bf16, f16); the CPU runs f32.
    #[arg(long, default_value = "f32", value_parser = FloatDtype::parse)]
    pub dtype: FloatDtype,
    /// How Linear weights are held: f32, bf16 (half the bytes) or fp8 (an FP8 checkpoint's
    /// codes and scales in memory).
    #[arg(long, default_value = "f32")]
    pub weights: WeightStorage,
    /// Prompt token ids (default: the golden's when the directory is a fixture, else 0..16).
    #[arg(long)]
    pub tokens: Option<String>,
    /// Greedy tokens to decode after the prompt (with the latent cache).
    #[arg(long, default_value_t = 8)]
    pub decode: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One backend's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub backend: String,
    pub dtype: String,
    /// `ok`, or why it did not run.
    pub status: String,
    pub max_abs_diff: Option<f64>,
    /// Greedy tokens equal to the reference backend's (the first that ran).
    pub greedy_agrees: Option<bool>,
    pub greedy: Vec<u32>,
    pub prefill_tok_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
}

/// What one run measured.
struct Measured {
    logits: Vec<f32>,
    greedy: Vec<u32>,
    prefill_s: f64,
    decode_s: f64,
}

struct Run<'a> {
    a: &'a CompareArgs,
    ids: &'a [u32],
    offset: usize,
}

impl OnBackend for Run<'_> {
    type Output = Result<Measured, CliError>;
    fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
        measure::<B>(self.a, self.ids, self.offset, kind)
    }
}

fn to_f32<const D: usize, B: DsBackend>(t: Tensor<B, D>) -> Result<Vec<f32>, CliError> {
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| CliError::Usage(format!("reading logits: {e:?}")))
}

fn measure<B: DsBackend>(
    a: &CompareArgs,
    ids: &[u32],
    offset: usize,
    kind: BackendKind,
) -> Result<Measured, CliError> {
    let device = B::Device::default();
    let opts = LoadOptions {
        strict: false,
        skip_mtp: true,
        ..Default::default()
    };
    let (model, _) =
        dsv3_model::load_with::<B>(&a.model, &device, &opts, &weight_options(kind, a.weights))?;
    super::keep_freed_buffers();
    let fopts = ForwardOptions::default();
    let tokens = model.tokens_tensor(ids)?;
    // Warm-up (kernel compilation, autotune), then the timed prefill.
    let _ = to_f32(model.forward(tokens.clone(), offset, None, &fopts).logits)?;
    let t0 = Instant::now();
    let out = model.forward(tokens, offset, None, &fopts);
    let logits = to_f32(out.logits.clone())?;
    let prefill_s = t0.elapsed().as_secs_f64();

    // Greedy decode with the latent cache, twice: the first pass compiles the kernels of every
    // new key length (seconds each on lavapipe), the second is timed.
    let t = ids.len();
    let vocab = model.config.vocab_size;
    let first = argmax(&logits[(t - 1) * vocab..t * vocab]);
    let decode = || -> Result<(Vec<u32>, f64), CliError> {
        let mut kv: Vec<LatentKv<B>> = out.kv.clone();
        let mut next = first;
        let mut greedy = Vec::with_capacity(a.decode);
        let t1 = Instant::now();
        for step in 0..a.decode {
            greedy.push(next);
            if step + 1 == a.decode {
                break;
            }
            let o = model.forward(
                model.tokens_tensor(&[next])?,
                offset + t + step,
                Some(&kv),
                &fopts,
            );
            kv = kv.iter().zip(&o.kv).map(|(p, n)| p.cat(n)).collect();
            next = argmax(&to_f32(o.logits)?);
        }
        Ok((greedy, t1.elapsed().as_secs_f64()))
    };
    decode()?;
    let (greedy, decode_s) = decode()?;
    Ok(Measured {
        logits,
        greedy,
        prefill_s,
        decode_s,
    })
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The fixture golden (`golden.safetensors`) beside a model, if any: input ids, offset, logits.
fn golden(dir: &Path) -> Option<(Vec<u32>, usize, Vec<f64>)> {
    let bytes = std::fs::read(dir.join("golden.safetensors")).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let ints = |name: &str| -> Option<Vec<i64>> {
        let v = st.tensor(name).ok()?;
        (v.dtype() == safetensors::Dtype::I64).then(|| {
            v.data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        })
    };
    let ids = ints("input_ids")?.iter().map(|&i| i as u32).collect();
    let offset = ints("offset").and_then(|v| v.first().copied()).unwrap_or(0) as usize;
    let l = st.tensor("logits").ok()?;
    let logits = match l.dtype() {
        safetensors::Dtype::F64 => l
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        safetensors::Dtype::F32 => l
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
            .collect(),
        _ => return None,
    };
    Some((ids, offset, logits))
}

pub fn compare(a: &CompareArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let dtype = a.dtype;
    let kinds = a.backends.clone();
    if kinds.is_empty() {
        return Err(CliError::Usage("--backends is empty".into()));
    }
    if !a.model.is_dir() {
        return Err(CliError::Usage(format!(
            "model directory {} does not exist",
            a.model.display()
        )));
    }
    let golden = golden(&a.model);
    let (ids, offset) = match (&a.tokens, &golden) {
        (Some(t), _) => (parse_tokens(t)?, 0),
        (None, Some((ids, off, _))) => (ids.clone(), *off),
        (None, None) => ((0..16).collect(), 0),
    };
    let use_golden = golden.is_some() && a.tokens.is_none();

    // The baseline: float64 golden, else the CPU backend in f32.
    let (baseline_name, baseline): (String, Vec<f64>) = if use_golden {
        let (_, _, l) = golden.clone().unwrap_or_default();
        ("float64 golden".into(), l)
    } else {
        let m = on_backend(
            BackendKind::Flex,
            FloatDtype::F32,
            Run {
                a,
                ids: &ids,
                offset,
            },
        )??;
        (
            "flex f32".into(),
            m.logits.iter().map(|&x| x as f64).collect(),
        )
    };

    let mut rows = Vec::new();
    let mut reference: Option<Vec<u32>> = None;
    for kind in kinds {
        let dt = if kind == BackendKind::Flex {
            FloatDtype::F32
        } else {
            dtype
        };
        let mut row = Row {
            backend: kind.name().into(),
            dtype: dt.name().into(),
            status: "ok".into(),
            max_abs_diff: None,
            greedy_agrees: None,
            greedy: vec![],
            prefill_tok_s: None,
            decode_tok_s: None,
        };
        let run = Run {
            a,
            ids: &ids,
            offset,
        };
        match on_backend(kind, dt, run) {
            Err(e) => row.status = e.to_string(),
            Ok(Err(e)) => row.status = format!("failed: {e}"),
            Ok(Ok(m)) => {
                row.max_abs_diff = Some(if m.logits.len() == baseline.len() {
                    m.logits
                        .iter()
                        .zip(&baseline)
                        .map(|(&x, &y)| (x as f64 - y).abs())
                        .fold(0.0, f64::max)
                } else {
                    f64::NAN
                });
                row.greedy_agrees = Some(match &reference {
                    Some(r) => *r == m.greedy,
                    None => {
                        reference = Some(m.greedy.clone());
                        true
                    }
                });
                row.greedy = m.greedy;
                row.prefill_tok_s = Some(ids.len() as f64 / m.prefill_s);
                if a.decode > 1 {
                    row.decode_tok_s = Some((a.decode - 1) as f64 / m.decode_s);
                }
            }
        }
        rows.push(row);
    }

    let text = if a.json {
        serde_json::json!({
            "model": a.model.display().to_string(),
            "tokens": ids.len(),
            "offset": offset,
            "baseline": baseline_name,
            "weights": a.weights.name(),
            "rows": rows,
        })
        .to_string()
            + "\n"
    } else {
        let mut s = format!(
            "{} prompt tokens at offset {offset}, weights {}, baseline {baseline_name}\n",
            ids.len(),
            a.weights
        );
        s += &format!(
            "{:<7} {:<5} {:>14} {:>7} {:>14} {:>13}  status\n",
            "backend", "dtype", "max|Δlogits|", "greedy", "prefill tok/s", "decode tok/s"
        );
        let opt =
            |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
        for r in &rows {
            s += &format!(
                "{:<7} {:<5} {:>14} {:>7} {:>14} {:>13}  {}\n",
                r.backend,
                r.dtype,
                r.max_abs_diff
                    .map(|d| format!("{d:.2e}"))
                    .unwrap_or_else(|| "-".into()),
                r.greedy_agrees
                    .map(|g| if g { "agree" } else { "DIFFER" }.to_string())
                    .unwrap_or_else(|| "-".into()),
                opt(r.prefill_tok_s, 1),
                opt(r.decode_tok_s, 1),
                r.status
            );
        }
        s
    };
    out.write_all(text.as_bytes())
        .map_err(|e| write_err(Path::new("stdout"), e))?;
    Ok(())
}
