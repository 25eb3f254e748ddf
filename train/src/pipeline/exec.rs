//! Runs one training step of a [`Schedule`] for real: the model's decoder layers cut into
//! stages ([`StageCut`]; the embedding on stage 0, the final norm, `lm_head` and the loss on the
//! last), each rank running its list of actions, activations and gradients sent with the
//! communicator's non-blocking `isend`/`irecv` (every receive of the step is posted up front, so
//! transfers proceed while the rank computes; sends complete in the background).
//!
//! A stage's forward (F) runs its layers with no parameter tracked and keeps only its input;
//! its backward (B) runs them again with autodiff from that input (a leaf) and back-propagates
//! `sum(y ⊙ g) + balance/m` from the received output gradient `g` (on the last stage, `loss/m`)
//! at once, reads the input's gradient for the previous stage and accumulates the parameters'.
//! So a rank holds its chunks' inputs, not their graphs (full activation recomputation: B costs
//! F + B here), and one autodiff graph is alive at a time. An F&B action runs its forward,
//! then its backward: on one CPU process nothing overlaps them (DualPipe's own example does the
//! same; the overlap it is named for hides the expert all-to-all on a GPU).
//!
//! The objective is the trainer's: next-token CE and the sequence-wise balance loss of every MoE
//! layer (each on the stage that holds it). MTP modules are not run in a pipeline.
//!
//! A rank computes only its stages' layers. What `dsv3 train --pp` runs
//! ([`crate::Parallel::pipelined`]): each rank holds only its stages' weights ([`held_layers`]:
//! the others are 1-element placeholders) and the step is the ZeRO-1 step of
//! [`crate::parallel`] over the ranks that hold the same stages (for DualPipe its
//! reduce-scatter sums the two copies of each stage, as DeepSeek's DualPipe example does);
//! validation runs through the stages ([`evaluate_stages`]). Without it every rank holds the
//! whole model, [`sum_gradients`] sums the gradients over the pipeline group and every rank
//! applies the same optimiser step.
//!
//! With expert parallelism ([`crate::Parallel::pipelined`]) the model's MoE layers exchange
//! tokens with the other ranks of their expert-parallel group, which hold the same stages in
//! other pipelines and run the same list of actions: each F, B, B-input and W makes the same
//! exchanges in the same order on every member (a backward's recomputed forward, then its
//! autodiff backward, at once), so they pair up.
//!
//! The backward split of ZB1P and DualPipe is done by recomputation: a B-input recomputes the
//! stage with the parameters untracked (Burn then computes the input's gradient only) and keeps
//! the input and output gradient; its W recomputes the stage with the input untracked (the
//! weights' gradients only). Each costs a forward more than in DeepSeek's code, which splits
//! the matmuls themselves (as [`super::split`] does for one matmul; the model's Linear layers do
//! not use it yet).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use dsv3_backends::comm::{CommExt, Communicator, Element, ReduceOp, Request};
use dsv3_backends::{DsAutodiffBackend, DsBackend};
use dsv3_model::{DeepseekV3, ForwardOptions, LatentKv, Span};

use super::schedule::{Action, Chunk, Schedule};
use super::PipelineError;
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::forward::{RouterTrace, TrainForward};
use crate::loss;
use crate::objective::{objective, Batch, Losses};

/// Which decoder layers each stage holds (stage 0 also the embedding, the last stage also the
/// final norm, `lm_head` and the loss).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCut {
    /// `layers[s]`: the layer indices of stage `s`, contiguous, in order, covering all layers.
    pub layers: Vec<Range<usize>>,
}

impl StageCut {
    /// `num_layers` layers in `stages` contiguous stages, as even as possible (the first
    /// `num_layers mod stages` stages take one more; a stage may hold none when there are more
    /// stages than layers: it passes its input on).
    ///
    /// # Errors
    /// [`PipelineError::NoRanks`] when `stages` is 0.
    pub fn even(num_layers: usize, stages: usize) -> Result<Self, PipelineError> {
        if stages == 0 {
            return Err(PipelineError::NoRanks);
        }
        let (base, extra) = (num_layers / stages, num_layers % stages);
        let mut at = 0;
        let layers = (0..stages)
            .map(|s| {
                let n = base + usize::from(s < extra);
                at += n;
                at - n..at
            })
            .collect();
        Ok(StageCut { layers })
    }
}

