//! Distributed training (DeepSeek-V3 report §3.2: expert parallelism inside ZeRO-1 data
//! parallelism). `W = N·M` ranks form a grid: rank `w = d·N + e` is member `e` of expert-parallel
//! group `d` (N ranks that split the routed experts, [`DeepseekV3::set_expert_parallel`]) and
//! member `d` of data-parallel group `e` (M ranks that hold the same experts).
//!
//! Every rank takes its own `1/W` of each micro-batch (the global batch is the single-process
//! run's), so the objective is the mean of the ranks' losses. Gradients: a routed expert's
//! already sums its EP group's tokens (the exchange's backward brought them); a dense parameter's
//! is first all-reduced over the EP group. Then ZeRO-1 over the DP group: parameters are
//! partitioned (whole tensors, balanced by size) and their gradients reduce-scattered, each rank
//! runs AdamW on its own part only (so it holds only that part's optimizer state), the global
//! gradient norm comes from an all-reduce, and the updated parameters are all-gathered.
//!
//! With pipeline parallelism ([`Parallel::pipelined`], `W = P·D`: `D` data-parallel pipelines of
//! `P` ranks) each rank holds only its stages' parameters, the expert-parallel groups lie inside
//! each stage's `D` replicas, and the ZeRO-1 group is every rank that holds the same stages and
//! experts (for DualPipe, both copies of a stage: its reduce-scatter also sums them).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};
use dsv3_backends::comm::{CommError, CommExt, Communicator, ReduceOp};
use dsv3_backends::DsAutodiffBackend;
use dsv3_model::{DeepseekV3, Holding as Kind};

use crate::error::TrainError;
use crate::optim::GradNorm;
use crate::optim::Optim;
use crate::pipeline_error::ScheduleKind;

/// The communicators of a distributed run.
#[derive(Clone, Debug)]
pub struct Parallel {
    /// All `W` ranks.
    pub world: Arc<dyn Communicator>,
    /// The `N` ranks that split the routed experts (this rank's expert-parallel group).
    pub ep: Arc<dyn Communicator>,
    /// The `M = W/N` ranks that hold the same experts (this rank's data-parallel group).
    pub dp: Arc<dyn Communicator>,
    /// Pipeline ranks per data-parallel pipeline ([`Self::pipelined`]); 1 without pipeline
    /// parallelism.
    pub pp: usize,
    /// The pipeline schedule whose stages the ranks hold ([`Self::pipelined`]).
    pub schedule: Option<ScheduleKind>,
}

pub(crate) fn comm_err(e: CommError) -> TrainError {
    TrainError::Comm(e)
}

/// Whether every rank succeeded at this point: each rank's `result` is combined (an all-reduce),
/// so a failure on one rank is an error on all of them, at the same point, instead of a hang at
/// the next collective. `what` names the step for the ranks that did not fail themselves.
///
/// # Errors
/// This rank's error; [`TrainError::Invalid`] when another rank failed; [`TrainError::Comm`]
/// when the collective fails or the ranks are at different points.
pub(crate) fn agree<T>(
    par: &Parallel,
    result: Result<T, TrainError>,
    what: &str,
) -> Result<T, TrainError> {
    let all_ok = par.world.agree_at(result.is_ok(), what).map_err(comm_err)?;
    let value = result?;
    if !all_ok {
        return Err(TrainError::Invalid(format!(
            "another rank failed {what} (see its message)"
        )));
    }
    Ok(value)
}

impl Parallel {
    /// Splits `world` into expert-parallel groups of `ep_size` ranks (and data-parallel groups
    /// of `world.size() / ep_size`).
    ///
    /// # Errors
    /// [`TrainError::Invalid`] when `ep_size` is 0 or does not divide the world size; a
    /// failed split.
    pub fn new(world: Arc<dyn Communicator>, ep_size: usize) -> Result<Self, TrainError> {
        let w = world.size();
        if ep_size == 0 || !w.is_multiple_of(ep_size) {
            return Err(TrainError::Invalid(format!(
                "--ep {ep_size} does not divide the {w} processes (data parallelism is the \
                 world size / --ep)"
            )));
        }
        let r = world.rank();
        let (d, e) = (r / ep_size, r % ep_size);
        let ep = world.split(d, e).map_err(comm_err)?;
        let dp = world.split(e, d).map_err(comm_err)?;
        Ok(Self {
            world,
            ep,
            dp,
            pp: 1,
            schedule: None,
        })
    }

