//! `dsv3 rl`: GRPO with rule-based rewards. Each step draws `--prompts-per-step` prompts (a
//! seeded order, epoch by epoch), samples `--group-size` completions of each in one batched
//! generation with the KV cache ([`dsv3_infer::generate_batch`] on the current policy), scores
//! them with the rule ([`dsv3_train::reward`]) against the line's `answer`, and hands the groups
//! to [`dsv3_train::rl::GrpoTrainer`]. Writes `metrics.jsonl` (one line per step), `rl.png` and
//! `final/` (the trained model with the starting model's tokenizer and template).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use dsv3_backends::{CpuAutodiff, SplitMix64};
use dsv3_infer::{generate_batch, GenerateOptions, SamplingOptions, Tokenizer};
use dsv3_model::DeepseekV3;
use dsv3_train::reward::{think_format, RuleReward};
use dsv3_train::rl::{Group, GrpoConfig, GrpoTrainer, RlRecord};

use super::post::{read_gen, tokenizer_files, GenItem};
use super::CliError;

/// The rule a completion is scored with against its line's `answer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RewardKind {
    /// The trimmed completion equals the answer.
    Exact,
    /// The completion's last number equals the answer.
    Number,
    /// --answer-regex's first capture group (or whole match) equals the answer.
    Regex,
}