/// What one pipeline step gave this rank.
pub struct StepResult {
    /// This rank's parameter gradients (its stages only) of `Σ_mb objective_mb / (m·replicas)`.
    pub grads: GradientsParams,
    /// Per micro-batch, summed over the pipeline group: the objective (CE + balance).
    pub total: Vec<f64>,
    /// Per micro-batch, over the group: the next-token CE.
    pub ce: Vec<f64>,
    /// Per micro-batch, over the group: the balance loss (`None` when α = 0 or no MoE layer).
    pub balance: Vec<Option<f64>>,
    /// Expert choices of the MoE layers this rank ran, per (layer, micro-batch).
    pub experts: Vec<(usize, Vec<Vec<u32>>)>,
}

/// What a stage's forward keeps for its backward: its input (`None` on stage 0, whose input
/// is the micro-batch's tokens), untracked.
struct Saved<B: DsBackend> {
    input: Option<Tensor<B, 3>>,
}

/// What one stage computed over one micro-batch.
struct StageOut<Bk: DsBackend> {
    /// The output `[b, T, H]` (`None` on the last stage).
    hidden: Option<Tensor<Bk, 3>>,
    /// The MoE layers' routers.
    routers: Vec<RouterTrace<Bk>>,
    /// On the last stage: the objective's parts over this stage's layers (CE + balance).
    losses: Option<Losses<Bk>>,
    /// Elsewhere: this stage's balance loss (`None` when α = 0 or no MoE layer here).
    balance: Option<Tensor<Bk, 1>>,
}

/// Stage `stage` of `cut` over `input` (`None`: the embedding of `batch.inputs`).
#[allow(clippy::too_many_arguments)]
fn stage_forward<Bk: DsBackend>(
    model: &DeepseekV3<Bk>,
    cut: &StageCut,
    stage: usize,
    input: Option<Tensor<Bk, 3>>,
    batch: &Batch<Bk>,
    span: &Span<Bk>,
    opts: &ForwardOptions,
    cfg: &TrainConfig,
) -> StageOut<Bk> {
    let mut h = match input {
        Some(x) => x,
        None => model.model.embed_tokens.forward(batch.inputs.clone()),
    };
    let [b, t] = batch.inputs.dims();
    let mut routers: Vec<RouterTrace<Bk>> = Vec::new();
    for l in cut.layers[stage].clone() {
        let out = model.model.layers[l].forward(h, span, |kv: &LatentKv<Bk>| kv.clone(), opts);
        h = out.h;
        if let (Some(r), Some(scores)) = (out.routing, out.scores) {
            routers.push(RouterTrace {
                layer: l,
                mtp: false,
                rows: b,
                len: t,
                scores,
                experts: r.experts,
            });
        }
    }
    if stage + 1 == cut.layers.len() {
        let fwd = TrainForward {
            logits: model.lm_head.forward(model.model.norm.forward(h)),
            mtp_logits: Vec::new(),
            routers,
            probes: Vec::new(),
        };
        let losses = objective(&fwd, batch, cfg);
        StageOut {
            hidden: None,
            routers: fwd.routers,
            losses: Some(losses),
            balance: None,
        }
    } else {
        let balance = (cfg.balance_alpha > 0.0 && !routers.is_empty()).then(|| {
            routers
                .iter()
                .map(|r| loss::sequence_balance_loss(r, cfg.balance_alpha))
                .reduce(|x, y| x + y)
                .expect("one layer")
        });
        StageOut {
            hidden: Some(h),
            routers,
            losses: None,
            balance,
        }
    }
}

/// Which gradients a backward computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Full B: the input's and the weights'.
    Full,
    /// B-input: the input's only (the parameters untracked).
    Input,
    /// W: the weights' only (the input untracked).
    Weight,
}

