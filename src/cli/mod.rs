//! The `dsv3` command line: argument definitions and the commands, as library code so tests can
//! call them. Every failure is one readable line (`error: ...`) and a non-zero exit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::activation::log_softmax;
use clap::{Args, Parser, Subcommand};

use dsv3_backends::{on_backend, BackendKind, Cpu, DsBackend, FloatDtype, OnBackend};
use dsv3_model::checkpoint::{write_safetensors, Checkpoint, Dtype, TensorSource};
use dsv3_model::{
    AttentionMode, DeepseekV3Config, ForwardOptions, LoadOptions, ModelError, SaveDtype,
    WeightOptions, WeightStorage,
};

pub mod compare;
pub mod dist;
pub mod generate;
pub mod pipeline;
pub mod post;
pub mod rl;
pub mod train;

#[derive(Parser, Debug)]
#[command(
    name = "dsv3",
    version,
    about = "DeepSeek-V3 on Burn: inspect and run DeepSeek-V3-architecture models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a model's config summary, parameter counts, dtypes and memory estimates.
    Inspect(InspectArgs),
    /// Run one forward pass over token ids: per-token NLL, perplexity, optional logits/routing dumps.
    Score(ScoreArgs),
    /// Write a randomly initialised model (config.json + model.safetensors) in the Hugging Face layout.
    Init(InitArgs),
    /// Pretrain a model on text (default: the embedded corpus), then sample continuations.
    Train(train::TrainArgs),
    /// Generate a continuation of a prompt (text or ids), streamed, then one line of statistics.
    Generate(generate::GenerateArgs),
    /// Interactive chat: each stdin line is a user turn; the conversation stays in the cache.
    Chat(generate::ChatArgs),
    /// Run the same input on several backends: max |Δ logits| against a baseline, greedy
    /// agreement, prefill/decode tokens/s.
    Compare(compare::CompareArgs),
    /// Self-checks of a distributed setup (run under `mpirun -n W`): collectives, the expert
    /// exchange, gradients and training steps against single-process references.
    DistCheck(dist::DistCheckArgs),
    /// Write a generated task (no download, fixed by the seed): chat lines for `sft`, prompts
    /// with answers for `eval --task gen`, split into training and held-out files.
    MakeTask(post::MakeTaskArgs),
    /// Evaluate a model: perplexity and bits per byte (ppl), multiple-choice acc/acc_norm (mc),
    /// or generative exact match (gen).
    Eval(post::EvalArgs),
    /// Supervised fine-tuning on chat JSONL: rendered with the model's chat template, loss on
    /// the assistant's tokens only; the training flags, checkpoints and --resume of `train`.
    Sft(post::SftArgs),
    /// Logit distillation: `sft` with (1 − α)·CE + α·τ²·KL(teacher ‖ student) on the
    /// assistant tokens, from a teacher sharing the tokenizer.
    Distill(post::DistillArgs),
    /// Reinforcement learning with GRPO: G sampled completions per prompt, rule rewards against
    /// each line's answer, group-normalised advantages, clipped ratio, KL to the start model.
    Rl(rl::RlArgs),
    /// Draw several training runs' loss curves into one PNG (e.g. f32 / bf16 / fp8 of the same
    /// seed) and print each run's final validation loss against the first's.
    PlotRuns(train::PlotRunsArgs),
    /// Simulate a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev) with per-action costs:
    /// bubble, makespan and peak activations per rank against the report's Table 2, the
    /// timeline as a PNG.
    PipelineSim(pipeline::PipelineSimArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Built-in config: 671b, small, mini or tiny.
    #[arg(long, conflicts_with = "config", required_unless_present = "config", value_parser = model_preset)]
    pub preset: Option<Box<DeepseekV3Config>>,
    /// A config.json to use instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights (normal, std = initializer_range).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stored precision: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: SaveDtype,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "config", "preset"])))]
pub struct InspectArgs {
    /// Model directory (config.json + model.safetensors or model.safetensors.index.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Inspect a built-in config instead of a directory: 671b, small, mini or tiny.
    #[arg(long, value_parser = model_preset)]
    pub preset: Option<Box<DeepseekV3Config>>,
    /// Inspect a config.json file alone (no checkpoint), e.g. a released model's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also load every tensor (as `score` would) and report load time, throughput and peak
    /// memory (with `--model`).
    #[arg(long)]
    pub load: bool,
    /// Backend to load on with `--load`: flex (alias cpu), or wgpu / cuda when built with them.
    #[arg(long, default_value = "flex", requires = "load", value_parser = BackendKind::parse)]
    pub backend: BackendKind,
    /// How `--load` holds the Linear weights: f32, bf16 or fp8 (as `generate --weights`).
    #[arg(long, default_value = "f32", requires = "load")]
    pub weights: WeightStorage,
    /// Also print training memory per GPU for f32, bf16 and fp8 training (weights, master
    /// weights, gradients, AdamW moments, saved Linear inputs) under --gpus / --pp / --ep.
    #[arg(long)]
    pub training: bool,
    /// GPUs of the training layout (with --training; default: the report's 2048).
    #[arg(long, default_value_t = 2048, requires = "training")]
    pub gpus: u64,
    /// Pipeline stages of the training layout (default: the report's 16).
    #[arg(long, default_value_t = 16, requires = "training")]
    pub pp: u64,
    /// Expert-parallel ranks per stage (default: the report's 64); the rest are ZeRO-1 replicas.
    #[arg(long, default_value_t = 64, requires = "training")]
    pub ep: u64,
}

/// A built-in model config by name, looked up while parsing (an unknown name is a usage error,
/// exit 2).
fn model_preset(name: &str) -> Result<Box<DeepseekV3Config>, String> {
    DeepseekV3Config::preset(name)
        .map(Box::new)
        .ok_or_else(|| unknown_preset("preset", name, DeepseekV3Config::PRESETS))
}

/// `unknown preset "x" (available: a, b)`.
pub(crate) fn unknown_preset(what: &str, name: &str, available: &[&str]) -> String {
    format!(
        "unknown {what} {name:?} (available: {})",
        available.join(", ")
    )
}

/// Where and how a command runs the model (`score`, `generate`, `chat`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Backend to run on: flex (alias cpu), or wgpu / cuda when built with those features.
    #[arg(long, default_value = "flex", value_parser = BackendKind::parse)]
    pub backend: BackendKind,
    /// Float type of weights and activations: f32, or bf16 / f16 where the backend has them (cuda).
    #[arg(long, default_value = "f32", value_parser = FloatDtype::parse)]
    pub dtype: FloatDtype,
    /// How Linear weights are held: f32 (FP8 dequantized while loading), bf16 (half the bytes;
    /// widened inside the products) or fp8 (an FP8 checkpoint's e4m3 codes + block scales,
    /// about half the bytes of bf16, dequantized inside the matmul).
    #[arg(long, default_value = "f32")]
    pub weights: WeightStorage,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Model directory (config.json + safetensors checkpoint, F32/BF16/F16/FP8).
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. 0,15,7 (each must be < vocab_size).
    #[arg(long)]
    pub tokens: String,
    /// Absolute position of the first token (RoPE/YaRN position).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Also run the first MTP module: writes `mtp_logits` [T-1, vocab] (row i predicts token i+2).
    #[arg(long)]
    pub mtp: bool,
    /// Write `logits` (f32 [T, vocab]) and, with --mtp, `mtp_logits` to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write every MoE layer's expert ids and weights per token to this JSON file.
    #[arg(long)]
    pub routing: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Attention form: auto (the cheaper of the two for each call: naive for prompts, absorbed
    /// for decode), absorbed (attention over the latent) or naive (per-head k/v).
    #[arg(long, default_value = "auto")]
    pub attention: AttentionMode,
    /// Fail if the checkpoint holds tensors the model does not use (default: report them).
    #[arg(long)]
    pub strict: bool,
    /// Expert parallelism: split the routed experts over this many processes (start them with
    /// `mpirun -n N`; each reads only its own experts). Rank 0 prints and writes the files.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
}

/// A command's failure: one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] dsv3_backends::UnknownBackend),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    /// A distributed command's error, already printed by the rank(s) that had to
    /// ([`dist::agree`]): the process exits non-zero without printing again.
    #[error("(reported above)")]
    Reported,
}

