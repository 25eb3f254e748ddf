//! `dsv3 generate` and `dsv3 chat`: text (or ids) in, streamed text (or ids) out, then one line
//! of statistics.

use std::sync::Arc;

use dsv3_backends::comm::{CommExt, Communicator};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::Args;

use dsv3_backends::{on_backend, BackendKind, DsBackend, FloatDtype, OnBackend};
use dsv3_infer::{
    continue_session, generate, generate_batch, GenerateOptions, Generation, InferError, Message,
    SamplingOptions, Session, Speculative, Tokenizer,
};
use dsv3_model::{DeepseekV3, LoadOptions};

use super::{parse_tokens, weight_options, CliError, RunArgs};

/// Decoding flags shared by `generate` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Model directory (config.json + safetensors; tokenizer.json/tokenizer_config.json for text).
    #[arg(long)]
    pub model: PathBuf,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the top token's probability, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalty (> 0, 1 = none) on tokens already in the context.
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampling noise (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Speculative decoding drafted by the model's MTP module (greedy only; output unchanged).
    #[arg(long, value_parser = ["mtp"])]
    pub speculative: Option<String>,
    /// Stop when the generated text contains this string (repeatable; needs a tokenizer).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Do not stop on the EOS ids (benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Preallocate the latent cache for this many positions; generation stops when it is full.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Tokens per prefill forward.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(
        long,
        conflicts_with = "tokens",
        required_unless_present_any = ["tokens", "prompts"]
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 0,15,7 (works without a tokenizer).
    #[arg(long)]
    pub tokens: Option<String>,
    /// A JSONL file of prompts, one object per line: {"prompt": TEXT} (a user message with
    /// --chat), {"messages": [{"role", "content"}, ...]} (rendered with the chat template, ready
    /// for the assistant's turn) or `{"tokens": [IDS]}`; other keys are ignored. Prints one JSON
    /// line per prompt, in order: {"index", "tokens", "text", "stop", "stats"}, where "stats"
    /// are its batch's (decode tokens/s summed over the batch's rows); a chat prompt's line also
    /// has "messages": its conversation with the reply appended (`sft --data` reads it as is).
    #[arg(long, conflicts_with_all = ["prompt", "tokens"])]
    pub prompts: Option<PathBuf>,
    /// Prompts decoded together as the rows of one batch (with --prompts).
    #[arg(long, default_value_t = 8, requires = "prompts")]
    pub batch_size: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long, conflicts_with = "tokens")]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Print one JSON object {"tokens", "text", "stop", "stats"} instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Expert parallelism: split the routed experts over this many processes (start them with
    /// `mpirun -n N`; each reads only its own experts). Every rank decodes the same tokens;
    /// rank 0 prints.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// System message for the whole conversation.
    #[arg(long)]
    pub system: Option<String>,
}

fn infer(e: InferError) -> CliError {
    CliError::Usage(e.to_string())
}

fn io(e: std::io::Error) -> CliError {
    CliError::Write {
        path: Path::new("stdout").to_path_buf(),
        reason: e.to_string(),
    }
}

impl DecodeArgs {
    fn options(&self) -> Result<GenerateOptions, CliError> {
        let opts = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingOptions {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_strings: self.stop.clone(),
            eos_token_ids: self.ignore_eos.then(Vec::new),
            prefill_chunk: self.prefill_chunk,
            max_context: self.max_context,
            speculative: self.speculative.as_ref().map(|_| Speculative::Mtp),
            ..Default::default()
        };
        opts.validate().map_err(infer)?;
        Ok(opts)
    }

    /// The model as `kind` runs it best (experts packed for the grouped kernels on GPU
    /// backends, FP8 kept in memory with `--weights fp8`) and its tokenizer, if any.
    fn load<B: DsBackend>(
        &self,
        kind: BackendKind,
        comm: Option<&Arc<dyn Communicator>>,
    ) -> Result<(DeepseekV3<B>, Option<Tokenizer>), CliError> {
        let tok = Tokenizer::from_dir(&self.model).map_err(infer)?;
        let opts = LoadOptions {
            strict: false,
            skip_mtp: self.speculative.is_none(),
            expert_shard: comm.map(|c| (c.rank(), c.size())),
            held: None,
        };
        let mut weights = weight_options(kind, self.run.weights);
        weights.pack_experts &= comm.is_none();
        let (mut model, report) =
            dsv3_model::load_with::<B>(&self.model, &B::Device::default(), &opts, &weights)?;
        if let Some(c) = comm {
            model.set_expert_parallel(c.clone())?;
        }
        if comm.is_none_or(|c| c.rank() == 0) {
            super::print_load_warnings(&report);
        }
        if let Some(t) = &tok {
            if t.vocab_size() > model.config.vocab_size {
                super::warn(format_args!(
                    "the tokenizer has {} ids but the model's vocab_size is {}: text whose ids \
                     reach past it cannot be fed (is this the model's tokenizer?)",
                    t.vocab_size(),
                    model.config.vocab_size
                ));
            }
        }
        super::keep_freed_buffers();
        Ok((model, tok))
    }
}