/// Message tag of a transfer: forward outputs even, input gradients odd.
fn tag(schedule: &Schedule, chunk: Chunk, gradient: bool) -> u16 {
    let id = (chunk.micro_batch * schedule.stages + chunk.stage) * 2 + usize::from(gradient);
    id as u16
}

fn comm_err(e: dsv3_backends::comm::CommError) -> TrainError {
    TrainError::Comm(e)
}

fn scalar<Bk: burn::tensor::backend::Backend>(t: &Tensor<Bk, 1>) -> f64 {
    t.clone().into_scalar().elem::<f64>()
}

/// Runs rank `comm.rank()`'s actions of `schedule` over `batches` (one [`Batch`] per
/// micro-batch, the same on every rank) with `comm` the pipeline group (`schedule.ranks`
/// members). Collective over the group.
///
/// F runs the stage with no parameter tracked (no autodiff graph) and keeps only its input; B
/// runs the stage again with autodiff from that input and back-propagates at once (activation
/// recomputation), so one autodiff graph is alive at a time whatever order the schedule takes
/// the micro-batches in. (Keeping every F's graph alive until its B, Burn 0.21's graph memory
/// management lost the input's gradient in some interleavings: with 1F1B on 4 ranks, stage 2
/// of micro-batch 3.) The recomputation repeats the same arithmetic: the values, routing and
/// gradients are the ones a plain backward gives.
///
/// # Errors
/// [`TrainError::Invalid`] when the group's size differs from the schedule's ranks, the batch
/// count from its micro-batches, the cut from its stages, or the model has MTP modules;
/// [`TrainError::Pipeline`] for a list that uses a tensor it never received or computed;
/// [`TrainError::Comm`] when a transfer fails.
pub fn run_step<B: DsAutodiffBackend>(
    model: &DeepseekV3<B>,
    schedule: &Schedule,
    cut: &StageCut,
    comm: &Arc<dyn Communicator>,
    batches: &[Batch<B>],
    cfg: &TrainConfig,
) -> Result<StepResult, TrainError> {
    run_step_scaled(model, schedule, cut, comm, batches, cfg, 1)
}