#[derive(Args, Debug)]
pub struct RlArgs {
    /// Starting model directory (Hugging Face layout, with tokenizer.json); also the frozen
    /// reference of the KL penalty.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL of {"prompt", "answer"} lines (e.g. make-task's train_prompts.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: metrics.jsonl, rl.png, final/.
    #[arg(long, default_value = "runs/rl")]
    pub out: PathBuf,
    /// GRPO steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 4)]
    pub prompts_per_step: usize,
    /// G: completions sampled per prompt (at least 2; advantages are normalised in the group).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Longest completion, in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (log-probabilities are taken at the same temperature).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Render each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Also stop a completion at this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long, value_enum, default_value_t = RewardKind::Number)]
    pub reward: RewardKind,
    /// The pattern of --reward regex.
    #[arg(long)]
    pub answer_regex: Option<String>,
    /// Weight of the format reward (1 for a leading <think>…</think> block followed by an
    /// answer), added to the rule's 0/1.
    #[arg(long, default_value_t = 0.0)]
    pub format_reward: f64,
    /// Peak learning rate (after --warmup steps of linear warm-up; then constant).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// β: weight of the k3 KL penalty against the starting model (0: no reference kept).
    #[arg(long, default_value_t = 0.04)]
    pub beta: f64,
    /// ε: clip range of the policy ratio.
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// μ: updates per batch of samples.
    #[arg(long, default_value_t = 1)]
    pub iterations: usize,
    /// Held-out {"prompt", "answer"} JSONL: greedy exact match before training, every
    /// --eval-every steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (0: only before and after).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Evaluate on the first N held-out lines only.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Seed of the prompt order and of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `dsv3 rl`.
pub fn rl(a: &RlArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let usage = |m: String| Err(CliError::Usage(m));
    if a.group_size < 2 {
        return usage(format!(
            "--group-size {}: GRPO normalises rewards within a group, so it needs at least 2 completions per prompt",
            a.group_size
        ));
    }
    if a.prompts_per_step == 0 || a.steps == 0 || a.max_new_tokens == 0 {
        return usage("--steps, --prompts-per-step and --max-new-tokens must be >= 1".into());
    }
    if !(a.format_reward.is_finite() && a.format_reward >= 0.0) {
        return usage(format!("--format-reward {} must be >= 0", a.format_reward));
    }
    let name = match a.reward {
        RewardKind::Exact => "exact",
        RewardKind::Number => "number",
        RewardKind::Regex => "regex",
    };
    let rule = RuleReward::parse(name, a.answer_regex.as_deref()).map_err(invalid)?;
    let cfg = GrpoConfig {
        lr: a.lr,
        warmup_steps: a.warmup,
        epsilon: a.epsilon,
        beta: a.beta,
        iterations: a.iterations,
        temperature: a.temperature,
        ..Default::default()
    };
    cfg.validate().map_err(invalid)?;
    let tok = Tokenizer::from_dir(&a.model)
        .map_err(|e| CliError::Usage(e.to_string()))?
        .ok_or_else(|| {
            CliError::Usage(format!(
                "rl needs the model's tokenizer to score completions: {} has no tokenizer.json",
                a.model.display()
            ))
        })?;
    if a.chat && !tok.has_chat_template() {
        return usage(format!(
            "--chat needs a chat template: {} has neither {} nor a chat_template key in tokenizer_config.json",
            a.model.display(),
            dsv3_infer::CHAT_TEMPLATE_FILE
        ));
    }
    if a.out.join("metrics.jsonl").exists() || dsv3_train::holds_saved_model(&a.out) {
        return usage(format!(
            "{} already holds an RL run: give another --out",
            a.out.display()
        ));
    }
    // Read now, so that an unreadable file fails before the training, not after it.
    let tokenizer_files = tokenizer_files(&a.model)?;
    let items = read_gen(&a.data, &tok, a.chat, a.system.as_deref())?;
    let held_out = match &a.eval_data {
        Some(p) => {
            let mut v = read_gen(p, &tok, a.chat, a.system.as_deref())?;
            if let Some(n) = a.eval_limit {
                v.truncate(n.max(1));
            }
            v
        }
        None => Vec::new(),
    };
    let device = Default::default();
    let (model, report) = dsv3_model::load::<CpuAutodiff>(&a.model, &device, &Default::default())?;
    super::print_load_warnings(&report);
    let vocab = model.config.vocab_size;
    if let Some((i, id)) = items.iter().enumerate().find_map(|(i, it)| {
        it.ids
            .iter()
            .find(|&&t| t as usize >= vocab)
            .map(|&t| (i, t))
    }) {
        return usage(format!(
            "{}: prompt {} holds token id {id}, not below the model's vocab_size = {vocab}",
            a.data.display(),
            i + 1
        ));
    }
    let mut trainer = GrpoTrainer::new(model, cfg, &device).map_err(invalid)?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", a.out.display())))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", metrics_path.display())))?;
    let mut say = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(&format!(
        "rl: {} prompts, {} per step × {} completions, {} steps, reward {name}{}; lr {}, β {}, ε {}, μ {}, τ {}",
        items.len(),
        a.prompts_per_step,
        a.group_size,
        a.steps,
        if a.format_reward > 0.0 {
            format!(" + {} × think format", a.format_reward)
        } else {
            String::new()
        },
        a.lr,
        a.beta,
        a.epsilon,
        a.iterations,
        a.temperature
    ));
    let eval = |m: &DeepseekV3<dsv3_backends::Cpu>| -> Result<Option<f64>, CliError> {
        if held_out.is_empty() {
            return Ok(None);
        }
        exact_match(m, &tok, &held_out, a.max_new_tokens, &a.stop).map(Some)
    };
    let eval0 = eval(&trainer.sampler())?;
    if let Some(e) = eval0 {
        say(&format!(
            "held-out exact match before training: {e:.4} ({} prompts)",
            held_out.len()
        ));
    }
    let t0 = Instant::now();
    let mut order = Order::new(items.len(), a.seed);
    let mut records = Vec::with_capacity(a.steps);
    for step in 1..=a.steps {
        let picked: Vec<&GenItem> = (0..a.prompts_per_step)
            .map(|_| &items[order.next()])
            .collect();
        let rows: Vec<Vec<u32>> = picked
            .iter()
            .flat_map(|it| std::iter::repeat_n(it.ids.clone(), a.group_size))
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling: SamplingOptions {
                temperature: a.temperature as f32,
                // Row r samples from stream seed + r: steps get disjoint streams.
                seed: a
                    .seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((step * rows.len()) as u64),
                ..Default::default()
            },
            stop_strings: a.stop.clone(),
            ..Default::default()
        };
        let gens = generate_batch(&trainer.sampler(), Some(&tok), &rows, &opts, |_| {})
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let (mut groups, mut correct) = (Vec::with_capacity(picked.len()), 0usize);
        for (it, gs) in picked.iter().zip(gens.chunks(a.group_size)) {
            let mut rewards = Vec::with_capacity(gs.len());
            for g in gs {
                let text = g.text.as_deref().unwrap_or("");
                let r = rule.score(text, &it.answer);
                correct += usize::from(r == 1.0);
                rewards.push(r + a.format_reward * think_format(text));
            }
            groups.push(Group {
                prompt: it.ids.clone(),
                completions: gs.iter().map(|g| g.tokens.clone()).collect(),
                rewards,
            });
        }
        let stats = trainer
            .step(&groups)
            .map_err(|e| CliError::Usage(format!("step {step}: {}", message(e))))?;
        let due = a.eval_every > 0 && step % a.eval_every == 0 || step == a.steps;
        let eval_exact_match = if due { eval(&trainer.sampler())? } else { None };
        let record = RlRecord {
            stats,
            accuracy: correct as f64 / rows.len() as f64,
            eval_exact_match,
            elapsed_s: t0.elapsed().as_secs_f64(),
        };
        let line = serde_json::to_string(&record).expect("serialisable");
        writeln!(metrics, "{line}")
            .and_then(|_| metrics.flush())
            .map_err(|e| {
                CliError::Usage(format!("cannot write {}: {e}", metrics_path.display()))
            })?;
        say(&format!(
            "step {step}/{}  reward {:.3} (sd {:.3})  accuracy {:.3}  kl {:.5}  length {:.1}  loss {:.4}  grad norm {:.3}  lr {:.2e}{}  {:.1} s",
            a.steps,
            stats.reward,
            stats.reward_std,
            record.accuracy,
            stats.kl,
            stats.completion_len,
            stats.loss,
            stats.grad_norm,
            stats.lr,
            eval_exact_match
                .map(|e| format!("  held-out exact match {e:.4}"))
                .unwrap_or_default(),
            record.elapsed_s
        ));
        records.push(record);
    }
    let final_dir = a.out.join("final");
    let files: Vec<(&str, Vec<u8>)> = tokenizer_files
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    dsv3_train::checkpoint::write_atomically(&trainer.sampler(), &final_dir, &files)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let png = a.out.join("rl.png");
    let plot = match dsv3_train::rl::draw(&records, eval0, &png) {
        Ok(()) => format!("; plot: {}", png.display()),
        Err(e) => {
            say(&format!("warning: {e}"));
            String::new()
        }
    };
    let first = records.first().map_or(0.0, |r| r.stats.reward);
    let last = records.last().map_or(0.0, |r| r.stats.reward);
    let mut report = format!(
        "rl: {} steps in {:.1} s; mean reward {first:.3} at step 1, {last:.3} at step {}\n",
        a.steps,
        t0.elapsed().as_secs_f64(),
        a.steps
    );
    if let (Some(e0), Some(e1)) = (eval0, records.last().and_then(|r| r.eval_exact_match)) {
        report += &format!("held-out exact match: {e0:.4} before, {e1:.4} after\n");
    }
    report += &format!(
        "final model: {}; metrics: {}{plot}\n",
        final_dir.display(),
        metrics_path.display()
    );
    out.write_all(report.as_bytes())
        .map_err(|e| CliError::Usage(format!("cannot write the report: {e}")))
}

