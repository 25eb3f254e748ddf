//! One optimiser step and one validation pass: the objective, gradient accumulation, global
//! clipping, AdamW, and the bias update, with NaN/inf caught before anything is applied.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use dsv3_backends::{DsAutodiffBackend, DsBackend};
use dsv3_model::{DeepseekV3, DeepseekV3Config};

use crate::balance;
use crate::config::TrainConfig;
use crate::data::{Dataset, Sampler};
use crate::distill::Teacher;
use crate::error::TrainError;
use crate::forward;
use crate::loss;
use crate::optim;
use crate::parallel::Parallel;
use crate::tokenizer;
use dsv3_backends::comm::CommExt;

pub use crate::objective::{make_batch, objective, Batch, Losses};
pub use crate::optim::Optim;

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    t.clone().into_scalar().elem::<f64>()
}

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct StepStats {
    pub step: usize,
    /// The whole objective.
    pub loss: f64,
    /// Next-token cross-entropy (nats).
    pub ce: f64,
    pub mtp_loss: Option<f64>,
    pub balance_loss: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `(layer, tokens routed to each expert)` for every MoE layer over the step.
    pub loads: Vec<(usize, Vec<u64>)>,
    /// Tokens of the step (the global batch in a distributed run).
    pub tokens: usize,
    /// A distributed run's communication during the step (this rank).
    pub comm: Option<CommStats>,
    /// FP8 events during the step (this process's quantizations; `precision = fp8` only).
    pub fp8: Option<dsv3_backends::QuantCounts>,
}

/// What the ranks of a distributed run moved during a step (one entry per world rank).
#[derive(Debug, Clone, PartialEq)]
pub struct CommStats {
    /// Bytes each rank sent to / received from other ranks (every collective of the step:
    /// expert exchanges forward and backward, gradient reductions, parameter gathers).
    pub sent_bytes: Vec<u64>,
    pub recv_bytes: Vec<u64>,
    /// Bytes each rank's forward expert exchanges sent (counts, ids, rows; `None` without EP).
    /// The backward sends the rows again.
    pub ep_sent_bytes: Option<Vec<u64>>,
    /// The analytic volume of those forward exchanges: dispatched rows that leave the rank ×
    /// hidden × 4 bytes, dispatch and combine.
    pub ep_analytic_bytes: Option<Vec<u64>>,
    /// Mean number of expert-parallel ranks each token reached, over every rank's tokens and
    /// MoE layer (at most `topk_group` when each expert group lies on one rank).
    pub ranks_per_token: Option<f64>,
}

/// Validation result.
#[derive(Debug, Clone, Copy)]
pub struct EvalStats {
    /// Mean next-token cross-entropy (nats per token).
    pub loss: f64,
    /// Total NLL in bits ÷ text bytes of the targets.
    pub bits_per_byte: f64,
    pub tokens: usize,
}

/// One micro-batch's gradients (of `objective / grad_accum`) and loss parts.
struct Micro {
    grads: GradientsParams,
    total: f64,
    ce: f64,
    mtp: Option<f64>,
    balance: Option<f64>,
    /// `(layer, chosen experts per token)` of every MoE layer.
    experts: Vec<(usize, Vec<Vec<u32>>)>,
}

/// Sums each layer's routed-token loads over the ranks (`sum` all-reduces a flat copy), so the
/// bias update is the same on every rank.
fn sum_loads(
    loads: &mut [(usize, Vec<u64>)],
    sum: impl FnOnce(&mut [f64]) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let mut flat: Vec<f64> = loads
        .iter()
        .flat_map(|(_, l)| l.iter().map(|&x| x as f64))
        .collect();
    sum(&mut flat)?;
    let mut it = flat.into_iter();
    for (_, l) in loads.iter_mut() {
        l.iter_mut()
            .for_each(|x| *x = it.next().expect("same layout") as u64);
    }
    Ok(())
}