/// [`run_step`] as one of `replicas` data-parallel pipelines: each micro-batch's objective
/// is divided by `m · replicas`, so the gradients summed over every rank of every replica are
/// those of the mean objective over the global batch.
///
/// # Errors
/// As [`run_step`].
pub fn run_step_scaled<B: DsAutodiffBackend>(
    model: &DeepseekV3<B>,
    schedule: &Schedule,
    cut: &StageCut,
    comm: &Arc<dyn Communicator>,
    batches: &[Batch<B>],
    cfg: &TrainConfig,
    replicas: usize,
) -> Result<StepResult, TrainError> {
    let rank = comm.rank();
    let m = schedule.micro_batches;
    if comm.size() != schedule.ranks {
        return Err(TrainError::Invalid(format!(
            "the pipeline group has {} ranks, the schedule {}",
            comm.size(),
            schedule.ranks
        )));
    }
    if batches.len() != m || cut.layers.len() != schedule.stages {
        return Err(TrainError::Invalid(format!(
            "{} micro-batches and {} stages given, the schedule has {m} and {}",
            batches.len(),
            cut.layers.len(),
            schedule.stages
        )));
    }
    if !model.model.mtp.is_empty() {
        return Err(TrainError::Invalid(
            "pipeline parallelism does not run MTP modules yet: use a model config with \
             num_nextn_predict_layers = 0"
                .into(),
        ));
    }
    if 2 * schedule.stages * m > usize::from(u16::MAX) {
        return Err(TrainError::Invalid(format!(
            "{} stages × {m} micro-batches is too many transfers to tag",
            schedule.stages
        )));
    }
    let device = batches[0].inputs.device();
    let [b, t] = batches[0].inputs.dims();
    let shape = [b, t, model.config.hidden_size];
    let n = shape.iter().product();
    // F runs the model with no parameter tracked: the backend's own forward arithmetic (the
    // same as a training forward's), no graph.
    let untracked = model.clone().no_grad();
    let span = Span::contiguous(&model.rope, 0, t, 0, &device);
    let opts = ForwardOptions {
        attention: cfg.attention,
        record_routing: true,
        router_scores: true,
        ..Default::default()
    };
    let invalid = |a: &Action, why: &str| {
        TrainError::Pipeline(PipelineError::InvalidSchedule(format!(
            "rank {rank}, {a}: {why}"
        )))
    };

    // Every receive of the step, posted now.
    let mut pending: HashMap<(Chunk, bool), Request> = HashMap::new();
    for a in &schedule.actions[rank] {
        let (chunk, from, gradient) = match *a {
            Action::RecvForward { chunk, from } => (chunk, from, false),
            Action::RecvBackward { chunk, from } => (chunk, from, true),
            _ => continue,
        };
        let req = comm
            .irecv(
                f32::owned(vec![0.0; n]),
                from,
                tag(schedule, chunk, gradient),
            )
            .map_err(comm_err)?;
        pending.insert((chunk, gradient), req);
    }
    let mut sends: Vec<Request> = Vec::new();
    let mut inputs: HashMap<Chunk, Tensor<B, 3>> = HashMap::new();
    let mut out_grads: HashMap<Chunk, Tensor<B, 3>> = HashMap::new();
    let mut in_grads: HashMap<Chunk, Vec<f32>> = HashMap::new();
    let mut saved: HashMap<Chunk, Saved<B>> = HashMap::new();
    let mut deferred = HashMap::new();
    let last = schedule.stages - 1;
    let mut outputs: HashMap<Chunk, Vec<f32>> = HashMap::new();
    let (mut ce, mut bal) = (vec![0.0; m], vec![0.0; m]);
    let mut has_balance = false;
    let mut experts: Vec<(usize, Vec<Vec<u32>>)> = Vec::new();
    let mut acc = GradientsAccumulator::<DeepseekV3<B>>::new();
    let host = |x: Tensor<B, 3>| -> Vec<f32> {
        x.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data")
    };
    let scale = (m * replicas.max(1)) as f64;

    let mut forward = |c: Chunk,
                       inputs: &mut HashMap<Chunk, Tensor<B, 3>>,
                       saved: &mut HashMap<Chunk, Saved<B>>,
                       outputs: &mut HashMap<Chunk, Vec<f32>>,
                       a: &Action|
     -> Result<(), TrainError> {
        let input = if c.stage == 0 {
            None
        } else {
            Some(
                inputs
                    .remove(&c)
                    .ok_or_else(|| invalid(a, "its input activation is not here"))?,
            )
        };
        let out = stage_forward(
            &untracked,
            cut,
            c.stage,
            input.clone(),
            &batches[c.micro_batch],
            &span,
            &opts,
            cfg,
        );
        let mb = c.micro_batch;
        for r in &out.routers {
            experts.push((r.layer, r.experts.clone()));
        }
        if let Some(parts) = &out.losses {
            ce[mb] += scalar(&parts.ce);
            if let Some(x) = &parts.balance {
                bal[mb] += scalar(x);
                has_balance = true;
            }
        }
        if let Some(x) = &out.balance {
            bal[mb] += scalar(x);
            has_balance = true;
        }
        if let Some(h) = out.hidden {
            let next = Chunk {
                stage: c.stage + 1,
                ..c
            };
            if schedule.owner(next) == rank {
                inputs.insert(next, h);
            } else {
                outputs.insert(c, host(h));
            }
        }
        saved.insert(c, Saved { input });
        Ok(())
    };

    // B-input keeps what its W needs: the stage input and the output gradient.
    type Deferred<B> = (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>);
    let mut backward = |c: Chunk,
                        part: Part,
                        saved: &mut HashMap<Chunk, Saved<B>>,
                        deferred: &mut HashMap<Chunk, Deferred<B>>,
                        out_grads: &mut HashMap<Chunk, Tensor<B, 3>>,
                        in_grads: &mut HashMap<Chunk, Vec<f32>>,
                        a: &Action|
     -> Result<(), TrainError> {
        let (input, g) = if part == Part::Weight {
            deferred
                .remove(&c)
                .ok_or_else(|| invalid(a, "no B-input ran before this W"))?
        } else {
            let s = saved
                .remove(&c)
                .ok_or_else(|| invalid(a, "runs before the chunk's forward"))?;
            let g = if c.stage < last {
                Some(
                    out_grads
                        .remove(&c)
                        .ok_or_else(|| invalid(a, "its output gradient is not here"))?,
                )
            } else {
                None
            };
            (s.input, g)
        };
        if part == Part::Input {
            deferred.insert(c, (input.clone(), g.clone()));
            if input.is_none() {
                return Ok(()); // Stage 0 has no input gradient: its W does the whole backward.
            }
        }
        // B-input: parameters untracked, input tracked (the input gradient only); W: the
        // reverse (the weight gradients only); full B: both.
        let x = match part {
            Part::Weight => input,
            _ => input.map(|x| x.require_grad()),
        };
        let stage_model = if part == Part::Input {
            &untracked
        } else {
            model
        };
        let out = stage_forward(
            stage_model,
            cut,
            c.stage,
            x.clone(),
            &batches[c.micro_batch],
            &span,
            &opts,
            cfg,
        );
        let target = match (out.hidden, out.losses, g) {
            (Some(y), _, Some(g)) => {
                let dot = (y * g).sum();
                match out.balance {
                    Some(e) => dot + e.div_scalar(scale),
                    None => dot,
                }
            }
            (None, Some(parts), _) => parts.total.div_scalar(scale),
            _ => return Err(invalid(a, "no output gradient and no loss")),
        };
        let mut grads = target.backward();
        if let (Some(x), true) = (x, part != Part::Weight) {
            let gx = x
                .grad_remove(&mut grads)
                .ok_or_else(|| invalid(a, "no gradient reached the stage's input"))?;
            let prev = Chunk {
                stage: c.stage - 1,
                ..c
            };
            if schedule.owner(prev) == rank {
                out_grads.insert(prev, Tensor::<B, 3>::from_inner(gx));
            } else {
                in_grads.insert(c, host(Tensor::<B, 3>::from_inner(gx)));
            }
        }
        if part != Part::Input {
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        Ok(())
    };
    let tensor = |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, shape), &device);

    // On an error the transfers still in flight are leaked, not dropped: dropping one waits
    // for it, and its peer may never send (the error ends the run on every rank anyway).
    let mut actions = || -> Result<(), TrainError> {
        for a in &schedule.actions[rank] {
            match *a {
                Action::Forward(c) => forward(c, &mut inputs, &mut saved, &mut outputs, a)?,
                Action::Backward(c) => backward(
                    c,
                    Part::Full,
                    &mut saved,
                    &mut deferred,
                    &mut out_grads,
                    &mut in_grads,
                    a,
                )?,
                Action::BackwardInput(c) => backward(
                    c,
                    Part::Input,
                    &mut saved,
                    &mut deferred,
                    &mut out_grads,
                    &mut in_grads,
                    a,
                )?,
                Action::Weight(c) => backward(
                    c,
                    Part::Weight,
                    &mut saved,
                    &mut deferred,
                    &mut out_grads,
                    &mut in_grads,
                    a,
                )?,
                Action::ForwardBackward {
                    forward: f,
                    backward: bw,
                } => {
                    forward(f, &mut inputs, &mut saved, &mut outputs, a)?;
                    backward(
                        bw,
                        Part::Full,
                        &mut saved,
                        &mut deferred,
                        &mut out_grads,
                        &mut in_grads,
                        a,
                    )?;
                }
                Action::SendForward { chunk, to } => {
                    let v = outputs
                        .remove(&chunk)
                        .ok_or_else(|| invalid(a, "sends a forward output not computed here"))?;
                    let req = comm
                        .isend(f32::owned(v), to, tag(schedule, chunk, false))
                        .map_err(comm_err)?;
                    sends.push(req);
                }
                Action::SendBackward { chunk, to } => {
                    let v = in_grads
                        .remove(&chunk)
                        .ok_or_else(|| invalid(a, "sends an input gradient not computed here"))?;
                    let req = comm
                        .isend(f32::owned(v), to, tag(schedule, chunk, true))
                        .map_err(comm_err)?;
                    sends.push(req);
                }
                Action::RecvForward { chunk, .. } | Action::RecvBackward { chunk, .. } => {
                    let gradient = matches!(a, Action::RecvBackward { .. });
                    let req = pending
                        .remove(&(chunk, gradient))
                        .ok_or_else(|| invalid(a, "receives twice"))?;
                    let v = f32::from_owned(req.wait().map_err(comm_err)?)
                        .ok_or_else(|| invalid(a, "received a buffer of another type"))?;
                    if gradient {
                        let c = Chunk {
                            stage: chunk.stage - 1,
                            ..chunk
                        };
                        out_grads.insert(c, tensor(v));
                    } else {
                        let c = Chunk {
                            stage: chunk.stage + 1,
                            ..chunk
                        };
                        inputs.insert(c, tensor(v));
                    }
                }
            }
        }
        Ok(())
    };
    if let Err(e) = actions() {
        std::mem::forget(pending);
        std::mem::forget(sends);
        return Err(e);
    }
    if !deferred.is_empty() {
        std::mem::forget(pending);
        std::mem::forget(sends);
        return Err(invalid(
            &schedule.actions[rank][0],
            "a B-input's weight gradients never ran (W missing)",
        ));
    }
    if !pending.is_empty() {
        std::mem::forget(pending);
        std::mem::forget(sends);
        return Err(invalid(
            &schedule.actions[rank][0],
            "the list never waits for some of its receives",
        ));
    }
    for r in sends {
        r.wait().map_err(comm_err)?;
    }
    // The losses of every micro-batch, summed over the group's stages.
    let mut sums: Vec<f64> = ce.iter().chain(&bal).copied().collect();
    sums.push(f64::from(u8::from(has_balance)));
    comm.all_reduce_in_place(&mut sums, ReduceOp::Sum)
        .map_err(comm_err)?;
    let any_balance = sums[2 * m] > 0.0;
    let ce = sums[..m].to_vec();
    let balance: Vec<Option<f64>> = sums[m..2 * m]
        .iter()
        .map(|&x| any_balance.then_some(x))
        .collect();
    let total = ce
        .iter()
        .zip(&balance)
        .map(|(c, b)| c + b.unwrap_or(0.0))
        .collect();
    Ok(StepResult {
        grads: acc.grads(),
        total,
        ce,
        balance,
        experts,
    })
}

