//! A whole run, as `dsv3 train` performs it: data, fresh start or `--resume`, the step loop
//! with logging, validation and checkpoints, then `DIR/final/` and the PNG.

use dsv3_backends::DsAutodiffBackend;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use dsv3_model::{DeepseekV3, DeepseekV3Config};

use crate::balance;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{self, Dataset, Document};
use crate::error::TrainError;
use crate::metrics::{self, LogRecord, MetricsLog};
use crate::plot;
use crate::trainer::{EvalStats, Trainer};

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The corpus compiled into the binary ([`crate::data::embedded_documents`]).
    Embedded,
    Path(PathBuf),
}

impl DataSource {
    /// How checkpoints record it.
    pub fn name(&self) -> String {
        match self {
            DataSource::Embedded => "embedded".into(),
            DataSource::Path(p) => p.display().to_string(),
        }
    }

    /// A path made absolute (recorded so in checkpoints: a resume from another directory finds
    /// it); the embedded corpus as it is.
    fn absolute(self) -> Self {
        match self {
            DataSource::Path(p) => DataSource::Path(std::path::absolute(&p).unwrap_or(p)),
            s => s,
        }
    }

    pub fn from_name(s: &str) -> Self {
        if s == "embedded" {
            DataSource::Embedded
        } else {
            DataSource::Path(PathBuf::from(s))
        }
    }