/// One micro-batch's forward and backward. In a distributed run `starts` is this rank's share
/// of the global micro-batch: the loss parts are averaged over the ranks before anything else
/// (so every rank agrees whether to run the backward, whose exchanges are collective) and the
/// gradient is of this rank's `1/W` of the objective.
fn micro_batch<B: DsAutodiffBackend>(
    model: &DeepseekV3<B>,
    data: &Dataset,
    starts: &[usize],
    cfg: &TrainConfig,
    device: &B::Device,
    par: Option<&Parallel>,
    teacher: Option<&Teacher<B::InnerBackend>>,
) -> Result<Micro, TrainError> {
    let depths = model.model.mtp.len();
    let batch = make_batch::<B>(data, starts, depths, device);
    let fwd = forward::forward(model, batch.inputs.clone(), cfg.attention, depths, false);
    let experts = fwd
        .routers
        .iter()
        .map(|r| (r.layer, r.experts.clone()))
        .collect();
    let mut parts = objective(&fwd, &batch, cfg);
    if let Some(t) = teacher {
        // (1 − α)·CE + α·τ²·KL in place of the CE; `ce` still reports the hard term.
        let mask = batch.target_mask.as_ref().map(|m| m.0.clone());
        let kl = t.kl(
            fwd.logits.clone(),
            batch.inputs.clone(),
            mask,
            cfg.attention,
        );
        let mixed = crate::distill::mix(parts.ce.clone(), kl, t.alpha);
        parts.total = parts.total - parts.ce.clone() + mixed;
    }
    let mut total = scalar(&parts.total);
    let (mut ce, mut mtp, mut balance) = (
        scalar(&parts.ce),
        parts.mtp.as_ref().map(scalar),
        parts.balance.as_ref().map(scalar),
    );
    let mut world = 1.0;
    if let Some(p) = par {
        world = p.world.size() as f64;
        let mut v = [total, ce, mtp.unwrap_or(0.0), balance.unwrap_or(0.0)];
        p.sum(&mut v)?;
        total = v[0] / world;
        ce = v[1] / world;
        mtp = mtp.map(|_| v[2] / world);
        balance = balance.map(|_| v[3] / world);
    }
    let grads = if total.is_finite() {
        let g = parts
            .total
            .div_scalar(cfg.grad_accum as f64 * world)
            .backward();
        GradientsParams::from_grads(g, model)
    } else {
        GradientsParams::new()
    };
    Ok(Micro {
        grads,
        total,
        ce,
        mtp,
        balance,
        experts,
    })
}

/// First parameter holding a NaN or infinity.
struct FindNonFinite {
    index: usize,
    found: Option<usize>,
}
impl<B: Backend> ModuleVisitor<B> for FindNonFinite {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.found.is_none() {
            let v = param.val();
            let bad: bool = v.clone().is_nan().any().into_scalar().elem::<bool>()
                || v.abs()
                    .equal_elem(f32::INFINITY)
                    .any()
                    .into_scalar()
                    .elem::<bool>();
            if bad {
                self.found = Some(self.index);
            }
        }
        self.index += 1;
    }
}

/// The model, its optimiser and where the run stands.
pub struct Trainer<B: DsAutodiffBackend> {
    pub model: DeepseekV3<B>,
    pub optim: Optim<B>,
    pub cfg: TrainConfig,
    pub data: Dataset,
    pub sampler: Sampler,
    /// Completed optimiser steps.
    pub step: usize,
    pub device: B::Device,
    /// The communicators of a distributed run ([`Self::distribute`]); `None`: one process.
    pub parallel: Option<Parallel>,
    /// Tokenizer files (name, bytes) that checkpoints carry instead of the byte-level
    /// tokenizer's: a fine-tuned model keeps the tokenizer and chat template it started with.
    pub tokenizer_files: Option<Vec<(String, Vec<u8>)>>,
    /// Logit distillation from a frozen teacher ([`crate::distill`]); `None`: hard labels only.
    pub teacher: Option<Teacher<B::InnerBackend>>,
    /// FP8 events of every quantization in the Linear GEMMs (`precision = fp8`).
    pub quant: std::sync::Arc<dsv3_backends::QuantCounters>,
    /// A pipeline-parallel run ([`Self::pipelined`]); `None`: the micro-batches run here.
    pub pipeline: Option<crate::pipeline::exec::PipelineSetup>,
}