    /// The groups of a pipeline-parallel run of schedule `kind`, with expert parallelism when
    /// `ep_size` > 1: `world` holds `D = W/pp` data-parallel pipelines of `pp` ranks (rank `w`
    /// is pipeline rank `p = w mod pp` of pipeline `r = w div pp`, as
    /// [`crate::Trainer::pipelined`] numbers them), and each rank holds only the parameters of
    /// its stages ([`ScheduleKind::stages_of`]). The
    /// `D` ranks of pipeline rank `p` hold the same stages; they form expert-parallel groups of
    /// `ep_size` (pipelines `r` with the same `r div ep_size`; member `r mod ep_size`), so a
    /// stage's MoE layers exchange tokens only between ranks that run that stage, in the same
    /// order (they run the same list of actions). [`Self::dp`] is every rank holding the same
    /// stages and experts (member `r mod ep_size` of every pipeline, at pipeline rank `p`, and
    /// for DualPipe also at `pp−1−p`, which holds the same two stages): ZeRO-1 over it sums
    /// the replicas' gradients and DualPipe's two copies.
    ///
    /// # Errors
    /// [`TrainError::Invalid`] when `pp` does not divide the world size or `ep_size` does not
    /// divide the `W/pp` pipelines; a failed split.
    pub fn pipelined(
        world: Arc<dyn Communicator>,
        pp: usize,
        ep_size: usize,
        kind: ScheduleKind,
    ) -> Result<Self, TrainError> {
        let w = world.size();
        if pp == 0 || !w.is_multiple_of(pp) {
            return Err(TrainError::Invalid(format!(
                "{w} processes do not form pipelines of {pp} ranks"
            )));
        }
        let pipelines = w / pp;
        if ep_size == 0 || !pipelines.is_multiple_of(ep_size) {
            return Err(TrainError::Invalid(format!(
                "--ep {ep_size} does not divide the {pipelines} data-parallel pipelines \
                 (expert parallelism runs inside the replicas of each stage)"
            )));
        }
        let rank = world.rank();
        let (p, r) = (rank % pp, rank / pp);
        let (g, e) = (r / ep_size, r % ep_size);
        let ep = world
            .split(p * (pipelines / ep_size) + g, e)
            .map_err(comm_err)?;
        // The first pipeline rank holding the same stages names the group.
        let mine = kind.stages_of(pp, p);
        let first = (0..pp)
            .find(|&q| kind.stages_of(pp, q) == mine)
            .unwrap_or(p);
        let dp = world.split(first * ep_size + e, rank).map_err(comm_err)?;
        Ok(Self {
            world,
            ep,
            dp,
            pp,
            schedule: Some(kind),
        })
    }

    /// Whether this rank reports and writes files (world rank 0).
    pub fn is_lead(&self) -> bool {
        self.world.rank() == 0
    }

    /// Data-parallel shares of each micro-batch: every rank without pipeline parallelism, the
    /// pipelines with it.
    pub fn replicas(&self) -> usize {
        self.world.size() / self.pp.max(1)
    }

    /// This rank's share `[lo, hi)` of `n` items (`n` divisible by the world size).
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        let (r, w) = (self.world.rank(), self.world.size());
        r * n / w..(r + 1) * n / w
    }

    /// Bytes moved so far through all three communicators.
    pub fn traffic(&self) -> dsv3_backends::comm::Traffic {
        let (w, e, d) = (self.world.traffic(), self.ep.traffic(), self.dp.traffic());
        dsv3_backends::comm::Traffic {
            sent_bytes: w.sent_bytes + e.sent_bytes + d.sent_bytes,
            recv_bytes: w.recv_bytes + e.recv_bytes + d.recv_bytes,
        }
    }

    /// Element-wise sum over every rank.
    ///
    /// # Errors
    /// [`TrainError::Comm`] when the collective fails.
    pub fn sum(&self, v: &mut [f64]) -> Result<(), TrainError> {
        self.world
            .all_reduce_in_place(v, ReduceOp::Sum)
            .map_err(comm_err)
    }
}

/// How each parameter is held, by id.
fn kinds<B: DsAutodiffBackend>(model: &DeepseekV3<B>) -> HashMap<ParamId, Kind> {
    model
        .param_holdings()
        .into_iter()
        .map(|(id, _, holding)| (id, holding))
        .collect()
}

/// One parameter's gradient on the host.
struct Entry {
    id: ParamId,
    kind: Kind,
    grad: Option<Vec<f32>>,
    numel: usize,
}

struct Collect<'a> {
    grads: &'a mut GradientsParams,
    kinds: &'a HashMap<ParamId, Kind>,
    out: Vec<Entry>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let kind = self
            .kinds
            .get(&param.id)
            .copied()
            .unwrap_or(Kind::Replicated);
        if kind == Kind::OtherExpert {
            return;
        }
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id).map(|g| {
            g.into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 gradient")
        });
        let numel = param.lazy_shape().num_elements();
        self.out.push(Entry {
            id: param.id,
            kind,
            grad,
            numel,
        });
    }
}