/// A trainer's pipeline: the groups, the schedule (its micro-batches are the step's
/// `grad_accum`) and the cut.
#[derive(Clone, Debug)]
pub struct PipelineSetup {
    /// Every process of the run.
    pub world: Arc<dyn Communicator>,
    /// This replica's pipeline ranks.
    pub comm: Arc<dyn Communicator>,
    /// The replicas of this pipeline rank (data parallelism; a group of one without it).
    pub dp: Arc<dyn Communicator>,
    /// Every rank's actions for one optimiser step.
    pub schedule: Schedule,
    /// The layers of each stage.
    pub cut: StageCut,
}

/// Sums `grads` over `comm` (the pipeline group, or every rank of every data-parallel
/// pipeline), so every rank holds the step's whole gradient (a parameter keeps "no gradient"
/// only when no rank computed one, as the optimiser skips those). Collective over `comm`.
///
/// # Errors
/// [`TrainError::Comm`] when the all-reduce fails.
pub fn sum_gradients<B: DsAutodiffBackend>(
    comm: &Arc<dyn Communicator>,
    model: &DeepseekV3<B>,
    grads: GradientsParams,
) -> Result<GradientsParams, TrainError> {
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    struct Flat<'a, B: DsAutodiffBackend> {
        grads: &'a GradientsParams,
        params: Vec<(ParamId, Vec<usize>)>,
        values: Vec<f32>,
        present: Vec<f32>,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: DsAutodiffBackend> ModuleVisitor<B> for Flat<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let shape = p.val().shape().dims::<D>().to_vec();
            match self.grads.get::<B::InnerBackend, D>(p.id) {
                Some(g) => {
                    let v: Vec<f32> = g
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32 gradient");
                    self.values.extend_from_slice(&v);
                    self.present.push(1.0);
                }
                None => {
                    let n: usize = shape.iter().product();
                    self.values.extend(std::iter::repeat_n(0.0, n));
                    self.present.push(0.0);
                }
            }
            self.params.push((p.id, shape));
        }
    }
    let mut flat = Flat::<B> {
        grads: &grads,
        params: Vec::new(),
        values: Vec::new(),
        present: Vec::new(),
        _b: std::marker::PhantomData,
    };
    model.visit(&mut flat);
    let (params, mut values, mut present) = (flat.params, flat.values, flat.present);
    comm.all_reduce_in_place(&mut values, ReduceOp::Sum)
        .map_err(comm_err)?;
    comm.all_reduce_in_place(&mut present, ReduceOp::Sum)
        .map_err(comm_err)?;
    let device = model.device();
    let mut out = GradientsParams::new();
    let mut at = 0;
    for ((id, shape), here) in params.into_iter().zip(present) {
        let n: usize = shape.iter().product();
        let v = values[at..at + n].to_vec();
        at += n;
        if here == 0.0 {
            continue;
        }
        let data = TensorData::new(v, shape.clone());
        match shape.len() {
            1 => out.register::<B::InnerBackend, 1>(id, Tensor::from_data(data, &device)),
            2 => out.register::<B::InnerBackend, 2>(id, Tensor::from_data(data, &device)),
            3 => out.register::<B::InnerBackend, 3>(id, Tensor::from_data(data, &device)),
            4 => out.register::<B::InnerBackend, 4>(id, Tensor::from_data(data, &device)),
            d => {
                return Err(TrainError::Invalid(format!(
                    "a {d}-dimensional parameter cannot be summed over the pipeline"
                )))
            }
        }
    }
    Ok(out)
}