/// `prompt tokens: 12, generated: 64, prefill: 512.0 tok/s, decode: 40.1 tok/s, cache: ...`
pub fn stats_line(g: &Generation) -> String {
    let s = &g.stats;
    let mut line = format!(
        "prompt tokens: {}, generated: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, cache: {} bytes ({} per token)",
        s.prompt_tokens,
        s.generated_tokens,
        s.prefill_tokens_per_sec(),
        s.decode_tokens_per_sec(),
        s.cache_bytes,
        s.cache_bytes_per_token,
    );
    if let Some(sp) = &s.speculative {
        line.push_str(&format!(
            ", speculative: {}/{} drafts accepted ({:.1}%)",
            sp.accepted,
            sp.drafted,
            100.0 * sp.acceptance_rate()
        ));
    }
    line
}

/// The `stats` object of `--json` (decode tokens/s summed over the batch's `rows`).
pub fn stats_json(g: &Generation) -> serde_json::Value {
    let s = &g.stats;
    let mut j = serde_json::json!({
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "prefilled_tokens": s.prefilled_tokens,
        "prefill_secs": s.prefill_secs,
        "decode_secs": s.decode_secs,
        "prefill_tokens_per_sec": s.prefill_tokens_per_sec(),
        "decode_tokens_per_sec": s.decode_tokens_per_sec(),
        "cache_bytes": s.cache_bytes,
        "cache_bytes_per_token": s.cache_bytes_per_token,
    });
    if let Some(sp) = &s.speculative {
        j["speculative"] = serde_json::json!({
            "steps": sp.steps,
            "drafted": sp.drafted,
            "accepted": sp.accepted,
            "acceptance_rate": sp.acceptance_rate(),
        });
    }
    j
}

pub fn generate_cmd(a: &GenerateArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (world, comm) = super::dist::ep_world(a.ep)?;
    let mut sink = std::io::sink();
    let out = super::dist::lead_output(&world.comm, out, &mut sink);
    struct Run<'a>(
        &'a GenerateArgs,
        Option<Arc<dyn Communicator>>,
        &'a mut dyn Write,
    );
    impl OnBackend for Run<'_> {
        type Output = Result<(), CliError>;
        fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
            generate_on::<B>(self.0, kind, self.1, self.2)
        }
    }
    let (kind, dtype) = (a.decode.run.backend, a.decode.run.dtype);
    on_backend(kind, dtype, Run(a, comm, out))?
}

/// One line of a `--prompts` file (keys other than these are ignored, e.g. an `answer`).
#[derive(serde::Deserialize)]
struct PromptLine {
    prompt: Option<String>,
    messages: Option<Vec<MessageLine>>,
    tokens: Option<Vec<u32>>,
}

#[derive(serde::Deserialize)]
struct MessageLine {
    role: String,
    content: String,
}

/// One prompt of a `--prompts` file: its ids and, for a chat prompt, the conversation it renders.
struct FilePrompt {
    ids: Vec<u32>,
    conversation: Option<Vec<Message>>,
}

/// The prompts of a `--prompts` file, each error naming `FILE:LINE`.
fn read_prompts(
    path: &Path,
    tok: Option<&Tokenizer>,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<FilePrompt>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read --prompts {}: {e}", path.display())))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| CliError::Usage(format!("{}:{}: {msg}", path.display(), i + 1));
        let p: PromptLine = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let need_tok = || {
            tok.ok_or_else(|| {
                at(
                    "text prompts need the model directory's tokenizer.json (or give \"tokens\")"
                        .into(),
                )
            })
        };
        let conversation = match (&p.prompt, &p.messages) {
            (Some(text), None) if chat => {
                let mut msgs: Vec<Message> = system
                    .map(|s| Message::new("system", s))
                    .into_iter()
                    .collect();
                msgs.push(Message::new("user", text));
                Some(msgs)
            }
            (None, Some(msgs)) => Some(
                msgs.iter()
                    .map(|m| Message::new(&m.role, &m.content))
                    .collect(),
            ),
            _ => None,
        };
        let ids = match (p.prompt, conversation.as_ref(), p.tokens) {
            (None, None, Some(ids)) => ids,
            (_, Some(msgs), None) => need_tok()?
                .encode_chat(msgs, true)
                .map_err(|e| at(e.to_string()))?,
            (Some(text), None, None) if p.messages.is_none() => need_tok()?
                .encode_prompt(&text)
                .map_err(|e| at(e.to_string()))?,
            _ => {
                return Err(at(
                    "give exactly one of \"prompt\", \"messages\" or \"tokens\"".into(),
                ))
            }
        };
        if ids.is_empty() {
            return Err(at("the prompt is empty".into()));
        }
        prompts.push(FilePrompt { ids, conversation });
    }
    if prompts.is_empty() {
        return Err(CliError::Usage(format!(
            "--prompts {} holds no prompt",
            path.display()
        )));
    }
    Ok(prompts)
}

