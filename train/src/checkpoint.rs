//! Checkpoints: `DIR/step-N/` in the Hugging Face layout (`config.json` + `model.safetensors`,
//! router bias included, plus `tokenizer.json`) that `dsv3 score`/`dsv3 generate` load
//! unchanged, and beside it `optimizer.mpk` (Burn's AdamW state) and `train_state.json` (step,
//! data-order RNG and cursor, settings, data fingerprint).
//!
//! Atomicity: everything is written into `DIR/.step-N.tmp/`, fsynced, and `train_state.json`
//! last; only then is the directory renamed to `step-N`. A kill at any point leaves either the
//! old set of complete checkpoints or the new one, never a torn `step-N`; a stale `.tmp` is
//! ignored by `--resume` and removed by the next save. Complete = `step-N/train_state.json`
//! exists. After a save, complete checkpoints beyond the newest K are deleted.

use dsv3_backends::{DsAutodiffBackend, DsBackend};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder, RecorderError};
use dsv3_model::{DeepseekV3, LoadOptions, SaveDtype};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{Dataset, Sampler, SamplerState};
use crate::error::TrainError;
use crate::optim;
use crate::parallel::{agree, Parallel};
use crate::pipeline::exec::held_by;
use crate::tokenizer::ByteTokenizer;
use crate::trainer::{Optim, Trainer};
use dsv3_backends::comm::CommExt;

pub const STATE_FILE: &str = "train_state.json";
pub const OPTIM_FILE: &str = "optimizer.mpk";

/// `train_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    /// Data order: epoch, cursor and the epoch's RNG state (the only randomness after init).
    pub sampler: SamplerState,
    pub train: TrainConfig,
    /// `"embedded"` or the data path as given.
    pub data: String,
    pub data_fingerprint: u64,
    /// Wall-clock seconds of training so far (for reports across resumes).
    pub elapsed_s: f64,
    /// Processes of the run that wrote it (1: a single-process run).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Expert-parallel group size of that run.
    #[serde(default = "one")]
    pub ep_size: usize,
    /// Pipeline ranks per pipeline of an expert-parallel pipelined run (1 otherwise: a
    /// pipelined run without expert parallelism writes a single-process checkpoint).
    #[serde(default = "one")]
    pub pp_size: usize,
    /// The pipeline schedule of that run (`None` without pipeline parallelism): it decides
    /// which stages each rank holds, so which optimiser state its shard has.
    #[serde(default)]
    pub schedule: Option<String>,
    /// A distillation run's teacher and its settings (`None` otherwise, and in checkpoints
    /// written before it was recorded).
    #[serde(default)]
    pub distill: Option<DistillSetting>,
}

/// What a distillation run's loss depends on besides the student: a resume must give the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillSetting {
    /// The teacher's directory, absolute.
    pub teacher: String,
    pub temperature: f64,
    pub alpha: f64,
}

impl DistillSetting {
    pub fn of<B: DsBackend>(t: &crate::distill::Teacher<B>) -> Self {
        Self {
            teacher: t.dir.display().to_string(),
            temperature: t.temperature,
            alpha: t.alpha,
        }
    }
}

impl std::fmt::Display for DistillSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "teacher {} (τ = {}, α = {})",
            self.teacher, self.temperature, self.alpha
        )
    }
}

fn one() -> usize {
    1
}

/// The optimiser state of world rank `rank` in a distributed run (its ZeRO-1 shard).
pub fn optim_shard_file(rank: usize) -> String {
    format!("optimizer-rank{rank}.mpk")
}

fn io<'a>(action: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> TrainError + 'a {
    move |e| TrainError::io(action, p, e)
}

/// `step-N` directory name.
pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("step-{step}"))
}

/// Complete checkpoints in `out`, oldest first.
pub fn complete(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            let p = e.path();
            p.join(STATE_FILE).is_file().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

fn sync_dir_files(dir: &Path) -> Result<(), TrainError> {
    for e in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let p = e.map_err(io("read", dir))?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io("sync", &p))?;
        }
    }
    Ok(())
}

