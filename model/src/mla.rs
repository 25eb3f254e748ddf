//! Multi-head latent attention (spec §4).
//!
//! Keys and values come from one low-rank latent `c` (`kv_lora_rank` wide) plus one rope key
//! shared by all heads. Those two are all a cache needs. Two forms share the projections:
//! - **naive**: expand `c` into per-head `k_nope` and `v` with `kv_b_proj`, then ordinary attention
//!   (one backend operation, `DsBackend::mla_attention`, on tokens-major views);
//! - **absorbed**: fold `W_UK` into the query and `W_UV` into the output, and attend over the
//!   latent directly (what decode with a latent cache does).
//!
//! Both compute the same function; tests check they agree.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use dsv3_backends::attention::MlaAttention;
use dsv3_backends::fused::softmax;
use dsv3_backends::DsBackend;

use crate::cache::LatentKv;
use crate::config::DeepseekV3Config;
use crate::linear::{linear, Linear};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::positions::Span;
use crate::rope::softmax_scale;
use crate::rotation::apply_rope;

/// Which of the two equivalent attention forms to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// Per-head keys and values expanded from the latent.
    Naive,
    /// Attention over the latent, `kv_b_proj` absorbed into query and output.
    Absorbed,
    /// Whichever of the two needs fewer multiply-adds for the shapes at hand (naive for
    /// prefill, absorbed for decode); the cache holds only the latent either way.
    #[default]
    Auto,
}

impl AttentionMode {
    pub fn name(self) -> &'static str {
        match self {
            AttentionMode::Naive => "naive",
            AttentionMode::Absorbed => "absorbed",
            AttentionMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Auto, Self::Absorbed, Self::Naive]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown attention form {s:?} (auto, absorbed or naive)"))
    }
}

#[derive(Config, Debug)]
pub struct MlaConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub softmax_scale: f64,
    /// eps of the latent norms `q_a_layernorm` and `kv_a_layernorm`: 1e-6 in HF and the
    /// official code whatever the config's `rms_norm_eps` says.
    #[config(default = 1e-6)]
    pub eps: f64,
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl MlaConfig {
    /// The attention of a DeepSeek-V3 block, from the HF config.
    pub fn from_model(cfg: &DeepseekV3Config) -> Self {
        Self::new(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            softmax_scale(cfg),
        )
        .with_q_lora_rank(cfg.q_lora_rank)
        // Not `rms_norm_eps`: HF builds the latent norms with RMSNorm's default eps
        // (`DeepseekV3RMSNorm(config.kv_lora_rank)` in modeling_deepseek_v3.py), as do DeepSeek's
        // inference/model.py and the checkpoints' remote code. It matters for configs whose
        // rms_norm_eps is not 1e-6 (Moonlight: 1e-5).
        .with_eps(1e-6)
        .with_init_std(cfg.initializer_range)
    }

    pub fn init<B: DsBackend>(&self, device: &B::Device) -> Mla<B> {
        let (h, nh, s) = (self.hidden_size, self.num_heads, self.init_std);
        let qk = self.qk_nope_head_dim + self.qk_rope_head_dim;
        let (q_a_proj, q_a_layernorm, q_b_proj, q_proj) = match self.q_lora_rank {
            Some(rq) => (
                Some(linear(h, rq, s, device)),
                Some(RmsNormConfig::new(rq).with_eps(self.eps).init(device)),
                Some(linear(rq, nh * qk, s, device)),
                None,
            ),
            None => (None, None, None, Some(linear(h, nh * qk, s, device))),
        };
        let r = self.kv_lora_rank;
        Mla {
            q_a_proj,
            q_a_layernorm,
            q_b_proj,
            q_proj,
            kv_a_proj_with_mqa: linear(h, r + self.qk_rope_head_dim, s, device),
            kv_a_layernorm: RmsNormConfig::new(r).with_eps(self.eps).init(device),
            kv_b_proj: linear(r, nh * (self.qk_nope_head_dim + self.v_head_dim), s, device),
            o_proj: linear(nh * self.v_head_dim, h, s, device),
            num_heads: nh,
            kv_lora_rank: r,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            softmax_scale: self.softmax_scale,
        }
    }
}