/// `generate --prompts FILE`: batches of `--batch-size` rows through [`generate_batch`], one
/// JSON line per prompt, then a summary line on stderr.
fn generate_file<B: DsBackend>(
    a: &GenerateArgs,
    path: &Path,
    kind: BackendKind,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if a.batch_size == 0 {
        return Err(CliError::Usage("--batch-size must be at least 1".into()));
    }
    let opts = a.decode.options()?;
    let (model, tok) = a.decode.load::<B>(kind, None)?;
    let prompts = read_prompts(path, tok.as_ref(), a.chat, a.system.as_deref())?;
    let (mut generated, mut decode_secs, mut index) = (0, 0.0, 0);
    for batch in prompts.chunks(a.batch_size) {
        let ids: Vec<Vec<u32>> = batch.iter().map(|p| p.ids.clone()).collect();
        let gens = generate_batch(&model, tok.as_ref(), &ids, &opts, |_| {}).map_err(infer)?;
        let stats = gens.first().map(stats_json);
        for (g, p) in gens.iter().zip(batch) {
            let mut j = serde_json::json!({
                "index": index,
                "tokens": g.tokens,
                "text": g.text,
                "stop": g.stop,
                "stats": stats,
            });
            // A chat prompt's conversation with the reply appended: the line is `sft` data as
            // it stands (sequence-level distillation: a teacher's answers, a student's SFT).
            if let (Some(conv), Some(text)) = (&p.conversation, &g.text) {
                let mut conv = conv.clone();
                conv.push(Message::new("assistant", text));
                j["messages"] = serde_json::json!(conv);
            }
            writeln!(out, "{j}").map_err(io)?;
            index += 1;
        }
        if let Some(g) = gens.first() {
            // Summed over batches: each batch's tokens after its rows' first.
            generated += g.stats.generated_tokens.saturating_sub(g.stats.rows);
            decode_secs += g.stats.decode_secs;
        }
    }
    out.flush().map_err(io)?;
    super::note(format_args!(
        "prompts: {}, batch size: {}, decode: {:.1} tok/s summed over rows",
        prompts.len(),
        a.batch_size,
        if decode_secs > 0.0 {
            generated as f64 / decode_secs
        } else {
            0.0
        }
    ));
    Ok(())
}

fn generate_on<B: DsBackend>(
    a: &GenerateArgs,
    kind: BackendKind,
    comm: Option<Arc<dyn Communicator>>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if let Some(path) = &a.prompts {
        if comm.is_some() {
            return Err(CliError::Usage("--prompts does not take --ep yet".into()));
        }
        return generate_file::<B>(a, path, kind, out);
    }
    // Everything before decoding fails alike on every rank: they agree before it.
    let prepared = (|| -> Result<_, CliError> {
        let opts = a.decode.options()?;
        if a.prompt.is_some() && !a.decode.model.join("tokenizer.json").is_file() {
            return Err(CliError::Usage(format!(
                "--prompt needs a tokenizer: {} has no tokenizer.json (use --tokens IDS)",
                a.decode.model.display()
            )));
        }
        let (model, tok) = a.decode.load::<B>(kind, comm.as_ref())?;
        let ids = match (&a.tokens, &a.prompt, &tok) {
            (Some(t), _, _) => parse_tokens(t)?,
            (None, Some(p), Some(tok)) if a.chat => {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", p));
                tok.encode_chat(&msgs, true).map_err(infer)?
            }
            (None, Some(p), Some(tok)) => tok.encode_prompt(p).map_err(infer)?,
            _ => return Err(CliError::Usage("give --prompt TEXT or --tokens IDS".into())),
        };
        Ok((opts, model, tok, ids))
    })();
    let (opts, model, tok, ids) = match &comm {
        Some(c) => super::dist::agree(c, prepared, "loading")?,
        None => prepared?,
    };
    let mut write_err = None;
    let g = {
        let mut on_token = |ev: &dsv3_infer::TokenEvent| {
            if a.json || write_err.is_some() {
                return;
            }
            let r = match &tok {
                Some(_) => out.write_all(ev.text.as_bytes()),
                None => write!(out, "{} ", ev.token),
            };
            if let Err(e) = r.and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        };
        let g = generate(&model, tok.as_ref(), &ids, &opts, &mut on_token).map_err(infer);
        match &comm {
            Some(c) => super::dist::agree(c, g, "decoding")?,
            None => g?,
        }
    };
    let mut rss = None;
    if let Some(c) = &comm {
        // Every rank decoded for itself, from logits that agree bit for bit in practice (the
        // same dense arithmetic everywhere; each token's expert rows computed by their owner in
        // one product): check that they chose the same tokens. (A divergence that changed the
        // number of steps would stop the exchanges from pairing before this check.)
        let mine: Vec<i32> = g.tokens.iter().map(|&t| t as i32).collect();
        let lens = c
            .all_gather_vec(&[mine.len() as i32])
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let all = if lens.iter().all(|&l| l == lens[0]) {
            c.all_gather_vec(&mine)
                .map_err(|e| CliError::Usage(e.to_string()))?
        } else {
            Vec::new()
        };
        if all.is_empty() && !mine.is_empty()
            || all.chunks(mine.len().max(1)).any(|r| r != mine.as_slice())
        {
            return Err(CliError::Usage(
                "the expert-parallel ranks decoded different tokens".into(),
            ));
        }
        rss = Some(super::dist::peak_rss_line(c)?);
    }
    // Rank 0's stdout failing is reported after the collectives above, which every rank runs.
    if let Some(e) = write_err {
        return Err(io(e));
    }
    if a.json {
        let j = serde_json::json!({
            "tokens": g.tokens,
            "text": g.text,
            "stop": g.stop,
            "stats": stats_json(&g),
        });
        writeln!(out, "{j}").map_err(io)?;
    } else {
        writeln!(out).map_err(io)?;
        writeln!(out, "{}", stats_line(&g)).map_err(io)?;
        if let Some(line) = rss {
            writeln!(out, "{line}").map_err(io)?;
        }
    }
    Ok(())
}