/// A directory written under a temporary sibling name (`.NAME.tmp`), fsynced, and only then
/// renamed over its destination: a kill at any point leaves the old directory or the new one.
struct Staging<'a> {
    dest: &'a Path,
    parent: &'a Path,
    name: String,
    tmp: PathBuf,
}

impl<'a> Staging<'a> {
    fn new(dest: &'a Path) -> Self {
        let parent = dest.parent().unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let tmp = parent.join(format!(".{name}.tmp"));
        Self {
            dest,
            parent,
            name,
            tmp,
        }
    }

    /// An empty temporary directory (a stale one from a killed run is removed).
    fn create(&self) -> Result<(), TrainError> {
        if self.tmp.exists() {
            std::fs::remove_dir_all(&self.tmp).map_err(io("remove stale", &self.tmp))?;
        }
        std::fs::create_dir_all(&self.tmp).map_err(io("create", &self.tmp))
    }

    /// The tokenizer and `files` (in order: the state file last), fsynced with everything
    /// else in the directory, then the rename over the destination. The tokenizer is the
    /// byte-level one unless `files` bring a `tokenizer.json` (a fine-tuned model's own).
    fn finish(&self, files: &[(&str, Vec<u8>)]) -> Result<(), TrainError> {
        if !files.iter().any(|(name, _)| *name == "tokenizer.json") {
            ByteTokenizer.save(&self.tmp)?;
        }
        for (file, bytes) in files {
            let p = self.tmp.join(file);
            std::fs::write(&p, bytes).map_err(io("write", &p))?;
        }
        sync_dir_files(&self.tmp)?;
        let dest = self.dest;
        if dest.exists() {
            // Replace only now that the new one is complete.
            let old = self.parent.join(format!(".{}.old", self.name));
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io("remove", &old))?;
            }
            std::fs::rename(dest, &old).map_err(io("move aside", dest))?;
            std::fs::rename(&self.tmp, dest).map_err(io("rename into place", dest))?;
            std::fs::remove_dir_all(&old).map_err(io("remove", &old))?;
        } else {
            std::fs::rename(&self.tmp, dest).map_err(io("rename into place", dest))?;
        }
        if let Ok(d) = std::fs::File::open(self.parent) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Writes a complete model directory (model + tokenizer + `extra` files) to `dest` atomically:
/// a temporary sibling, fsynced, then renamed over `dest`.
///
/// # Errors
/// - [`TrainError::Io`]: creating, writing, fsyncing, removing or renaming a file or
///   directory fails (the message names the action and the path).
/// - [`TrainError::Model`]: [`dsv3_model::save`] refuses the model (packed experts) or
///   cannot write the safetensors file.
pub fn write_atomically<B: DsBackend>(
    model: &DeepseekV3<B>,
    dest: &Path,
    extra: &[(&str, Vec<u8>)],
) -> Result<(), TrainError> {
    let staging = Staging::new(dest);
    staging.create()?;
    dsv3_model::save(model, &staging.tmp, SaveDtype::F32)?;
    staging.finish(extra)
}

/// [`write_atomically`] for a distributed run, collective over `par.world`: the first
/// data-parallel replica writes the model as a sharded checkpoint
/// ([`dsv3_model::save_expert_parallel`]: each expert-parallel rank its own experts; in a
/// pipelined run [`dsv3_model::save_tensors`] on the first ranks holding each stage, their
/// stages' tensors (their own experts of them), and rank 0 the index), every
/// rank writes its `per_rank` file (its optimiser shard), and rank 0 adds the tokenizer and
/// `lead_files` (the state file last) and renames the directory into place.
///
/// # Errors
/// As [`write_atomically`], on any rank (every rank returns an error then).
pub fn write_parallel<B: DsBackend>(
    model: &DeepseekV3<B>,
    par: &Parallel,
    dest: &Path,
    lead_files: &[(&str, Vec<u8>)],
    per_rank: Option<(String, Vec<u8>)>,
) -> Result<(), TrainError> {
    let staging = Staging::new(dest);
    let lead = par.is_lead();
    let created = if lead { staging.create() } else { Ok(()) };
    agree(par, created, "writing the checkpoint")?;
    let layout = stage_layout(par, &model.config)?;
    let written = (|| {
        match &layout {
            Some(layout) => write_stage_shards(model, par, layout, &staging.tmp)?,
            None if par.dp.rank() == 0 => {
                dsv3_model::save_expert_parallel(model, &staging.tmp, SaveDtype::F32)?;
            }
            None => {}
        }
        if let Some((file, bytes)) = &per_rank {
            let p = staging.tmp.join(file);
            std::fs::write(&p, bytes).map_err(io("write", &p))?;
        }
        Ok(())
    })();
    agree(par, written, "writing the checkpoint")?;
    let finished = if lead {
        layout
            .as_ref()
            .map_or(Ok(()), |l| write_stage_index(model, l, &staging.tmp))
            .and_then(|()| staging.finish(lead_files))
    } else {
        Ok(())
    };
    agree(par, finished, "writing the checkpoint")
}

