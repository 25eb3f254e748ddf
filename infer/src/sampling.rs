//! Token selection from the last position's logits, on the device.
//!
//! Order (as HF `generate`): repetition penalty, then temperature, top-k, top-p, min-p, each on
//! the distribution left by the previous step. Greedy (`temperature == 0`) is the argmax after
//! the penalty. Sampling uses the Gumbel-max trick — `argmax(logits + G)` with
//! `G = -ln(-ln U)` is an exact draw from `softmax(logits)` — so only one id per row comes back
//! from the device. The uniforms come from a seeded host generator (one stream per batch row),
//! which makes a run reproducible on any backend and independent of other users of Burn's
//! global RNG.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use dsv3_backends::SplitMix64;

use crate::error::InferError;

/// How to pick the next token. `Default` is greedy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (ties at the k-th value are kept).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `p`, in (0, 1].
    pub top_p: Option<f32>,
    /// Drop tokens whose probability is below `min_p ×` the top probability, in [0, 1].
    pub min_p: Option<f32>,
    /// HF/CTRL penalty (> 0) on tokens already in the context: positive logits are divided by
    /// it, negative ones multiplied.
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampling noise; row `r` of a batch uses stream `seed + r`.
    pub seed: u64,
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects values outside each option's domain.
    ///
    /// # Errors
    /// [`InferError::InvalidOption`] naming the first option at fault: a negative or
    /// non-finite `temperature`, `top_k` 0, `top_p` outside (0, 1], `min_p` outside [0, 1], or
    /// a `repetition_penalty` that is not finite and > 0.
    pub fn validate(&self) -> Result<(), InferError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(InferError::invalid(
                "temperature",
                t,
                "must be a finite number >= 0 (0 = greedy)",
            ));
        }
        if self.top_k == Some(0) {
            return Err(InferError::invalid(
                "top_k",
                0,
                "must be >= 1 (leave it unset to keep every token)",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(InferError::invalid("top_p", p, "must be in (0, 1]"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(InferError::invalid("min_p", p, "must be in [0, 1]"));
            }
        }
        if let Some(p) = self.repetition_penalty {
            if !p.is_finite() || p <= 0.0 {
                return Err(InferError::invalid(
                    "repetition_penalty",
                    p,
                    "must be a finite number > 0 (1 = no penalty)",
                ));
            }
        }
        Ok(())
    }
}

/// A sampler with its own noise streams; one per generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    opts: SamplingOptions,
    rngs: Vec<SplitMix64>,
}

impl Sampler {
    /// Validates `opts`. Rows get streams `seed + r` as they are first used.
    ///
    /// # Errors
    /// [`InferError::InvalidOption`] when `opts` fails [`SamplingOptions::validate`].
    pub fn new(opts: &SamplingOptions) -> Result<Self, InferError> {
        opts.validate()?;
        Ok(Self {
            opts: opts.clone(),
            rngs: Vec::new(),
        })
    }

    pub fn options(&self) -> &SamplingOptions {
        &self.opts
    }

    /// The logits after penalty, temperature and the top-k/top-p/min-p filters (masked entries
    /// −inf): sampling draws from their softmax. `logits: [B, V]`; `history[r]` are row r's
    /// context tokens (for the repetition penalty).
    pub fn process<B: Backend>(&self, logits: Tensor<B, 2>, history: &[&[u32]]) -> Tensor<B, 2> {
        let mut x = match self.opts.repetition_penalty {
            Some(p) if p != 1.0 => repetition_penalty(logits, history, p),
            _ => logits,
        };
        if self.opts.is_greedy() {
            return x;
        }
        let [_, v] = x.dims();
        x = x / self.opts.temperature as f64;
        if let Some(k) = self.opts.top_k.filter(|&k| k < v) {
            let kth = x.clone().sort_descending(1).narrow(1, k - 1, 1); // [B, 1]
            let drop = x.clone().lower(kth.expand([x.dims()[0], v]));
            x = x.mask_fill(drop, f32::NEG_INFINITY);
        }
        if let Some(p) = self.opts.top_p.filter(|&p| p < 1.0) {
            let probs = burn::tensor::activation::softmax(x.clone(), 1);
            let sorted = probs.clone().sort_descending(1);
            // Mass strictly before each sorted token; keep while it is below p (the first always).
            let before = sorted.clone().cumsum(1) - sorted.clone();
            let dropped_sorted = before.greater_equal_elem(p as f64);
            let threshold = sorted.mask_fill(dropped_sorted, f32::INFINITY).min_dim(1); // smallest kept probability, [B, 1]
            let drop = probs.clone().lower(threshold.expand(probs.dims()));
            x = x.mask_fill(drop, f32::NEG_INFINITY);
        }
        if let Some(m) = self.opts.min_p.filter(|&m| m > 0.0) {
            let probs = burn::tensor::activation::softmax(x.clone(), 1);
            let floor = probs.clone().max_dim(1) * m as f64;
            let drop = probs.clone().lower(floor.expand(probs.dims()));
            x = x.mask_fill(drop, f32::NEG_INFINITY);
        }
        x
    }

