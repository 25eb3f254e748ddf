//! Post-training commands: `dsv3 make-task` (a generated task, train and held-out JSONL) and
//! `dsv3 eval` (perplexity, multiple choice, generative exact match). The metrics are
//! [`dsv3_train::eval`]'s (lm-evaluation-harness definitions); this module runs the model.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use dsv3_backends::{on_backend, BackendKind, DsBackend, FloatDtype, OnBackend};
use dsv3_infer::{generate_batch, GenerateOptions, InferError, Message, Tokenizer};
use dsv3_model::{DeepseekV3, ForwardOptions, LoadOptions};
use dsv3_train::eval::{self, PerplexityTotals};

use super::{weight_options, CliError, RunArgs};

#[derive(Args, Debug)]
pub struct MakeTaskArgs {
    /// The task: addition (multi-digit sums with a worked, column-by-column answer).
    #[arg(long, default_value = "addition", value_parser = clap::builder::PossibleValuesParser::new(dsv3_train::task::TASKS))]
    pub task: String,
    /// Output directory: train.jsonl (chat lines for `sft`), train_prompts.jsonl and test.jsonl
    /// ({"prompt", "answer"} lines for `eval --task gen` and `rl`), test_chat.jsonl (the
    /// held-out problems as chat lines, for `sft --val-data`).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the problems (same seed, same files).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Operands have 1 to this many digits.
    #[arg(long, default_value_t = 3)]
    pub digits: u32,
    /// Training problems.
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Held-out problems (none of them appears in the training set).
    #[arg(long, default_value_t = 200)]
    pub test: usize,
}

/// `dsv3 make-task`.
pub fn make_task(a: &MakeTaskArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let task = dsv3_train::task::addition(a.seed, a.digits, a.train, a.test).map_err(train)?;
    let [chat, prompts, test, test_chat] = dsv3_train::task::write(&task, &a.out).map_err(train)?;
    writeln!(
        out,
        "wrote {} ({} conversations), {}, {} ({} held-out prompts) and {}",
        chat.display(),
        task.train.len(),
        prompts.display(),
        test.display(),
        task.test.len(),
        test_chat.display()
    )
    .map_err(stdout)
}

fn train(e: dsv3_train::TrainError) -> CliError {
    CliError::Usage(e.to_string())
}

fn infer(e: InferError) -> CliError {
    CliError::Usage(e.to_string())
}

fn stdout(e: std::io::Error) -> CliError {
    CliError::Write {
        path: PathBuf::from("stdout"),
        reason: e.to_string(),
    }
}

/// What `dsv3 eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalTask {
    /// Perplexity and bits per byte of a text file, a directory of them, or JSONL with "text".
    Ppl,
    /// Multiple choice: JSONL {"question", "choices": [..], "answer": index or choice text};
    /// acc and acc_norm by the log-likelihood of " " + choice after the question.
    Mc,
    /// Generation: JSONL {"prompt", "answer"}; greedy decoding, exact match of the extracted
    /// answer (the last number when the answer is a number, else the trimmed text).
    Gen,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub task: EvalTask,
    /// The data (see --task).
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object: the summary and "items" (each item's result) instead of the line.
    #[arg(long)]
    pub json: bool,
    /// Evaluate only the first N items (documents for ppl).
    #[arg(long)]
    pub limit: Option<std::num::NonZeroUsize>,
    /// ppl: tokens per window (disjoint windows, each conditioned on the previous window's
    /// last token, as lm-evaluation-harness's rolling log-likelihood); default: the model's
    /// max_position_embeddings, at most 2048.
    #[arg(long)]
    pub context: Option<usize>,
    /// gen: render each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// gen: system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// gen: prompts decoded together as the rows of one batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// gen: stop after this many new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// gen: also stop at this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `dsv3 eval`.
pub fn eval_cmd(a: &EvalArgs, out: &mut dyn Write) -> Result<(), CliError> {
    struct Run<'a>(&'a EvalArgs, &'a mut dyn Write);
    impl OnBackend for Run<'_> {
        type Output = Result<(), CliError>;
        fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
            eval_on::<B>(self.0, kind, self.1)
        }
    }
    on_backend(a.run.backend, a.run.dtype, Run(a, out))?
}