/// A training error's message without the `invalid training setting:` prefix (the CLI's
/// one line names the flag's value already).
fn message(e: dsv3_train::TrainError) -> String {
    match e {
        dsv3_train::TrainError::Invalid(m) => m,
        other => other.to_string(),
    }
}

fn invalid(e: dsv3_train::TrainError) -> CliError {
    CliError::Usage(message(e))
}

/// Greedy exact match ([`dsv3_train::eval::exact_match`]) over `items`, 16 prompts per batch.
fn exact_match(
    model: &DeepseekV3<dsv3_backends::Cpu>,
    tok: &Tokenizer,
    items: &[GenItem],
    max_new_tokens: usize,
    stop: &[String],
) -> Result<f64, CliError> {
    let opts = GenerateOptions {
        max_new_tokens,
        stop_strings: stop.to_vec(),
        ..Default::default()
    };
    let mut correct = 0;
    for batch in items.chunks(16) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|i| i.ids.clone()).collect();
        let gens = generate_batch(model, Some(tok), &prompts, &opts, |_| {})
            .map_err(|e| CliError::Usage(e.to_string()))?;
        correct += batch
            .iter()
            .zip(&gens)
            .filter(|(i, g)| {
                dsv3_train::eval::exact_match(g.text.as_deref().unwrap_or(""), &i.answer)
            })
            .count();
    }
    Ok(correct as f64 / items.len() as f64)
}

/// Prompt indices in a seeded order, reshuffled every epoch.
struct Order {
    rng: SplitMix64,
    perm: Vec<usize>,
    pos: usize,
}

impl Order {
    fn new(n: usize, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            perm: (0..n).collect(),
            pos: n,
        }
    }

    fn next(&mut self) -> usize {
        if self.pos == self.perm.len() {
            self.rng.shuffle(&mut self.perm);
            self.pos = 0;
        }
        self.pos += 1;
        self.perm[self.pos - 1]
    }
}
