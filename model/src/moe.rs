//! DeepSeekMoE (spec §5): shared experts plus routed experts chosen by a sigmoid router with
//! group-limited top-k and the aux-loss-free selection bias.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{activation::sigmoid, IndexingUpdateOp, Int, Tensor, TensorData};
use dsv3_backends::{DsBackend, Fp8Weight, GroupedWeight};

use crate::expert_parallel::ExpertParallel;
use crate::linear::Linear;
use crate::mlp::{Mlp, MlpConfig};

/// Router settings (HF field names in [`crate::DeepseekV3Config`]).
#[derive(Config, Debug)]
pub struct RouterConfig {
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    #[config(default = true)]
    pub norm_topk_prob: bool,
    #[config(default = 1.0)]
    pub routed_scaling_factor: f64,
}

/// Chooses experts for each row of `logits: [N, E]` (the gate's raw scores).
///
/// Returns the chosen expert ids `[N, k]` (in descending biased score) and their weights `[N, k]`:
/// unbiased sigmoid scores, renormalised over the `k` chosen (when `norm_topk_prob`) and
/// multiplied by `routed_scaling_factor`. `bias` only steers the choice. Experts of the groups
/// that are not kept are masked with −inf, so a kept expert with `sigmoid + bias < 0` still wins
/// over any dropped one.
pub fn route<B: DsBackend>(
    logits: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    cfg: &RouterConfig,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    route_scores(sigmoid(logits), bias, cfg)
}

/// [`route`] from the sigmoid affinities `scores: [N, E]` themselves.
pub(crate) fn route_scores<B: DsBackend>(
    scores: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    cfg: &RouterConfig,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let [n, e] = scores.dims();
    let mut biased = scores.clone() + bias.unsqueeze_dim::<2>(0);
    if cfg.n_group > 1 {
        let (g, per) = (cfg.n_group, e / cfg.n_group);
        // Group score: the sum of the two best biased scores in the group.
        let group_scores = biased
            .clone()
            .reshape([n, g, per])
            .sort_descending(2)
            .narrow(2, 0, 2)
            .sum_dim(2)
            .reshape([n, g]);
        let kept = top_k_indices(group_scores, cfg.topk_group);
        let device = biased.device();
        let keep = Tensor::<B, 2>::zeros([n, g], &device).scatter(
            1,
            kept,
            Tensor::ones([n, cfg.topk_group], &device),
            IndexingUpdateOp::Add,
        );
        let dropped = keep
            .reshape([n, g, 1])
            .expand([n, g, per])
            .reshape([n, e])
            .lower_elem(0.5);
        biased = biased.mask_fill(dropped, f32::NEG_INFINITY);
    }
    let idx = top_k_indices(biased, cfg.num_experts_per_tok);
    let mut weights = scores.gather(1, idx.clone());
    if cfg.norm_topk_prob {
        let denom = weights.clone().sum_dim(1) + 1e-20;
        weights = weights / denom;
    }
    (idx, weights * cfg.routed_scaling_factor)
}

/// Indices of the `k` largest values of each row, largest first. (Burn's `topk` insists on
/// `k < len`; routing needs `k == len` too, e.g. keeping every group.)
fn top_k_indices<B: DsBackend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let (_, idx) = x.sort_descending_with_indices(1);
    idx.narrow(1, 0, k)
}

#[derive(Config, Debug)]
pub struct MoeConfig {
    pub hidden_size: usize,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: usize,
    pub router: RouterConfig,
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl MoeConfig {
    pub fn init<B: DsBackend>(&self, device: &B::Device) -> Moe<B> {
        let (h, e) = (self.hidden_size, self.router.n_routed_experts);
        let expert = MlpConfig::new(h, self.moe_intermediate_size).with_init_std(self.init_std);
        let shared = (self.n_shared_experts > 0).then(|| {
            MlpConfig::new(h, self.moe_intermediate_size * self.n_shared_experts)
                .with_init_std(self.init_std)
                .init(device)
        });
        Moe {
            gate: MoeGate {
                weight: Initializer::Normal {
                    mean: 0.0,
                    std: self.init_std,
                }
                .init([e, h], device),
                e_score_correction_bias: Initializer::Zeros.init([e], device),
            },
            experts: (0..e).map(|_| expert.init(device)).collect(),
            shared_experts: shared,
            router: self.router.clone(),
            packed: None,
            ep: None,
        }
    }
}

/// The router's parameters: `mlp.gate.weight` `[E, H]` (checkpoint layout) and the selection bias.
#[derive(Module, Debug)]
pub struct MoeGate<B: DsBackend> {
    pub weight: Param<Tensor<B, 2>>,
    /// Aux-loss-free balancing bias: steers selection only, never trained by gradients.
    pub e_score_correction_bias: Param<Tensor<B, 1>>,
}

impl<B: DsBackend> MoeGate<B> {
    /// Raw router logits `[N, E]`.
    pub fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.weight.val().transpose())
    }
}