fn eval_on<B: DsBackend>(
    a: &EvalArgs,
    kind: BackendKind,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if !a.data.exists() {
        return Err(CliError::Usage(format!(
            "--data {} does not exist",
            a.data.display()
        )));
    }
    let tok = Tokenizer::from_dir(&a.model)
        .map_err(infer)?
        .ok_or_else(|| {
            CliError::Usage(format!(
                "eval needs the model's tokenizer: {} has no tokenizer.json",
                a.model.display()
            ))
        })?;
    if a.chat && !tok.has_chat_template() {
        return Err(CliError::Usage(format!(
            "--chat needs a chat template: {} has neither {} nor a chat_template key in \
             tokenizer_config.json",
            a.model.display(),
            dsv3_infer::CHAT_TEMPLATE_FILE
        )));
    }
    // Items are read (and every line checked) before the model is loaded.
    let (summary, items) = match a.task {
        EvalTask::Ppl => {
            let (docs, _) = dsv3_train::data::read_documents(&a.data).map_err(train)?;
            let docs = limit(docs, a.limit);
            let model = load::<B>(a, kind)?;
            ppl(&model, &tok, &docs, a.context)?
        }
        EvalTask::Mc => {
            let items = limit(read_mc(&a.data)?, a.limit);
            let model = load::<B>(a, kind)?;
            mc(&model, &tok, &items)?
        }
        EvalTask::Gen => {
            if a.batch_size == 0 {
                return Err(CliError::Usage("--batch-size must be at least 1".into()));
            }
            let items = limit(
                read_gen(&a.data, &tok, a.chat, a.system.as_deref())?,
                a.limit,
            );
            let model = load::<B>(a, kind)?;
            gen(&model, &tok, &items, a)?
        }
    };
    if a.json {
        let mut j = summary.json;
        j["items"] = Value::Array(items);
        writeln!(out, "{j}").map_err(stdout)
    } else {
        writeln!(out, "{}", summary.line).map_err(stdout)
    }
}

fn limit<T>(mut v: Vec<T>, n: Option<std::num::NonZeroUsize>) -> Vec<T> {
    if let Some(n) = n {
        v.truncate(n.get());
    }
    v
}

fn load<B: DsBackend>(a: &EvalArgs, kind: BackendKind) -> Result<DeepseekV3<B>, CliError> {
    let opts = LoadOptions {
        skip_mtp: true,
        ..Default::default()
    };
    let (model, report) = dsv3_model::load_with::<B>(
        &a.model,
        &B::Device::default(),
        &opts,
        &weight_options(kind, a.run.weights),
    )?;
    super::print_load_warnings(&report);
    super::keep_freed_buffers();
    Ok(model)
}

fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what}  {{msg}}  ETA {{eta_precise}}"
        ))
        .expect("template"),
    );
    pb
}

/// The summary as one line and as the JSON object's top-level keys.
struct Summary {
    line: String,
    json: Value,
}

/// `-log p(ids[i+1] | ids[..=i])` for every `i` in `from..ids.len()-1` (one forward, no cache).
fn nlls<B: DsBackend>(
    model: &DeepseekV3<B>,
    ids: &[u32],
    from: usize,
) -> Result<Vec<f64>, CliError> {
    let input = &ids[..ids.len() - 1];
    let tokens = model.tokens_tensor(input)?;
    dsv3_model::check_positions(0, input.len())?;
    let logits = model
        .forward(tokens, 0, None, &ForwardOptions::default())
        .logits;
    let all = super::target_nlls(logits, &ids[1..], model.config.vocab_size)?;
    Ok(all[from.min(all.len())..].to_vec())
}

