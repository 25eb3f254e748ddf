//! The decoder block (spec §2): `h += attn(norm(h)); h += ffn(norm(h))`, with MLA attention and a
//! dense SwiGLU MLP (layers below `first_k_dense_replace`) or DeepSeekMoE. The main stack is a
//! list of these; each MTP module wraps one (spec §6); a pipeline stage is a range of them.

use burn::module::Module;
use burn::tensor::Tensor;
use dsv3_backends::DsBackend;

use crate::cache::LatentKv;
use crate::config::DeepseekV3Config;
use crate::mla::{AttentionMode, Mla, MlaConfig};
use crate::mlp::{Mlp, MlpConfig};
use crate::moe::{Moe, MoeConfig, RouterConfig, Routing};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::positions::Span;

/// How to run a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attention: AttentionMode,
    /// Keep every MoE layer's expert choices and weights (a host read per layer).
    pub record_routing: bool,
    /// Compute logits for each row's last position only (`[B, 1, V]`): what a prompt's
    /// prefill needs, and `lm_head` is the largest matmul of a small model.
    pub last_logits_only: bool,
    /// Keep every MoE layer's router affinities `[B·T, E]` (in the autodiff graph on an
    /// autodiff backend): what training's sequence-wise balance loss needs.
    pub router_scores: bool,
    /// Keep the output `[B, T, H]` of the embedding and of every block, named by checkpoint
    /// path (for locating the first non-finite value).
    pub probes: bool,
}

/// The feed-forward half of a decoder layer.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FeedForward<B: DsBackend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

/// What the feed-forward half returns.
#[derive(Debug, Clone)]
pub struct FfnOutput<B: DsBackend> {
    /// `[B, T, H]`.
    pub y: Tensor<B, 3>,
    /// The MoE layer's routing, when recorded.
    pub routing: Option<Routing>,
    /// The MoE layer's router affinities `[B·T, E]`; `None` for a dense layer.
    pub scores: Option<Tensor<B, 2>>,
}

impl<B: DsBackend> FeedForward<B> {
    /// Layer `layer`'s feed-forward (checkpoint index; MTP blocks are MoE layers).
    pub fn new(cfg: &DeepseekV3Config, layer: usize, device: &B::Device) -> Self {
        if !cfg.is_moe_layer(layer) {
            return FeedForward::Dense(
                MlpConfig::new(cfg.hidden_size, cfg.intermediate_size)
                    .with_init_std(cfg.initializer_range)
                    .init(device),
            );
        }
        let router = RouterConfig::new(
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
        )
        .with_norm_topk_prob(cfg.norm_topk_prob)
        .with_routed_scaling_factor(cfg.routed_scaling_factor);
        FeedForward::Moe(
            MoeConfig::new(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.n_shared_experts,
                router,
            )
            .with_init_std(cfg.initializer_range)
            .init(device),
        )
    }

    /// `x: [B, T, H]` → `[B, T, H]`; with `record`, a MoE layer also reports its routing.
    pub fn forward(&self, x: Tensor<B, 3>, record: bool) -> FfnOutput<B> {
        match self {
            FeedForward::Dense(mlp) => FfnOutput {
                y: mlp.forward(x),
                routing: None,
                scores: None,
            },
            FeedForward::Moe(moe) => {
                let (y, routing, scores) = moe.forward_scored(x, record);
                FfnOutput {
                    y,
                    routing,
                    scores: Some(scores),
                }
            }
        }
    }

    /// The MoE layer, if this is one.
    pub fn moe(&self) -> Option<&Moe<B>> {
        match self {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    /// The MoE layer, if this is one.
    pub fn moe_mut(&mut self) -> Option<&mut Moe<B>> {
        match self {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }
}

/// What one decoder block returns.
#[derive(Debug, Clone)]
pub struct BlockOutput<B: DsBackend> {
    /// The block's output `[B, T, H]`.
    pub h: Tensor<B, 3>,
    /// Latent entries of the new tokens.
    pub kv: LatentKv<B>,
    /// The MoE layer's routing, when recorded.
    pub routing: Option<Routing>,
    /// The MoE layer's router affinities `[B·T, E]` (in the autodiff graph); `None` for a
    /// dense layer.
    pub scores: Option<Tensor<B, 2>>,
}

/// `model.layers.{i}.*` of the checkpoint (field names are the checkpoint's).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: DsBackend> {
    pub self_attn: Mla<B>,
    pub mlp: FeedForward<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: DsBackend> DecoderLayer<B> {
    /// Every Linear layer of the block that DeepSeek-V3 trains in FP8 (report §3.3.2; the
    /// weights its checkpoints store in FP8, spec §8): the attention projections, the dense
    /// MLP, the shared and the routed experts. Not the router, the norms or attention's core.
    pub fn linears_mut(&mut self) -> Vec<&mut crate::linear::Linear<B>> {
        let mut out = self.self_attn.linears_mut();
        match &mut self.mlp {
            FeedForward::Dense(m) => out.extend(m.linears_mut()),
            FeedForward::Moe(moe) => {
                for m in moe.experts.iter_mut().chain(moe.shared_experts.as_mut()) {
                    out.extend(m.linears_mut());
                }
            }
        }
        out
    }

    /// Block `layer` (checkpoint index: dense below `first_k_dense_replace`, MoE above; the
    /// MTP modules' blocks are `num_hidden_layers + k`).
    pub fn new(cfg: &DeepseekV3Config, layer: usize, device: &B::Device) -> Self {
        let norm = RmsNormConfig::new(cfg.hidden_size).with_eps(cfg.rms_norm_eps);
        Self {
            self_attn: MlaConfig::from_model(cfg).init(device),
            mlp: FeedForward::new(cfg, layer, device),
            input_layernorm: norm.init(device),
            post_attention_layernorm: norm.init(device),
        }
    }

    /// The block over `h: [B, T, H]` at the positions of `span`. `history` receives the new
    /// tokens' latent entries and returns every entry they attend to, earlier ones first (see
    /// [`Mla::forward_with`]).
    pub fn forward(
        &self,
        h: Tensor<B, 3>,
        span: &Span<B>,
        history: impl FnOnce(&LatentKv<B>) -> LatentKv<B>,
        opts: &ForwardOptions,
    ) -> BlockOutput<B> {
        let x = self.input_layernorm.forward(h.clone());
        let (a, kv) = self
            .self_attn
            .forward_with(x, span, opts.attention, history);
        let h = h + a;
        let ffn = self.mlp.forward(
            self.post_attention_layernorm.forward(h.clone()),
            opts.record_routing,
        );
        BlockOutput {
            h: h + ffn.y,
            kv,
            routing: ffn.routing,
            scores: ffn.scores,
        }
    }
}
