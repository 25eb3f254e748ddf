//! The whole model (spec §2): embedding, decoder blocks (dense below `first_k_dense_replace`,
//! MoE above), final norm, `lm_head`, and the MTP modules, with the one forward walk over them.
//!
//! Struct and field names follow the checkpoint's key paths (`model.layers.3.mlp.experts.7.up_proj.weight`),
//! so weights bind by name (see `names.rs`). The exceptions: MTP module `k` lives in
//! `model.mtp.k` and is stored as `model.layers.{num_hidden_layers + k}`
//! ([`DeepseekV3Config::mtp_layer`]), and its `block` field adds nothing to the path.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::DsBackend;

use crate::block::{DecoderLayer, FeedForward, ForwardOptions};
use crate::cache::{Concat, LatentKv, LatentStore};
use crate::config::DeepseekV3Config;
use crate::error::ModelError;
use crate::expert_parallel::{owned_experts, EpStats, ExpertParallel, Holding};
use crate::linear::{linear, Linear};
use crate::mla::Mla;
use crate::mlp::Mlp;
use crate::moe::{Moe, Routing};
use crate::mtp::{MtpLayer, MtpLayerConfig};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::positions::Span;
use crate::rope::RotaryEmbedding;

/// One MoE layer's routing, with its checkpoint layer index.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRouting {
    pub layer: usize,
    pub mtp: bool,
    pub routing: Routing,
}

/// One MoE layer's router affinities `[B·T, E]` (with [`ForwardOptions::router_scores`]).
#[derive(Debug, Clone)]
pub struct LayerScores<B: DsBackend> {
    /// Checkpoint layer index (`num_hidden_layers + k` for MTP module k).
    pub layer: usize,
    pub scores: Tensor<B, 2>,
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
    /// Router affinities of every MoE layer with [`ForwardOptions::router_scores`].
    pub router_scores: Vec<LayerScores<B>>,
    /// With [`ForwardOptions::probes`]: the embedding's and every block's output, named by
    /// checkpoint path.
    pub probes: Vec<(String, Tensor<B, 3>)>,
}

/// Output of [`DeepseekV3::forward_mtp`].
#[derive(Debug, Clone)]
pub struct MtpOutput<B: DsBackend> {
    /// `[B, T, vocab]` for `T` input rows (`[B, 1, vocab]` with
    /// [`ForwardOptions::last_logits_only`]): row i predicts the token `depth + 2` after
    /// position i (for [`DeepseekV3::mtp_logits`], `T` is the sequence length minus one).
    pub logits: Tensor<B, 3>,
    /// The module's block output `[B, T, H]` (input of the next depth).
    pub hidden: Tensor<B, 3>,
    pub kv: LatentKv<B>,
    pub routing: Option<LayerRouting>,
    /// With [`ForwardOptions::router_scores`].
    pub router_scores: Option<LayerScores<B>>,
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

fn block_linears<'a, B: DsBackend>(
    b: &'a mut DecoderLayer<B>,
    p: &str,
    out: &mut Vec<(String, &'a mut Linear<B>)>,
) {
    attn_linears(&mut b.self_attn, &format!("{p}.self_attn"), out);
    ffn_linears(&mut b.mlp, &format!("{p}.mlp"), out);
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
    /// Every decoder block with its checkpoint layer index: the main layers, then each MTP
    /// module's block (`num_hidden_layers + k`).
    pub fn blocks(&self) -> impl Iterator<Item = (usize, &DecoderLayer<B>)> + '_ {
        let mtp = self.model.mtp.iter().enumerate();
        let mtp = mtp.map(|(k, m)| (self.config.mtp_layer(k), &m.block));
        self.model.layers.iter().enumerate().chain(mtp)
    }

