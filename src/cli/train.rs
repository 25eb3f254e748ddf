//! `dsv3 train`: pretrain a DeepSeek-V3-architecture model on text (the embedded corpus by
//! default), then sample a few continuations with the inference engine (MTP speculative
//! decoding when the model has an MTP module).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use dsv3_backends::{BackendKind, CpuAutodiff, DsAutodiffBackend, DsBackend};
use dsv3_model::{DeepseekV3, DeepseekV3Config, ModelError};
use dsv3_train::{DataSource, RunOptions, TrainConfig, TrainError};

use super::CliError;

/// A training preset by name, looked up while parsing (an unknown name is a usage error, exit 2).
fn train_preset(name: &str) -> Result<Box<dsv3_train::Preset>, String> {
    dsv3_train::preset(name)
        .map(Box::new)
        .ok_or_else(|| super::unknown_preset("training preset", name, dsv3_train::PRESETS))
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Text file, directory of text files (recursive), or .jsonl with a "text" field.
    /// Default: the embedded corpus (this project's own docs and sources); with --resume, the
    /// checkpoint's data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Model shape and training settings: mini (default; ≤ 10 min on 2 cores), tiny (smoke
    /// test), small (~100M shape; slow on CPU).
    #[arg(long, conflicts_with = "config", value_parser = train_preset)]
    pub preset: Option<Box<dsv3_train::Preset>>,
    /// A model config.json (HF layout) instead of a preset's model; training settings are mini's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory: metrics.jsonl, step-N/ checkpoints, final/, training.png.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Total optimiser steps of the run (with --resume: the new total).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed of the initial weights and of the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from the newest usable checkpoint in --out, with its settings and data (--data
    /// may name the same data; of the other flags only --steps, --checkpoint-every,
    /// --log-every, --eval-every and --keep apply).
    #[arg(long)]
    pub resume: bool,
    /// Backend to train on: flex (alias cpu), or wgpu / cuda when built with them (f32 master
    /// weights; on a GPU backend one process, no --ep / --dp / --pp).
    #[arg(long, default_value = "flex", value_parser = BackendKind::parse)]
    pub backend: BackendKind,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (warm-up, then cosine decay to a tenth of it).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// λ, weight of the MTP loss (default 0.3).
    #[arg(long)]
    pub mtp_lambda: Option<f64>,
    /// α, weight of the sequence-wise balance loss (default 1e-4).
    #[arg(long)]
    pub balance_alpha: Option<f64>,
    /// γ, speed of the aux-loss-free bias update (default 1e-3; 0 turns it off).
    #[arg(long)]
    pub bias_gamma: Option<f64>,
    /// Validate every N steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Log every N steps.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Complete checkpoints to keep.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Micro-batches computed in parallel threads (default 2; the result does not depend on it;
    /// always 1 on a GPU backend).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Attention form used in training: naive or absorbed (the same function).
    #[arg(long)]
    pub attention: Option<dsv3_model::AttentionMode>,
    /// Number format of the decoder blocks' Linear GEMMs (forward, input and weight gradient):
    /// f32, bf16 (rounded operands, f32 accumulation) or fp8 (e4m3, 1×128 activation tiles and
    /// 128×128 weight blocks, f32 accumulation; DeepSeek-V3 report §3.3). Master weights f32.
    #[arg(long)]
    pub precision: Option<dsv3_train::Precision>,
    /// FP8 scales rounded up to powers of two (UE8M0); with --precision fp8.
    #[arg(long, requires = "precision")]
    pub fp8_pow2_scales: bool,
    /// Storage of AdamW's moments: f32 or bf16 (widened to f32 for each update).
    #[arg(long)]
    pub optimizer_state: Option<dsv3_train::StateDtype>,
    /// Continuations sampled at the end (0: none).
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// New tokens per sampled continuation.
    #[arg(long, default_value_t = 200)]
    pub sample_tokens: usize,
    /// Sampling temperature of the continuations (top-p 0.9); 0 = greedy with MTP speculative
    /// decoding. A greedy MTP-speculative continuation is always added when the model has MTP.
    #[arg(long, default_value_t = 0.7)]
    pub sample_temperature: f32,
    /// Expert parallelism: split the routed experts over groups of this many processes
    /// (start W processes with `mpirun -n W`; W/ep groups are data-parallel replicas, ZeRO-1).
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Data-parallel replicas (default: processes / --ep); must equal processes / --ep. With
    /// --pp: the pipelines (default: processes / --pp), which --ep must divide.
    #[arg(long)]
    pub dp: Option<usize>,
    /// Pipeline parallelism: the decoder layers cut into stages over this many processes
    /// (`mpirun -n PP·DP`: --dp pipelines, each taking its share of every micro-batch), the
    /// step's --grad-accum micro-batches flowing through them as --schedule orders. With --ep E
    /// the DP ranks of each stage form DP/E expert-parallel groups of E (not yet with MTP
    /// modules).
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Pipeline schedule with --pp: 1f1b, zb1p, dualpipe (PP even, micro-batches even and
    /// ≥ 2·PP) or dualpipev (micro-batches ≥ 2·PP).
    #[arg(long, default_value = "1f1b", value_parser = super::pipeline::schedule_kind, requires = "pp")]
    pub schedule: dsv3_train::pipeline::ScheduleKind,
}

fn train_err(e: TrainError) -> CliError {
    match e {
        TrainError::Model(m) => CliError::Model(m),
        other => CliError::Usage(other.to_string()),
    }
}

/// The model shape and settings of a new run, flags applied.
fn settings(a: &TrainArgs) -> Result<(DeepseekV3Config, TrainConfig), CliError> {
    let preset = match &a.preset {
        Some(p) => p.clone(),
        None => train_preset("mini").map_err(CliError::Usage)?,
    };
    let preset = *preset;
    let mut t = preset.train;
    let set = |dst: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    set(&mut t.steps, a.steps);
    set(&mut t.seq_len, a.seq_len);
    set(&mut t.batch_size, a.batch_size);
    set(&mut t.grad_accum, a.grad_accum);
    set(&mut t.warmup_steps, a.warmup);
    set(&mut t.eval_every, a.eval_every);
    set(&mut t.log_every, a.log_every);
    set(&mut t.keep_checkpoints, a.keep);
    set(&mut t.checkpoint_every, a.checkpoint_every);
    set(&mut t.workers, a.workers);
    if let Some(m) = a.attention {
        t.attention = m;
    }
    if let Some(p) = a.precision {
        t.precision = p;
    }
    if a.fp8_pow2_scales {
        if t.precision != dsv3_train::Precision::Fp8 {
            return Err(CliError::Usage(
                "--fp8-pow2-scales needs --precision fp8".into(),
            ));
        }
        t.fp8_pow2_scales = true;
    }
    if let Some(d) = a.optimizer_state {
        t.optimizer_state = d;
    }
    if let Some(s) = a.seed {
        t.seed = s;
    }
    if let Some(lr) = a.lr {
        t.lr = lr;
        t.min_lr = lr / 10.0;
    }
    if let Some(v) = a.mtp_lambda {
        t.mtp_lambda = v;
    }
    if let Some(v) = a.balance_alpha {
        t.balance_alpha = v;
    }
    if let Some(v) = a.bias_gamma {
        t.bias_gamma = v;
    }
    let model = match &a.config {
        Some(path) => {
            let cfg = DeepseekV3Config::from_file(path).map_err(ModelError::from)?;
            if cfg.vocab_size < dsv3_train::BYTE_VOCAB {
                return Err(CliError::Usage(format!(
                    "{}: vocab_size = {} is smaller than the byte-level tokenizer's {}",
                    path.display(),
                    cfg.vocab_size,
                    dsv3_train::BYTE_VOCAB
                )));
            }
            let mut cfg = dsv3_train::for_bytes(cfg.clone(), t.seq_len);
            cfg.vocab_size = cfg.vocab_size.max(dsv3_train::BYTE_VOCAB);
            cfg
        }
        None => dsv3_train::for_bytes(preset.model, t.seq_len),
    };
    t.validate().map_err(train_err)?;
    Ok((model, t))
}

pub fn train(a: &TrainArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if a.backend != BackendKind::Flex && (a.ep > 1 || a.pp > 1 || a.dp.unwrap_or(1) > 1) {
        return Err(CliError::Usage(format!(
            "--ep / --dp / --pp train on flex only (the communicator moves host buffers); \
             --backend {} trains in one process",
            a.backend.name()
        )));
    }
    a.backend
        .check(dsv3_backends::FloatDtype::F32)
        .map_err(CliError::from)?;
    match a.backend {
        BackendKind::Flex => train_on::<CpuAutodiff>(a, out),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => train_on::<burn::backend::Autodiff<dsv3_backends::Wgpu>>(a, out),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => train_on::<burn::backend::Autodiff<dsv3_backends::Cuda>>(a, out),
        #[allow(unreachable_patterns)]
        other => Err(dsv3_backends::BackendError::NotCompiled { name: other.name() }.into()),
    }
}

fn train_on<B: DsAutodiffBackend>(a: &TrainArgs, out: &mut dyn Write) -> Result<(), CliError>
where
    B::Device: Default,
{
    let (model, train) = settings(a)?;
    // Checked before training, not when the samples are drawn after it.
    dsv3_infer::SamplingOptions {
        temperature: a.sample_temperature,
        ..Default::default()
    }
    .validate()
    .map_err(|e| CliError::Usage(format!("--sample-temperature: {e}")))?;
    // With --pp the processes are PP × DP (DP pipelines; --ep groups inside each stage's DP
    // replicas), without it EP × DP.
    let ranks = if a.pp > 1 {
        a.pp * a.dp.unwrap_or(a.ep)
    } else {
        a.ep * a.dp.unwrap_or(1)
    };
    let world = super::dist::world(ranks)?;
    let comm = &world.comm;
    if a.pp > 1 {
        let dp = a.dp.unwrap_or(comm.size() / a.pp).max(1);
        let checked = if comm.size() != a.pp * dp {
            Err(CliError::Usage(format!(
                "--pp {} × --dp {dp} needs {} processes, mpirun started {}",
                a.pp,
                a.pp * dp,
                comm.size()
            )))
        } else if a.ep == 0 || !dp.is_multiple_of(a.ep) {
            Err(CliError::Usage(format!(
                "--ep {} must divide --dp {dp}: with --pp the expert-parallel groups lie inside \
                 each stage's data-parallel replicas (processes = --pp × --dp)",
                a.ep
            )))
        } else {
            Ok(())
        };
        super::dist::agree(comm, checked, "the pipeline layout")?;
    } else {
        super::dist::check_world(comm, a.ep, a.dp, true)?;
    }
    let w = if a.pp > 1 { 1 } else { comm.size() };
    let mut sink = std::io::sink();
    let out = super::dist::lead_output(comm, out, &mut sink);
    let checked = (|| {
        if let Some(d) = &a.data {
            if !d.exists() {
                return Err(train_err(TrainError::MissingData(d.clone())));
            }
        }
        if !a.resume {
            super::refuse_saved_run(&a.out)?;
        }
        Ok(())
    })();
    super::dist::agree(comm, checked, "checks")?;
    let parallel = if a.pp > 1 {
        Some(
            dsv3_train::Parallel::pipelined(comm.clone(), a.pp, a.ep, a.schedule)
                .map_err(train_err)?,
        )
    } else if w > 1 {
        Some(dsv3_train::Parallel::new(comm.clone(), a.ep).map_err(train_err)?)
    } else {
        None
    };
    let opts = RunOptions {
        out: a.out.clone(),
        data: a.data.clone().map(DataSource::Path),
        model,
        train,
        given: dsv3_train::Given {
            steps: a.steps.is_some(),
            checkpoint_every: a.checkpoint_every.is_some(),
            log_every: a.log_every.is_some(),
            eval_every: a.eval_every.is_some(),
            keep_checkpoints: a.keep.is_some(),
        },
        resume: a.resume,
        progress: true,
        parallel: parallel.clone(),
        pipeline: (a.pp > 1).then(|| dsv3_train::pipeline::exec::PipelinePlan {
            world: comm.clone(),
            pp: a.pp,
            kind: a.schedule,
        }),
    };
    if a.resume {
        let ignored = ignored_on_resume(a);
        if !ignored.is_empty() && comm.rank() == 0 {
            super::warn(format_args!(
                "--resume continues with the checkpoint's settings: {} ignored (only --steps, \
                 --checkpoint-every, --log-every, --eval-every and --keep apply)",
                ignored.join(", ")
            ));
        }
    }
    let device = Default::default();
    let mut say = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    // The ranks of a distributed run stop together (the run's failures are agreed on: the
    // same settings, the same losses, checkpoint writes that agree), so they agree here once.
    let result = dsv3_train::run::<B>(&opts, &device, &mut say).map_err(train_err);
    let (summary, trained) = super::dist::agree(comm, result, "training")?;
    let mut report = String::new();
    use std::fmt::Write as _;
    if comm.size() > 1 {
        let _ = writeln!(report, "{}", super::dist::peak_rss_line(&world.comm)?);
    }
    let _ = writeln!(
        report,
        "trained steps {}..{} in {:.1} s ({:.1} s in optimiser steps, {:.0} tokens/s)",
        summary.start_step, summary.steps, summary.wall_s, summary.train_s, summary.tokens_per_s
    );
    if let Some(v) = summary.val {
        let _ = writeln!(
            report,
            "validation: loss {:.4} nats/token, {:.4} bits/byte over {} tokens",
            v.loss, v.bits_per_byte, v.tokens
        );
    }
    let imb: Vec<String> = summary
        .imbalance
        .iter()
        .map(|(l, v)| format!("layer {l}: {v:.2}"))
        .collect();
    let _ = writeln!(report, "expert load max/mean: {}", imb.join(", "));
    let _ = writeln!(
        report,
        "final model: {} (dsv3 score/generate load it); metrics: {}{}",
        summary.final_dir.display(),
        summary.metrics.display(),
        summary
            .plot
            .as_ref()
            .map(|p| format!("; plot: {}", p.display()))
            .unwrap_or_default()
    );
    out.write_all(report.as_bytes())
        .map_err(|e| super::write_err(Path::new("stdout"), e))?;
    if parallel.is_some() || a.pp > 1 {
        if a.samples > 0 {
            let _ = writeln!(
                out,
                "samples skipped in a distributed run: `dsv3 generate --model {}` samples the \
                 final model",
                summary.final_dir.display()
            );
        }
    } else if a.samples > 0 {
        sample(
            &trained,
            &summary.final_dir,
            a.samples,
            a.sample_tokens,
            a.sample_temperature,
            out,
        )?;
    }
    Ok(())
}

/// The flags given with `--resume` that the run does not take (the checkpoint's values hold).
fn ignored_on_resume(a: &TrainArgs) -> Vec<&'static str> {
    [
        ("--preset", a.preset.is_some()),
        ("--config", a.config.is_some()),
        ("--seed", a.seed.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--seq-len", a.seq_len.is_some()),
        ("--grad-accum", a.grad_accum.is_some()),
        ("--lr", a.lr.is_some()),
        ("--warmup", a.warmup.is_some()),
        ("--mtp-lambda", a.mtp_lambda.is_some()),
        ("--balance-alpha", a.balance_alpha.is_some()),
        ("--bias-gamma", a.bias_gamma.is_some()),
        ("--workers", a.workers.is_some()),
        ("--attention", a.attention.is_some()),
        ("--precision", a.precision.is_some()),
        ("--optimizer-state", a.optimizer_state.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect()
}

/// Prompts for the samples: openings that occur in the embedded corpus.
const PROMPTS: &[&str] = &[
    "The router ",
    "/// Loads ",
    "pub fn forward",
    "MLA (multi-head ",
    "let mut ",
];

/// Continuations through the inference engine (`dsv3-infer`): `n` sampled ones (temperature `t`,
/// top-p 0.9, seeded: reproducible), then — when the model has an MTP module — one greedy
/// continuation with MTP speculative decoding (output equal to plain greedy decoding), with its
/// draft acceptance rate. With `t = 0` all are greedy (speculative when possible).
fn sample<B: DsBackend>(
    model: &DeepseekV3<B>,
    dir: &Path,
    n: usize,
    max_new: usize,
    t: f32,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let infer = |e: dsv3_infer::InferError| CliError::Usage(e.to_string());
    let w = |e: std::io::Error| super::write_err(Path::new("stdout"), e);
    let tok = dsv3_infer::Tokenizer::from_dir(dir)
        .map_err(infer)?
        .ok_or_else(|| CliError::Usage(format!("{} has no tokenizer.json", dir.display())))?;
    let mtp = (!model.model.mtp.is_empty()).then_some(dsv3_infer::Speculative::Mtp);
    let run = |prompt: &str,
               opts: &dsv3_infer::GenerateOptions,
               out: &mut dyn Write|
     -> Result<(), CliError> {
        let ids = tok.encode_prompt(prompt).map_err(infer)?;
        let g = dsv3_infer::generate(model, Some(&tok), &ids, opts, |_| {}).map_err(infer)?;
        let accept = g
            .stats
            .speculative
            .as_ref()
            .map(|s| format!(", MTP drafts accepted: {:.0}%", 100.0 * s.acceptance_rate()))
            .unwrap_or_default();
        let how = if opts.sampling.temperature > 0.0 {
            format!(
                "temperature {}, top-p 0.9, seed {}",
                opts.sampling.temperature, opts.sampling.seed
            )
        } else {
            "greedy".into()
        };
        writeln!(
            out,
            "--- {prompt:?} ({how}{accept})\n{prompt}{}",
            g.text.unwrap_or_default()
        )
        .map_err(w)
    };
    writeln!(out, "samples:").map_err(w)?;
    for (i, prompt) in PROMPTS.iter().cycle().take(n).enumerate() {
        let opts = dsv3_infer::GenerateOptions {
            max_new_tokens: max_new,
            sampling: dsv3_infer::SamplingOptions {
                temperature: t,
                top_p: (t > 0.0).then_some(0.9),
                seed: i as u64,
                ..Default::default()
            },
            speculative: if t > 0.0 { None } else { mtp.clone() },
            ..Default::default()
        };
        run(prompt, &opts, out)?;
    }
    if t > 0.0 && mtp.is_some() && n > 0 {
        let opts = dsv3_infer::GenerateOptions {
            max_new_tokens: max_new.min(80),
            sampling: dsv3_infer::SamplingOptions::greedy(),
            speculative: mtp,
            ..Default::default()
        };
        run(PROMPTS[0], &opts, out)?;
    }
    Ok(())
}

/// `LABEL=DIR`.
fn parse_run(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((label, dir)) if !label.is_empty() && !dir.is_empty() => {
            Ok((label.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("expected LABEL=DIR, got {s:?}")),
    }
}

#[derive(Args, Debug)]
pub struct PlotRunsArgs {
    /// A training run as LABEL=DIR (reads DIR/metrics.jsonl); repeat for each run. The first
    /// is the reference the others are compared with.
    #[arg(long = "run", required = true, value_parser = parse_run)]
    pub runs: Vec<(String, PathBuf)>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `dsv3 plot-runs`: the loss curves of several runs in one PNG, and each run's final
/// validation loss against the first's.
pub fn plot_runs(a: &PlotRunsArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut runs = Vec::new();
    for (label, dir) in &a.runs {
        let path = dir.join("metrics.jsonl");
        if !path.is_file() {
            return Err(CliError::Usage(format!(
                "{} has no metrics.jsonl (not a training run directory)",
                dir.display()
            )));
        }
        let records = dsv3_train::metrics::read(&path).map_err(train_err)?;
        if records.is_empty() {
            return Err(CliError::Usage(format!(
                "{} holds no training records (step, loss): plot-runs draws pretraining and \
                 fine-tuning runs, not rl",
                path.display()
            )));
        }
        runs.push((label.clone(), records));
    }
    dsv3_train::compare_runs(&runs, &a.out).map_err(train_err)?;
    let last_val = |r: &[dsv3_train::metrics::LogRecord]| {
        r.iter()
            .rev()
            .find_map(|x| x.val_loss.map(|v| (x.step, v, x.val_bits_per_byte)))
    };
    let base = last_val(&runs[0].1);
    for (label, recs) in &runs {
        let line = match (last_val(recs), base) {
            (Some((step, v, bpb)), Some((_, b, _))) => format!(
                "{label}: final val loss {v:.4} nats/token ({:.3} bits/byte) at step {step}, {:+.3}% vs {}",
                bpb.unwrap_or(f64::NAN),
                100.0 * (v - b) / b,
                runs[0].0
            ),
            _ => format!("{label}: no validation loss recorded"),
        };
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "wrote {}", a.out.display());
    Ok(())
}