/// Runs a parsed command, writing its report to `out`.
/// Keeps freed buffers in the process heap from now on (glibc only). glibc hands every block
/// above its mmap threshold back to the OS when freed, so each forward pays first-touch page
/// faults again for its score and activation buffers: ~15% of a prefill on the small preset.
/// Called by the inference commands once the weights are loaded (loading itself is faster with
/// mmapped blocks, which grow by `mremap`). Libraries should leave the allocator to the program.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is valid for these two.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Parses a command line (`args[0]` is the program name). Usage errors come back as one line
/// (clap's message with its hints folded in); `--help` and `--version` come back as `Ok(None)`
/// after printing.
pub fn parse_args<I, T>(args: I) -> Result<Option<Cli>, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(Some(cli)),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            Ok(None)
        }
        Err(e) => {
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            let line = line.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            Err(format!("{line} (see --help)"))
        }
    }
}

pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Inspect(a) => inspect(&a, out),
        Command::Score(a) => score(&a, out),
        Command::Init(a) => init(&a, out),
        Command::Train(a) => train::train(&a, out),
        Command::Generate(a) => generate::generate_cmd(&a, out),
        Command::Chat(a) => generate::chat_cmd(&a, out),
        Command::Compare(a) => compare::compare(&a, out),
        Command::DistCheck(a) => dist::dist_check(&a, out),
        Command::MakeTask(a) => post::make_task(&a, out),
        Command::Eval(a) => post::eval_cmd(&a, out),
        Command::Sft(a) => post::sft(&a, out),
        Command::Distill(a) => post::distill(&a, out),
        Command::Rl(a) => rl::rl(&a, out),
        Command::PlotRuns(a) => train::plot_runs(&a, out),
        Command::PipelineSim(a) => pipeline::pipeline_sim(&a, out),
    }
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