/// Field names are the checkpoint's (`self_attn.q_a_proj.weight`, ...).
#[derive(Module, Debug)]
pub struct Mla<B: DsBackend> {
    pub q_a_proj: Option<Linear<B>>,
    pub q_a_layernorm: Option<RmsNorm<B>>,
    pub q_b_proj: Option<Linear<B>>,
    pub q_proj: Option<Linear<B>>,
    pub kv_a_proj_with_mqa: Linear<B>,
    pub kv_a_layernorm: RmsNorm<B>,
    pub kv_b_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub softmax_scale: f64,
}

impl<B: DsBackend> Mla<B> {
    /// The projections (q, kv, o): the Linear layers DeepSeek-V3 quantizes.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out: Vec<&mut Linear<B>> =
            [&mut self.q_a_proj, &mut self.q_b_proj, &mut self.q_proj]
                .into_iter()
                .filter_map(|l| l.as_mut())
                .collect();
        out.extend([
            &mut self.kv_a_proj_with_mqa,
            &mut self.kv_b_proj,
            &mut self.o_proj,
        ]);
        out
    }

    /// Attention for `x: [B, T, H]` whose tokens follow the `past` entries.
    ///
    /// `span` holds the rope tables of the new tokens' positions and the mask `[B|1, 1, T, S]`
    /// added to the scores (0 or −inf), with `S = past + T`. Returns the output `[B, T, H]` and
    /// the latent entries of the new tokens (for the caller's cache).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        span: &Span<B>,
        past: Option<&LatentKv<B>>,
        mode: AttentionMode,
    ) -> (Tensor<B, 3>, LatentKv<B>) {
        self.forward_with(x, span, mode, |new| match past {
            Some(p) if !p.is_empty() => p.cat(new),
            _ => new.clone(),
        })
    }

    /// [`Self::forward`] with the history kept by the caller: `history` receives the new
    /// tokens' entries (to store them) and returns every entry the queries attend to, earlier
    /// ones first. A preallocated cache writes the new entries into its buffer and returns a
    /// view, so the history is not concatenated.
    pub fn forward_with(
        &self,
        x: Tensor<B, 3>,
        span: &Span<B>,
        mode: AttentionMode,
        history: impl FnOnce(&LatentKv<B>) -> LatentKv<B>,
    ) -> (Tensor<B, 3>, LatentKv<B>) {
        let (cos, sin, swap, mask) = (&span.cos, &span.sin, &span.swap, span.mask.as_ref());
        let [b, t, _] = x.dims();
        let (nh, dn, dr, dv, r) = (
            self.num_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.kv_lora_rank,
        );

        // Queries: [B, T, nh, dn+dr], nope part first within each head.
        let q = match (
            &self.q_proj,
            &self.q_a_proj,
            &self.q_a_layernorm,
            &self.q_b_proj,
        ) {
            (Some(q_proj), ..) => q_proj.forward(x.clone()),
            (None, Some(a), Some(norm), Some(bp)) => bp.forward(norm.forward(a.forward(x.clone()))),
            _ => unreachable!("MlaConfig::init creates either q_proj or the q-LoRA triple"),
        };
        // Queries tokens-major, `[B, T, nh, ·]`, as the projection wrote them (views, no
        // copies); the rotary part is rotated heads-major, `[nh, B, T, dr]`, where the rope
        // tables broadcast as one contiguous row over the heads.
        let scale = self.softmax_scale;
        let q = q.reshape([b, t, nh, dn + dr]);
        let q_nope = q.clone().narrow(3, 0, dn); // [B, T, nh, dn]
        let q_pe = apply_rope(q.narrow(3, dn, dr).permute([2, 0, 1, 3]), cos, sin, swap);

        // The latent and the shared rope key of the new tokens.
        let kv = self.kv_a_proj_with_mqa.forward(x);
        let c = self.kv_a_layernorm.forward(kv.clone().narrow(2, 0, r));
        let k_pe = apply_rope(kv.narrow(2, r, dr), cos, sin, swap);
        let new = LatentKv { c, k_pe };
        let all = history(&new);
        let s = all.len();
        let mode = match mode {
            AttentionMode::Auto => cheaper_mode(nh, dn, dv, r, t, s),
            m => m,
        };
        let LatentKv { c, k_pe } = all; // [B, S, r], [B, S, dr] (maybe views into a cache)

        let out = match mode {
            // Keys and values per head, `kv_b_proj`'s output `[B, S, nh, dn+dv]`, and one
            // attention operation over the tokens-major views (`DsBackend::mla_attention`).
            AttentionMode::Naive => {
                let [_, s, _] = c.dims();
                let kv = self
                    .kv_b_proj
                    .forward(c.reshape([b * s, r]))
                    .reshape([b, s, nh, dn + dv]);
                let x = MlaAttention {
                    q_nope,
                    q_pe: q_pe.permute([1, 2, 0, 3]),
                    kv,
                    k_pe,
                    scale,
                };
                B::mla_attention(&x, mask) // [B, T, nh, dv]
            }
            _ => {
                // kv_b_proj as stored here is [r, nh*(dn+dv)]; per head: [r, dn] -> W_UK,
                // [r, dv] -> W_UV. Strided views, no copies: the matmuls read them in place.
                let w = self.kv_b_proj.weight_in_out().reshape([r, nh, dn + dv]);
                let w_uk = w.clone().narrow(2, 0, dn).swap_dims(0, 1); // [nh, r, dn]
                let w_uv = w.narrow(2, dn, dv).swap_dims(0, 1); // [nh, r, dv]

                // The queries carry the softmax scale (cheaper than scaling the scores).
                let q_nope = q_nope.permute([2, 0, 1, 3]) * scale; // [nh, B, T, dn]
                attend_absorbed(q_nope, q_pe * scale, c, k_pe, w_uk, w_uv, mask)
                    .reshape([nh, b, t, dv])
                    .permute([1, 2, 0, 3])
            }
        };
        let out = out.reshape([b, t, nh * dv]);
        (self.o_proj.forward(out), new)
    }
}

