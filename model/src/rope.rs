//! Rotary position embedding for MLA's decoupled rope dims: interleaved pairs, optional YaRN.
//!
//! Angles are computed in float64 on the host (`position * inv_freq`), then rounded once to the
//! model dtype. The reference implementations form the angle in float32, which loses
//! ~position·2⁻²⁴ rad; near 128K that is 1e-2 rad. Here it stays below 1e-7 at any position.

use burn::tensor::{Tensor, TensorData};
use dsv3_backends::DsBackend;

use crate::config::{DeepseekV3Config, Yarn};
use crate::error::ModelError;

/// Absolute positions must stay below this. Angles are formed in float64 (`position · inv_freq`),
/// exact to ~2⁻²⁰ rad up to here; no context comes near it.
pub const MAX_POSITION: usize = 1 << 32;

/// `Ok` when positions `offset..offset + len` are all below [`MAX_POSITION`].
///
/// # Errors
/// [`ModelError::PositionOutOfRange`] when `offset + len` exceeds [`MAX_POSITION`] (or
/// overflows `usize`).
pub fn check_positions(offset: usize, len: usize) -> Result<(), ModelError> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_POSITION => Ok(()),
        _ => Err(ModelError::PositionOutOfRange {
            last: offset.saturating_add(len.max(1) - 1),
            max: MAX_POSITION,
        }),
    }
}

/// The panic message of a position past [`MAX_POSITION`] reaching the model.
pub(crate) fn out_of_range(last: usize) -> String {
    format!(
        "{} (validate positions with `check_positions` before a forward)",
        ModelError::PositionOutOfRange {
            last,
            max: MAX_POSITION
        }
    )
}

/// `mscale(f, m)` of YaRN: the attention-temperature correction for a context stretched by `f`.
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// The dimension index whose wavelength makes `num_rotations` turns over `orig` positions.
fn correction_dim(num_rotations: f64, dim: usize, base: f64, orig: usize) -> f64 {
    dim as f64 * (orig as f64 / (num_rotations * 2.0 * std::f64::consts::PI)).ln()
        / (2.0 * base.ln())
}

/// YaRN's blend range `[low, high]` over the `dim/2` frequencies.
pub fn yarn_correction_range(y: &Yarn, dim: usize, base: f64) -> (f64, f64) {
    let low = correction_dim(y.beta_fast, dim, base, y.original_max_position_embeddings).floor();
    let high = correction_dim(y.beta_slow, dim, base, y.original_max_position_embeddings).ceil();
    (low.max(0.0), high.min(dim as f64 - 1.0))
}

/// Frequencies, cos/sin scale and softmax scale of one model's rotary embedding.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `dr/2` inverse frequencies (float64).
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (HF's `attention_factor`; 1 for every released DeepSeek config).
    pub attention_factor: f64,
}

impl RotaryEmbedding {
    pub fn new(cfg: &DeepseekV3Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_base();
        let plain: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf(-((2 * i) as f64) / dim as f64))
            .collect();
        let Some(y) = cfg.yarn() else {
            return Self {
                inv_freq: plain,
                attention_factor: 1.0,
            };
        };
        let (low, mut high) = yarn_correction_range(&y, dim, base);
        if low == high {
            high += 0.001;
        }
        let inv_freq = plain
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                f / y.factor * (1.0 - smooth) + f * smooth
            })
            .collect();
        // HF: mscale/mscale_all_dim when both are set and non-zero, else mscale(f, 1).
        let attention_factor = match (y.mscale, y.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                yarn_mscale(y.factor, m) / yarn_mscale(y.factor, a)
            }
            _ => yarn_mscale(y.factor, 1.0),
        };
        Self {
            inv_freq,
            attention_factor,
        }
    }

    /// `cos`, `sin` tables `[len, dr]` for positions `start..start+len` (see
    /// [`Self::cos_sin_at`]).
    pub fn cos_sin<B: DsBackend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let positions: Vec<usize> = (start..start + len).collect();
        let (c, s) = self.cos_sin_at::<B>(&positions, device);
        let dr = 2 * self.inv_freq.len();
        (c.reshape([len, dr]), s.reshape([len, dr]))
    }

    /// Rotation tables `[1, n, dr]` for arbitrary absolute positions, in the interleaved layout
    /// `apply_rope` uses: `cos = (c₀, c₀, c₁, c₁, …)` and `sin = (−s₀, s₀, −s₁, s₁, …)`,
    /// both already multiplied by `attention_factor`.
    ///
    /// # Panics
    /// When a position is not below [`MAX_POSITION`] (a caller's bug: validate input positions
    /// with [`check_positions`]).
    pub fn cos_sin_at<B: DsBackend>(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if let Some(&p) = positions.iter().find(|&&p| p >= MAX_POSITION) {
            panic!("{}", out_of_range(p));
        }
        let dr = 2 * self.inv_freq.len();
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * dr);
        let mut sin = Vec::with_capacity(len * dr);
        for &p in positions {
            for &f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                let (c, s) = (
                    (c * self.attention_factor) as f32,
                    (s * self.attention_factor) as f32,
                );
                cos.extend([c, c]);
                sin.extend([-s, s]);
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [1, len, dr]), device),
            Tensor::from_data(TensorData::new(sin, [1, len, dr]), device),
        )
    }
}

/// The softmax scale of MLA: `(dn+dr)^-0.5`, times `mscale(f, mscale_all_dim)²` under YaRN (HF).
pub fn softmax_scale(cfg: &DeepseekV3Config) -> f64 {
    let base = (cfg.qk_head_dim() as f64).powf(-0.5);
    match cfg.yarn() {
        Some(y) => match y.mscale_all_dim {
            Some(a) if a != 0.0 => {
                let m = yarn_mscale(y.factor, a);
                base * m * m
            }
            _ => base,
        },
        None => base,
    }
}