pub(crate) fn gib(bytes: f64) -> String {
    if bytes >= 1024f64.powi(3) {
        format!("{:.2} GiB", bytes / 1024f64.powi(3))
    } else {
        format!("{:.2} MiB", bytes / 1024f64.powi(2))
    }
}

pub fn inspect(a: &InspectArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if a.load && a.model.is_none() {
        return Err(CliError::Usage(
            "--load needs --model DIR (a checkpoint to load); --config and --preset have none"
                .into(),
        ));
    }
    let (cfg, ckpt) = if let Some(dir) = &a.model {
        if !dir.is_dir() {
            return Err(CliError::Usage(format!(
                "model directory {} does not exist",
                dir.display()
            )));
        }
        let path = dir.join("config.json");
        let (cfg, unset) = DeepseekV3Config::from_file_unset(&path).map_err(ModelError::from)?;
        if !unset.is_empty() {
            warn(format_args!(
                "{} does not set {}: HF's defaults (the 671B model's sizes) are shown",
                path.display(),
                unset.join(", ")
            ));
        }
        (cfg, Some(Checkpoint::open(dir).map_err(ModelError::from)?))
    } else if let Some(cfg) = &a.preset {
        (DeepseekV3Config::clone(cfg), None)
    } else if let Some(path) = &a.config {
        (
            DeepseekV3Config::from_file(path).map_err(ModelError::from)?,
            None,
        )
    } else {
        return Err(CliError::Usage(
            "give --model DIR, --config FILE or --preset NAME".into(),
        ));
    };
    let mtp_present = match &ckpt {
        Some(c) => {
            let prefix = format!("model.layers.{}.", cfg.mtp_layer(0));
            cfg.num_nextn_predict_layers > 0 && c.names().any(|n| n.starts_with(&prefix))
        }
        None => cfg.num_nextn_predict_layers > 0,
    };
    let counts = cfg.param_counts(mtp_present);
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(c) = &ckpt {
        for n in c.names() {
            if let Some(i) = c.info(n) {
                *dtypes.entry(format!("{:?}", i.dtype)).or_default() += 1;
            }
        }
    }
    let n = counts.total as f64;
    let mem = [
        ("f32", n * 4.0),
        ("bf16", n * 2.0),
        ("fp8 (+block scales)", n * (1.0 + 4.0 / 16384.0)),
    ];
    let dense = cfg.first_k_dense_replace.min(cfg.num_hidden_layers);
    let layout = dsv3_train::memory::Layout {
        gpus: a.gpus,
        pp: a.pp,
        ep: a.ep,
    };
    let training = if a.training {
        Some(
            dsv3_train::memory::per_gpu(&cfg, layout)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        )
    } else {
        None
    };
    if a.json {
        let j = serde_json::json!({
            "config": serde_json::to_value(&cfg).unwrap_or_default(),
            "params_total": counts.total,
            "params_active_per_token": counts.active_per_token,
            "params_mtp": counts.mtp,
            "dense_layers": dense,
            "moe_layers": cfg.num_hidden_layers - dense,
            "mtp_present": mtp_present,
            "checkpoint_dtypes": dtypes,
            "checkpoint_bytes": ckpt.as_ref().map(|c| c.total_bytes()),
            "memory_bytes": mem.iter().map(|(k, v)| (k.to_string(), *v as u64)).collect::<BTreeMap<_, _>>(),
            "training_memory_per_gpu": training.as_ref().map(|t| serde_json::json!({
                "gpus": layout.gpus, "pp": layout.pp, "ep": layout.ep,
                "rows": t.iter().map(|m| serde_json::json!({
                    "precision": m.precision.name(),
                    "weights": m.weights as u64,
                    "master_weights": m.master as u64,
                    "gradients": m.grads as u64,
                    "moments_f32": m.moments_f32 as u64,
                    "moments_bf16": m.moments_bf16 as u64,
                    "activations_per_token_layer": m.activations_per_token_layer as u64,
                    "activations_per_4096_sequence_stage": m.activations_per_sequence as u64,
                })).collect::<Vec<_>>(),
            })),
        });
        writeln!(out, "{j}").map_err(|e| write_err(Path::new("stdout"), e))?;
        return Ok(());
    }
    let q = match cfg.q_lora_rank {
        Some(r) => format!("q-LoRA rank {r}"),
        None => "direct q_proj".into(),
    };
    let rope = match cfg.yarn() {
        Some(y) => format!(
            "YaRN factor {} (original {} positions), theta {}",
            y.factor,
            y.original_max_position_embeddings,
            cfg.rope_base()
        ),
        None => format!("plain RoPE, theta {}", cfg.rope_base()),
    };
    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "DeepSeek-V3 architecture: {} layers ({} dense, {} MoE), hidden {}, vocab {}",
        cfg.num_hidden_layers,
        dense,
        cfg.num_hidden_layers - dense,
        cfg.hidden_size,
        cfg.vocab_size
    );
    let _ = writeln!(
        s,
        "attention: MLA, {} heads, {q}, kv latent {}, head dims nope {} / rope {} / v {}",
        cfg.num_attention_heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim
    );
    let _ = writeln!(s, "rope: {rope}");
    let _ = writeln!(s, "MoE: {} routed experts (width {}) in {} groups, top-{} from {} groups, {} shared, scale {}", cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.n_group, cfg.num_experts_per_tok, cfg.topk_group, cfg.n_shared_experts, cfg.routed_scaling_factor);
    let _ = writeln!(s, "dense MLP width: {}", cfg.intermediate_size);
    let _ = writeln!(
        s,
        "MTP modules: {} in config, {}",
        cfg.num_nextn_predict_layers,
        if mtp_present { "present" } else { "absent" }
    );
    let _ = writeln!(
        s,
        "parameters: {} total ({:.3} B), {} active per token ({:.3} B), MTP {}",
        counts.total,
        n / 1e9,
        counts.active_per_token,
        counts.active_per_token as f64 / 1e9,
        counts.mtp
    );
    let _ = writeln!(
        s,
        "KV cache (latent): {} values per layer per token ({} bytes in f32)",
        cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    );
    if let Some(c) = &ckpt {
        let _ = writeln!(
            s,
            "checkpoint: {} tensors, {}, dtypes {:?}",
            c.names().count(),
            gib(c.total_bytes() as f64),
            dtypes
        );
    }
    for (k, v) in mem {
        let _ = writeln!(s, "memory for weights as {k}: {}", gib(v));
    }
    if let Some(rows) = &training {
        let _ = writeln!(
            s,
            "training memory per GPU ({} GPUs: {} pipeline stages x {} expert-parallel ranks, ZeRO-1 over the rest):",
            layout.gpus, layout.pp, layout.ep
        );
        let _ = writeln!(
            s,
            "  precision  weights    master     grads      moments f32/bf16       sum (f32 / bf16 moments)  Linear inputs per token-layer, per 4096-token sequence-stage"
        );
        for m in rows {
            let base = m.weights + m.master + m.grads;
            let _ = writeln!(
                s,
                "  {:<9}  {:<9}  {:<9}  {:<9}  {:<9} / {:<9}  {:<9} / {:<9}      {:.0} B, {}",
                m.precision.name(),
                gib(m.weights),
                gib(m.master),
                gib(m.grads),
                gib(m.moments_f32),
                gib(m.moments_bf16),
                gib(base + m.moments_f32),
                gib(base + m.moments_bf16),
                m.activations_per_token_layer,
                gib(m.activations_per_sequence)
            );
        }
    }
    out.write_all(s.as_bytes())
        .map_err(|e| write_err(Path::new("stdout"), e))?;
    if a.load {
        if let Some(dir) = &a.model {
            struct Run<'a>(&'a InspectArgs, &'a Path);
            impl OnBackend for Run<'_> {
                type Output = Result<String, CliError>;
                fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
                    load_report::<B>(self.1, kind, self.0.weights)
                }
            }
            let line = on_backend(a.backend, FloatDtype::F32, Run(a, dir))??;
            out.write_all(line.as_bytes())
                .map_err(|e| write_err(Path::new("stdout"), e))?;
        }
    }
    Ok(())
}