/// Perplexity over disjoint windows of `context` inputs; a document's first token (BOS when
/// the tokenizer adds one) is not predicted.
fn ppl<B: DsBackend>(
    model: &DeepseekV3<B>,
    tok: &Tokenizer,
    docs: &[dsv3_train::data::Document],
    context: Option<usize>,
) -> Result<(Summary, Vec<Value>), CliError> {
    let ctx = context.unwrap_or(model.config.max_position_embeddings.min(2048));
    if ctx == 0 {
        return Err(CliError::Usage("--context must be at least 1".into()));
    }
    let pb = progress(docs.len(), "documents");
    let (mut total, mut items) = (PerplexityTotals::default(), Vec::new());
    for d in docs {
        let ids = tok.encode_prompt(&d.text).map_err(infer)?;
        let mut t = PerplexityTotals {
            bytes: d.text.len(),
            ..Default::default()
        };
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + ctx + 1).min(ids.len());
            let v = nlls(model, &ids[start..end], 0)?;
            t.nll += v.iter().sum::<f64>();
            t.tokens += v.len();
            start = end - 1;
        }
        total.add(t);
        items.push(json!({
            "name": d.name, "tokens": t.tokens, "bytes": t.bytes, "nll": t.nll,
            "perplexity": t.perplexity(), "bits_per_byte": t.bits_per_byte(),
        }));
        pb.inc(1);
        pb.set_message(format!("ppl {:.3}", total.perplexity()));
    }
    pb.finish_and_clear();
    let line = format!(
        "ppl: perplexity {:.4}, bits per byte {:.4}, mean nll {:.4} over {} tokens ({} bytes, {} documents, windows of {ctx})",
        total.perplexity(),
        total.bits_per_byte(),
        total.mean_nll(),
        total.tokens,
        total.bytes,
        docs.len()
    );
    let json = json!({
        "task": "ppl", "perplexity": total.perplexity(), "bits_per_byte": total.bits_per_byte(),
        "mean_nll": total.mean_nll(), "tokens": total.tokens, "bytes": total.bytes,
        "documents": docs.len(), "context": ctx,
    });
    Ok((Summary { line, json }, items))
}

/// One multiple-choice line.
struct McItem {
    question: String,
    choices: Vec<String>,
    answer: usize,
}

/// A JSONL line: its 1-based number and its object.
type Line = (usize, serde_json::Map<String, Value>);

/// A JSONL file's non-empty lines as JSON objects, errors naming `FILE:LINE`.
fn jsonl_lines(path: &Path) -> Result<Vec<Line>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => lines.push((i + 1, m)),
            Ok(_) => return Err(at(path, i + 1, "not a JSON object")),
            Err(e) => return Err(at(path, i + 1, &format!("not JSON: {e}"))),
        }
    }
    if lines.is_empty() {
        return Err(CliError::Usage(format!("{} holds no item", path.display())));
    }
    Ok(lines)
}

fn at(path: &Path, line: usize, msg: &str) -> CliError {
    CliError::Usage(format!("{}:{line}: {msg}", path.display()))
}

fn string_field(
    m: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<String, CliError> {
    match m.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(at(path, line, &format!("\"{key}\" is not a string"))),
        None => Err(at(path, line, &format!("no \"{key}\" field"))),
    }
}

fn read_mc(path: &Path) -> Result<Vec<McItem>, CliError> {
    jsonl_lines(path)?
        .into_iter()
        .map(|(line, m)| {
            let question = string_field(&m, "question", path, line)?;
            let choices: Vec<String> = match m.get("choices") {
                Some(Value::Array(v)) if v.len() >= 2 => v
                    .iter()
                    .map(|c| c.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| at(path, line, "\"choices\" must be strings"))?,
                Some(_) => {
                    return Err(at(
                        path,
                        line,
                        "\"choices\" must be a list of at least 2 strings",
                    ))
                }
                None => return Err(at(path, line, "no \"choices\" field")),
            };
            let answer = match m.get("answer") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .map(|i| i as usize)
                    .filter(|&i| i < choices.len()),
                Some(Value::String(s)) => choices.iter().position(|c| c == s),
                Some(_) => None,
                None => return Err(at(path, line, "no \"answer\" field")),
            }
            .ok_or_else(|| {
                at(
                    path,
                    line,
                    &format!(
                        "\"answer\" must be a choice's index (0..{}) or one of the choices",
                        choices.len()
                    ),
                )
            })?;
            Ok(McItem {
                question,
                choices,
                answer,
            })
        })
        .collect()
}

/// Continuation ids of `question` + `cont` as the harness splits them: the whole string
/// encoded once, the context's ids cut off the front (the continuation encoded alone when the
/// context's ids are not a prefix).
fn split_encode(
    tok: &Tokenizer,
    question: &str,
    cont: &str,
) -> Result<(Vec<u32>, usize), CliError> {
    let ctx = tok.encode_prompt(question).map_err(infer)?;
    let whole = tok
        .encode_prompt(&format!("{question}{cont}"))
        .map_err(infer)?;
    if whole.len() > ctx.len() && whole.starts_with(&ctx) {
        return Ok((whole, ctx.len()));
    }
    let mut ids = ctx;
    let n = ids.len();
    ids.extend(tok.encode(cont).map_err(infer)?);
    Ok((ids, n))
}