/// Absorbed attention: `W_UK` folded into the queries and `W_UV` into the output, attention over
/// the latent itself. Every head attends over the same latent, so the heads are folded into the
/// query rows, `[B, nh·T, ·]` against `[B, S, ·]`: each latent row is read once per step, not once
/// per head (what dominates long-context decode). Queries `[nh, B, T, dn|dr]` (scaled), the
/// latent `c: [B, S, r]`, `k_pe: [B, S, dr]`, `W_UK: [nh, r, dn]`, `W_UV: [nh, r, dv]`; returns
/// `[nh, B·T, dv]`.
fn attend_absorbed<B: DsBackend>(
    q_nope: Tensor<B, 4>,
    q_pe: Tensor<B, 4>,
    c: Tensor<B, 3>,
    k_pe: Tensor<B, 3>,
    w_uk: Tensor<B, 3>,
    w_uv: Tensor<B, 3>,
    mask: Option<&Tensor<B, 4>>,
) -> Tensor<B, 3> {
    let [nh, b, t, dn] = q_nope.dims();
    let [_, s, r] = c.dims();
    let dr = k_pe.dims()[2];
    let q_abs = q_nope
        .reshape([nh, b * t, dn])
        .matmul(w_uk.swap_dims(1, 2))
        .reshape([nh, b, t, r]);
    let fold = |q: Tensor<B, 4>, d: usize| q.swap_dims(0, 1).reshape([b, nh * t, d]);
    let (q_abs, q_pe) = (fold(q_abs, r), fold(q_pe, dr));
    let pieces = B::parallel_jobs().min(s / SPLIT_MIN_KEYS);
    let o_lat = match mask {
        None if pieces > 1 => split_attention::<B>(q_abs, q_pe, c, k_pe, pieces),
        _ => {
            let scores = scores(&q_abs, &q_pe, &c, &k_pe); // [B, nh·T, S]
            let p = match mask {
                Some(mask) => {
                    let s4 = scores.reshape([b, nh, t, s]).swap_dims(0, 1);
                    softmax(add_mask(s4, mask)) // [nh, B, T, S]
                        .swap_dims(0, 1)
                        .reshape([b, nh * t, s])
                }
                None => softmax(scores),
            };
            p.matmul(c)
        }
    };
    let o_lat = o_lat.reshape([b, nh, t, r]); // [B, nh, T, r]
    o_lat.swap_dims(0, 1).reshape([nh, b * t, r]).matmul(w_uv) // [nh, B·T, dv]
}