/// Loads `dir` on `B` with the weights held as `weights`; one line of time, throughput and
/// peak memory (against the bytes the loaded weights hold).
fn load_report<B: DsBackend>(
    dir: &Path,
    kind: BackendKind,
    weights: WeightStorage,
) -> Result<String, CliError> {
    let t0 = std::time::Instant::now();
    let (mut model, report) = dsv3_model::load_with::<B>(
        dir,
        &Default::default(),
        &LoadOptions::default(),
        &weight_options(kind, weights),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    print_load_warnings(&report);
    let loaded = model.weight_bytes() as f64;
    let peak = peak_rss_bytes();
    Ok(format!(
        "loaded {} parameters ({} as held, Linear weights as {weights}) from {} of files in {:.2} s ({:.2} GB/s of file); peak RSS {} = {:.2}x the loaded weights\n",
        report.params,
        gib(loaded),
        gib(report.file_bytes as f64),
        secs,
        report.file_bytes as f64 / secs / 1e9,
        peak.map(|p| gib(p as f64)).unwrap_or_else(|| "unknown".into()),
        peak.map(|p| p as f64 / loaded).unwrap_or(f64::NAN),
    ))
}

/// Prints what loading did other than as written (one `warning:` line each, on stderr).
pub fn print_load_warnings(report: &dsv3_model::LoadReport) {
    for w in &report.warnings {
        warn(format_args!("{w}"));
    }
    if let Some(first) = report.unexpected.first() {
        warn(format_args!(
            "{} checkpoint tensor(s) not used by the model, e.g. {first}",
            report.unexpected.len(),
        ));
    }
}

/// Refuses a fresh run into `out` when it holds a saved model (step checkpoints or `final/`)
/// that the run would overwrite.
fn refuse_saved_run(out: &Path) -> Result<(), CliError> {
    if !dsv3_train::holds_saved_model(out) {
        return Ok(());
    }
    let how = if dsv3_train::has_checkpoint(out) {
        "continue with --resume, or give another --out"
    } else {
        "it has no step checkpoint to resume from: give another --out"
    };
    Err(CliError::Usage(format!(
        "{} already holds a saved run (checkpoints or final/): {how}",
        out.display()
    )))
}

/// One line on stderr, ignoring a closed stderr (`eprintln!` would panic on a broken pipe).
pub fn note(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A `warning: ` line on stderr ([`note`]).
pub fn warn(line: std::fmt::Arguments) {
    note(format_args!("warning: {line}"));
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn init(a: &InitArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let cfg = match (&a.preset, &a.config) {
        (Some(cfg), _) => DeepseekV3Config::clone(cfg),
        (None, Some(path)) => DeepseekV3Config::from_file(path).map_err(ModelError::from)?,
        (None, None) => {
            return Err(CliError::Usage(
                "give --preset NAME or --config FILE".into(),
            ))
        }
    };
    let counts = cfg.param_counts(true);
    if counts.total > 20_000_000_000 {
        return Err(CliError::Usage(format!(
            "refusing to materialise {} random parameters; init is for small models",
            counts.total
        )));
    }
    let device = Default::default();
    <Cpu as burn::tensor::backend::Backend>::seed(&device, a.seed);
    let mut cfg = cfg;
    cfg.quantization_config = None;
    let model = dsv3_model::DeepseekV3::<Cpu>::init(&cfg, &device)?;
    dsv3_model::save(&model, &a.out, a.dtype)?;
    writeln!(
        out,
        "wrote {} ({} parameters, {})",
        a.out.display(),
        counts.total,
        a.dtype
    )
    .map_err(|e| write_err(Path::new("stdout"), e))?;
    Ok(())
}

/// Parses `0,15,7` into ids.
pub fn parse_tokens(s: &str) -> Result<Vec<u32>, CliError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(CliError::Usage(
            "--tokens is empty: give comma-separated token ids, e.g. 0,15,7".into(),
        ));
    }
    s.split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>().map_err(|_| {
                CliError::Usage(if t.parse::<u128>().is_ok() {
                    format!("--tokens: {t} is above the largest token id, {}", u32::MAX)
                } else {
                    format!("--tokens: {t:?} is not a non-negative integer token id")
                })
            })
        })
        .collect()
}