fn mc<B: DsBackend>(
    model: &DeepseekV3<B>,
    tok: &Tokenizer,
    items: &[McItem],
) -> Result<(Summary, Vec<Value>), CliError> {
    let pb = progress(items.len(), "questions");
    let (mut acc, mut acc_norm, mut results) = (0usize, 0usize, Vec::new());
    for (i, item) in items.iter().enumerate() {
        let mut lls = Vec::new();
        for c in &item.choices {
            let (ids, ctx) = split_encode(tok, &item.question, &format!(" {c}"))?;
            if ctx == 0 {
                return Err(CliError::Usage(format!(
                    "item {i}: the question encodes to no token (nothing to condition on)"
                )));
            }
            lls.push(-nlls(model, &ids, ctx - 1)?.iter().sum::<f64>());
        }
        let chars: Vec<usize> = item.choices.iter().map(|c| c.chars().count()).collect();
        let (p, pn) = eval::mc_predictions(&lls, &chars).expect("two choices or more");
        acc += usize::from(p == item.answer);
        acc_norm += usize::from(pn == item.answer);
        results.push(json!({
            "index": i, "answer": item.answer, "loglikelihoods": lls,
            "prediction": p, "prediction_norm": pn,
            "acc": u8::from(p == item.answer), "acc_norm": u8::from(pn == item.answer),
        }));
        pb.inc(1);
        pb.set_message(format!("acc {:.3}", acc as f64 / (i + 1) as f64));
    }
    pb.finish_and_clear();
    let n = items.len();
    let line = format!(
        "mc: acc {:.4} ({acc}/{n}), acc_norm {:.4} ({acc_norm}/{n}) over {n} questions",
        acc as f64 / n as f64,
        acc_norm as f64 / n as f64
    );
    let json = json!({
        "task": "mc", "acc": acc as f64 / n as f64, "acc_norm": acc_norm as f64 / n as f64,
        "correct": acc, "correct_norm": acc_norm, "n": n,
    });
    Ok((Summary { line, json }, results))
}

/// One generation line, encoded.
pub(crate) struct GenItem {
    pub ids: Vec<u32>,
    pub answer: String,
}

/// The `{"prompt", "answer"}` lines of `path`, each prompt encoded (as a user message in the
/// chat template with `chat`); errors name `FILE:LINE`.
pub(crate) fn read_gen(
    path: &Path,
    tok: &Tokenizer,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<GenItem>, CliError> {
    jsonl_lines(path)?
        .into_iter()
        .map(|(line, m)| {
            let prompt = string_field(&m, "prompt", path, line)?;
            let answer = match m.get("answer") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => return Err(at(path, line, "\"answer\" is not a string or number")),
                None => return Err(at(path, line, "no \"answer\" field")),
            };
            let ids = if chat {
                let mut msgs: Vec<Message> = system
                    .map(|s| Message::new("system", s))
                    .into_iter()
                    .collect();
                msgs.push(Message::new("user", &prompt));
                tok.encode_chat(&msgs, true)
            } else {
                tok.encode_prompt(&prompt)
            }
            .map_err(|e| at(path, line, &e.to_string()))?;
            if ids.is_empty() {
                return Err(at(path, line, "the prompt is empty"));
            }
            Ok(GenItem { ids, answer })
        })
        .collect()
}

