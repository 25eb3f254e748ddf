//! Multi-token prediction module (spec §6).
//!
//! `h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])` — embedding first, as the released weights
//! expect — then one full (MoE) decoder block and the shared head predict `t_{i+2}`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Int, Tensor};
use dsv3_backends::DsBackend;

use crate::config::DeepseekV3Config;
use crate::linear::Linear;
use crate::mla::{LatentKv, Mla};
use crate::mlp::linear;
use crate::model::{feed_forward, mla_config, residual_block, FeedForward, ForwardOptions, Span};
use crate::moe::Routing;
use crate::norm::{RmsNorm, RmsNormConfig};

#[derive(Config, Debug)]
pub struct MtpLayerConfig {
    /// The model's config (the MTP block is a decoder layer of the same shape).
    pub model: DeepseekV3Config,
    /// Checkpoint layer index (`num_hidden_layers + k`): always a MoE layer in V3.
    pub layer: usize,
}

impl MtpLayerConfig {
    pub fn from_model(cfg: &DeepseekV3Config, k: usize) -> Self {
        Self::new(cfg.clone(), cfg.num_hidden_layers + k)
    }

    pub fn init<B: DsBackend>(&self, device: &B::Device) -> MtpLayer<B> {
        let cfg = &self.model;
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let norm = RmsNormConfig::new(h).with_eps(cfg.rms_norm_eps);
        MtpLayer {
            embed_tokens: EmbeddingConfig::new(cfg.vocab_size, h)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device),
            enorm: norm.init(device),
            hnorm: norm.init(device),
            eh_proj: linear(2 * h, h, std, device),
            self_attn: mla_config(cfg).init(device),
            mlp: feed_forward(cfg, self.layer, device),
            input_layernorm: norm.init(device),
            post_attention_layernorm: norm.init(device),
            shared_head: SharedHead {
                norm: norm.init(device),
                head: linear(h, cfg.vocab_size, std, device),
            },
        }
    }
}

/// `shared_head.*`: the output norm and a copy of `lm_head`.
#[derive(Module, Debug)]
pub struct SharedHead<B: DsBackend> {
    pub norm: RmsNorm<B>,
    pub head: Linear<B>,
}

/// `model.layers.{num_hidden_layers + k}.*` of the checkpoint.
#[derive(Module, Debug)]
pub struct MtpLayer<B: DsBackend> {
    /// A copy of the main embedding (the checkpoint stores it separately).
    pub embed_tokens: Embedding<B>,
    pub enorm: RmsNorm<B>,
    pub hnorm: RmsNorm<B>,
    /// `[H, 2H]` in the checkpoint; input is `[embedding ; hidden]`.
    pub eh_proj: Linear<B>,
    pub self_attn: Mla<B>,
    pub mlp: FeedForward<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub shared_head: SharedHead<B>,
}

impl<B: DsBackend> MtpLayer<B> {
    /// Returns (logits, block output, latent entries, routing).
    pub fn forward(
        &self,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, LatentKv<B>, Option<Routing>) {
        let e = self.enorm.forward(self.embed_tokens.forward(next_tokens));
        let x = self
            .eh_proj
            .forward(Tensor::cat(vec![e, self.hnorm.forward(h)], 2));
        let block = residual_block(
            &self.self_attn,
            &self.input_layernorm,
            &self.mlp,
            &self.post_attention_layernorm,
            x,
            span,
            |new| match past {
                Some(p) if !p.is_empty() => p.cat(new),
                _ => new.clone(),
            },
            opts,
        );
        let (out, kv, routing) = (block.h, block.kv, block.routing);
        let last = if opts.last_logits_only {
            let t = out.dims()[1];
            out.clone().narrow(1, t - 1, 1)
        } else {
            out.clone()
        };
        let logits = self
            .shared_head
            .head
            .forward(self.shared_head.norm.forward(last));
        (logits, out, kv, routing)
    }
}