impl<B: DsAutodiffBackend> Trainer<B> {
    /// A fresh run: checks the settings and initialises the model from the seed.
    ///
    /// # Errors
    /// What [`check_setup`] returns: [`TrainError::Invalid`] for settings that cannot work,
    /// [`TrainError::Model`] for a model config that fails validation.
    pub fn new(
        model_cfg: &DeepseekV3Config,
        cfg: TrainConfig,
        data: Dataset,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        check_setup(model_cfg, &cfg, &data)?;
        let model = crate::init::seeded(DeepseekV3::<B>::init(model_cfg, device)?, cfg.seed);
        Ok(Self::at_step_zero(model, cfg, data, device))
    }

    /// [`Self::new`] for a distributed run: the routed experts are split over `par.ep`, and in
    /// a pipelined run ([`Parallel::pipelined`]) the other stages' weights made placeholders
    /// ([`DeepseekV3::hold_only`]), before the weights are drawn, so each rank materialises
    /// only the experts and stages it holds (with the values a single-process run of the same
    /// seed gives them: [`crate::init::seeded_part`]).
    ///
    /// # Errors
    /// As [`Self::new`] and [`Self::distribute`].
    pub fn new_distributed(
        model_cfg: &DeepseekV3Config,
        cfg: TrainConfig,
        data: Dataset,
        device: &B::Device,
        par: Parallel,
    ) -> Result<Self, TrainError> {
        check_setup(model_cfg, &cfg, &data)?;
        let mut model = DeepseekV3::<B>::init(model_cfg, device)?;
        // A pipeline rank holds only its stages' weights ([`Parallel::pipelined`]).
        let held = crate::pipeline::exec::held_by(&par, model_cfg.num_hidden_layers)?;
        let whole = held.is_some().then(|| crate::init::numels(&model));
        if par.ep.size() > 1 {
            model.set_expert_parallel(par.ep.clone())?;
        }
        if let Some(h) = &held {
            model = model.hold_only(h);
        }
        let model = crate::init::seeded_part(model, cfg.seed, whole);
        let sampler = Sampler::new(data.train.len(), cfg.seed);
        let mut t = Self::from_parts(model, optim::adamw(&cfg), cfg, data, sampler, 0, device);
        t.distribute(par)?;
        Ok(t)
    }

    pub fn from_parts(
        model: DeepseekV3<B>,
        optim: Optim<B>,
        cfg: TrainConfig,
        data: Dataset,
        sampler: Sampler,
        step: usize,
        device: &B::Device,
    ) -> Self {
        let quant = std::sync::Arc::new(dsv3_backends::QuantCounters::default());
        let mut model = model;
        model.set_training_gemm(cfg.precision.gemm(cfg.fp8_pow2_scales, &quant));
        Self {
            quant,
            model,
            optim,
            cfg,
            data,
            sampler,
            step,
            device: device.clone(),
            parallel: None,
            tokenizer_files: None,
            teacher: None,
            pipeline: None,
        }
    }

    /// A run that starts from trained weights (fine-tuning) instead of a seeded init.
    ///
    /// # Errors
    /// As [`Self::new`] ([`check_setup`] against the model's own config).
    pub fn from_model(
        model: DeepseekV3<B>,
        cfg: TrainConfig,
        data: Dataset,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        check_setup(&model.config, &cfg, &data)?;
        Ok(Self::at_step_zero(model, cfg, data, device))
    }

    /// A run at step 0 over checked settings: a fresh optimiser and the seed's sampler.
    fn at_step_zero(
        model: DeepseekV3<B>,
        cfg: TrainConfig,
        data: Dataset,
        device: &B::Device,
    ) -> Self {
        let sampler = Sampler::new(data.train.len(), cfg.seed);
        Self::from_parts(model, optim::adamw(&cfg), cfg, data, sampler, 0, device)
    }