    /// One token per row. `rows[r]` names the noise stream of row r (its index in the original
    /// batch, so a row keeps its stream when others finish).
    ///
    /// # Errors
    /// - [`InferError::InvalidOption`]: `rows` or `history` does not hold one entry per
    ///   logits row.
    /// - [`InferError::Readback`]: the chosen ids cannot be read back from the device.
    pub fn sample<B: Backend>(
        &mut self,
        logits: Tensor<B, 2>,
        history: &[&[u32]],
        rows: &[usize],
    ) -> Result<Vec<u32>, InferError> {
        let [b, _] = logits.dims();
        if rows.len() != b || history.len() != b {
            return Err(InferError::invalid(
                "rows",
                format!(
                    "{} rows / {} histories for {b} logits rows",
                    rows.len(),
                    history.len()
                ),
                "one stream index and one history per logits row",
            ));
        }
        let x = self.process(logits, history);
        let choice = if self.opts.is_greedy() {
            x.argmax(1)
        } else {
            let [b, v] = x.dims();
            let mut noise = Vec::with_capacity(b * v);
            for &r in rows {
                while self.rngs.len() <= r {
                    let s = self.opts.seed.wrapping_add(self.rngs.len() as u64);
                    self.rngs.push(SplitMix64::new(s));
                }
                let rng = &mut self.rngs[r];
                noise.extend((0..v).map(|_| -(-rng.uniform_open_f32().ln()).ln()));
            }
            let g = Tensor::<B, 2>::from_data(TensorData::new(noise, [b, v]), &x.device());
            (x + g).argmax(1)
        };
        read_ids(choice)
    }
}

/// Reads an `[B, 1]` (or `[B]`-shaped) id tensor back to the host.
pub(crate) fn read_ids<B: Backend, const D: usize>(
    t: Tensor<B, D, Int>,
) -> Result<Vec<u32>, InferError> {
    let v: Vec<i64> = t
        .into_data()
        .convert::<i64>()
        .to_vec()
        .map_err(|e| InferError::Readback(format!("{e:?}")))?;
    Ok(v.into_iter().map(|i| i as u32).collect())
}

/// Divides positive logits by `p` and multiplies negative ones by `p`, for the tokens present
/// in each row's history.
fn repetition_penalty<B: Backend>(
    logits: Tensor<B, 2>,
    history: &[&[u32]],
    p: f32,
) -> Tensor<B, 2> {
    let [b, v] = logits.dims();
    let device = logits.device();
    // A [B, V+1] presence map; rows with no history scatter into the spare column V.
    let width = history.iter().map(|h| h.len()).max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(b * width);
    for r in 0..b {
        let h = history.get(r).copied().unwrap_or(&[]);
        for j in 0..width {
            let id = h
                .get(j)
                .or(h.last())
                .map(|&i| (i as usize).min(v))
                .unwrap_or(v);
            idx.push(id as i64);
        }
    }
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [b, width]), &device);
    let present: Tensor<B, 2, Bool> = Tensor::<B, 2>::zeros([b, v + 1], &device)
        .scatter(
            1,
            idx,
            Tensor::ones([b, width], &device),
            burn::tensor::IndexingUpdateOp::Add,
        )
        .narrow(1, 0, v)
        .greater_elem(0.5);
    let positive = logits.clone().greater_elem(0.0);
    let factor = Tensor::<B, 2>::full([b, v], p, &device).mask_fill(positive, 1.0 / p);
    let penalized = logits.clone() * factor;
    logits.mask_where(present, penalized)
}