fn gen<B: DsBackend>(
    model: &DeepseekV3<B>,
    tok: &Tokenizer,
    items: &[GenItem],
    a: &EvalArgs,
) -> Result<(Summary, Vec<Value>), CliError> {
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_strings: a.stop.clone(),
        ..Default::default()
    };
    opts.validate().map_err(infer)?;
    let pb = progress(items.len(), "prompts");
    let t0 = std::time::Instant::now();
    let (mut correct, mut generated, mut results) = (0, 0, Vec::new());
    for (b, batch) in items.chunks(a.batch_size).enumerate() {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|i| i.ids.clone()).collect();
        let gens = generate_batch(model, Some(tok), &prompts, &opts, |_| {}).map_err(infer)?;
        for (r, (item, g)) in batch.iter().zip(&gens).enumerate() {
            let text = g.text.clone().unwrap_or_default();
            let ok = eval::exact_match(&text, &item.answer);
            generated += g.tokens.len();
            correct += usize::from(ok);
            results.push(json!({
                "index": b * a.batch_size + r, "answer": item.answer, "text": text,
                "extracted": eval::extracted_answer(&text, &item.answer),
                "exact_match": u8::from(ok),
            }));
        }
        pb.inc(batch.len() as u64);
        pb.set_message(format!(
            "exact_match {:.3}",
            correct as f64 / results.len() as f64
        ));
    }
    pb.finish_and_clear();
    let n = items.len();
    let line = format!(
        "gen: exact_match {:.4} ({correct}/{n}) over {n} prompts, {generated} tokens generated in {:.1} s",
        correct as f64 / n as f64,
        t0.elapsed().as_secs_f64()
    );
    let json = json!({
        "task": "gen", "exact_match": correct as f64 / n as f64, "correct": correct, "n": n,
        "generated_tokens": generated,
    });
    Ok((Summary { line, json }, results))
}