/// The scores `q_abs·cᵀ + q_pe·k_peᵀ` of queries `[B, M, r|dr]` over keys `[B, S, r|dr]`, as
/// `[B, M, S]` (a transposed view). Computed keys-major, `c·q_absᵀ`, with the S × r latent as
/// the left operand: on Flex the whole absorbed attention then takes 11–31% less time at
/// 512–8192 keys on one thread (`bench-kernels.sh absorbed`; `gemm` on these few-row products).
fn scores<B: DsBackend>(
    q_abs: &Tensor<B, 3>,
    q_pe: &Tensor<B, 3>,
    c: &Tensor<B, 3>,
    k_pe: &Tensor<B, 3>,
) -> Tensor<B, 3> {
    let keys_major = c.clone().matmul(q_abs.clone().swap_dims(1, 2))
        + k_pe.clone().matmul(q_pe.clone().swap_dims(1, 2)); // [B, S, M]
    keys_major.swap_dims(1, 2)
}

/// Keys per piece below which absorbed attention is not split across parallel jobs.
const SPLIT_MIN_KEYS: usize = 1024;

/// Unmasked absorbed attention of `q_abs [B, M, r]`, `q_pe [B, M, dr]` over the latent
/// `c [B, S, r]`, `k_pe [B, S, dr]` in `pieces` key ranges run as parallel jobs, each with its
/// own softmax maximum and sum, merged exactly as one softmax would be (the log-sum-exp rescale of
/// split-K "flash decoding"). Returns `softmax(q·kᵀ) · c`, `[B, M, r]`.
fn split_attention<B: DsBackend>(
    q_abs: Tensor<B, 3>,
    q_pe: Tensor<B, 3>,
    c: Tensor<B, 3>,
    k_pe: Tensor<B, 3>,
    pieces: usize,
) -> Tensor<B, 3> {
    let s = c.dims()[1];
    let per = s.div_ceil(pieces);
    let ranges: Vec<(usize, usize)> = (0..s).step_by(per).map(|a| (a, per.min(s - a))).collect();
    let parts = B::par_map(ranges, |(a, len)| {
        let c = c.clone().narrow(1, a, len);
        let scores = scores(&q_abs, &q_pe, &c, &k_pe.clone().narrow(1, a, len));
        let max = scores.clone().max_dim(2); // [B, M, 1]
        let p = (scores - max.clone()).exp();
        (max, p.clone().sum_dim(2), p.matmul(c)) // [B, M, 1], [B, M, 1], [B, M, r]
    });
    let max = parts
        .iter()
        .map(|(m, _, _)| m.clone())
        .reduce(|a, b| a.max_pair(b))
        .expect("at least one piece");
    let (mut sum, mut out) = (None, None);
    for (m, l, o) in parts {
        let w = (m - max.clone()).exp();
        sum = Some(match sum {
            None => l * w.clone(),
            Some(acc) => acc + l * w.clone(),
        });
        out = Some(match out {
            None => o * w,
            Some(acc) => acc + o * w,
        });
    }
    out.expect("at least one piece") / sum.expect("at least one piece")
}

