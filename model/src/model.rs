//! The whole model (spec §2): embedding, decoder layers (dense below `first_k_dense_replace`,
//! MoE above), final norm, `lm_head`, and the MTP modules.
//!
//! Struct and field names follow the checkpoint's key paths (`model.layers.3.mlp.experts.7.up_proj.weight`),
//! so weights bind by name (see `load.rs`). The one exception: MTP module `k` lives in
//! `model.mtp.k` and is stored as `model.layers.{num_hidden_layers + k}`.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::DsBackend;

use crate::config::DeepseekV3Config;
use crate::error::ModelError;
use crate::linear::Linear;
use crate::mla::{padded_causal_mask, AttentionMode, LatentKv, Mla, MlaConfig};
use crate::mlp::{linear, Mlp, MlpConfig};
use crate::moe::{Moe, MoeConfig, RouterConfig, Routing};
use crate::mtp::{MtpLayer, MtpLayerConfig};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::rope::{softmax_scale, RotaryEmbedding};

/// The feed-forward half of a decoder layer.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FeedForward<B: DsBackend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

impl<B: DsBackend> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>, record: bool) -> (Tensor<B, 3>, Option<Routing>) {
        let (y, routing, _) = self.forward_scored(x, record);
        (y, routing)
    }

    /// [`Self::forward`], plus the router's sigmoid affinities `[B·T, E]` of a MoE layer.
    pub fn forward_scored(
        &self,
        x: Tensor<B, 3>,
        record: bool,
    ) -> (Tensor<B, 3>, Option<Routing>, Option<Tensor<B, 2>>) {
        match self {
            FeedForward::Dense(mlp) => (mlp.forward(x), None, None),
            FeedForward::Moe(moe) => {
                let (y, routing, scores) = moe.forward_scored(x, record);
                (y, routing, Some(scores))
            }
        }
    }
}

/// Where a forward pass's new tokens sit: the rotary angles of their absolute positions and the
/// additive attention mask over (cached + new) key slots.
#[derive(Debug, Clone)]
pub struct Span<B: DsBackend> {
    /// `[B or 1, T, dr]` rotation tables ([`RotaryEmbedding::cos_sin_at`]).
    pub cos: Tensor<B, 3>,
    pub sin: Tensor<B, 3>,
    /// `[B or 1, 1, T, past + T]`, 0 or −inf; `None` when nothing is masked (one new token per
    /// row, no padding: every decode step of an unpadded batch).
    pub mask: Option<Tensor<B, 4>>,
    /// The rope pair-swap matrix `[dr, dr]` ([`crate::rope::pair_swap`]), built once per span
    /// rather than per layer.
    pub swap: Tensor<B, 2>,
}

impl<B: DsBackend> Span<B> {
    /// `t` tokens at positions `offset..offset+t` after `past` cached ones, the same for every row.
    pub fn contiguous(
        rope: &RotaryEmbedding,
        offset: usize,
        t: usize,
        past: usize,
        device: &B::Device,
    ) -> Self {
        Self::padded(rope, &[offset], t, past, &[0], device)
    }

    /// Left-padded rows: row `r`'s first `pad[r]` key slots (cache + new) are padding, and its new
    /// tokens sit at positions `offsets[r]..offsets[r]+t`.
    pub fn padded(
        rope: &RotaryEmbedding,
        offsets: &[usize],
        t: usize,
        past: usize,
        pad: &[usize],
        device: &B::Device,
    ) -> Self {
        let positions: Vec<usize> = offsets.iter().flat_map(|&o| o..o + t).collect();
        Self::at_positions(
            rope,
            &positions,
            offsets.len(),
            padded_causal_mask(t, past, pad, device),
            device,
        )
    }

    /// `rows` rows of `positions.len() / rows` new tokens at the given absolute positions
    /// (row-major), with an explicit additive mask `[rows or 1, 1, T, S]` (`None`: no masking).
    pub fn at_positions(
        rope: &RotaryEmbedding,
        positions: &[usize],
        rows: usize,
        mask: Option<Tensor<B, 4>>,
        device: &B::Device,
    ) -> Self {
        let (cos, sin) = rope.cos_sin_at::<B>(positions, device);
        let [_, n, dr] = cos.dims();
        Self {
            cos: cos.reshape([rows, n / rows, dr]),
            sin: sin.reshape([rows, n / rows, dr]),
            mask,
            swap: crate::rope::pair_swap(dr, device),
        }
    }
}