/// Puts host gradients back as `GradientsParams` (shapes from the parameters).
struct Register<'a, B: AutodiffBackend> {
    values: HashMap<ParamId, Vec<f32>>,
    out: &'a mut GradientsParams,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Register<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(v) = self.values.remove(&param.id) {
            let shape = param.lazy_shape();
            let t = Tensor::<B::InnerBackend, D>::from_data(TensorData::new(v, shape), self.device);
            self.out.register(param.id, t);
        }
    }
}

/// Reads parameter values to the host.
struct ReadParams<'a> {
    want: &'a HashSet<ParamId>,
    out: HashMap<ParamId, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ReadParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.want.contains(&param.id) {
            let v = param
                .val()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            self.out.insert(param.id, v);
        }
    }
}

/// Replaces parameter values (keeping ids, so the optimizer state stays bound).
struct WriteParams<'a, B: AutodiffBackend> {
    values: HashMap<ParamId, Vec<f32>>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleMapper<B> for WriteParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.remove(&param.id) {
            Some(v) => {
                let shape = param.lazy_shape();
                let t = Tensor::<B, D>::from_data(TensorData::new(v, shape), self.device);
                Param::initialized(param.id, t.require_grad())
            }
            None => param,
        }
    }
}

/// Owner (DP member) of each entry: whole tensors, greedily to the least-loaded member, in
/// module order. The entries are every parameter the DP group holds, so the partition is the
/// same on every member and at every step (an owner keeps its parameters' optimizer state).
fn partition(entries: &[Entry], m: usize) -> Vec<usize> {
    let mut load = vec![0usize; m];
    entries
        .iter()
        .map(|e| {
            let q = (0..m).min_by_key(|&q| (load[q], q)).expect("m > 0");
            load[q] += e.numel;
            q
        })
        .collect()
}