    /// Makes this a distributed run: the routed experts are split over `par.ep`
    /// ([`DeepseekV3::set_expert_parallel`]; a model loaded with
    /// [`dsv3_model::LoadOptions::expert_shard`] already holds only its own) and the steps
    /// go through [`crate::parallel`]. Every rank must hold the same dense weights.
    ///
    /// # Errors
    /// [`TrainError::Invalid`] when the global batch does not split over the ranks (micro-batch
    /// threads are turned off: `workers` becomes 1); [`TrainError::Model`] when the experts
    /// cannot be split.
    pub fn distribute(&mut self, par: Parallel) -> Result<(), TrainError> {
        let w = par.replicas();
        if !self.cfg.batch_size.is_multiple_of(w) {
            let what = if par.pp > 1 {
                "data-parallel pipelines"
            } else {
                "processes"
            };
            return Err(TrainError::Invalid(format!(
                "batch_size = {} (the global micro-batch) must be divisible by the {w} {what}",
                self.cfg.batch_size
            )));
        }
        self.cfg.workers = 1;
        if par.ep.size() > 1 && self.model.expert_parallel().is_none() {
            self.model.set_expert_parallel(par.ep.clone())?;
        }
        self.parallel = Some(par);
        Ok(())
    }

    /// Makes this a pipeline-parallel run over `world` (`P · D` processes: rank `w` is
    /// pipeline rank `w mod P` of data-parallel replica `w div P`). Every rank computes its
    /// stages of schedule `kind`; each replica takes its `1/D` of every micro-batch of the step
    /// (`grad_accum` micro-batches flow through its pipeline).
    ///
    /// With [`Self::parallel`] = [`Parallel::pipelined`] over the same `world`, `pp` and `kind`
    /// (set by [`Self::new_distributed`] or a distributed resume, which then made the model
    /// hold only this rank's stages; with expert parallelism inside each stage's replicas when
    /// its EP groups have several ranks) the stages' MoE layers exchange tokens within their
    /// expert-parallel group and the step is [`crate::parallel`]'s: dense gradients over the
    /// EP group, ZeRO-1 over the ranks that hold the same stages and experts (each holds the
    /// optimiser state of its part only). Without it every rank holds the whole model, the
    /// gradients are summed over all ranks and every rank applies the same optimiser step, so
    /// the ranks stay identical. Collective over `world` (it is split into the groups).
    ///
    /// # Errors
    /// [`TrainError::Invalid`] for a model with MTP modules, a distributed layout made for
    /// another world or pipeline size, a world that is not a multiple of `pp`, or a batch that
    /// does not split over the replicas; [`TrainError::Pipeline`] when the schedule's
    /// preconditions fail for `pp` ranks and `grad_accum` micro-batches; [`TrainError::Comm`]
    /// when the split fails.
    pub fn pipelined(
        &mut self,
        world: std::sync::Arc<dyn dsv3_backends::comm::Communicator>,
        pp: usize,
        kind: crate::pipeline::ScheduleKind,
    ) -> Result<(), TrainError> {
        if let Some(p) = &self.parallel {
            if p.pp != pp || p.world.size() != world.size() || p.schedule != Some(kind) {
                return Err(TrainError::Invalid(format!(
                    "the run's distributed layout is for {} processes in pipelines of {} \
                     ({}), not {} in pipelines of {pp} ({kind})",
                    p.world.size(),
                    p.pp,
                    p.schedule.map_or("none".to_string(), |k| k.to_string()),
                    world.size()
                )));
            }
        }
        if self.mtp_depths() > 0 {
            return Err(TrainError::Invalid(
                "pipeline parallelism does not run MTP modules yet: train a model config with \
                 num_nextn_predict_layers = 0"
                    .into(),
            ));
        }
        let w = world.size();
        if pp == 0 || !w.is_multiple_of(pp) {
            return Err(TrainError::Invalid(format!(
                "{w} processes do not form pipelines of {pp} ranks"
            )));
        }
        let replicas = w / pp;
        if !self.cfg.batch_size.is_multiple_of(replicas) {
            return Err(TrainError::Invalid(format!(
                "batch_size = {} (the global micro-batch) must be divisible by the {replicas} \
                 data-parallel pipelines",
                self.cfg.batch_size
            )));
        }
        let (r, p) = (world.rank() / pp, world.rank() % pp);
        let comm = world.split(r, p).map_err(crate::parallel::comm_err)?;
        let dp = world.split(p, r).map_err(crate::parallel::comm_err)?;
        let schedule = crate::pipeline::Schedule::new(kind, pp, self.cfg.grad_accum)?;
        let cut = crate::pipeline::exec::StageCut::even(
            self.model.config.num_hidden_layers,
            schedule.stages,
        )?;
        self.cfg.workers = 1;
        self.pipeline = Some(crate::pipeline::exec::PipelineSetup {
            world,
            comm,
            dp,
            schedule,
            cut,
        });
        Ok(())
    }