/// How to run a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attention: AttentionMode,
    /// Keep every MoE layer's expert choices and weights (a host read per layer).
    pub record_routing: bool,
    /// Compute logits for each row's last position only (`[B, 1, V]`): what a prompt's
    /// prefill needs, and `lm_head` is the largest matmul of a small model.
    pub last_logits_only: bool,
}

/// One MoE layer's routing, with its checkpoint layer index.
#[derive(Debug, Clone)]
pub struct LayerRouting {
    pub layer: usize,
    pub mtp: bool,
    pub routing: Routing,
}

/// Builds the layer modules from the HF config.
pub(crate) fn mla_config(cfg: &DeepseekV3Config) -> MlaConfig {
    MlaConfig::new(
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

pub(crate) fn feed_forward<B: DsBackend>(
    cfg: &DeepseekV3Config,
    layer: usize,
    device: &B::Device,
) -> FeedForward<B> {
    if cfg.is_moe_layer(layer) {
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
    } else {
        FeedForward::Dense(
            MlpConfig::new(cfg.hidden_size, cfg.intermediate_size)
                .with_init_std(cfg.initializer_range)
                .init(device),
        )
    }
}

/// What one residual block returns.
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

/// Pre-norm residual block shared by decoder layers, MTP modules and the training forward:
/// `h += attn(norm(h)); h += ffn(norm(h))`. `history` keeps the latent entries (see
/// [`Mla::forward_with`]).
#[allow(clippy::too_many_arguments)]
pub fn residual_block<B: DsBackend>(
    attn: &Mla<B>,
    attn_norm: &RmsNorm<B>,
    ffn: &FeedForward<B>,
    ffn_norm: &RmsNorm<B>,
    h: Tensor<B, 3>,
    span: &Span<B>,
    history: impl FnOnce(&LatentKv<B>) -> LatentKv<B>,
    opts: &ForwardOptions,
) -> BlockOutput<B> {
    let (a, kv) = attn.forward_with(attn_norm.forward(h.clone()), span, opts.attention, history);
    let h = h + a;
    let (f, routing, scores) = ffn.forward_scored(ffn_norm.forward(h.clone()), opts.record_routing);
    BlockOutput {
        h: h + f,
        kv,
        routing,
        scores,
    }
}

/// The main layers' latent history during a forward pass: `store_layer(l, new)` keeps layer
/// `l`'s new entries and returns all of its entries (earlier positions first) for attention.
/// Implemented by inference caches; [`DeepseekV3::forward_span`] uses a concatenating one.
pub trait LatentStore<B: DsBackend> {
    fn store_layer(&mut self, layer: usize, new: &LatentKv<B>) -> LatentKv<B>;
}

/// History given as per-layer tensors: the new entries are appended by concatenation.
struct Concat<'a, B: DsBackend>(Option<&'a [LatentKv<B>]>);

impl<B: DsBackend> LatentStore<B> for Concat<'_, B> {
    fn store_layer(&mut self, layer: usize, new: &LatentKv<B>) -> LatentKv<B> {
        match self.0.map(|p| &p[layer]) {
            Some(p) if !p.is_empty() => p.cat(new),
            _ => new.clone(),
        }
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: DsBackend> {
    pub self_attn: Mla<B>,
    pub mlp: FeedForward<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: DsBackend> DecoderLayer<B> {
    pub fn new(cfg: &DeepseekV3Config, layer: usize, device: &B::Device) -> Self {
        let norm = RmsNormConfig::new(cfg.hidden_size).with_eps(cfg.rms_norm_eps);
        Self {
            self_attn: mla_config(cfg).init(device),
            mlp: feed_forward(cfg, layer, device),
            input_layernorm: norm.init(device),
            post_attention_layernorm: norm.init(device),
        }
    }
}

/// `model.*` of the checkpoint.
#[derive(Module, Debug)]
pub struct DeepseekV3Model<B: DsBackend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// MTP modules, stored as `model.layers.{num_hidden_layers + k}`.
    pub mtp: Vec<MtpLayer<B>>,
}

/// Output of [`DeepseekV3::forward`].
#[derive(Debug, Clone)]
pub struct ForwardOutput<B: DsBackend> {
    /// `[B, T, vocab]` (`[B, 1, vocab]` with [`ForwardOptions::last_logits_only`]).
    pub logits: Tensor<B, 3>,
    /// Hidden state after the final norm, `[B, T, H]` (what the MTP modules consume).
    pub hidden: Tensor<B, 3>,
    /// Latent entries of the new tokens, one per main layer.
    pub kv: Vec<LatentKv<B>>,
    /// Routing of every MoE layer when requested.
    pub routing: Vec<LayerRouting>,
}

/// Output of [`DeepseekV3::forward_mtp`].
#[derive(Debug, Clone)]
pub struct MtpOutput<B: DsBackend> {
    /// `[B, T-1, vocab]`: row i predicts token i+2.
    pub logits: Tensor<B, 3>,
    /// The module's block output `[B, T-1, H]` (input of the next depth).
    pub hidden: Tensor<B, 3>,
    pub kv: LatentKv<B>,
    pub routing: Option<LayerRouting>,
}

/// `DeepseekV3ForCausalLM`: the model plus `lm_head`.
#[derive(Module, Debug)]
pub struct DeepseekV3<B: DsBackend> {
    pub model: DeepseekV3Model<B>,
    pub lm_head: Linear<B>,
    pub config: DeepseekV3Config,
    pub rope: RotaryEmbedding,
}

/// The Linear layers of an attention block, with their checkpoint names.
fn attn_linears<'a, B: DsBackend>(
    m: &'a mut Mla<B>,
    p: &str,
    out: &mut Vec<(String, &'a mut Linear<B>)>,
) {
    let Mla {
        q_a_proj,
        q_b_proj,
        q_proj,
        kv_a_proj_with_mqa,
        kv_b_proj,
        o_proj,
        ..
    } = m;
    for (name, l) in [
        ("q_a_proj", q_a_proj.as_mut()),
        ("q_b_proj", q_b_proj.as_mut()),
        ("q_proj", q_proj.as_mut()),
        ("kv_a_proj_with_mqa", Some(kv_a_proj_with_mqa)),
        ("kv_b_proj", Some(kv_b_proj)),
        ("o_proj", Some(o_proj)),
    ] {
        if let Some(l) = l {
            out.push((format!("{p}.{name}"), l));
        }
    }
}

fn mlp_linears<'a, B: DsBackend>(
    m: &'a mut Mlp<B>,
    p: &str,
    out: &mut Vec<(String, &'a mut Linear<B>)>,
) {
    out.push((format!("{p}.gate_proj"), &mut m.gate_proj));
    out.push((format!("{p}.up_proj"), &mut m.up_proj));
    out.push((format!("{p}.down_proj"), &mut m.down_proj));
}

fn ffn_linears<'a, B: DsBackend>(
    f: &'a mut FeedForward<B>,
    p: &str,
    out: &mut Vec<(String, &'a mut Linear<B>)>,
) {
    match f {
        FeedForward::Dense(m) => mlp_linears(m, p, out),
        FeedForward::Moe(moe) => {
            for (e, m) in moe.experts.iter_mut().enumerate() {
                mlp_linears(m, &format!("{p}.experts.{e}"), out);
            }
            if let Some(m) = moe.shared_experts.as_mut() {
                mlp_linears(m, &format!("{p}.shared_experts"), out);
            }
        }
    }
}

impl<B: DsBackend> DeepseekV3<B> {
    /// Every Linear layer with its checkpoint name (without `.weight`), in module order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        let n = self.config.num_hidden_layers;
        for (l, layer) in self.model.layers.iter_mut().enumerate() {
            attn_linears(
                &mut layer.self_attn,
                &format!("model.layers.{l}.self_attn"),
                &mut out,
            );
            ffn_linears(&mut layer.mlp, &format!("model.layers.{l}.mlp"), &mut out);
        }
        for (k, m) in self.model.mtp.iter_mut().enumerate() {
            let p = format!("model.layers.{}", n + k);
            out.push((format!("{p}.eh_proj"), &mut m.eh_proj));
            attn_linears(&mut m.self_attn, &format!("{p}.self_attn"), &mut out);
            ffn_linears(&mut m.mlp, &format!("{p}.mlp"), &mut out);
            out.push((format!("{p}.shared_head.head"), &mut m.shared_head.head));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// The MoE layers (main layers, then MTP layers).
    fn moe_layers_mut(&mut self) -> Vec<&mut Moe<B>> {
        let main = self.model.layers.iter_mut().map(|l| &mut l.mlp);
        let mtp = self.model.mtp.iter_mut().map(|m| &mut m.mlp);
        main.chain(mtp)
            .filter_map(|f| match f {
                FeedForward::Moe(m) => Some(m),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// Stacks every MoE layer's experts for the backend's grouped kernels ([`Moe::pack`]).
    pub fn pack_experts(&mut self) -> Result<(), ModelError> {
        for m in self.moe_layers_mut() {
            m.pack()?;
        }
        Ok(())
    }

    /// Whether any MoE layer is packed (then the per-expert parameters are placeholders).
    pub fn is_packed(&self) -> bool {
        self.model
            .layers
            .iter()
            .map(|l| &l.mlp)
            .chain(self.model.mtp.iter().map(|m| &m.mlp))
            .any(|f| matches!(f, FeedForward::Moe(m) if m.packed.is_some()))
    }

    /// Turns every FP8 Linear back into float weights.
    pub fn dequantize_fp8(&mut self) {
        for (_, l) in self.linears_mut() {
            l.dequantize();
        }
    }

    /// Bytes held by the weights of the Linear layers and packed experts (FP8 codes and scales
    /// at 1 and 4 bytes, float weights at their dtype's size).
    pub fn linear_weight_bytes(&mut self) -> usize {
        let packed = self.packed_bytes();
        let linears: usize = self
            .linears_mut()
            .iter()
            .map(|(_, l)| {
                if l.fp8.is_none() && l.weight.lazy_shape().num_elements() == 1 {
                    0 // a placeholder (packed expert)
                } else {
                    l.weight_bytes()
                }
            })
            .sum();
        packed + linears
    }

    /// Bytes held by the packed experts of every MoE layer (0 when none is packed).
    fn packed_bytes(&mut self) -> usize {
        self.moe_layers_mut()
            .iter()
            .filter_map(|m| m.packed.as_ref().map(|p| p.bytes()))
            .sum()
    }

    /// Bytes held by all weights: every parameter at its dtype, plus the FP8 forms and packed
    /// experts (which are not parameters).
    pub fn weight_bytes(&mut self) -> usize {
        struct Sum(usize);
        impl<B: DsBackend> burn::module::ModuleVisitor<B> for Sum {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
                let t = p.val();
                self.0 += t.shape().num_elements() * t.dtype().size();
            }
        }
        let mut sum = Sum(0);
        self.visit(&mut sum);
        let fp8: usize = self
            .linears_mut()
            .iter()
            .filter_map(|(_, l)| l.fp8.as_ref().map(|w| w.bytes()))
            .sum();
        sum.0 + fp8 + self.packed_bytes()
    }

    /// A model with freshly initialised weights (normal, std `initializer_range`; norms 1, bias 0).
    /// Parameters are created lazily: loading a checkpoint over them never allocates the init.
    pub fn init(cfg: &DeepseekV3Config, device: &B::Device) -> Result<Self, ModelError> {
        cfg.validate()?;
        let std = cfg.initializer_range;
        let embed = || {
            EmbeddingConfig::new(cfg.vocab_size, cfg.hidden_size)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device)
        };
        let norm = RmsNormConfig::new(cfg.hidden_size).with_eps(cfg.rms_norm_eps);
        Ok(Self {
            model: DeepseekV3Model {
                embed_tokens: embed(),
                layers: (0..cfg.num_hidden_layers)
                    .map(|l| DecoderLayer::new(cfg, l, device))
                    .collect(),
                norm: norm.init(device),
                mtp: (0..cfg.num_nextn_predict_layers)
                    .map(|k| MtpLayerConfig::from_model(cfg, k).init(device))
                    .collect(),
            },
            lm_head: linear(cfg.hidden_size, cfg.vocab_size, std, device),
            config: cfg.clone(),
            rope: RotaryEmbedding::new(cfg),
        })
    }

    pub fn device(&self) -> B::Device {
        self.lm_head.weight.device()
    }

    /// Checks ids against the vocabulary and turns them into a `[1, T]` tensor.
    pub fn tokens_tensor(&self, ids: &[u32]) -> Result<Tensor<B, 2, Int>, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let vocab = self.config.vocab_size;
        if let Some((index, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange {
                id: id as i64,
                index,
                vocab,
            });
        }
        let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Ok(
            Tensor::<B, 1, Int>::from_data(TensorData::new(data, [ids.len()]), &self.device())
                .reshape([1, ids.len()]),
        )
    }

    /// Forward over `tokens: [B, T]` whose first token sits at absolute position `offset`.
    ///
    /// `past`, when given, holds per layer the latent entries of the positions before (a cache);
    /// without it the tokens attend only to each other.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        offset: usize,
        past: Option<&[LatentKv<B>]>,
        opts: &ForwardOptions,
    ) -> ForwardOutput<B> {
        let [_, t] = tokens.dims();
        let past_len = past.and_then(|p| p.first()).map(|kv| kv.len()).unwrap_or(0);
        let span = Span::contiguous(&self.rope, offset, t, past_len, &self.device());
        self.forward_span(tokens, &span, past, opts)
    }

    /// Forward with explicit positions and mask (batched rows of different lengths).
    pub fn forward_span(
        &self,
        tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        past: Option<&[LatentKv<B>]>,
        opts: &ForwardOptions,
    ) -> ForwardOutput<B> {
        self.forward_store(tokens, span, &mut Concat(past), opts)
    }

    /// [`Self::forward_span`] with the history kept by `store` (an inference cache).
    pub fn forward_store(
        &self,
        tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        store: &mut dyn LatentStore<B>,
        opts: &ForwardOptions,
    ) -> ForwardOutput<B> {
        let mut h = self.model.embed_tokens.forward(tokens);
        let mut kv = Vec::with_capacity(self.model.layers.len());
        let mut routing = Vec::new();
        for (l, layer) in self.model.layers.iter().enumerate() {
            let out = residual_block(
                &layer.self_attn,
                &layer.input_layernorm,
                &layer.mlp,
                &layer.post_attention_layernorm,
                h,
                span,
                |new| store.store_layer(l, new),
                opts,
            );
            h = out.h;
            kv.push(out.kv);
            if let Some(routing_l) = out.routing {
                routing.push(LayerRouting {
                    layer: l,
                    mtp: false,
                    routing: routing_l,
                });
            }
        }
        let hidden = self.model.norm.forward(h);
        let logits = if opts.last_logits_only {
            let t = hidden.dims()[1];
            self.lm_head.forward(hidden.clone().narrow(1, t - 1, 1))
        } else {
            self.lm_head.forward(hidden.clone())
        };
        ForwardOutput {
            logits,
            hidden,
            kv,
            routing,
        }
    }

    /// MTP module `depth` (0-based): from the previous representation `h: [B, T, H]` (the main
    /// model's post-norm hidden state for depth 0, the previous module's output after that) at
    /// positions `offset..offset+T` and the tokens one step ahead `next_tokens: [B, T]`, predicts
    /// the tokens `depth + 2` ahead. The module's own attention runs at positions `offset..`.
    pub fn forward_mtp(
        &self,
        depth: usize,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        offset: usize,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> MtpOutput<B> {
        let [_, t, _] = h.dims();
        let past_len = past.map(|kv| kv.len()).unwrap_or(0);
        let span = Span::contiguous(&self.rope, offset, t, past_len, &self.device());
        self.forward_mtp_span(depth, h, next_tokens, &span, past, opts)
    }

    /// [`Self::forward_mtp`] with explicit positions and mask.
    pub fn forward_mtp_span(
        &self,
        depth: usize,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> MtpOutput<B> {
        let layer = &self.model.mtp[depth];
        let (logits, hidden, kv, routing) = layer.forward(h, next_tokens, span, past, opts);
        MtpOutput {
            logits,
            hidden,
            kv,
            routing: routing.map(|routing| LayerRouting {
                layer: self.config.num_hidden_layers + depth,
                mtp: true,
                routing,
            }),
        }
    }

    /// Convenience for scoring: the first MTP module's logits `[B, T-1, V]` for a sequence whose
    /// main-model forward gave `out`.
    pub fn mtp_logits(
        &self,
        tokens: Tensor<B, 2, Int>,
        out: &ForwardOutput<B>,
        offset: usize,
        opts: &ForwardOptions,
    ) -> Result<MtpOutput<B>, ModelError> {
        let [_, t] = tokens.dims();
        if self.model.mtp.is_empty() || t < 2 {
            return Err(ModelError::NoMtp(format!(
                "{} token(s), num_nextn_predict_layers = {}",
                t,
                self.model.mtp.len()
            )));
        }
        let h = out.hidden.clone().narrow(1, 0, t - 1);
        let next = tokens.narrow(1, 1, t - 1);
        Ok(self.forward_mtp(0, h, next, offset, None, opts))
    }
}