/// How a run is to be pipelined (`dsv3 train --pp P [--dp D] --schedule S`): every process
/// of the run, the pipeline size and the schedule; [`crate::Trainer::pipelined`] builds the
/// rest once the step's micro-batch count is known.
#[derive(Clone, Debug)]
pub struct PipelinePlan {
    /// Every process of the run: `P · D` ranks, rank `w` is pipeline rank `w mod P` of
    /// data-parallel replica `w div P`.
    pub world: Arc<dyn Communicator>,
    /// Pipeline ranks per replica (P).
    pub pp: usize,
    /// The schedule.
    pub kind: super::ScheduleKind,
}

/// The part of the model pipeline rank `rank` of `pp` holds under schedule `kind` with
/// `num_layers` decoder layers cut evenly ([`StageCut::even`]): its stages' layers, the
/// embedding when it holds stage 0, the final norm and `lm_head` when it holds the last.
///
/// # Errors
/// [`PipelineError::NoRanks`] when `pp` is 0.
pub fn held_layers(
    kind: super::ScheduleKind,
    pp: usize,
    rank: usize,
    num_layers: usize,
) -> Result<dsv3_model::HeldLayers, PipelineError> {
    let stages = kind.stages(pp);
    let cut = StageCut::even(num_layers, stages)?;
    let mine = kind.stages_of(pp, rank);
    Ok(dsv3_model::HeldLayers {
        layers: mine.iter().flat_map(|&s| cut.layers[s].clone()).collect(),
        embed: mine.contains(&0),
        head: mine.contains(&(stages - 1)),
    })
}