pub fn score(a: &ScoreArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (world, comm) = dist::ep_world(a.ep)?;
    let ids = dist::agree(&world.comm, parse_tokens(&a.tokens), "tokens")?;
    let mut sink = std::io::sink();
    let out = dist::lead_output(&world.comm, out, &mut sink);
    struct Run<'a>(
        &'a ScoreArgs,
        &'a [u32],
        Option<std::sync::Arc<dyn dsv3_backends::comm::Communicator>>,
        &'a mut dyn Write,
    );
    impl OnBackend for Run<'_> {
        type Output = Result<(), CliError>;
        fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
            score_on::<B>(self.0, self.1, kind, self.2, self.3)
        }
    }
    let (kind, dtype) = (a.run.backend, a.run.dtype);
    on_backend(kind, dtype, Run(a, &ids, comm, out))?
}

/// How a backend holds the weights: the GPU backends run the routed experts through the grouped
/// MoE kernels (packed); the CPU keeps the per-expert form (bit-identical to the reference path).
pub fn weight_options(kind: BackendKind, weights: WeightStorage) -> WeightOptions {
    WeightOptions {
        storage: weights,
        pack_experts: kind != BackendKind::Flex || weights == WeightStorage::Fp8,
    }
}

/// `-log p(targets[i])` under row i of `logits: [1, R, vocab]` (rows past the targets unused).
pub(crate) fn target_nlls<B: DsBackend>(
    logits: burn::tensor::Tensor<B, 3>,
    targets: &[u32],
    vocab: usize,
) -> Result<Vec<f64>, CliError> {
    let logp: Vec<f32> = log_softmax(logits, 2)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| CliError::Usage(format!("{e:?}")))?;
    Ok(targets
        .iter()
        .enumerate()
        .map(|(i, &id)| -(logp[i * vocab + id as usize] as f64))
        .collect())
}