#[derive(Args, Debug)]
pub struct SftArgs {
    /// Starting model directory (Hugging Face layout) with tokenizer.json and a chat template
    /// (chat_template.jinja or tokenizer_config.json's chat_template).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL, one conversation per line: {"messages": [{"role", "content"}, ...]} with roles
    /// system, user and assistant. Rendered with the model's chat template; the loss counts the
    /// assistant turns' tokens only.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: metrics.jsonl, step-N/ checkpoints, final/, training.png.
    #[arg(long, default_value = "runs/sft")]
    pub out: PathBuf,
    /// Total optimiser steps (with --resume: the new total) [default: 200, on --resume the
    /// checkpoint's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every N steps (0: only at the end) [default: 100, on --resume the
    /// checkpoint's].
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from the newest usable checkpoint in --out (same --model and --data), with its
    /// settings: of the flags, only --steps, --checkpoint-every, --log-every, --eval-every and
    /// --keep apply.
    #[arg(long)]
    pub resume: bool,
    /// Conversations per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per window (one conversation each, padded; longer ones are cut). Default: the
    /// longest conversation, at most the model's max_position_embeddings.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches accumulated per optimiser step (computed in parallel by --workers).
    #[arg(long, default_value_t = 2)]
    pub grad_accum: usize,
    /// Peak learning rate (warm-up, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// λ, weight of the MTP loss (on the assistant tokens too).
    #[arg(long, default_value_t = 0.3)]
    pub mtp_lambda: f64,
    /// α, weight of the sequence-wise balance loss.
    #[arg(long, default_value_t = 1e-4)]
    pub balance_alpha: f64,
    /// γ, speed of the aux-loss-free bias update (0 turns it off).
    #[arg(long, default_value_t = 1e-3)]
    pub bias_gamma: f64,
    /// Every N-th conversation is held out for validation (without --val-data).
    #[arg(long, default_value_t = 20)]
    pub val_every: usize,
    /// Held-out conversations (JSONL like --data, e.g. make-task's test_chat.jsonl) to
    /// validate on; every conversation of --data then trains. Runs that share this file report
    /// comparable validation losses.
    #[arg(long, conflicts_with = "val_every")]
    pub val_data: Option<PathBuf>,
    /// Validate every N steps [default: 50, on --resume the checkpoint's].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Log every N steps [default: 10, on --resume the checkpoint's].
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Complete checkpoints to keep [default: 3, on --resume the checkpoint's].
    #[arg(long)]
    pub keep: Option<usize>,
    /// Micro-batches computed in parallel threads (the result does not depend on it).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// The conversations of an SFT file, rendered and masked, each error naming `FILE:LINE`.
///
/// # Errors
/// [`CliError::Usage`]: a line that is not JSON, has no `messages` list of `{"role",
/// "content"}` strings, a role other than system/user/assistant, no assistant message, a
/// template that fails on it, or an id outside the model's vocabulary; an empty file.
pub fn read_sft(
    path: &Path,
    tok: &Tokenizer,
    vocab: usize,
) -> Result<Vec<dsv3_train::sft::Example>, CliError> {
    const ROLES: [&str; 3] = ["system", "user", "assistant"];
    jsonl_lines(path)?
        .into_iter()
        .map(|(line, m)| {
            let msgs = match m.get("messages") {
                Some(Value::Array(v)) => v,
                Some(_) => return Err(at(path, line, "\"messages\" is not a list")),
                None => return Err(at(path, line, "no \"messages\" field")),
            };
            let mut messages = Vec::with_capacity(msgs.len());
            for (i, msg) in msgs.iter().enumerate() {
                let field = |k: &str| msg.get(k).and_then(Value::as_str);
                let (Some(role), Some(content)) = (field("role"), field("content")) else {
                    return Err(at(
                        path,
                        line,
                        &format!("message {i} needs string \"role\" and \"content\""),
                    ));
                };
                if !ROLES.contains(&role) {
                    return Err(at(
                        path,
                        line,
                        &format!(
                            "message {i} has the unknown role {role:?} (sft takes system, user and assistant)"
                        ),
                    ));
                }
                messages.push(Message::new(role, content));
            }
            let (ids, mask) = tok
                .encode_chat_with_assistant_mask(&messages)
                .map_err(|e| at(path, line, &e.to_string()))?;
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(at(
                    path,
                    line,
                    &format!("token id {id} is not below the model's vocab_size = {vocab}"),
                ));
            }
            Ok(dsv3_train::sft::Example { ids, mask })
        })
        .collect()
}

#[derive(Args, Debug)]
pub struct DistillArgs {
    /// The teacher's model directory (the same tokenizer as --model's).
    #[arg(long)]
    pub teacher: PathBuf,
    /// τ: both distributions are softened as softmax(logits / τ).
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    /// α: weight of the soft term τ²·KL(teacher ‖ student); the hard-label term gets 1 − α.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    #[command(flatten)]
    pub sft: SftArgs,
}

/// `dsv3 distill`: `sft` with the next-token term replaced by the distillation mix.
pub fn distill(a: &DistillArgs, out: &mut dyn Write) -> Result<(), CliError> {
    for (what, dir) in [("--teacher", &a.teacher), ("--model", &a.sft.model)] {
        if !dir.is_dir() {
            let why = match dir.exists() {
                true => "not a directory",
                false => "no such model directory",
            };
            return Err(CliError::Usage(format!("{what} {}: {why}", dir.display())));
        }
    }
    let student = Tokenizer::from_dir(&a.sft.model).map_err(infer)?;
    let teacher = Tokenizer::from_dir(&a.teacher).map_err(infer)?;
    let same = match (&student, &teacher) {
        (Some(s), Some(t)) => s.inner().get_vocab(true) == t.inner().get_vocab(true),
        _ => false,
    };
    if !same {
        return Err(CliError::Usage(format!(
            "teacher {} and student {} do not share a tokenizer (tokenizer.json vocabularies \
             differ or one is missing): distillation compares their distributions id by id",
            a.teacher.display(),
            a.sft.model.display()
        )));
    }
    run_sft(
        &a.sft,
        Some((a.teacher.clone(), a.temperature, a.alpha)),
        out,
    )
}

/// The tokenizer files of model directory `dir` that a fine-tuned model carries on (name,
/// bytes): `tokenizer.json`, `tokenizer_config.json` and the chat template, those present.
///
/// # Errors
/// [`CliError::Usage`] naming a file that exists but cannot be read.
pub(crate) fn tokenizer_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, CliError> {
    let mut files = Vec::new();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        dsv3_infer::CHAT_TEMPLATE_FILE,
    ] {
        let p = dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))?;
            files.push((name.to_string(), bytes));
        }
    }
    Ok(files)
}

/// `dsv3 sft`.
pub fn sft(a: &SftArgs, out: &mut dyn Write) -> Result<(), CliError> {
    run_sft(a, None, out)
}

