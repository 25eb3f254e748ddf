//! The training forward pass: the model's own blocks (`residual_block`), walked layer by layer
//! so that every MoE layer (the MTP module's included) also hands back its router affinities
//! **with gradient** and its expert choices, which the sequence-wise balance loss and the bias
//! update need, and so that a NaN can be located by block. The same operations in the same
//! order as `DeepseekV3::forward`/`forward_mtp`: a test checks the logits are bit-identical.

use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor};
use dsv3_backends::DsBackend;
use dsv3_model::mla::Mla;
use dsv3_model::model::{residual_block, DecoderLayer, FeedForward, Span};
use dsv3_model::norm::RmsNorm;
use dsv3_model::{AttentionMode, DeepseekV3, ForwardOptions};

/// One MoE layer's router in one forward pass.
#[derive(Debug, Clone)]
pub struct RouterTrace<B: Backend> {
    /// Checkpoint layer index (`num_hidden_layers + k` for MTP module k).
    pub layer: usize,
    pub mtp: bool,
    /// Sequences in the batch and tokens per sequence (`rows · len` router rows).
    pub rows: usize,
    pub len: usize,
    /// Sigmoid affinities `s_{i,t}`, `[rows·len, E]`, in the autodiff graph.
    pub scores: Tensor<B, 2>,
    /// Chosen experts per token, `[rows·len][k]` (what the layer actually used).
    pub experts: Vec<Vec<u32>>,
}

/// What a training forward produces.
#[derive(Debug, Clone)]
pub struct TrainForward<B: Backend> {
    /// `[B, T, V]`: position i predicts token i+1.
    pub logits: Tensor<B, 3>,
    /// Per MTP depth k: `[B, T−1−k, V]`, row i predicts token i+k+2.
    pub mtp_logits: Vec<Tensor<B, 3>>,
    pub routers: Vec<RouterTrace<B>>,
    /// With `probe`: every block's output in order, named by checkpoint path (for locating a NaN).
    pub probes: Vec<(String, Tensor<B, 3>)>,
}

/// One residual block through the model's own [`residual_block`] (no cache), keeping the MoE
/// layer's router affinities and choices.
#[allow(clippy::too_many_arguments)]
fn block<B: DsBackend>(
    attn: &Mla<B>,
    attn_norm: &RmsNorm<B>,
    ffn: &FeedForward<B>,
    ffn_norm: &RmsNorm<B>,
    h: Tensor<B, 3>,
    span: &Span<B>,
    mode: AttentionMode,
    trace: (usize, bool),
    routers: &mut Vec<RouterTrace<B>>,
) -> Tensor<B, 3> {
    let [rows, len, _] = h.dims();
    let opts = ForwardOptions {
        attention: mode,
        record_routing: true,
        ..Default::default()
    };
    let out = residual_block(
        attn,
        attn_norm,
        ffn,
        ffn_norm,
        h,
        span,
        |new| new.clone(),
        &opts,
    );
    if let Some(scores) = out.scores {
        routers.push(RouterTrace {
            layer: trace.0,
            mtp: trace.1,
            rows,
            len,
            scores,
            experts: out.routing.map(|r| r.experts).unwrap_or_default(),
        });
    }
    out.h
}

/// Main model over `tokens: [B, T]` (positions 0..T), then `mtp_depths` MTP modules.
///
/// MTP depth k takes the previous representation's first `T−1−k` rows and the tokens
/// `k+1 ..= T−1` and predicts tokens `k+2 ..= T` (targets the caller takes from the window).
pub fn forward<B: DsBackend>(
    model: &DeepseekV3<B>,
    tokens: Tensor<B, 2, Int>,
    mode: AttentionMode,
    mtp_depths: usize,
    probe: bool,
) -> TrainForward<B> {
    let [_, t] = tokens.dims();
    let device = model.device();
    let span = Span::contiguous(&model.rope, 0, t, 0, &device);
    let mut routers = Vec::new();
    let mut probes = Vec::new();
    let mut h = model.model.embed_tokens.forward(tokens.clone());
    if probe {
        probes.push(("model.embed_tokens".to_string(), h.clone()));
    }
    for (l, layer) in model.model.layers.iter().enumerate() {
        let DecoderLayer {
            self_attn,
            mlp,
            input_layernorm,
            post_attention_layernorm,
        } = layer;
        h = block(
            self_attn,
            input_layernorm,
            mlp,
            post_attention_layernorm,
            h,
            &span,
            mode,
            (l, false),
            &mut routers,
        );
        if probe {
            probes.push((format!("model.layers.{l}"), h.clone()));
        }
    }
    let hidden = model.model.norm.forward(h);
    let logits = model.lm_head.forward(hidden.clone());
    if probe {
        probes.push(("model.norm + lm_head".to_string(), logits.clone()));
    }
    let n_layers = model.config.num_hidden_layers;
    let mut prev = hidden;
    let mut mtp_logits = Vec::new();
    for k in 0..mtp_depths.min(model.model.mtp.len()) {
        if t < k + 2 {
            break;
        }
        let len = t - 1 - k;
        let m = &model.model.mtp[k];
        let span = Span::contiguous(&model.rope, 0, len, 0, &device);
        let e = m
            .enorm
            .forward(m.embed_tokens.forward(tokens.clone().narrow(1, k + 1, len)));
        let x = m.eh_proj.forward(Tensor::cat(
            vec![e, m.hnorm.forward(prev.narrow(1, 0, len))],
            2,
        ));
        let out = block(
            &m.self_attn,
            &m.input_layernorm,
            &m.mlp,
            &m.post_attention_layernorm,
            x,
            &span,
            mode,
            (n_layers + k, true),
            &mut routers,
        );
        let lg = m
            .shared_head
            .head
            .forward(m.shared_head.norm.forward(out.clone()));
        if probe {
            probes.push((
                format!("model.layers.{} (MTP module {k})", n_layers + k),
                out.clone(),
            ));
        }
        mtp_logits.push(lg);
        prev = out;
    }
    TrainForward {
        logits,
        mtp_logits,
        routers,
        probes,
    }
}

/// Name of the first probe holding a NaN or infinity, if any.
pub fn first_non_finite<B: Backend>(probes: &[(String, Tensor<B, 3>)]) -> Option<String> {
    probes.iter().find_map(|(name, t)| {
        let bad = t.clone().is_nan().any().into_scalar().elem::<bool>()
            || t.clone()
                .abs()
                .equal_elem(f32::INFINITY)
                .any()
                .into_scalar()
                .elem::<bool>();
        bad.then(|| name.clone())
    })
}
