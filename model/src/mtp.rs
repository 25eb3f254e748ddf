//! Multi-token prediction module (spec §6).
//!
//! `h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])` — embedding first, as the released weights
//! expect — then one full (MoE) decoder block and the shared head predict `t_{i+2}`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Int, Tensor};
use dsv3_backends::DsBackend;

use crate::block::{BlockOutput, DecoderLayer, ForwardOptions};
use crate::cache::LatentKv;
use crate::config::DeepseekV3Config;
use crate::linear::{linear, Linear};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::positions::Span;

#[derive(Config, Debug)]
pub struct MtpLayerConfig {
    /// The model's config (the MTP block is a decoder layer of the same shape).
    pub model: DeepseekV3Config,
    /// Checkpoint layer index (`num_hidden_layers + k`): always a MoE layer in V3.
    pub layer: usize,
}

impl MtpLayerConfig {
    pub fn from_model(cfg: &DeepseekV3Config, k: usize) -> Self {
        Self::new(cfg.clone(), cfg.mtp_layer(k))
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
            block: DecoderLayer::new(cfg, self.layer, device),
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

/// `model.layers.{num_hidden_layers + k}.*` of the checkpoint: the block's tensors sit directly
/// under that prefix (`self_attn.*`, `mlp.*`, the two norms), beside the module's own.
#[derive(Module, Debug)]
pub struct MtpLayer<B: DsBackend> {
    /// A copy of the main embedding (the checkpoint stores it separately).
    pub embed_tokens: Embedding<B>,
    pub enorm: RmsNorm<B>,
    pub hnorm: RmsNorm<B>,
    /// `[H, 2H]` in the checkpoint; input is `[embedding ; hidden]`.
    pub eh_proj: Linear<B>,
    /// A full decoder block (always MoE in V3); its field name adds nothing to checkpoint paths.
    pub block: DecoderLayer<B>,
    pub shared_head: SharedHead<B>,
}

/// What an MTP module returns.
#[derive(Debug, Clone)]
pub struct MtpLayerOutput<B: DsBackend> {
    /// `[B, T, vocab]` (`[B, 1, vocab]` with [`ForwardOptions::last_logits_only`]).
    pub logits: Tensor<B, 3>,
    /// The block's output (its `h` feeds the next depth), latent entries and router outputs.
    pub block: BlockOutput<B>,
}

impl<B: DsBackend> MtpLayer<B> {
    /// From the previous depth's representation `h: [B, T, H]` and the embeddings of the tokens
    /// one step ahead `next_tokens: [B, T]`, at the positions of `span` after the `past` entries
    /// of this module's own attention.
    pub fn forward(
        &self,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> MtpLayerOutput<B> {
        let e = self.enorm.forward(self.embed_tokens.forward(next_tokens));
        let x = self
            .eh_proj
            .forward(Tensor::cat(vec![e, self.hnorm.forward(h)], 2));
        let block = self.block.forward(
            x,
            span,
            |new| match past {
                Some(p) if !p.is_empty() => p.cat(new),
                _ => new.clone(),
            },
            opts,
        );
        let last = if opts.last_logits_only {
            let t = block.h.dims()[1];
            block.h.clone().narrow(1, t - 1, 1)
        } else {
            block.h.clone()
        };
        let logits = self
            .shared_head
            .head
            .forward(self.shared_head.norm.forward(last));
        MtpLayerOutput { logits, block }
    }
}
