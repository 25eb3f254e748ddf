//! The training forward pass: the model's own forward (main blocks, then `mtp_depths` MTP
//! modules), asked to keep what training needs besides the logits: every MoE layer's router
//! affinities **with gradient** and expert choices (for the sequence-wise balance loss and the
//! bias update) and, when probing, each block's output (to locate a NaN).

use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor};
use dsv3_backends::DsBackend;
use dsv3_model::{AttentionMode, DeepseekV3, ForwardOptions, LayerRouting, LayerScores};

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

/// Pairs each MoE layer's recorded routing with its router affinities.
fn traces<B: DsBackend>(
    routing: Vec<LayerRouting>,
    scores: Vec<LayerScores<B>>,
    rows: usize,
    len: usize,
) -> impl Iterator<Item = RouterTrace<B>> {
    routing.into_iter().zip(scores).map(move |(r, s)| {
        debug_assert_eq!(r.layer, s.layer);
        RouterTrace {
            layer: r.layer,
            mtp: r.mtp,
            rows,
            len,
            scores: s.scores,
            experts: r.routing.experts,
        }
    })
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
    let [rows, t] = tokens.dims();
    let opts = ForwardOptions {
        attention: mode,
        record_routing: true,
        router_scores: true,
        probes: probe,
        ..Default::default()
    };
    let out = model.forward(tokens.clone(), 0, None, &opts);
    let mut routers: Vec<RouterTrace<B>> =
        traces(out.routing, out.router_scores, rows, t).collect();
    let mut probes = out.probes;
    if probe {
        probes.push(("model.norm + lm_head".to_string(), out.logits.clone()));
    }
    let mut prev = out.hidden;
    let mut mtp_logits = Vec::new();
    for k in 0..mtp_depths.min(model.model.mtp.len()) {
        if t < k + 2 {
            break;
        }
        let len = t - 1 - k;
        let next = tokens.clone().narrow(1, k + 1, len);
        let m = model
            .forward_mtp(k, prev.narrow(1, 0, len), next, 0, None, &opts)
            .expect("depth k is below model.mtp.len()");
        let routing = m.routing.into_iter().collect();
        routers.extend(traces(
            routing,
            m.router_scores.into_iter().collect(),
            rows,
            len,
        ));
        if probe {
            let name = format!(
                "model.layers.{} (MTP module {k})",
                model.config.mtp_layer(k)
            );
            probes.push((name, m.hidden.clone()));
        }
        mtp_logits.push(m.logits);
        prev = m.hidden;
    }
    TrainForward {
        logits: out.logits,
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