/// How a pipelined run's model is sharded on disk: one file per (holder group, expert-parallel
/// member), a holder group being the pipeline ranks that hold the same stages (DualPipe: two).
struct StageLayout {
    /// Each holder group's part, in order of its first pipeline rank.
    groups: Vec<dsv3_model::HeldLayers>,
    /// This rank's group.
    mine: usize,
    /// Expert-parallel group size.
    ep: usize,
    n_experts: usize,
}

impl StageLayout {
    fn file(&self, group: usize, member: usize) -> String {
        let n = self.groups.len() * self.ep;
        format!(
            "model-{:05}-of-{n:05}.safetensors",
            group * self.ep + member + 1
        )
    }

    /// The expert-parallel member whose file holds tensor `name` (0 for dense tensors).
    fn member(&self, name: &str) -> usize {
        dsv3_model::expert_of(name)
            .map_or(0, |x| dsv3_model::expert_owner(x, self.n_experts, self.ep))
    }

    /// The file that holds tensor `name`.
    fn file_of(&self, name: &str) -> String {
        let group = self
            .groups
            .iter()
            .position(|g| g.contains(name))
            .unwrap_or(0);
        self.file(group, self.member(name))
    }
}

/// The shard layout of a pipelined run (`None` without pipeline parallelism).
fn stage_layout(
    par: &Parallel,
    config: &dsv3_model::DeepseekV3Config,
) -> Result<Option<StageLayout>, TrainError> {
    let Some(kind) = par.schedule.filter(|_| par.pp > 1) else {
        return Ok(None);
    };
    let pp = par.pp;
    let first = |q: usize| {
        let stages = kind.stages_of(pp, q);
        (0..pp)
            .find(|&f| kind.stages_of(pp, f) == stages)
            .unwrap_or(q)
    };
    let mut firsts: Vec<usize> = (0..pp).map(first).collect();
    let me = first(par.world.rank() % pp);
    firsts.sort_unstable();
    firsts.dedup();
    let groups = firsts
        .iter()
        .map(|&f| crate::pipeline::exec::held_layers(kind, pp, f, config.num_hidden_layers))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(StageLayout {
        groups,
        mine: firsts.iter().position(|&f| f == me).unwrap_or(0),
        ep: par.ep.size(),
        n_experts: config.n_routed_experts,
    }))
}

/// A pipelined run's model shards: the first member of each ZeRO-1 group (the ranks holding the
/// same stages and experts) writes its group's file: the tensors of its stages (of the routed
/// experts, its own).
fn write_stage_shards<B: DsBackend>(
    model: &DeepseekV3<B>,
    par: &Parallel,
    layout: &StageLayout,
    dir: &Path,
) -> Result<(), TrainError> {
    if par.dp.rank() != 0 {
        return Ok(());
    }
    let member = par.ep.rank();
    let held = &layout.groups[layout.mine];
    let keep = |name: &str| held.contains(name) && layout.member(name) == member;
    let file = layout.file(layout.mine, member);
    dsv3_model::save_tensors(model, dir, &file, SaveDtype::F32, &keep)?;
    Ok(())
}