    /// [`Self::train_step`] of a pipeline-parallel run.
    fn pipeline_step(
        &mut self,
        setup: crate::pipeline::exec::PipelineSetup,
    ) -> Result<StepStats, TrainError> {
        use crate::pipeline::exec;
        let step = self.step + 1;
        let lr = optim::lr_at(&self.cfg, step);
        let accum = self.cfg.grad_accum;
        let layers = self.model.moe_layers();
        let n_experts = self.model.config.n_routed_experts;
        let mut loads: Vec<(usize, Vec<u64>)> =
            layers.iter().map(|&l| (l, vec![0u64; n_experts])).collect();
        // This replica's share of each global micro-batch.
        let (replicas, replica) = (setup.dp.size(), setup.dp.rank());
        let share = self.cfg.batch_size / replicas;
        let batches: Vec<Batch<B>> = (0..accum)
            .map(|_| {
                let starts: Vec<usize> = self
                    .sampler
                    .next(self.cfg.batch_size)
                    .into_iter()
                    .map(|i| self.data.train[i])
                    .collect();
                let mine = &starts[replica * share..(replica + 1) * share];
                make_batch::<B>(&self.data, mine, 0, &self.device)
            })
            .collect();
        let mut res = exec::run_step_scaled(
            &self.model,
            &setup.schedule,
            &setup.cut,
            &setup.comm,
            &batches,
            &self.cfg,
            replicas,
        )?;
        if replicas > 1 {
            // The replicas' losses are of equal shares: their mean is the global batch's.
            let mut v: Vec<f64> = res.total.iter().chain(&res.ce).copied().collect();
            v.extend(res.balance.iter().map(|b| b.unwrap_or(0.0)));
            setup
                .dp
                .all_reduce_in_place(&mut v, dsv3_backends::comm::ReduceOp::Sum)
                .map_err(crate::parallel::comm_err)?;
            let mean = |x: f64| x / replicas as f64;
            res.total = v[..accum].iter().map(|&x| mean(x)).collect();
            res.ce = v[accum..2 * accum].iter().map(|&x| mean(x)).collect();
            let has = res.balance.iter().all(Option::is_some);
            res.balance = v[2 * accum..]
                .iter()
                .map(|&x| has.then(|| mean(x)))
                .collect();
        }
        if let Some(i) = res.total.iter().position(|t| !t.is_finite()) {
            return Err(TrainError::NonFinite {
                what: "loss",
                step,
                location: format!("micro-batch {i} of the pipeline step"),
            });
        }
        for (layer, experts) in &res.experts {
            if let Some((_, l)) = loads.iter_mut().find(|(x, _)| x == layer) {
                balance::add_loads(l, experts);
            }
        }
        // Loads over every stage and replica: the bias stays identical on every rank.
        sum_loads(&mut loads, |v| {
            setup
                .world
                .all_reduce_in_place(v, dsv3_backends::comm::ReduceOp::Sum)
                .map_err(crate::parallel::comm_err)
        })?;
        // With `Parallel` (expert-parallel stages) its step sums the stages too: dense
        // gradients over the EP group, then ZeRO-1 over the ranks holding the same experts.
        let grads = if self.parallel.is_some() {
            res.grads
        } else {
            exec::sum_gradients(&setup.world, &self.model, res.grads)?
        };
        let norm = self.apply_gradients(grads, lr, step)?;
        balance::apply(&mut self.model, &loads, self.cfg.bias_gamma as f32);
        self.step = step;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / accum as f64;
        let bal = res.balance.iter().copied().collect::<Option<Vec<f64>>>();
        Ok(StepStats {
            step,
            loss: mean(&res.total),
            ce: mean(&res.ce),
            mtp_loss: None,
            balance_loss: bal.map(|b| mean(&b)),
            lr,
            grad_norm: norm.norm,
            loads,
            tokens: self.cfg.tokens_per_step(),
            comm: None,
            fp8: None,
        })
    }