/// The attention form with fewer multiply-adds for `t` queries over `s` keys with `nh` heads of
/// nope/value widths `dn`/`dv` over a latent of rank `r`: naive pays for expanding every key
/// once (`s·r·nh·(dn+dv)`) but attends in `dn`/`dv` wide heads; absorbed attends `r` wide.
/// Prompts favour naive, decode (t = 1) absorbed.
pub(crate) fn cheaper_mode(
    nh: usize,
    dn: usize,
    dv: usize,
    r: usize,
    t: usize,
    s: usize,
) -> AttentionMode {
    let naive = s * r * nh * (dn + dv) + nh * t * s * (dn + dv);
    let absorbed = nh * t * r * (dn + dv) + nh * t * s * 2 * r;
    if naive < absorbed {
        AttentionMode::Naive
    } else {
        AttentionMode::Absorbed
    }
}

/// `scores: [nh, B, T, S] + mask: [B|1, 1, T, S]`, laid out so the mask is one contiguous row
/// repeated over the outer axis (the broadcast CPU backends do fastest).
fn add_mask<B: DsBackend>(scores: Tensor<B, 4>, mask: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [nh, b, t, s] = scores.dims();
    // A per-row mask repeats over the heads; a shared one over heads and rows.
    let (outer, row) = if mask.dims()[0] == b {
        (nh, b * t * s)
    } else {
        (nh * b, t * s)
    };
    (scores.reshape([outer, row]) + mask.clone().reshape([1, row])).reshape([nh, b, t, s])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Auto picks naive for prompts and absorbed for decode, at the 671B shape (128 heads,
    /// latent 512, nope/value 128) and at the bench's small shape.
    #[test]
    fn auto_mode_choice() {
        for (nh, dn, dv, r) in [(128, 128, 128, 512), (8, 48, 48, 128)] {
            assert_eq!(cheaper_mode(nh, dn, dv, r, 512, 512), AttentionMode::Naive);
            assert_eq!(
                cheaper_mode(nh, dn, dv, r, 2048, 4096),
                AttentionMode::Naive
            );
            assert_eq!(
                cheaper_mode(nh, dn, dv, r, 1, 4096),
                AttentionMode::Absorbed
            );
            assert_eq!(
                cheaper_mode(nh, dn, dv, r, 4, 4096),
                AttentionMode::Absorbed
            );
        }
    }

    /// Attention split over key ranges and merged equals one softmax over all keys, for piece
    /// counts that do not divide the keys. Tolerance: both sum 2501 f32 terms in different
    /// orders (normalising before or after the product with `c`), ~√S·2⁻²⁴ ≈ 3e-6 relative;
    /// measured ~1e-6. A wrong rescale of a piece is off by 1e-2 or more.
    #[test]
    fn split_attention_equals_one_softmax() {
        use burn::tensor::Distribution;
        type B = burn::backend::Flex;
        let device = Default::default();
        let (b, m, r, dr, s) = (2, 5, 24, 8, 2501);
        let q_abs = Tensor::<B, 3>::random([b, m, r], Distribution::Normal(0.0, 0.5), &device);
        let q_pe = Tensor::<B, 3>::random([b, m, dr], Distribution::Normal(0.0, 0.5), &device);
        let c = Tensor::<B, 3>::random([b, s, r], Distribution::Normal(0.0, 1.0), &device);
        let k_pe = Tensor::<B, 3>::random([b, s, dr], Distribution::Normal(0.0, 1.0), &device);
        let scores = q_abs.clone().matmul(c.clone().swap_dims(1, 2))
            + q_pe.clone().matmul(k_pe.clone().swap_dims(1, 2));
        let want: Vec<f32> = softmax(scores)
            .matmul(c.clone())
            .into_data()
            .to_vec()
            .unwrap();
        for pieces in [1, 2, 3, 7] {
            let got: Vec<f32> =
                split_attention::<B>(q_abs.clone(), q_pe.clone(), c.clone(), k_pe.clone(), pieces)
                    .into_data()
                    .to_vec()
                    .unwrap();
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{pieces} pieces: {worst:e}");
        }
    }
}