/// `mean nll …, perplexity … over N predicted tokens` (`None` when nothing was predicted).
fn mean_line(nll: &[f64]) -> Option<String> {
    (!nll.is_empty()).then(|| {
        let mean = nll.iter().sum::<f64>() / nll.len() as f64;
        format!(
            "mean nll {:.6}, perplexity {:.4} over {} predicted tokens",
            mean,
            mean.exp(),
            nll.len()
        )
    })
}

fn score_on<B: DsBackend>(
    a: &ScoreArgs,
    ids: &[u32],
    kind: BackendKind,
    comm: Option<std::sync::Arc<dyn dsv3_backends::comm::Communicator>>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let device = B::Device::default();
    let lead = comm.as_ref().is_none_or(|c| c.rank() == 0);
    // Everything up to the forward pass fails alike on every rank: they agree before it.
    let loaded = (|| -> Result<_, CliError> {
        let opts = LoadOptions {
            strict: a.strict,
            skip_mtp: !a.mtp,
            expert_shard: comm.as_ref().map(|c| (c.rank(), c.size())),
            held: None,
        };
        let mut weights = weight_options(kind, a.run.weights);
        // Expert-parallel layers run their experts unpacked (the exchange is host-staged).
        weights.pack_experts &= comm.is_none();
        let (mut model, report) = dsv3_model::load_with::<B>(&a.model, &device, &opts, &weights)?;
        if let Some(c) = &comm {
            model.set_expert_parallel(c.clone())?;
        }
        if a.mtp && model.model.mtp.is_empty() {
            if lead {
                // The warnings say why a declared MTP layer was not loaded.
                print_load_warnings(&report);
            }
            return Err(ModelError::NoMtp(format!(
                "{} loaded without an MTP module (num_nextn_predict_layers = 0, or its tensors \
                 are not in the checkpoint)",
                a.model.display()
            ))
            .into());
        }
        if a.mtp && ids.len() < 2 {
            return Err(ModelError::NoMtp(format!(
                "--mtp needs at least 2 tokens (got {})",
                ids.len()
            ))
            .into());
        }
        let tokens = model.tokens_tensor(ids)?;
        dsv3_model::check_positions(a.offset, ids.len())?;
        Ok((model, report, tokens))
    })();
    let (model, report, tokens) = match &comm {
        Some(c) => dist::agree(c, loaded, "loading")?,
        None => loaded?,
    };
    keep_freed_buffers();
    if lead {
        print_load_warnings(&report);
    }
    let fopts = ForwardOptions {
        attention: a.attention,
        record_routing: a.routing.is_some(),
        ..Default::default()
    };
    let fwd = model.forward(tokens.clone(), a.offset, None, &fopts);
    let t = ids.len();
    let vocab = model.config.vocab_size;
    // Row i of the logits predicts token i+1.
    let nll = target_nlls(fwd.logits.clone(), &ids[1..], vocab)?;
    let mut report_s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(report_s, "{:>5} {:>8} {:>12}", "pos", "token", "nll");
    let _ = writeln!(report_s, "{:>5} {:>8} {:>12}", a.offset, ids[0], "-");
    for (i, v) in nll.iter().enumerate() {
        let _ = writeln!(
            report_s,
            "{:>5} {:>8} {:>12.6}",
            a.offset + i + 1,
            ids[i + 1],
            v
        );
    }
    match mean_line(&nll) {
        Some(line) => {
            let _ = writeln!(report_s, "{line}");
        }
        None => {
            let _ = writeln!(
                report_s,
                "one token: nothing to predict (logits are still written with --out)"
            );
        }
    }

    let mut routing = fwd.routing.clone();
    let mut mtp_logits = None;
    if a.mtp {
        let m = model.mtp_logits(tokens, &fwd, a.offset, &fopts)?;
        if let Some(r) = m.routing.clone() {
            routing.push(r);
        }
        // Row i predicts token i+2.
        let nll = target_nlls(m.logits.clone(), ids.get(2..).unwrap_or(&[]), vocab)?;
        if let Some(line) = mean_line(&nll) {
            let _ = writeln!(report_s, "MTP (token i+2): {line}");
        }
        mtp_logits = Some(m.logits);
    }
    if let Some(c) = &comm {
        let line = dist::peak_rss_line(c)?;
        let _ = writeln!(report_s, "{line}");
    }
    if !lead {
        return Ok(());
    }
    if let Some(path) = &a.out {
        // Each tensor is copied off the device when the writer reaches it.
        let f32_values =
            |x: burn::tensor::Tensor<B, 3>| -> dsv3_model::checkpoint::Values<'static> {
                Box::new(move || {
                    x.into_data()
                        .convert::<f32>()
                        .into_vec()
                        .map_err(|e| format!("{e:?}"))
                })
            };
        let mut tensors = vec![(
            "logits".to_string(),
            TensorSource {
                dtype: Dtype::F32,
                shape: vec![t, vocab],
                values: f32_values(fwd.logits),
            },
        )];
        if let Some(m) = mtp_logits {
            tensors.push((
                "mtp_logits".to_string(),
                TensorSource {
                    dtype: Dtype::F32,
                    shape: vec![t - 1, vocab],
                    values: f32_values(m),
                },
            ));
        }
        write_safetensors(path, tensors, None).map_err(|e| write_err(path, e))?;
        let _ = writeln!(report_s, "wrote {}", path.display());
    }
    if let Some(path) = &a.routing {
        let layers: Vec<serde_json::Value> = routing
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({
                    "layer": r.layer,
                    "experts": r.routing.experts,
                    "weights": r.routing.weights,
                });
                if r.mtp {
                    v["mtp"] = serde_json::Value::Bool(true);
                }
                v
            })
            .collect();
        let j = serde_json::json!({ "layers": layers });
        std::fs::write(path, j.to_string()).map_err(|e| write_err(path, e))?;
        let _ = writeln!(report_s, "wrote {}", path.display());
    }
    out.write_all(report_s.as_bytes())
        .map_err(|e| write_err(Path::new("stdout"), e))?;
    Ok(())
}