    /// [`Self::blocks`], mutably.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = (usize, &mut DecoderLayer<B>)> + '_ {
        let cfg = &self.config;
        let mtp = self.model.mtp.iter_mut().enumerate();
        let mtp = mtp.map(|(k, m)| (cfg.mtp_layer(k), &mut m.block));
        self.model.layers.iter_mut().enumerate().chain(mtp)
    }

    /// Runs the training GEMMs of every Linear layer in the decoder blocks (main and MTP) in
    /// `gemm`'s format (bf16 or FP8, DeepSeek-V3 report §3.3), or back in f32 with `None`.
    /// The layers the report keeps in higher precision stay in f32: embeddings, `lm_head`,
    /// the MTP modules' `eh_proj` and heads, the router, norms and the attention core.
    pub fn set_training_gemm(&mut self, gemm: Option<dsv3_backends::QuantGemm>) {
        for (_, block) in self.blocks_mut() {
            for l in block.linears_mut() {
                l.gemm = gemm.clone();
            }
        }
    }

    /// The MoE layer of checkpoint layer `layer` (a main layer or an MTP module's block).
    pub fn moe(&self, layer: usize) -> Option<&Moe<B>> {
        self.blocks().find(|(i, _)| *i == layer)?.1.mlp.moe()
    }

    /// [`Self::moe`], mutably.
    pub fn moe_mut(&mut self, layer: usize) -> Option<&mut Moe<B>> {
        let block = self.blocks_mut().find(|(i, _)| *i == layer)?.1;
        block.mlp.moe_mut()
    }

    /// Checkpoint indices of the MoE layers: main layers, then MTP modules.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.blocks()
            .filter(|(_, b)| b.mlp.moe().is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// Every Linear layer with its checkpoint name (without `.weight`), in module order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        let cfg = &self.config;
        for (l, layer) in self.model.layers.iter_mut().enumerate() {
            block_linears(layer, &format!("model.layers.{l}"), &mut out);
        }
        for (k, m) in self.model.mtp.iter_mut().enumerate() {
            let p = format!("model.layers.{}", cfg.mtp_layer(k));
            out.push((format!("{p}.eh_proj"), &mut m.eh_proj));
            block_linears(&mut m.block, &p, &mut out);
            out.push((format!("{p}.shared_head.head"), &mut m.shared_head.head));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// The MoE layers (main layers, then MTP layers).
    fn moe_layers_mut(&mut self) -> Vec<&mut Moe<B>> {
        self.blocks_mut()
            .filter_map(|(_, b)| b.mlp.moe_mut())
            .collect()
    }

    /// Splits the routed experts of every MoE layer (the MTP modules' too) over the members of
    /// `comm`: expert `e` stays on rank [`expert_owner`](crate::expert_owner)`(e, E, size)`, the others become
    /// placeholders (their memory is freed), and every MoE forward then dispatches rows to
    /// the experts' owners and combines the results ([`ExpertParallel`]). Every rank must hold
    /// the same dense weights and call the model's forward passes in step.
    ///
    /// # Errors
    /// [`ModelError::Invalid`] for a model whose experts are packed, or a group larger than
    /// the number of routed experts.
    pub fn set_expert_parallel(
        &mut self,
        comm: std::sync::Arc<dyn dsv3_backends::comm::Communicator>,
    ) -> Result<(), ModelError> {
        if self.is_packed() {
            return Err(ModelError::Invalid(
                "expert parallelism runs the experts unpacked: split them before (instead of) packing"
                    .into(),
            ));
        }
        let n = self.config.n_routed_experts;
        let owned = owned_experts(comm.rank(), n, comm.size());
        let stats = std::sync::Arc::new(std::sync::Mutex::new(EpStats::default()));
        for layer in self.moe_layers() {
            let ep = ExpertParallel::with_stats(comm.clone(), n, layer, stats.clone())?;
            let moe = self.moe_mut(layer).expect("a MoE layer");
            for (e, expert) in moe.experts.iter_mut().enumerate() {
                if !owned.contains(&e) {
                    expert.gate_proj.clear();
                    expert.up_proj.clear();
                    expert.down_proj.clear();
                }
            }
            moe.ep = Some(ep);
        }
        Ok(())
    }

    /// The expert-parallel group, when [`Self::set_expert_parallel`] was called.
    pub fn expert_parallel(&self) -> Option<&ExpertParallel> {
        self.blocks()
            .find_map(|(_, b)| b.mlp.moe().and_then(|m| m.ep.as_ref()))
    }

    /// Ids of the parameters of the routed experts this rank holds (every routed expert
    /// without expert parallelism). Under expert parallelism these are the parameters that are
    /// not replicated over the expert-parallel group: their gradients already sum every
    /// rank's tokens (the exchange's backward brings them), the others must be all-reduced.
    pub fn held_expert_params(&self) -> std::collections::HashSet<burn::module::ParamId> {
        use burn::module::{ModuleVisitor, Param, ParamId};
        struct Ids(std::collections::HashSet<ParamId>);
        impl<B: DsBackend> ModuleVisitor<B> for Ids {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0.insert(p.id);
            }
        }
        let mut ids = Ids(Default::default());
        let n = self.config.n_routed_experts;
        for (_, block) in self.blocks() {
            if let Some(moe) = block.mlp.moe() {
                let owned = moe.ep.as_ref().map_or(0..n, |ep| ep.owned());
                for e in owned {
                    moe.experts[e].visit(&mut ids);
                }
            }
        }
        ids.0
    }

    /// Every float parameter's id, checkpoint name and [`Holding`], in module order: what a
    /// distributed optimizer needs to know (which gradients to sum over which ranks, which
    /// parameters are another rank's placeholders).
    pub fn param_holdings(&self) -> Vec<(burn::module::ParamId, String, Holding)> {
        let held = self.held_expert_params();
        self.param_names()
            .into_iter()
            .map(|(id, name)| {
                let holding = if held.contains(&id) {
                    Holding::HeldExpert
                } else if crate::expert_parallel::expert_of(&name).is_some() {
                    Holding::OtherExpert
                } else {
                    Holding::Replicated
                };
                (id, name, holding)
            })
            .collect()
    }

    /// Stacks every MoE layer's experts for the backend's grouped kernels ([`Moe::pack`]).
    ///
    /// # Errors
    /// [`ModelError::Invalid`] when a layer's FP8 experts differ in shape or block size (see
    /// [`Moe::pack`]); layers before it stay packed.
    pub fn pack_experts(&mut self) -> Result<(), ModelError> {
        for m in self.moe_layers_mut() {
            m.pack()?;
        }
        Ok(())
    }

    /// Whether any MoE layer is packed (then the per-expert parameters are placeholders).
    pub fn is_packed(&self) -> bool {
        self.blocks()
            .any(|(_, b)| b.mlp.moe().is_some_and(|m| m.packed.is_some()))
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
    ///
    /// # Errors
    /// [`ModelError::Config`] when `cfg` fails [`DeepseekV3Config::validate`].
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
    ///
    /// # Errors
    /// - [`ModelError::EmptyInput`]: `ids` is empty.
    /// - [`ModelError::TokenOutOfRange`]: the first id `>= vocab_size`, with its index.
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
    ///
    /// # Panics
    /// When `offset + T` exceeds [`MAX_POSITION`](crate::MAX_POSITION): validate positions that
    /// come from input with [`check_positions`](crate::check_positions) (ids with
    /// [`Self::tokens_tensor`]).
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

    /// [`Self::forward_span`] with the history kept by `store` (an inference cache). The one
    /// walk over the main blocks: inference, scoring and training all run it.
    pub fn forward_store(
        &self,
        tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        store: &mut dyn LatentStore<B>,
        opts: &ForwardOptions,
    ) -> ForwardOutput<B> {
        let mut h = self.model.embed_tokens.forward(tokens);
        let mut kv = Vec::with_capacity(self.model.layers.len());
        let (mut routing, mut router_scores, mut probes) = (Vec::new(), Vec::new(), Vec::new());
        if opts.probes {
            probes.push(("model.embed_tokens".to_string(), h.clone()));
        }
        for (l, layer) in self.model.layers.iter().enumerate() {
            let out = layer.forward(h, span, |new| store.store_layer(l, new), opts);
            h = out.h;
            kv.push(out.kv);
            if let Some(r) = out.routing {
                routing.push(LayerRouting {
                    layer: l,
                    mtp: false,
                    routing: r,
                });
            }
            if let (true, Some(scores)) = (opts.router_scores, out.scores) {
                router_scores.push(LayerScores { layer: l, scores });
            }
            if opts.probes {
                probes.push((format!("model.layers.{l}"), h.clone()));
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
            router_scores,
            probes,
        }
    }

    /// MTP module `depth` (0-based): from the previous representation `h: [B, T, H]` (the main
    /// model's post-norm hidden state for depth 0, the previous module's output after that) at
    /// positions `offset..offset+T` and the tokens one step ahead `next_tokens: [B, T]`, predicts
    /// the tokens `depth + 2` ahead. The module's own attention runs at positions `offset..`.
    ///
    /// # Errors
    /// - [`ModelError::NoMtp`] when the model has no MTP module `depth` (it has
    ///   `model.mtp.len()`: none when not configured or skipped at load).
    /// - [`ModelError::PositionOutOfRange`] when `offset + T` exceeds
    ///   [`MAX_POSITION`](crate::MAX_POSITION).
    pub fn forward_mtp(
        &self,
        depth: usize,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        offset: usize,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> Result<MtpOutput<B>, ModelError> {
        self.mtp_module(depth)?;
        let [_, t, _] = h.dims();
        crate::rope::check_positions(offset, t)?;
        let past_len = past.map(|kv| kv.len()).unwrap_or(0);
        let span = Span::contiguous(&self.rope, offset, t, past_len, &self.device());
        self.forward_mtp_span(depth, h, next_tokens, &span, past, opts)
    }

    /// [`Self::forward_mtp`] with explicit positions and mask.
    ///
    /// # Errors
    /// [`ModelError::NoMtp`] when the model has no MTP module `depth`.
    pub fn forward_mtp_span(
        &self,
        depth: usize,
        h: Tensor<B, 3>,
        next_tokens: Tensor<B, 2, Int>,
        span: &Span<B>,
        past: Option<&LatentKv<B>>,
        opts: &ForwardOptions,
    ) -> Result<MtpOutput<B>, ModelError> {
        let out = self
            .mtp_module(depth)?
            .forward(h, next_tokens, span, past, opts);
        let layer = self.config.mtp_layer(depth);
        Ok(MtpOutput {
            logits: out.logits,
            hidden: out.block.h,
            kv: out.block.kv,
            routing: out.block.routing.map(|routing| LayerRouting {
                layer,
                mtp: true,
                routing,
            }),
            router_scores: out
                .block
                .scores
                .filter(|_| opts.router_scores)
                .map(|scores| LayerScores { layer, scores }),
        })
    }

    /// MTP module `depth`, or why there is none.
    fn mtp_module(&self, depth: usize) -> Result<&MtpLayer<B>, ModelError> {
        self.model.mtp.get(depth).ok_or_else(|| {
            ModelError::NoMtp(format!(
                "MTP module {depth} asked for, the model has {} (num_nextn_predict_layers; \
                 none when skipped at load)",
                self.model.mtp.len()
            ))
        })
    }

    /// Convenience for scoring: the first MTP module's logits `[B, T-1, V]` for a sequence whose
    /// main-model forward gave `out`.
    ///
    /// # Errors
    /// [`ModelError::NoMtp`] when the model has no MTP module (none configured, or skipped at
    /// load) or `tokens` holds fewer than 2 positions (nothing to predict a token ahead of);
    /// [`ModelError::PositionOutOfRange`] as [`Self::forward_mtp`].
    pub fn mtp_logits(
        &self,
        tokens: Tensor<B, 2, Int>,
        out: &ForwardOutput<B>,
        offset: usize,
        opts: &ForwardOptions,
    ) -> Result<MtpOutput<B>, ModelError> {
        let [_, t] = tokens.dims();
        self.mtp_module(0)?;
        if t < 2 {
            return Err(ModelError::NoMtp(format!(
                "{t} token(s): the MTP module predicts the token after the next one, so it \
                 needs at least 2"
            )));
        }
        let h = out.hidden.clone().narrow(1, 0, t - 1);
        let next = tokens.narrow(1, 1, t - 1);
        self.forward_mtp(0, h, next, offset, None, opts)
    }
}