#[derive(Module, Debug)]
pub struct Moe<B: DsBackend> {
    pub gate: MoeGate<B>,
    pub experts: Vec<Mlp<B>>,
    pub shared_experts: Option<Mlp<B>>,
    pub router: RouterConfig,
    /// The routed experts stacked for the grouped kernels (see [`Moe::pack`]). Not parameters:
    /// once packed, `experts` hold placeholders and the layer is for inference only.
    pub packed: Option<PackedExperts<B>>,
    /// Set when the routed experts are split over ranks
    /// ([`DeepseekV3::set_expert_parallel`](crate::DeepseekV3::set_expert_parallel)): the
    /// experts held elsewhere are placeholders and rows travel to their owners.
    #[module(skip)]
    pub ep: Option<ExpertParallel>,
}

/// The routed experts' projections stacked along a leading expert axis, float or FP8.
#[derive(Module, Debug)]
pub struct PackedExperts<B: DsBackend> {
    pub gate_proj: GroupedWeight<B>,
    pub up_proj: GroupedWeight<B>,
    pub down_proj: GroupedWeight<B>,
}

impl<B: DsBackend> PackedExperts<B> {
    /// Bytes held on the device by the three stacked projections.
    pub fn bytes(&self) -> usize {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }
}

/// Which experts each token went to in one MoE layer, and with what weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `[tokens][k]` expert ids, in descending biased score.
    pub experts: Vec<Vec<u32>>,
    /// `[tokens][k]` final weights (after renormalisation and scaling).
    pub weights: Vec<Vec<f32>>,
}

impl<B: DsBackend> Moe<B> {
    /// Stacks the routed experts for the grouped kernels ([`DsBackend::grouped_matmul`]): all
    /// FP8 if every expert projection is FP8, else float `[E, in, out]`. The per-expert weights
    /// are replaced by placeholders, so memory is not doubled; the layer is then for inference.
    /// Packing twice, or a layer without experts, is a no-op.
    ///
    /// # Errors
    /// [`ModelError::Invalid`](crate::ModelError::Invalid) when the experts' FP8 weights
    /// cannot be stacked (different shapes or block sizes; [`Fp8Weight::cat`]), or the layer
    /// is expert-parallel.
    pub fn pack(&mut self) -> Result<(), crate::error::ModelError> {
        if self.packed.is_some() || self.experts.is_empty() {
            return Ok(());
        }
        if self.ep.is_some() {
            return Err(crate::error::ModelError::Invalid(
                "an expert-parallel layer runs its experts unpacked (the experts of other ranks \
                 are placeholders here): it cannot be packed"
                    .into(),
            ));
        }
        let stack = |experts: &mut [Mlp<B>],
                     pick: fn(&mut Mlp<B>) -> &mut Linear<B>|
         -> Result<GroupedWeight<B>, crate::error::ModelError> {
            let all_fp8 = experts.iter_mut().all(|e| pick(e).fp8.is_some());
            let w = if all_fp8 {
                let parts: Vec<Fp8Weight<B>> = experts
                    .iter_mut()
                    .map(|e| pick(e).fp8.clone().expect("checked"))
                    .collect();
                GroupedWeight::fp8(
                    Fp8Weight::cat(parts)
                        .map_err(|e| crate::error::ModelError::Invalid(e.to_string()))?,
                )
            } else {
                let parts: Vec<Tensor<B, 2>> = experts
                    .iter_mut()
                    .map(|e| pick(e).weight_in_out())
                    .collect();
                GroupedWeight::dense(Tensor::stack(parts, 0))
            };
            for e in experts.iter_mut() {
                pick(e).clear();
            }
            Ok(w)
        };
        let gate_proj = stack(&mut self.experts, |m| &mut m.gate_proj)?;
        let up_proj = stack(&mut self.experts, |m| &mut m.up_proj)?;
        let down_proj = stack(&mut self.experts, |m| &mut m.down_proj)?;
        self.packed = Some(PackedExperts {
            gate_proj,
            up_proj,
            down_proj,
        });
        Ok(())
    }

    /// `x: [B, T, H]` → `[B, T, H]`; with `record`, also the routing of every token (row-major
    /// over batch then time).
    pub fn forward(&self, x: Tensor<B, 3>, record: bool) -> (Tensor<B, 3>, Option<Routing>) {
        let (y, routing, _) = self.forward_scored(x, record);
        (y, routing)
    }