fn run_sft(
    a: &SftArgs,
    teacher: Option<(PathBuf, f64, f64)>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let model_cfg = dsv3_model::DeepseekV3Config::from_file(&a.model.join("config.json"))
        .map_err(dsv3_model::ModelError::from)?;
    let tok = Tokenizer::from_dir(&a.model)
        .map_err(infer)?
        .ok_or_else(|| {
            CliError::Usage(format!(
                "sft needs the model's tokenizer: {} has no tokenizer.json",
                a.model.display()
            ))
        })?;
    if !tok.has_chat_template() {
        return Err(CliError::Usage(format!(
            "sft needs a chat template: {} has neither {} nor a chat_template key in \
             tokenizer_config.json",
            a.model.display(),
            dsv3_infer::CHAT_TEMPLATE_FILE
        )));
    }
    if !a.data.exists() {
        return Err(CliError::Usage(format!(
            "--data {} does not exist",
            a.data.display()
        )));
    }
    if !a.resume {
        super::refuse_saved_run(&a.out)?;
    }
    let examples = read_sft(&a.data, &tok, model_cfg.vocab_size)?;
    let held = a
        .val_data
        .as_ref()
        .map(|p| read_sft(p, &tok, model_cfg.vocab_size))
        .transpose()?;
    let longest = examples
        .iter()
        .chain(held.iter().flatten())
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(2);
    let seq_len = a.seq_len.unwrap_or_else(|| {
        (longest.saturating_sub(1))
            .max(2)
            .min(model_cfg.max_position_embeddings)
    });
    let pad = tok.eos_id().unwrap_or(0);
    let held_out = match &held {
        Some(v) => dsv3_train::sft::HeldOut::Given(v),
        None => dsv3_train::sft::HeldOut::EveryNth(a.val_every),
    };
    let (data, report) =
        dsv3_train::sft::dataset(&examples, seq_len, held_out, pad).map_err(train)?;
    let cfg = dsv3_train::TrainConfig {
        steps: a.steps.unwrap_or(200),
        seq_len,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        min_lr: a.lr / 10.0,
        warmup_steps: a.warmup,
        mtp_lambda: a.mtp_lambda,
        balance_alpha: a.balance_alpha,
        bias_gamma: a.bias_gamma,
        val_every: a.val_every,
        eval_every: a.eval_every.unwrap_or(50),
        log_every: a.log_every.unwrap_or(10),
        checkpoint_every: a.checkpoint_every.unwrap_or(100),
        keep_checkpoints: a.keep.unwrap_or(3),
        seed: a.seed,
        workers: a.workers,
        ..Default::default()
    };
    cfg.validate().map_err(train)?;
    let tokenizer_files = tokenizer_files(&a.model)?;
    let ft = dsv3_train::FineTune {
        data_name: a.data.display().to_string(),
        data,
        model_dir: a.model.clone(),
        tokenizer_files,
        teacher,
    };
    let opts = dsv3_train::RunOptions {
        out: a.out.clone(),
        data: None,
        model: model_cfg,
        train: cfg,
        given: dsv3_train::Given {
            steps: a.steps.is_some(),
            checkpoint_every: a.checkpoint_every.is_some(),
            log_every: a.log_every.is_some(),
            eval_every: a.eval_every.is_some(),
            keep_checkpoints: a.keep.is_some(),
        },
        resume: a.resume,
        progress: true,
        parallel: None,
        pipeline: None,
    };
    let mut say = |line: &str| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    if let Some((dir, t, alpha)) = &ft.teacher {
        say(&format!(
            "distilling from {} at temperature {t}, soft weight {alpha}",
            dir.display()
        ));
    }
    say(&format!(
        "sft: {} conversations ({} held out), windows of {} tokens (padded, one conversation each; {} cut, longest {}), {} assistant target tokens",
        report.examples,
        ft.data.val.len(),
        seq_len + 1,
        report.truncated,
        report.longest,
        report.target_tokens
    ));
    let device = Default::default();
    let (summary, _) =
        dsv3_train::fine_tune::<dsv3_backends::CpuAutodiff>(&opts, &ft, &device, &mut say)
            .map_err(|e| match e {
                dsv3_train::TrainError::Model(m) => CliError::Model(m),
                other => CliError::Usage(other.to_string()),
            })?;
    let mut report = format!(
        "fine-tuned steps {}..{} in {:.1} s ({:.0} tokens/s, padding included)\n",
        summary.start_step, summary.steps, summary.wall_s, summary.tokens_per_s
    );
    if let Some(v) = summary.val {
        report += &format!(
            "validation: loss {:.4} nats per assistant token over {} tokens\n",
            v.loss, v.tokens
        );
    }
    report += &format!(
        "final model: {} (dsv3 eval/generate load it); metrics: {}{}\n",
        summary.final_dir.display(),
        summary.metrics.display(),
        summary
            .plot
            .as_ref()
            .map(|p| format!("; plot: {}", p.display()))
            .unwrap_or_default()
    );
    out.write_all(report.as_bytes()).map_err(stdout)
}