    /// The documents, and files skipped as not being text.
    ///
    /// # Errors
    /// For a path, what [`data::read_documents`] returns; the embedded corpus cannot fail.
    pub fn documents(&self) -> Result<(Vec<Document>, Vec<PathBuf>), TrainError> {
        match self {
            DataSource::Embedded => Ok((data::embedded_documents(), Vec::new())),
            DataSource::Path(p) => data::read_documents(p).map(|(d, r)| (d, r.skipped)),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// `None`: the embedded corpus for a new run, the checkpoint's data on `--resume`.
    pub data: Option<DataSource>,
    /// Model shape of a new run (a resumed run keeps its own).
    pub model: DeepseekV3Config,
    /// Settings of a new run; on resume only those marked in `given` are taken from here.
    pub train: TrainConfig,
    /// Which of `train`'s run-length and interval settings apply on resume (the others keep
    /// the checkpoint's values; every other setting is always the checkpoint's).
    pub given: Given,
    pub resume: bool,
    /// Draw the progress bar on stderr.
    pub progress: bool,
    /// A distributed run's communicators (`mpirun`): rank 0 logs, plots and reports;
    /// checkpoints are written together ([`checkpoint::write_parallel`]).
    pub parallel: Option<crate::parallel::Parallel>,
    /// A pipeline-parallel run (`mpirun -n PP·DP`): every rank computes its stages; rank 0
    /// logs, plots and reports. With `parallel` = [`crate::parallel::Parallel::pipelined`] over
    /// the same world (what `dsv3 train --pp` gives, with or without `--ep`) each rank holds
    /// only its stages' weights, the optimiser step is ZeRO-1, validation runs through the
    /// pipeline, and the checkpoints are written together (per-stage shards of one model);
    /// without it every rank holds the whole model, the ranks stay identical and rank 0 writes
    /// the checkpoints, every rank resuming from them.
    pub pipeline: Option<crate::pipeline::exec::PipelinePlan>,
}

/// The settings of [`RunOptions::train`] that a resumed run takes over the checkpoint's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Given {
    pub steps: bool,
    pub checkpoint_every: bool,
    pub log_every: bool,
    pub eval_every: bool,
    pub keep_checkpoints: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub final_dir: PathBuf,
    pub resumed_from: Option<PathBuf>,
    pub start_step: usize,
    pub steps: usize,
    /// Seconds spent in optimiser steps in this invocation (no evaluation, no saving).
    pub train_s: f64,
    /// Seconds of this invocation, start to end.
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub val: Option<EvalStats>,
    /// `(layer, max/mean load)` over the last logging window.
    pub imbalance: Vec<(usize, f64)>,
    pub parameters: u64,
    pub corpus_tokens: usize,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    pub warnings: Vec<String>,
}

/// Running sums over one logging window.
#[derive(Default)]
struct Window {
    steps: usize,
    loss: f64,
    ce: f64,
    mtp: Option<f64>,
    bal: Option<f64>,
    loads: Vec<(usize, Vec<u64>)>,
    fp8: Option<dsv3_backends::QuantCounts>,
}

impl Window {
    fn add(&mut self, s: &crate::trainer::StepStats) {
        self.steps += 1;
        self.loss += s.loss;
        self.ce += s.ce;
        if let Some(m) = s.mtp_loss {
            *self.mtp.get_or_insert(0.0) += m;
        }
        if let Some(b) = s.balance_loss {
            *self.bal.get_or_insert(0.0) += b;
        }
        if let Some(q) = s.fp8 {
            let w = self.fp8.get_or_insert_with(Default::default);
            w.values += q.values;
            w.underflow += q.underflow;
            w.overflow += q.overflow;
            w.tiles += q.tiles;
            w.clipped_tiles += q.clipped_tiles;
        }
        if self.loads.is_empty() {
            self.loads = s.loads.clone();
        } else {
            for ((_, acc), (_, l)) in self.loads.iter_mut().zip(&s.loads) {
                acc.iter_mut().zip(l).for_each(|(a, b)| *a += b);
            }
        }
    }
}

/// Fine-tuning ([`fine_tune`]): a prepared dataset (token ids with the assistant mask, see
/// [`crate::sft`]) and a starting model directory instead of text and a seeded init.
#[derive(Debug, Clone)]
pub struct FineTune {
    /// Recorded in checkpoints as the run's data.
    pub data_name: String,
    pub data: Dataset,
    /// The starting weights (Hugging Face layout).
    pub model_dir: PathBuf,
    /// Tokenizer files (name, bytes) written into every checkpoint and `final/`.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    /// Logit distillation: the teacher's directory, τ and α ([`crate::distill`]).
    pub teacher: Option<(PathBuf, f64, f64)>,
}

/// The frozen teacher of a distillation run, checked against the student's vocabulary.
fn teacher<B: DsAutodiffBackend>(
    ft: &FineTune,
    device: &B::Device,
) -> Result<Option<crate::distill::Teacher<B::InnerBackend>>, TrainError> {
    let Some((dir, temperature, alpha)) = &ft.teacher else {
        return Ok(None);
    };
    let opts = dsv3_model::LoadOptions {
        skip_mtp: true,
        ..Default::default()
    };
    let (model, _) = dsv3_model::load::<B::InnerBackend>(dir, device, &opts)?;
    let student = dsv3_model::DeepseekV3Config::from_file(&ft.model_dir.join("config.json"))
        .map_err(dsv3_model::ModelError::from)?;
    crate::distill::check_vocab(
        model.config.vocab_size,
        student.vocab_size,
        *temperature,
        *alpha,
    )?;
    Ok(Some(crate::distill::Teacher {
        model,
        dir: std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
        temperature: *temperature,
        alpha: *alpha,
    }))
}

/// Packs the documents with the run's sequence length and split.
fn pack(
    source: &DataSource,
    cfg: &TrainConfig,
    warnings: &mut Vec<String>,
) -> Result<Dataset, TrainError> {
    let (docs, skipped) = source.documents()?;
    for s in skipped {
        warnings.push(format!("skipped {} (not UTF-8 text)", s.display()));
    }
    Dataset::pack(&docs, cfg.seq_len, cfg.val_every)
}

/// Runs training to `steps`, saving checkpoints and `final/`. Returns the summary and the
/// trained model (inference backend).
///
/// # Errors
/// - [`TrainError::NoCheckpoint`]: `resume` and `out` holds no complete checkpoint.
/// - Reading and packing the data ([`DataSource::documents`], [`Dataset::pack`]).
/// - Starting: [`Trainer::new`] for a new run, [`checkpoint::resume`] on resume (checkpoints
///   whose state cannot be read are passed over with a warning; the error of the oldest when
///   none can), then [`TrainConfig::validate`] of the merged settings.
/// - [`TrainError::NonFinite`] from [`Trainer::train_step`]; the last checkpoint is kept.
/// - [`TrainError::Io`] / [`TrainError::Model`]: creating `out`, the metrics log or a
///   checkpoint fails. A plot that cannot be drawn is only a warning.
pub fn run<B: DsAutodiffBackend>(
    opts: &RunOptions,
    device: &B::Device,
    say: &mut dyn FnMut(&str),
) -> Result<(RunSummary, DeepseekV3<B::InnerBackend>), TrainError> {
    run_with::<B>(opts, None, device, say)
}

/// [`run`] for fine-tuning: the steps, schedule, logging, validation, checkpoints, `--resume`
/// and plot are the same; the data is `ft.data` (`opts.data` and `opts.model` are not used)
/// and a new run starts from `ft.model_dir`'s weights. One process only.
///
/// # Errors
/// As [`run`]; also [`TrainError::Invalid`] with `opts.parallel`, and [`TrainError::Model`]
/// when `ft.model_dir` does not load.
pub fn fine_tune<B: DsAutodiffBackend>(
    opts: &RunOptions,
    ft: &FineTune,
    device: &B::Device,
    say: &mut dyn FnMut(&str),
) -> Result<(RunSummary, DeepseekV3<B::InnerBackend>), TrainError> {
    if opts.parallel.is_some() {
        return Err(TrainError::Invalid(
            "fine-tuning runs in one process (no --ep/--dp yet)".into(),
        ));
    }
    run_with::<B>(opts, Some(ft), device, say)
}

fn run_with<B: DsAutodiffBackend>(
    opts: &RunOptions,
    ft: Option<&FineTune>,
    device: &B::Device,
    say: &mut dyn FnMut(&str),
) -> Result<(RunSummary, DeepseekV3<B::InnerBackend>), TrainError> {
    let t0 = Instant::now();
    let mut warnings = Vec::new();
    let out = &opts.out;
    // Data, a fresh model or a checkpoint: in a distributed run the ranks agree that every one
    // of them got through (data is read by each rank) before the first collective of training.
    let started = (|| -> Result<_, TrainError> {
        Ok(if opts.resume {
            // The data source comes from the newest checkpoint whose state reads; an unreadable
            // one is passed over here as `checkpoint::resume` passes over it below (which is what
            // reports it).
            let mut state = Err(TrainError::NoCheckpoint(out.clone()));
            for (_, dir) in checkpoint::complete(out).into_iter().rev() {
                state = checkpoint::read_state(&dir);
                if !matches!(state, Err(TrainError::BadCheckpoint { .. })) {
                    break;
                }
            }
            let state = state?;
            let (source, data) = match ft {
                Some(ft) => (
                    DataSource::Path(ft.data_name.clone().into()),
                    ft.data.clone(),
                ),
                None => {
                    let source = match &opts.data {
                        Some(d) => d.clone().absolute(),
                        None => match DataSource::from_name(&state.data) {
                            DataSource::Path(p) if !p.exists() => {
                                return Err(TrainError::Invalid(format!(
                                    "the checkpoint's data path {} does not exist from here \
                                     (a relative path is relative to where the run started): \
                                     give --data",
                                    p.display()
                                )))
                            }
                            s => s.absolute(),
                        },
                    };
                    let data = pack(&source, &state.train, &mut warnings)?;
                    (source, data)
                }
            };
            let given = opts.given;
            let steps = given.steps.then_some(opts.train.steps);
            let par = opts.parallel.as_ref();
            let (mut t, dir, state, w) = checkpoint::resume::<B>(out, &data, steps, device, par)?;
            warnings.extend(w);
            let new = &opts.train;
            if given.checkpoint_every {
                t.cfg.checkpoint_every = new.checkpoint_every;
            }
            if given.log_every {
                t.cfg.log_every = new.log_every;
            }
            if given.eval_every {
                t.cfg.eval_every = new.eval_every;
            }
            if given.keep_checkpoints {
                t.cfg.keep_checkpoints = new.keep_checkpoints;
            }
            t.cfg.validate()?;
            t.tokenizer_files = ft.map(|f| f.tokenizer_files.clone());
            t.teacher = ft.map(|f| teacher::<B>(f, device)).transpose()?.flatten();
            let now = t.teacher.as_ref().map(checkpoint::DistillSetting::of);
            if let Some(before) = &state.distill {
                if now.as_ref() != Some(before) {
                    return Err(TrainError::Invalid(format!(
                        "the checkpoint was trained with {before}, this resume gives {}: resume \
                         with the same --teacher, --temperature and --alpha",
                        now.map_or("no teacher".to_string(), |n| n.to_string())
                    )));
                }
            }
            (t, source, Some(dir), state.elapsed_s)
        } else if let Some(ft) = ft {
            let (model, _) = dsv3_model::load::<B>(&ft.model_dir, device, &Default::default())?;
            let mut t =
                Trainer::<B>::from_model(model, opts.train.clone(), ft.data.clone(), device)?;
            t.tokenizer_files = Some(ft.tokenizer_files.clone());
            t.teacher = teacher::<B>(ft, device)?;
            (t, DataSource::Path(ft.data_name.clone().into()), None, 0.0)
        } else {
            let source = opts
                .data
                .clone()
                .map_or(DataSource::Embedded, DataSource::absolute);
            let data = pack(&source, &opts.train, &mut warnings)?;
            let t = match &opts.parallel {
                Some(p) => Trainer::<B>::new_distributed(
                    &opts.model,
                    opts.train.clone(),
                    data,
                    device,
                    p.clone(),
                )?,
                None => Trainer::<B>::new(&opts.model, opts.train.clone(), data, device)?,
            };
            (t, source, None, 0.0)
        })
    })();
    let started = match &opts.parallel {
        Some(p) => crate::parallel::agree(p, started, "starting the run")?,
        None => started?,
    };
    let (mut trainer, source, resumed_from, elapsed_before) = started;
    if let Some(plan) = &opts.pipeline {
        trainer.pipelined(plan.world.clone(), plan.pp, plan.kind)?;
    }
    let lead = opts.parallel.as_ref().is_none_or(|p| p.is_lead())
        && opts.pipeline.as_ref().is_none_or(|p| p.world.rank() == 0);
    // Every rank of a distributed run takes part in the collective checkpoint writes (each
    // holds its part) and validation (through the pipeline when the ranks hold stages).
    let writes = opts.pipeline.is_none() || opts.parallel.is_some() || lead;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io("create", out, e))?;
    let log = if lead {
        MetricsLog::open(out, resumed_from.as_ref().map(|_| trainer.step)).map(Some)
    } else {
        Ok(None)
    };
    let log = match &opts.parallel {
        Some(p) => crate::parallel::agree(p, log, "opening the metrics log")?,
        None => log?,
    };
    let start_step = trainer.step;
    let total = trainer.cfg.steps;
    let layers = trainer.model.moe_layers();
    let parameters = trainer.model.config.param_counts(true).total;
    say(&format!(
        "{} {} parameters ({} MoE layers), corpus {} tokens ({} train / {} val windows of {}), {} tokens per step, steps {}..{}",
        if resumed_from.is_some() { "resuming" } else { "training" },
        parameters,
        layers.len(),
        trainer.data.tokens.len(),
        trainer.data.train.len(),
        trainer.data.val.len(),
        trainer.cfg.seq_len,
        trainer.cfg.tokens_per_step(),
        start_step,
        total
    ));
    if let Some(d) = &resumed_from {
        say(&format!("resumed from {}", d.display()));
    }
    for w in &warnings {
        say(&format!("warning: {w}"));
    }
    let pb = metrics::progress_bar(start_step, total, opts.progress && lead);
    let mut window = Window::default();
    let (mut train_s, mut tokens) = (0.0f64, 0u64);
    let mut last_val = None;
    let mut last_imbalance = Vec::new();
    let mut saved_at = None;
    while trainer.step < total {
        let ts = Instant::now();
        let stats = match trainer.train_step() {
            Ok(s) => s,
            Err(e) => {
                pb.abandon();
                return Err(e);
            }
        };
        train_s += ts.elapsed().as_secs_f64();
        tokens += stats.tokens as u64;
        window.add(&stats);
        let step = stats.step;
        let tps = tokens as f64 / train_s.max(1e-9);
        pb.set_position(step as u64);
        pb.set_message(format!("loss {:.3}  {:.0} tok/s", stats.ce, tps));
        let last = step == total;
        if step % trainer.cfg.log_every == 0 || last {
            let val = match (writes && (step % trainer.cfg.eval_every == 0 || last))
                .then(|| trainer.evaluate_run())
                .transpose()
            {
                Ok(v) => v,
                Err(e) => {
                    pb.abandon();
                    return Err(e);
                }
            };
            if val.is_some() {
                last_val = val;
            }
            let n = window.steps.max(1) as f64;
            last_imbalance = window
                .loads
                .iter()
                .map(|(l, loads)| (*l, balance::imbalance(loads)))
                .collect();
            let rec = LogRecord {
                step,
                loss: window.loss / n,
                ce_loss: window.ce / n,
                mtp_loss: window.mtp.map(|m| m / n),
                balance_loss: window.bal.map(|b| b / n),
                val_loss: val.map(|v| v.loss),
                val_bits_per_byte: val.map(|v| v.bits_per_byte),
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                imbalance: last_imbalance.iter().map(|x| x.1).collect(),
                moe_layers: layers.clone(),
                tokens: (step * trainer.cfg.tokens_per_step()) as u64,
                tokens_per_s: tps,
                elapsed_s: elapsed_before + t0.elapsed().as_secs_f64(),
                comm_sent_bytes: stats.comm.as_ref().map(|c| c.sent_bytes.clone()),
                comm_recv_bytes: stats.comm.as_ref().map(|c| c.recv_bytes.clone()),
                ep_sent_bytes: stats.comm.as_ref().and_then(|c| c.ep_sent_bytes.clone()),
                ep_analytic_bytes: stats
                    .comm
                    .as_ref()
                    .and_then(|c| c.ep_analytic_bytes.clone()),
                ep_ranks_per_token: stats.comm.as_ref().and_then(|c| c.ranks_per_token),
                fp8_values: window.fp8.map(|q| q.values),
                fp8_underflow: window.fp8.map(|q| q.underflow),
                fp8_overflow: window.fp8.map(|q| q.overflow),
                fp8_clipped_tile_share: window
                    .fp8
                    .map(|q| q.clipped_tiles as f64 / q.tiles.max(1) as f64),
            };
            let appended = log.as_ref().map_or(Ok(()), |l| l.append(&rec));
            match &opts.parallel {
                Some(p) => crate::parallel::agree(p, appended, "writing the metrics log")?,
                None => appended?,
            }
            let mut line = format!(
                "step {step:>5}  loss {:.4}  ce {:.4}",
                rec.loss, rec.ce_loss
            );
            if let Some(m) = rec.mtp_loss {
                line += &format!("  mtp {m:.4}");
            }
            if let Some(v) = val {
                line += &format!("  val {:.4} ({:.3} bits/byte)", v.loss, v.bits_per_byte);
            }
            if let Some(q) = window.fp8 {
                line += &format!(
                    "  fp8 underflow {:.1e} overflow {} clipped tiles {:.1e}",
                    q.underflow as f64 / q.values.max(1) as f64,
                    q.overflow,
                    q.clipped_tiles as f64 / q.tiles.max(1) as f64
                );
            }
            line += &format!(
                "  lr {:.2e}  |g| {:.2}  imbalance max {:.2}  {:.0} tok/s",
                rec.lr,
                rec.grad_norm,
                rec.imbalance.iter().copied().fold(0.0, f64::max),
                tps
            );
            pb.suspend(|| say(&line));
            window = Window::default();
        }
        if writes && trainer.cfg.checkpoint_every > 0 && step % trainer.cfg.checkpoint_every == 0 {
            let elapsed = elapsed_before + t0.elapsed().as_secs_f64();
            let dir = checkpoint::save(&trainer, out, &source.name(), elapsed)?;
            saved_at = Some(step);
            pb.suspend(|| say(&format!("saved {}", dir.display())));
        }
    }
    pb.finish_and_clear();
    if writes && saved_at != Some(trainer.step) {
        let elapsed = elapsed_before + t0.elapsed().as_secs_f64();
        let dir = checkpoint::save(&trainer, out, &source.name(), elapsed)?;
        say(&format!("saved {}", dir.display()));
    }
    let final_dir = out.join("final");
    match &trainer.parallel {
        Some(p) => checkpoint::write_parallel(&trainer.model, p, &final_dir, &[], None)?,
        None if writes => checkpoint::write_atomically(
            &trainer.model,
            &final_dir,
            &checkpoint::tokenizer_files(&trainer),
        )?,
        None => {}
    }
    // The other ranks of a pipelined run return once the final model is written.
    if let Some(plan) = &opts.pipeline {
        plan.world.barrier().map_err(crate::parallel::comm_err)?;
    }
    // Evaluation is collective in a distributed run: before anything only rank 0 does.
    let val = match last_val {
        Some(v) => Some(v),
        None if start_step == total && writes => Some(trainer.evaluate_run()?),
        None => None,
    };
    let metrics_path = out.join("metrics.jsonl");
    let plot = match &log {
        Some(log) => {
            let records = metrics::read(&log.path)?;
            let png = out.join("training.png");
            match plot::draw(&records, &png) {
                Ok(()) => Some(png),
                Err(e) => {
                    say(&format!("warning: no plot: {e}"));
                    None
                }
            }
        }
        None => None,
    };
    let summary = RunSummary {
        out: out.clone(),
        final_dir,
        resumed_from,
        start_step,
        steps: trainer.step,
        train_s,
        wall_s: t0.elapsed().as_secs_f64(),
        tokens_per_s: tokens as f64 / train_s.max(1e-9),
        val,
        imbalance: last_imbalance,
        parameters,
        corpus_tokens: trainer.data.tokens.len(),
        metrics: metrics_path,
        plot,
        warnings,
    };
    Ok((summary, trainer.model.valid()))
}

/// `true` when `dir` holds at least one complete checkpoint.
pub fn has_checkpoint(dir: &Path) -> bool {
    !checkpoint::complete(dir).is_empty()
}

/// `true` when `dir` holds a saved model a new run there would overwrite: a complete
/// checkpoint or a `final/` model in any layout (e.g. of an `rl` run, a distributed run's
/// shards, or after the step checkpoints were removed).
pub fn holds_saved_model(dir: &Path) -> bool {
    has_checkpoint(dir) || dir.join("final").exists()
}