/// The optimizer step of a distributed run on this rank's gradients (of its share of the
/// objective): reduce, shard, clip by the global norm, AdamW on this rank's part, gather.
/// Returns the updated model and the global norm (before clipping).
///
/// # Errors
/// [`TrainError::Comm`] when a collective fails. A non-finite norm is returned in
/// [`GradNorm::non_finite`] with nothing applied.
pub(crate) fn step<B: DsAutodiffBackend>(
    par: &Parallel,
    model: DeepseekV3<B>,
    optim: &mut Optim<B>,
    mut grads: GradientsParams,
    lr: f64,
    max_norm: f64,
    device: &B::Device,
) -> Result<(DeepseekV3<B>, GradNorm), TrainError> {
    let kinds = kinds(&model);
    let mut c = Collect {
        grads: &mut grads,
        kinds: &kinds,
        out: Vec::new(),
    };
    model.visit(&mut c);
    let mut entries = c.out;
    // A parameter takes part if some member of the DP group has a gradient for it (the
    // members hold the same parameters); missing ones are zeros (no token used it there).
    // One without a gradient anywhere is left alone, as the single-process optimizer does.
    let mut present: Vec<i32> = entries.iter().map(|e| e.grad.is_some() as i32).collect();
    par.dp
        .all_reduce_in_place(&mut present, ReduceOp::Max)
        .map_err(comm_err)?;
    // Dense parameters also over the EP group (same dense set on every member).
    let mut dense_present: Vec<i32> = entries
        .iter()
        .zip(&present)
        .filter(|(e, _)| e.kind == Kind::Replicated)
        .map(|(_, &p)| p)
        .collect();
    par.ep
        .all_reduce_in_place(&mut dense_present, ReduceOp::Max)
        .map_err(comm_err)?;
    let mut dp_iter = dense_present.into_iter();
    for (e, p) in entries.iter_mut().zip(&mut present) {
        if e.kind == Kind::Replicated {
            *p = dp_iter.next().expect("one flag per dense entry");
        }
    }
    // Every held parameter keeps its slot (and its owner, so its optimizer state stays on one
    // rank); those without a gradient anywhere travel as zeros and are not stepped.
    for e in entries.iter_mut() {
        if e.grad.is_none() {
            e.grad = Some(vec![0.0; e.numel]);
        }
    }
    // Dense gradients: sum over the expert-parallel group.
    if par.ep.size() > 1 {
        let mut flat: Vec<f32> = entries
            .iter()
            .filter(|e| e.kind == Kind::Replicated)
            .flat_map(|e| e.grad.as_ref().expect("filled").iter().copied())
            .collect();
        par.ep
            .all_reduce_in_place(&mut flat, ReduceOp::Sum)
            .map_err(comm_err)?;
        let mut at = 0;
        for e in entries.iter_mut().filter(|e| e.kind == Kind::Replicated) {
            e.grad
                .as_mut()
                .expect("filled")
                .copy_from_slice(&flat[at..at + e.numel]);
            at += e.numel;
        }
    }

    // ZeRO-1: reduce-scatter over the data-parallel group, by owner.
    let m = par.dp.size();
    let me = par.dp.rank();
    let owner = partition(&entries, m);
    let block = (0..m)
        .map(|q| {
            entries
                .iter()
                .zip(&owner)
                .filter(|(_, &o)| o == q)
                .map(|(e, _)| e.numel)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    if m > 1 {
        let mut send = vec![0f32; block * m];
        let mut fill = vec![0usize; m];
        for (e, &q) in entries.iter().zip(&owner) {
            let at = q * block + fill[q];
            send[at..at + e.numel].copy_from_slice(e.grad.as_ref().expect("filled"));
            fill[q] += e.numel;
        }
        let mut mine = vec![0f32; block];
        par.dp
            .reduce_scatter(
                dsv3_backends::comm::Buf::F32(&send),
                dsv3_backends::comm::BufMut::F32(&mut mine),
                ReduceOp::Sum,
            )
            .map_err(comm_err)?;
        let mut at = 0;
        for (e, &q) in entries.iter_mut().zip(&owner) {
            if q == me {
                e.grad
                    .as_mut()
                    .expect("filled")
                    .copy_from_slice(&mine[at..at + e.numel]);
                at += e.numel;
            } else {
                e.grad = None;
            }
        }
    }
    for (e, &p) in entries.iter_mut().zip(&present) {
        if p == 0 {
            e.grad = None;
        }
    }

    // The global norm: each DP group holds every dense parameter once (N groups) and its own
    // experts once.
    let (mut dense_sq, mut expert_sq) = (0f64, 0f64);
    let mut first_bad = None;
    for e in entries.iter().filter(|e| e.grad.is_some()) {
        let sq: f64 = e
            .grad
            .as_ref()
            .expect("mine")
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum();
        if !sq.is_finite() && first_bad.is_none() {
            first_bad = Some(e.id);
        }
        match e.kind {
            Kind::HeldExpert => expert_sq += sq,
            _ => dense_sq += sq,
        }
    }
    let mut total = [dense_sq / par.ep.size() as f64 + expert_sq];
    par.world
        .all_reduce_in_place(&mut total, ReduceOp::Sum)
        .map_err(comm_err)?;
    let norm = total[0].sqrt();
    if !norm.is_finite() {
        let names = model.param_names();
        let location = first_bad
            .and_then(|id| names.iter().find(|(p, _)| *p == id))
            .map(|(_, n)| format!("gradient of {n}"))
            .unwrap_or_else(|| "a gradient held by another rank".into());
        return Ok((
            model,
            GradNorm {
                norm,
                non_finite: Some(location),
            },
        ));
    }
    let factor = if max_norm > 0.0 && norm > max_norm {
        (max_norm / (norm + 1e-6)) as f32
    } else {
        1.0
    };
    let mine: HashSet<ParamId> = entries
        .iter()
        .zip(&owner)
        .filter(|(_, &q)| q == me)
        .map(|(e, _)| e.id)
        .collect();
    let mut values: HashMap<ParamId, Vec<f32>> = HashMap::new();
    for e in entries.iter_mut() {
        if let Some(mut g) = e.grad.take() {
            if factor != 1.0 {
                g.iter_mut().for_each(|x| *x *= factor);
            }
            values.insert(e.id, g);
        }
    }
    let mut owned_grads = GradientsParams::new();
    let mut reg = Register::<B> {
        values,
        out: &mut owned_grads,
        device,
    };
    model.visit(&mut reg);
    let model = optim.step(lr, model, owned_grads);

    // All-gather the updated parameters over the data-parallel group.
    let model = if m > 1 {
        let mut read = ReadParams {
            want: &mine,
            out: HashMap::new(),
        };
        model.visit(&mut read);
        let mut send = vec![0f32; block];
        let mut at = 0;
        for (e, &q) in entries.iter().zip(&owner) {
            if q == me {
                send[at..at + e.numel].copy_from_slice(&read.out[&e.id]);
                at += e.numel;
            }
        }
        let all = par.dp.all_gather_vec(&send).map_err(comm_err)?;
        let mut fill = vec![0usize; m];
        let mut values = HashMap::new();
        for (e, &q) in entries.iter().zip(&owner) {
            let at = q * block + fill[q];
            fill[q] += e.numel;
            if q != me {
                values.insert(e.id, all[at..at + e.numel].to_vec());
            }
        }
        let mut write = WriteParams::<B> { values, device };
        model.map(&mut write)
    } else {
        model
    };
    Ok((
        model,
        GradNorm {
            norm,
            non_finite: None,
        },
    ))
}