/// This rank's part of a pipelined [`crate::Parallel`] for a model of `num_layers` decoder
/// layers ([`held_layers`]); `None` without pipeline parallelism.
///
/// # Errors
/// [`TrainError::Pipeline`] as [`held_layers`].
pub fn held_by(
    par: &crate::Parallel,
    num_layers: usize,
) -> Result<Option<dsv3_model::HeldLayers>, TrainError> {
    match par.schedule {
        Some(kind) if par.pp > 1 => Ok(Some(held_layers(
            kind,
            par.pp,
            par.world.rank() % par.pp,
            num_layers,
        )?)),
        _ => Ok(None),
    }
}

/// Validation through the pipeline, for ranks that hold only their stages: each window batch
/// (`batch_size` windows of the first `eval_windows` held-out ones, or all) flows through the
/// stages, each run by the rank that runs the stage's first-direction chunks
/// ([`Schedule::owner`] of micro-batch 0), activations sent with `isend` and received in stage
/// order (a rank's stages in ascending order, batch by batch: no cycle). The last stage's rank
/// sums the target tokens' negative log-likelihood. Collective over `comm` (the pipeline); the
/// replicas of a data-parallel run each evaluate the same windows (with expert parallelism the
/// MoE layers exchange within the EP group, as in training). Returns (NLL in nats, target
/// tokens, target bytes), summed over the group.
///
/// # Errors
/// [`TrainError::Comm`] when a transfer or the final all-reduce fails.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_stages<Bk: DsBackend>(
    model: &DeepseekV3<Bk>,
    schedule: &Schedule,
    cut: &StageCut,
    comm: &Arc<dyn Communicator>,
    data: &crate::data::Dataset,
    cfg: &TrainConfig,
) -> Result<(f64, usize, usize), TrainError> {
    let rank = comm.rank();
    let stages = schedule.stages;
    let owner = |s: usize| {
        schedule.owner(Chunk {
            stage: s,
            micro_batch: 0,
        })
    };
    let n = if cfg.eval_windows == 0 {
        data.val.len()
    } else {
        cfg.eval_windows.min(data.val.len())
    };
    let device = model.device();
    let hidden = model.config.hidden_size;
    let opts = ForwardOptions {
        attention: cfg.attention,
        ..Default::default()
    };
    let (mut nll, mut tokens, mut bytes) = (0.0f64, 0usize, 0usize);
    let mut sends: Vec<Request> = Vec::new();
    for (k, chunk) in data.val[..n].chunks(cfg.batch_size.max(1)).enumerate() {
        let batch = crate::objective::make_batch::<Bk>(data, chunk, 0, &device);
        let [b, t] = batch.inputs.dims();
        let span = Span::contiguous(&model.rope, 0, t, 0, &device);
        let tag = |s: usize| ((k * stages + s) % 60_000) as u16;
        let mut h: Option<Tensor<Bk, 3>> = None;
        for s in (0..stages).filter(|&s| owner(s) == rank) {
            let mut x = if s == 0 {
                model.model.embed_tokens.forward(batch.inputs.clone())
            } else if let (Some(x), true) = (h.take(), owner(s - 1) == rank) {
                x
            } else {
                let req = comm
                    .irecv(f32::owned(vec![0.0; b * t * hidden]), owner(s - 1), tag(s))
                    .map_err(comm_err)?;
                let v = f32::from_owned(req.wait().map_err(comm_err)?).ok_or_else(|| {
                    TrainError::Invalid("validation received a buffer of another type".into())
                })?;
                Tensor::<Bk, 3>::from_data(TensorData::new(v, [b, t, hidden]), &device)
            };
            for l in cut.layers[s].clone() {
                x = model.model.layers[l]
                    .forward(x, &span, |kv: &LatentKv<Bk>| kv.clone(), &opts)
                    .h;
            }
            if s + 1 == stages {
                let logits = model.lm_head.forward(model.model.norm.forward(x));
                let token_nll = loss::token_nll(logits, batch.targets.clone());
                let (sum, count) = match &batch.target_mask {
                    Some((m, _)) => {
                        let count = m.clone().sum().into_scalar().elem::<f64>() as usize;
                        (token_nll * m.clone(), count)
                    }
                    None => (token_nll, chunk.len() * data.seq_len),
                };
                nll += sum.sum().into_scalar().elem::<f64>();
                tokens += count;
                bytes += batch.target_bytes;
            } else if owner(s + 1) == rank {
                h = Some(x);
            } else {
                let v: Vec<f32> = x
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32 data");
                let req = comm
                    .isend(f32::owned(v), owner(s + 1), tag(s + 1))
                    .map_err(comm_err)?;
                sends.push(req);
            }
        }
    }
    for r in sends {
        r.wait().map_err(comm_err)?;
    }
    let mut sums = [nll, tokens as f64, bytes as f64];
    comm.all_reduce_in_place(&mut sums, ReduceOp::Sum)
        .map_err(comm_err)?;
    Ok((sums[0], sums[1] as usize, sums[2] as usize))
}