    /// Clips and applies one step's gradients: through `Parallel`'s step (EP group and ZeRO-1
    /// collectives) when the run has one, else locally. A non-finite norm is an error naming
    /// `step`, with nothing applied.
    fn apply_gradients(
        &mut self,
        mut grads: GradientsParams,
        lr: f64,
        step: usize,
    ) -> Result<optim::GradNorm, TrainError> {
        let model = self.model.clone();
        let norm = if let Some(p) = &self.parallel {
            let (m, norm) = crate::parallel::step(
                p,
                model,
                &mut self.optim,
                grads,
                lr,
                self.cfg.grad_clip,
                &self.device,
            )?;
            norm.check(step)?;
            self.model = m;
            norm
        } else {
            let norm = optim::clip_global_norm(&self.model, &mut grads, self.cfg.grad_clip);
            norm.check(step)?;
            self.model = self.optim.step(lr, model, grads);
            norm
        };
        Ok(norm)
    }

    fn mtp_depths(&self) -> usize {
        self.model.model.mtp.len()
    }

    /// One optimiser step over `grad_accum` micro-batches. On a NaN/inf loss or gradient it
    /// returns [`TrainError::NonFinite`] before touching the parameters.
    ///
    /// # Errors
    /// [`TrainError::NonFinite`] with `what` = `"loss"` (and the first non-finite block or
    /// parameter, [`Self::diagnose`]) or `"gradient"` (the first non-finite gradient). The data
    /// order has advanced by then; the parameters, optimiser and `step` have not.
    pub fn train_step(&mut self) -> Result<StepStats, TrainError> {
        if let Some(setup) = self.pipeline.clone() {
            return self.pipeline_step(setup);
        }
        let step = self.step + 1;
        let lr = optim::lr_at(&self.cfg, step);
        let accum = self.cfg.grad_accum;
        let layers = self.model.moe_layers();
        let n_experts = self.model.config.n_routed_experts;
        let mut loads: Vec<(usize, Vec<u64>)> =
            layers.iter().map(|&l| (l, vec![0u64; n_experts])).collect();
        let micro: Vec<Vec<usize>> = (0..accum)
            .map(|_| {
                self.sampler
                    .next(self.cfg.batch_size)
                    .into_iter()
                    .map(|i| self.data.train[i])
                    .collect()
            })
            .collect();
        let par = self.parallel.clone();
        let micro: Vec<Vec<usize>> = match &par {
            Some(p) => micro
                .into_iter()
                .map(|m| m[p.share(m.len())].to_vec())
                .collect(),
            None => micro,
        };
        let traffic0 = par.as_ref().map(|p| p.traffic());
        let quant0 = self.quant.snapshot();
        if let Some(ep) = self.model.expert_parallel() {
            ep.take_stats();
        }
        let mut acc = GradientsAccumulator::<DeepseekV3<B>>::new();
        let (mut loss, mut ce, mut mtp, mut bal) = (0.0, 0.0, None::<f64>, None::<f64>);
        let workers = if par.is_some() || !B::concurrent_micro_batches() {
            1
        } else {
            self.cfg.workers.clamp(1, accum)
        };
        for group in micro.chunks(workers) {
            let outs: Vec<Micro> = if group.len() == 1 {
                vec![micro_batch(
                    &self.model,
                    &self.data,
                    &group[0],
                    &self.cfg,
                    &self.device,
                    par.as_ref(),
                    self.teacher.as_ref(),
                )?]
            } else {
                // Independent micro-batches in parallel threads, each on its own fork of the
                // model (a separate autodiff graph); results are summed in micro-batch order,
                // so the step is bit-identical to the sequential one.
                std::thread::scope(|s| {
                    let handles: Vec<_> = group
                        .iter()
                        .map(|starts| {
                            let fork = DeepseekV3::<B>::from_inner(self.model.valid());
                            let (data, cfg, device) = (&self.data, &self.cfg, &self.device);
                            let teacher = self.teacher.clone();
                            let workers = group.len();
                            // Each worker on its share of the backend's threads.
                            s.spawn(move || {
                                B::as_worker(workers, || {
                                    micro_batch(
                                        &fork,
                                        data,
                                        starts,
                                        cfg,
                                        device,
                                        None,
                                        teacher.as_ref(),
                                    )
                                })
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("training worker panicked"))
                        .collect::<Result<Vec<_>, _>>()
                })?
            };
            for (m, starts) in outs.into_iter().zip(group) {
                if !m.total.is_finite() {
                    let batch = make_batch::<B>(&self.data, starts, 0, &self.device);
                    let location = self.diagnose(batch.inputs);
                    return Err(TrainError::NonFinite {
                        what: "loss",
                        step,
                        location,
                    });
                }
                for (layer, experts) in &m.experts {
                    if let Some((_, l)) = loads.iter_mut().find(|(x, _)| x == layer) {
                        balance::add_loads(l, experts);
                    }
                }
                loss += m.total / accum as f64;
                ce += m.ce / accum as f64;
                if let Some(v) = m.mtp {
                    *mtp.get_or_insert(0.0) += v / accum as f64;
                }
                if let Some(v) = m.balance {
                    *bal.get_or_insert(0.0) += v / accum as f64;
                }
                acc.accumulate(&self.model, m.grads);
            }
        }
        if let Some(p) = &par {
            // Loads over every rank's tokens: the bias stays identical everywhere.
            sum_loads(&mut loads, |v| p.sum(v))?;
        }
        let norm = self.apply_gradients(acc.grads(), lr, step)?;
        balance::apply(&mut self.model, &loads, self.cfg.bias_gamma as f32);
        self.step = step;
        let comm = match (&par, traffic0) {
            (Some(p), Some(t0)) => {
                let t = p.traffic() - t0;
                let ep = self.model.expert_parallel().map(|ep| ep.take_stats());
                let mine = [
                    t.sent_bytes as f64,
                    t.recv_bytes as f64,
                    ep.map_or(0.0, |s| s.sent_bytes as f64),
                    ep.map_or(0.0, |s| s.analytic_bytes() as f64),
                    ep.map_or(0.0, |s| s.tokens as f64),
                    ep.map_or(0.0, |s| s.token_ranks as f64),
                ];
                let all = p
                    .world
                    .all_gather_vec(&mine)
                    .map_err(crate::parallel::comm_err)?;
                let col = |j: usize| all.chunks(6).map(|r| r[j] as u64).collect::<Vec<_>>();
                let (tokens, ranks): (f64, f64) = all
                    .chunks(6)
                    .fold((0.0, 0.0), |(a, b), r| (a + r[4], b + r[5]));
                Some(CommStats {
                    sent_bytes: col(0),
                    recv_bytes: col(1),
                    ep_sent_bytes: ep.map(|_| col(2)),
                    ep_analytic_bytes: ep.map(|_| col(3)),
                    ranks_per_token: ep.map(|_| ranks / tokens.max(1.0)),
                })
            }
            _ => None,
        };
        Ok(StepStats {
            step,
            loss,
            ce,
            mtp_loss: mtp,
            balance_loss: bal,
            lr,
            grad_norm: norm.norm,
            loads,
            tokens: self.cfg.tokens_per_step(),
            comm,
            fp8: (self.cfg.precision == crate::config::Precision::Fp8)
                .then(|| self.quant.snapshot().since(&quant0)),
        })
    }

    /// Where a non-finite loss comes from: the first block whose output is not finite, else
    /// the first non-finite parameter, else the logits/loss themselves.
    pub fn diagnose(&self, tokens: Tensor<B, 2, Int>) -> String {
        let inner = self.model.valid();
        let fwd = forward::forward(
            &inner,
            tokens.inner(),
            self.cfg.attention,
            self.mtp_depths(),
            true,
        );
        if let Some(name) = forward::first_non_finite(&fwd.probes) {
            return format!("output of {name}");
        }
        let mut f = FindNonFinite {
            index: 0,
            found: None,
        };
        inner.visit(&mut f);
        if let Some(i) = f.found {
            let paths = inner.param_names();
            if let Some((_, p)) = paths.get(i) {
                return format!("parameter {p}");
            }
        }
        "the loss (activations and parameters are finite)".into()
    }

    /// Mean validation loss and bits per byte over the held-out windows (the first
    /// `eval_windows`, or all), without autodiff.
    pub fn evaluate(&self) -> EvalStats {
        evaluate(&self.model.valid(), &self.data, &self.cfg)
    }

    /// [`Self::evaluate`] in a run whose ranks may hold only their pipeline stages: there the
    /// windows flow through the pipeline ([`crate::pipeline::exec::evaluate_stages`];
    /// collective over every rank).
    ///
    /// # Errors
    /// [`TrainError::Comm`] when a transfer fails.
    pub fn evaluate_run(&self) -> Result<EvalStats, TrainError> {
        let (Some(setup), Some(par)) = (&self.pipeline, &self.parallel) else {
            return Ok(self.evaluate());
        };
        if par.pp <= 1 {
            return Ok(self.evaluate());
        }
        let (nll, tokens, bytes) = crate::pipeline::exec::evaluate_stages(
            &self.model.valid(),
            &setup.schedule,
            &setup.cut,
            &setup.comm,
            &self.data,
            &self.cfg,
        )?;
        Ok(EvalStats {
            loss: nll / tokens.max(1) as f64,
            bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            tokens,
        })
    }
}

/// Validation with an inference-mode model (also used on a loaded checkpoint).
pub fn evaluate<B: DsBackend>(
    model: &DeepseekV3<B>,
    data: &Dataset,
    cfg: &TrainConfig,
) -> EvalStats {
    let n = if cfg.eval_windows == 0 {
        data.val.len()
    } else {
        cfg.eval_windows.min(data.val.len())
    };
    let device = model.device();
    let (mut nll, mut tokens, mut bytes) = (0.0f64, 0usize, 0usize);
    for chunk in data.val[..n].chunks(cfg.batch_size.max(1)) {
        let batch = make_batch::<B>(data, chunk, 0, &device);
        let fwd = forward::forward(model, batch.inputs, cfg.attention, 0, false);
        let token_nll = loss::token_nll(fwd.logits, batch.targets);
        let (sum, count) = match batch.target_mask {
            Some((m, _)) => {
                let count = m.clone().sum().into_scalar().elem::<f64>() as usize;
                (token_nll * m, count)
            }
            None => (token_nll, chunk.len() * data.seq_len),
        };
        nll += sum.sum().into_scalar().elem::<f64>();
        tokens += count;
        bytes += batch.target_bytes;
    }
    EvalStats {
        loss: nll / tokens.max(1) as f64,
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens,
    }
}

/// Settings that cannot work together, each in one line.
///
/// # Errors
/// - [`TrainError::Invalid`]: `cfg` fails [`TrainConfig::validate`], the model's
///   `vocab_size` is below the byte tokenizer's, or `data` was packed for another `seq_len`.
/// - [`TrainError::Model`] (wrapping [`dsv3_model::ModelError::Config`]): `model` fails
///   [`DeepseekV3Config::validate`].
pub fn check_setup(
    model: &DeepseekV3Config,
    cfg: &TrainConfig,
    data: &Dataset,
) -> Result<(), TrainError> {
    cfg.validate()?;
    model.validate().map_err(dsv3_model::ModelError::from)?;
    if model.vocab_size < tokenizer::VOCAB {
        return Err(TrainError::Invalid(format!(
            "model vocab_size = {} is smaller than the byte-level tokenizer's {}",
            model.vocab_size,
            tokenizer::VOCAB
        )));
    }
    if data.seq_len != cfg.seq_len {
        return Err(TrainError::Invalid(format!(
            "data packed for seq_len {} but the run uses {}",
            data.seq_len, cfg.seq_len
        )));
    }
    Ok(())
}