/// Rank 0's part of a pipelined checkpoint: the index naming each tensor's shard, and
/// `config.json`.
fn write_stage_index<B: DsBackend>(
    model: &DeepseekV3<B>,
    layout: &StageLayout,
    dir: &Path,
) -> Result<(), TrainError> {
    let map: Vec<(String, String)> = model
        .param_names()
        .into_iter()
        .map(|(_, name)| {
            let file = layout.file_of(&name);
            (name, file)
        })
        .collect();
    dsv3_model::save_index(model, dir, SaveDtype::F32, &map)?;
    Ok(())
}

/// The optimiser state keyed by parameter position (module order) instead of the run's
/// random `ParamId`s, so it binds to a model loaded from safetensors.
fn optimizer_bytes<B: DsAutodiffBackend>(t: &Trainer<B>) -> Result<Vec<u8>, TrainError> {
    let index: HashMap<ParamId, u64> = t
        .model
        .param_names()
        .into_iter()
        .enumerate()
        .map(|(i, (id, _))| (id, i as u64))
        .collect();
    let record: <Optim<B> as Optimizer<DeepseekV3<B>, B>>::Record = t
        .optim
        .to_record()
        .into_iter()
        .filter_map(|(id, r)| index.get(&id).map(|&i| (ParamId::from(i), r)))
        .collect();
    Recorder::<B>::record(
        &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
        record,
        (),
    )
    .map_err(|e| TrainError::io("serialise", OPTIM_FILE, format!("{e:?}")))
}

/// The trainer's own tokenizer files ([`Trainer::tokenizer_files`]), if any.
pub fn tokenizer_files<B: DsAutodiffBackend>(t: &Trainer<B>) -> Vec<(&str, Vec<u8>)> {
    t.tokenizer_files
        .iter()
        .flatten()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect()
}

/// Saves the trainer as `out/step-N` and prunes old checkpoints. Returns the directory.
///
/// # Errors
/// As [`write_atomically`]; also [`TrainError::Io`] when the optimiser state cannot be
/// serialised or an old checkpoint cannot be removed ([`prune`]).
pub fn save<B: DsAutodiffBackend>(
    t: &Trainer<B>,
    out: &Path,
    data_name: &str,
    elapsed_s: f64,
) -> Result<PathBuf, TrainError> {
    let (world_size, ep_size, pp_size) = t
        .parallel
        .as_ref()
        .map_or((1, 1, 1), |p| (p.world.size(), p.ep.size(), p.pp));
    let state = TrainState {
        step: t.step,
        sampler: t.sampler.state(),
        train: t.cfg.clone(),
        data: data_name.to_string(),
        data_fingerprint: t.data.fingerprint(),
        elapsed_s,
        world_size,
        ep_size,
        pp_size,
        schedule: t
            .parallel
            .as_ref()
            .and_then(|p| p.schedule)
            .map(|k| k.to_string()),
        distill: t.teacher.as_ref().map(DistillSetting::of),
    };
    let dest = step_dir(out, t.step);
    let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
    if let Some(par) = &t.parallel {
        let shard = agree(par, optimizer_bytes(t), "serialising its optimiser state")?;
        let shard = (optim_shard_file(par.world.rank()), shard);
        write_parallel(
            &t.model,
            par,
            &dest,
            &[(STATE_FILE, state_json)],
            Some(shard),
        )?;
        let pruned = if par.is_lead() {
            prune(out, t.cfg.keep_checkpoints, t.step)
        } else {
            Ok(())
        };
        agree(par, pruned, "pruning old checkpoints")?;
        return Ok(dest);
    }
    // train_state.json is written last inside the temporary directory.
    let mut files = tokenizer_files(t);
    files.extend([(OPTIM_FILE, optimizer_bytes(t)?), (STATE_FILE, state_json)]);
    write_atomically(&t.model, &dest, &files)?;
    prune(out, t.cfg.keep_checkpoints, t.step)?;
    Ok(dest)
}