pub fn chat_cmd(a: &ChatArgs, out: &mut dyn Write) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut input = stdin.lock();
    struct Run<'a>(&'a ChatArgs, &'a mut dyn BufRead, &'a mut dyn Write, bool);
    impl OnBackend for Run<'_> {
        type Output = Result<(), CliError>;
        fn run<B: DsBackend>(self, kind: BackendKind, _: FloatDtype) -> Self::Output {
            chat_on::<B>(self.0, kind, self.1, self.2, self.3)
        }
    }
    let (kind, dtype) = (a.decode.run.backend, a.decode.run.dtype);
    on_backend(kind, dtype, Run(a, &mut input, out, interactive))?
}

/// The chat loop over `input` lines: each line is a user turn; an empty line or EOF ends it.
/// The conversation stays in the latent cache; each turn prefills only its new tokens.
pub fn chat_on<B: DsBackend>(
    a: &ChatArgs,
    kind: BackendKind,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    interactive: bool,
) -> Result<(), CliError> {
    let opts = a.decode.options()?;
    let (model, tok) = a.decode.load::<B>(kind, None)?;
    let tok = tok.ok_or_else(|| {
        CliError::Usage(format!(
            "chat needs a tokenizer: {} has no tokenizer.json",
            a.decode.model.display()
        ))
    })?;
    if !tok.has_chat_template() {
        return Err(CliError::Usage(format!(
            "chat needs a chat template: {} has neither {} nor a chat_template key in \
             tokenizer_config.json",
            a.decode.model.display(),
            dsv3_infer::CHAT_TEMPLATE_FILE
        )));
    }
    let mut session = Session::new(&model, 1, &opts.session_options()).map_err(infer)?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    let mut line = String::new();
    loop {
        if interactive {
            write!(out, "> ").and_then(|_| out.flush()).map_err(io)?;
        }
        line.clear();
        if input.read_line(&mut line).map_err(io)? == 0 {
            break;
        }
        let user = line.trim_end_matches(['\n', '\r']);
        if user.is_empty() {
            break;
        }
        messages.push(Message::new("user", user));
        let ids = tok.encode_chat(&messages, true).map_err(infer)?;
        let mut write_err = None;
        let g = continue_session(&mut session, Some(&tok), &ids, &opts, |ev| {
            if write_err.is_none() {
                if let Err(e) = out.write_all(ev.text.as_bytes()).and_then(|_| out.flush()) {
                    write_err = Some(e);
                }
            }
        })
        .map_err(infer)?;
        if let Some(e) = write_err {
            return Err(io(e));
        }
        writeln!(out).map_err(io)?;
        writeln!(
            out,
            "[{}, reused {} cached tokens]",
            stats_line(&g),
            g.stats.prompt_tokens - g.stats.prefilled_tokens
        )
        .map_err(io)?;
        messages.push(Message::new("assistant", g.text.as_deref().unwrap_or("")));
    }
    Ok(())
}