    /// [`Self::forward`], also returning the router's sigmoid affinities `[B·T, E]` (in the
    /// autodiff graph: what the sequence-wise balance loss of training needs).
    pub fn forward_scored(
        &self,
        x: Tensor<B, 3>,
        record: bool,
    ) -> (Tensor<B, 3>, Option<Routing>, Tensor<B, 2>) {
        let [b, t, h] = x.dims();
        let n = b * t;
        let k = self.router.num_experts_per_tok;
        let x = x.reshape([n, h]);
        let bias = self.gate.e_score_correction_bias.val().detach();
        let scores = sigmoid(self.gate.logits(x.clone()));
        let (idx, weights) = route_scores(scores.clone(), bias, &self.router);
        if let Some(ep) = &self.ep {
            let ids = host_ids(idx);
            let base = self.shared_output(x.clone());
            let out = ep.routed(&self.experts, x, &ids, weights.clone(), base);
            let routing = record.then(|| Routing::from_ids(&ids, weights, k));
            return (out.reshape([b, t, h]), routing, scores);
        }
        if let Some(packed) = &self.packed {
            let routing = record.then(|| routing_of(idx.clone(), weights.clone(), k));
            let out = self.forward_packed(x, idx, weights, packed);
            return (out.reshape([b, t, h]), routing, scores);
        }

        // Group the (token, slot) pairs by expert on the host: each expert runs only on its tokens.
        let ids = host_ids(idx);
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); self.experts.len()];
        let mut slots: Vec<Vec<i64>> = vec![Vec::new(); self.experts.len()];
        for (pos, &e) in ids.iter().enumerate() {
            tokens[e as usize].push((pos / k) as i64);
            slots[e as usize].push(pos as i64);
        }
        let device = x.device();
        let flat_w = weights.clone().reshape([n * k]);
        // The shared expert (job `None`) and each used routed expert run as independent jobs
        // (concurrently on a CPU backend's pool); their outputs are summed in expert order.
        let mut jobs: Vec<Option<ExpertJob>> = vec![None];
        for e in 0..self.experts.len() {
            if !tokens[e].is_empty() {
                jobs.push(Some((
                    e,
                    std::mem::take(&mut tokens[e]),
                    std::mem::take(&mut slots[e]),
                )));
            }
        }
        let outs = B::par_map(jobs, |job| match job {
            None => self
                .shared_experts
                .as_ref()
                .map(|s| (None, s.forward(x.clone()))),
            Some((e, tok, slot)) => {
                let m = tok.len();
                let tok = Tensor::<B, 1, Int>::from_data(TensorData::new(tok, [m]), &device);
                let slot = Tensor::<B, 1, Int>::from_data(TensorData::new(slot, [m]), &device);
                let y = self.experts[e].forward(x.clone().select(0, tok.clone()))
                    * flat_w.clone().select(0, slot).reshape([m, 1]);
                Some((Some(tok), y))
            }
        });
        let mut out = Tensor::zeros([n, h], &device);
        for (tok, y) in outs.into_iter().flatten() {
            out = match tok {
                None => out + y,
                Some(tok) => out.select_assign(0, tok, y, IndexingUpdateOp::Add),
            };
        }
        let routing = record.then(|| Routing::from_ids(&ids, weights, k));
        (out.reshape([b, t, h]), routing, scores)
    }

    /// The routed experts through the backend's MoE operations: dispatch (sort the (token, slot)
    /// pairs by expert, on the device), three grouped matmuls for the SwiGLU experts, and the
    /// weighted combine onto the shared experts' output. No host round trip on GPU backends.
    fn forward_packed(
        &self,
        x: Tensor<B, 2>,
        idx: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        packed: &PackedExperts<B>,
    ) -> Tensor<B, 2> {
        let d = B::moe_dispatch(idx, self.router.n_routed_experts);
        let xs = x.clone().select(0, d.tokens.clone());
        let g = B::grouped_matmul(xs.clone(), &packed.gate_proj, &d);
        let u = B::grouped_matmul(xs, &packed.up_proj, &d);
        let y = B::grouped_matmul(B::swiglu(g, u), &packed.down_proj, &d);
        B::moe_combine(y, &d, weights, self.shared_output(x))
    }
}

impl<B: DsBackend> Moe<B> {
    /// The shared experts' output for `x: [n, h]` (zeros without shared experts): what the
    /// routed experts' weighted outputs are summed onto.
    fn shared_output(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.shared_experts {
            Some(shared) => shared.forward(x),
            None => Tensor::zeros(x.dims(), &x.device()),
        }
    }
}

/// One routed expert's work in the host-grouped path: its id, tokens and (token, slot) indices.
type ExpertJob = (usize, Vec<i64>, Vec<i64>);

impl Routing {
    /// From the chosen ids (already on the host, row-major `[tokens·k]`) and the `[tokens, k]`
    /// weights (read here).
    fn from_ids<B: DsBackend>(ids: &[i64], weights: Tensor<B, 2>, k: usize) -> Self {
        let w: Vec<f32> = weights
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float routing weights");
        Routing {
            experts: ids
                .chunks(k)
                .map(|r| r.iter().map(|&v| v as u32).collect())
                .collect(),
            weights: w.chunks(k).map(|r| r.to_vec()).collect(),
        }
    }
}

/// The chosen expert ids, row-major, on the host.
fn host_ids<B: DsBackend>(idx: Tensor<B, 2, Int>) -> Vec<i64> {
    idx.into_data()
        .convert::<i64>()
        .to_vec()
        .expect("int routing ids")
}

/// Reads routing ids and weights to the host.
fn routing_of<B: DsBackend>(idx: Tensor<B, 2, Int>, weights: Tensor<B, 2>, k: usize) -> Routing {
    Routing::from_ids(&host_ids(idx), weights, k)
}