/// Deletes complete checkpoints beyond the newest `keep` (at least one is kept) among those at
/// or below step `upto` (the one just saved). Checkpoints past it are neither counted nor
/// deleted: a run resumes behind them only when they were unusable, and counting them would
/// delete the usable ones as the run saves.
///
/// # Errors
/// [`TrainError::Io`] when a checkpoint directory cannot be removed; older ones may already
/// be gone then. An unreadable `out` is not an error (nothing is pruned).
pub fn prune(out: &Path, keep: usize, upto: usize) -> Result<(), TrainError> {
    let all: Vec<_> = complete(out)
        .into_iter()
        .filter(|&(step, _)| step <= upto)
        .collect();
    let n = all.len();
    for (_, p) in all.into_iter().take(n.saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(&p).map_err(io("remove", &p))?;
    }
    Ok(())
}

/// Reads `train_state.json` of a checkpoint.
///
/// # Errors
/// - [`TrainError::Io`]: the file cannot be read (missing, permissions).
/// - [`TrainError::BadCheckpoint`]: it is not a valid `train_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainState, TrainError> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(io("read", &p))?;
    serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
        path: dir.to_path_buf(),
        reason: format!("{STATE_FILE}: {e}"),
    })
}

/// Restores a trainer from checkpoint `dir` over `data` (which must be the data it was
/// trained on). `steps` (when given) replaces the run's total.
///
/// # Errors
/// - [`TrainError::BadCheckpoint`]: `dir` was trained on other data (fingerprint), its model
///   does not load strictly, or `optimizer.mpk` is missing, unreadable or for other
///   parameters; also an invalid `train_state.json` ([`read_state`]).
/// - [`TrainError::Io`]: `train_state.json` cannot be read.
/// - [`TrainError::Invalid`] / [`TrainError::Model`]: the restored settings (with `steps`)
///   fail [`check_setup`](crate::trainer::check_setup), e.g. `steps` is 0 or `data` is packed
///   for another `seq_len`.
pub fn load<B: DsAutodiffBackend>(
    dir: &Path,
    data: Dataset,
    steps: Option<usize>,
    device: &B::Device,
    par: Option<&Parallel>,
) -> Result<Trainer<B>, TrainError> {
    let bad = |reason: String| TrainError::BadCheckpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let state = read_state(dir)?;
    if data.fingerprint() != state.data_fingerprint {
        return Err(bad(format!(
            "it was trained on different data ({}); give the same --data",
            state.data
        )));
    }
    let (world, ep, pp) = par.map_or((1, 1, 1), |p| (p.world.size(), p.ep.size(), p.pp));
    let schedule = par.and_then(|p| p.schedule).map(|k| k.to_string());
    if (state.world_size, state.ep_size, state.pp_size) != (world, ep, pp)
        || (pp > 1 && state.schedule != schedule)
    {
        let name = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        return Err(TrainError::Invalid(format!(
            "{} was written by {} process(es) with --ep {} --pp {} --schedule {}; resume it with \
             the same layout (this run: {world} with --ep {ep} --pp {pp} --schedule {})",
            dir.display(),
            state.world_size,
            state.ep_size,
            state.pp_size,
            name(&state.schedule),
            name(&schedule)
        )));
    }
    // A pipeline rank reads only its stages' tensors.
    let held = match par {
        Some(p) if p.pp > 1 => {
            let cfg = dsv3_model::DeepseekV3Config::from_file(&dir.join("config.json"))
                .map_err(|e| bad(e.to_string()))?;
            held_by(p, cfg.num_hidden_layers)?
        }
        _ => None,
    };
    let opts = LoadOptions {
        strict: true,
        skip_mtp: false,
        expert_shard: par
            .filter(|p| p.ep.size() > 1)
            .map(|p| (p.ep.rank(), p.ep.size())),
        held,
    };
    let (model, _) = dsv3_model::load::<B>(dir, device, &opts).map_err(|e| bad(e.to_string()))?;
    let optim_file = match par {
        Some(p) => optim_shard_file(p.world.rank()),
        None => OPTIM_FILE.to_string(),
    };
    let bytes =
        std::fs::read(dir.join(&optim_file)).map_err(|e| bad(format!("{optim_file}: {e}")))?;
    let record: <Optim<B> as Optimizer<DeepseekV3<B>, B>>::Record = Recorder::<B>::load(
        &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
        bytes,
        device,
    )
    .map_err(|e| {
        // Burn's recorder error carries a paragraph after the failure (advice about an old
        // record format, which does not apply here): the failure alone is kept.
        let (RecorderError::FileNotFound(m)
        | RecorderError::DeserializeError(m)
        | RecorderError::Unknown(m)) = e;
        let why = m.lines().next().unwrap_or("").trim().to_string();
        bad(format!(
            "{optim_file}: not a readable optimiser state ({why})"
        ))
    })?;
    let ids: Vec<ParamId> = model.param_names().into_iter().map(|(id, _)| id).collect();
    let record: <Optim<B> as Optimizer<DeepseekV3<B>, B>>::Record = record
        .into_iter()
        .map(|(pos, r)| {
            ids.get(pos.val() as usize)
                .map(|&id| (id, r))
                .ok_or_else(|| {
                    bad(format!(
                        "{OPTIM_FILE}: state for parameter #{} of {}",
                        pos.val(),
                        ids.len()
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let mut cfg = state.train.clone();
    if let Some(s) = steps {
        if s < state.step {
            return Err(TrainError::Invalid(format!(
                "--steps {s} is below the step of the checkpoint resumed from ({}, {})",
                state.step,
                dir.display()
            )));
        }
        cfg.steps = s;
    }
    crate::trainer::check_setup(&model.config, &cfg, &data)?;
    let optim = optim::adamw::<B, DeepseekV3<B>>(&cfg).load_record(record);
    let sampler = Sampler::restore(data.train.len(), state.sampler);
    let mut t = Trainer::from_parts(model, optim, cfg, data, sampler, state.step, device);
    if let Some(p) = par {
        t.distribute(p.clone())?;
    }
    Ok(t)
}

/// The newest complete checkpoint of `out` that loads; older ones are tried when a newer one
/// is unusable (their problems are returned as warnings).
///
/// # Errors
/// - [`TrainError::NoCheckpoint`]: `out` holds no complete checkpoint.
/// - [`TrainError::BadCheckpoint`]: every checkpoint is unusable (the error of the oldest).
/// - Any other error of [`load`] ([`TrainError::Io`], [`TrainError::Invalid`],
///   [`TrainError::Model`]) at once, without trying older checkpoints.
pub fn resume<B: DsAutodiffBackend>(
    out: &Path,
    data: &Dataset,
    steps: Option<usize>,
    device: &B::Device,
    par: Option<&Parallel>,
) -> Result<(Trainer<B>, PathBuf, TrainState, Vec<String>), TrainError> {
    let mut warnings = Vec::new();
    let mut last_err = None;
    let mut found = None;
    for (_, dir) in complete(out).into_iter().rev() {
        match load::<B>(&dir, data.clone(), steps, device, par) {
            Ok(t) => {
                found = Some(read_state(&dir).map(|state| (t, dir, state)));
                break;
            }
            Err(e @ TrainError::BadCheckpoint { .. }) => {
                warnings.push(e.to_string());
                last_err = Some(e);
            }
            Err(e) => {
                found = Some(Err(e));
                break;
            }
        }
    }
    let result = found.unwrap_or_else(|| {
        Err(last_err.unwrap_or_else(|| TrainError::NoCheckpoint(out.to_path_buf())))
    });
    let Some(p) = par else {
        return result.map(|(t, dir, state)| (t, dir, state, warnings));
    };
    // Every rank must continue from the same checkpoint (one of them could have passed over a
    // damaged shard of its own): they agree on the step before the first collective of training.
    let (t, dir, state) = agree(p, result, "resuming")?;
    let mut v = [t.step as f64, -(t.step as f64)];
    p.world
        .all_reduce_in_place(&mut v, dsv3_backends::comm::ReduceOp::Max)
        .map_err(crate::parallel::comm_err)?;
    if v[0] != -v[1] {
        return Err(TrainError::Invalid(format!(
            "the ranks found different newest checkpoints (steps {} to {}) in {}: every rank \
             needs the same complete checkpoint",
            -v[1],
            v[0],
            out.display()
        )));
    }
    Ok((t, dir, state, warnings))
}
