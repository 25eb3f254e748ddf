//! The generation loop: prefill, then decode until each row stops (EOS id, stop string,
//! `max_new_tokens`, or a full preallocated context), streaming every token to a callback.
//!
//! Batched rows are left-padded and each leaves the batch when it stops; what a row generates
//! does not depend on the other rows. With [`Speculative::Mtp`] the model's MTP module drafts
//! the next token, one main forward verifies it together with the current token, and the
//! cache rolls back on rejection: the output is exactly greedy decoding's.

use std::time::Instant;

use dsv3_backends::DsBackend;
use dsv3_model::{DeepseekV3, ForwardOptions};
use serde::Serialize;

use crate::error::InferError;
use crate::sampling::{read_ids, Sampler, SamplingOptions};
use crate::session::{Session, SessionOptions};
use crate::tokenizer::Tokenizer;

/// Who drafts tokens for speculative decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Speculative {
    /// The model's first MTP module drafts one token per step.
    Mtp,
    /// Drafts the given continuation `per_step` tokens at a time (verification of a known or
    /// guessed continuation; also how tests drive partial acceptance).
    Tokens { tokens: Vec<u32>, per_step: usize },
}

/// Options of one generation. `Default`: greedy, 256 new tokens, stop on the model's EOS ids.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Stop when the generated text contains one of these (needs a tokenizer); the text is cut
    /// before it.
    pub stop_strings: Vec<String>,
    /// Stop ids. `None`: the model config's `eos_token_id`s plus the tokenizer's EOS.
    /// `Some(vec![])` never stops on an id (benchmarks).
    pub eos_token_ids: Option<Vec<u32>>,
    /// Slots per prefill forward.
    pub prefill_chunk: usize,
    /// Preallocate the cache for this many positions; generation stops when it is full.
    pub max_context: Option<usize>,
    pub speculative: Option<Speculative>,
    /// Absolute position of the prompt's first token.
    pub start_position: usize,
    pub forward: ForwardOptions,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingOptions::default(),
            stop_strings: Vec::new(),
            eos_token_ids: None,
            prefill_chunk: 512,
            max_context: None,
            speculative: None,
            start_position: 0,
            forward: ForwardOptions::default(),
        }
    }
}

impl GenerateOptions {
    /// Rejects option values no generation can run with (checked before any forward).
    ///
    /// # Errors
    /// - [`InferError::InvalidOption`]: a sampling option out of its domain
    ///   ([`SamplingOptions::validate`]), `prefill_chunk` or `max_context` 0, an empty stop
    ///   string, or `Speculative::Tokens` with `per_step` 0.
    /// - [`InferError::Speculative`]: speculative decoding with sampling or a repetition
    ///   penalty (it reproduces greedy decoding only).
    pub fn validate(&self) -> Result<(), InferError> {
        self.sampling.validate()?;
        if self.prefill_chunk == 0 {
            return Err(InferError::invalid("prefill_chunk", 0, "must be >= 1"));
        }
        if self.max_context == Some(0) {
            return Err(InferError::invalid("max_context", 0, "must be >= 1"));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(InferError::invalid(
                "stop_strings",
                "\"\"",
                "a stop string must not be empty",
            ));
        }
        if let Some(spec) = &self.speculative {
            let plain = self.sampling.is_greedy()
                && self.sampling.repetition_penalty.is_none_or(|p| p == 1.0);
            if !plain {
                return Err(InferError::Speculative(
                    "greedy decoding (temperature 0, no repetition penalty)".into(),
                ));
            }
            if let Speculative::Tokens { per_step: 0, .. } = spec {
                return Err(InferError::invalid("per_step", 0, "must be >= 1"));
            }
        }
        Ok(())
    }

    /// The session settings these options imply (for [`continue_session`] callers).
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            max_context: self.max_context,
            start_position: self.start_position,
            prefill_chunk: self.prefill_chunk,
            forward: self.forward,
            mtp: self.speculative == Some(Speculative::Mtp),
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Generated this stop id (it is the last of `tokens`).
    Eos(u32),
    /// The text reached this stop string.
    StopString(String),
    MaxNewTokens,
    /// The preallocated context is full.
    ContextFull,
}

/// Speculative decoding counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SpeculativeStats {
    /// Verification forwards.
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl SpeculativeStats {
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// Timings and sizes of one run (shared by every row of a batch).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Prompt tokens over all rows (padding excluded).
    pub prompt_tokens: usize,
    /// Generated tokens over all rows.
    pub generated_tokens: usize,
    /// Rows generated together (the batch's size; 1 for one prompt).
    pub rows: usize,
    /// Prompt tokens actually run (a continued session reuses its cache).
    pub prefilled_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Latent cache bytes held at the end (main + MTP).
    pub cache_bytes: usize,
    /// Main latent cache bytes per token and row.
    pub cache_bytes_per_token: usize,
    pub speculative: Option<SpeculativeStats>,
}

impl Stats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prefilled_tokens, self.prefill_secs)
    }
    /// Tokens generated after each row's first (which the prefill produces) per second,
    /// summed over the rows.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(
            self.generated_tokens.saturating_sub(self.rows),
            self.decode_secs,
        )
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// Generated ids (a stop id included, as HF does).
    pub tokens: Vec<u32>,
    /// Their text (special tokens skipped, cut before a stop string), with a tokenizer.
    pub text: Option<String>,
    pub stop: StopReason,
    pub stats: Stats,
}

/// What the streaming callback sees for each generated token.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// Row in the batch as given (0 for a single prompt).
    pub row: usize,
    pub token: u32,
    /// Text that became printable with this token (may be empty; never half a character).
    pub text: &'a str,
}

/// Generates a continuation of `prompt` (ids; BOS is the caller's business, see
/// [`Tokenizer::encode_prompt`]). `tokenizer` enables text, streaming text and stop strings.
/// A full preallocated context ends the generation ([`StopReason::ContextFull`]), not an error.
///
/// # Errors
/// - [`InferError::InvalidOption`] / [`InferError::Speculative`]: `opts` fails
///   [`GenerateOptions::validate`], or [`Speculative::Mtp`] on a model without an MTP module.
/// - Everything [`continue_session`] returns on a fresh one-row session: an empty or
///   out-of-vocabulary `prompt`, a prompt longer than `max_context`, stop strings without a
///   tokenizer, decoding or readback failures.
pub fn generate<B: DsBackend>(
    model: &DeepseekV3<B>,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(&TokenEvent),
) -> Result<Generation, InferError> {
    opts.validate()?;
    let mut session = Session::new(model, 1, &opts.session_options())?;
    continue_session(&mut session, tokenizer, prompt, opts, on_token)
}

/// Generates for several prompts at once (left-padded batch); each row stops on its own and
/// equals what [`generate`] gives for it alone (greedy; sampled rows use stream `seed + row`).
///
/// # Errors
/// - [`InferError::InvalidOption`]: `opts` fails [`GenerateOptions::validate`].
/// - [`InferError::EmptyPrompt`]: no prompt, or one of them is empty.
/// - [`InferError::Speculative`]: speculative decoding with more than one prompt or with
///   sampling, or [`Speculative::Mtp`] on a model without an MTP module.
/// - [`InferError::StopStringsNeedTokenizer`]: stop strings without a tokenizer.
/// - [`InferError::TokenOutOfRange`]: a prompt id (or a [`Speculative::Tokens`] draft)
///   `>= vocab_size`.
/// - [`InferError::ContextFull`]: the longest prompt does not fit in `max_context`.
/// - [`InferError::Tokenizer`] / [`InferError::Readback`]: detokenizing a generated id, or
///   reading the picked ids back from the device, failed.
pub fn generate_batch<B: DsBackend>(
    model: &DeepseekV3<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&TokenEvent),
) -> Result<Vec<Generation>, InferError> {
    opts.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(InferError::EmptyPrompt);
    }
    if opts.speculative.is_some() && prompts.len() > 1 {
        return Err(InferError::Speculative("a batch of one".into()));
    }
    let mut session = Session::new(model, prompts.len(), &opts.session_options())?;
    let mut run = Run::new(&session, tokenizer, opts)?;
    let t0 = Instant::now();
    let logits = session.prefill(prompts)?;
    run.stats.prompt_tokens = prompts.iter().map(Vec::len).sum();
    run.stats.prefilled_tokens = run.stats.prompt_tokens;
    run.decode(&mut session, logits, t0, &mut on_token)
}

/// Continues a single-row session with `ids` — the whole context so far, e.g. the re-rendered
/// chat: the cached common prefix is reused, anything after it is rolled back and prefilled.
/// The generated tokens stay in the session (the last one is fed at the next turn).
///
/// # Errors
/// - [`InferError::InvalidOption`]: `opts` fails [`GenerateOptions::validate`], or the
///   session has more than one row.
/// - [`InferError::Speculative`]: [`Speculative::Mtp`] on a session opened without `mtp`.
/// - [`InferError::StopStringsNeedTokenizer`]: stop strings without a tokenizer.
/// - [`InferError::EmptyPrompt`] / [`InferError::TokenOutOfRange`]: `ids` is empty, or it
///   (or a [`Speculative::Tokens`] draft) holds an id `>= vocab_size`.
/// - [`InferError::ContextFull`]: `ids` does not fit in the session's `max_context`.
/// - [`InferError::Tokenizer`] / [`InferError::Readback`]: as in [`generate_batch`].
pub fn continue_session<B: DsBackend>(
    session: &mut Session<'_, B>,
    tokenizer: Option<&Tokenizer>,
    ids: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&TokenEvent),
) -> Result<Generation, InferError> {
    opts.validate()?;
    if opts.speculative == Some(Speculative::Mtp) && !session.has_mtp() {
        return Err(InferError::Speculative(
            "a session opened with mtp = true".into(),
        ));
    }
    let mut run = Run::new(session, tokenizer, opts)?;
    let t0 = Instant::now();
    let reused = session.common_prefix(ids);
    let logits = session.sync(ids)?;
    run.stats.prompt_tokens = ids.len();
    run.stats.prefilled_tokens = ids.len() - reused;
    let mut out = run.decode(session, logits, t0, &mut on_token)?;
    Ok(out.remove(0))
}

/// Per-row output state.
struct RowState<'t> {
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already streamed.
    emitted: usize,
    stream: Option<crate::tokenizer::StreamDecoder<'t>>,
    stop: Option<StopReason>,
}

struct Run<'t, 'o> {
    tokenizer: Option<&'t Tokenizer>,
    opts: &'o GenerateOptions,
    eos: Vec<u32>,
    sampler: Sampler,
    stats: Stats,
}

impl<'t, 'o> Run<'t, 'o> {
    fn new<B: DsBackend>(
        session: &Session<'_, B>,
        tokenizer: Option<&'t Tokenizer>,
        opts: &'o GenerateOptions,
    ) -> Result<Self, InferError> {
        if !opts.stop_strings.is_empty() && tokenizer.is_none() {
            return Err(InferError::StopStringsNeedTokenizer);
        }
        let eos = match &opts.eos_token_ids {
            Some(v) => v.clone(),
            None => {
                let mut v = session.model().config.eos_token_ids();
                v.extend(tokenizer.and_then(Tokenizer::eos_id));
                v
            }
        };
        Ok(Self {
            tokenizer,
            opts,
            eos,
            sampler: Sampler::new(&opts.sampling)?,
            stats: Stats::default(),
        })
    }

    /// Runs the decode loop from the prefill's last logits `[B, V]`.
    fn decode<B: DsBackend>(
        &mut self,
        session: &mut Session<'_, B>,
        logits: burn::tensor::Tensor<B, 2>,
        t0: Instant,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<Generation>, InferError> {
        let n = session.batch();
        let mut rows: Vec<RowState> = (0..n)
            .map(|_| RowState {
                tokens: Vec::new(),
                text: String::new(),
                emitted: 0,
                stream: self.tokenizer.map(|t| t.stream(true)),
                stop: None,
            })
            .collect();
        // Batch position -> original row.
        let mut active: Vec<usize> = (0..n).collect();
        let mut t_decode = None;
        let mut spec_stats = SpeculativeStats::default();
        let mut state = Next::Logits(logits);
        if self.opts.max_new_tokens == 0 {
            for r in rows.iter_mut() {
                r.stop = Some(StopReason::MaxNewTokens);
            }
            active.clear();
        }
        while !active.is_empty() {
            // The token each active row feeds next (already recorded in its output).
            let next: Vec<u32> = match state {
                Next::Logits(l) => {
                    let hist: Vec<&[u32]> = (0..active.len()).map(|i| session.tokens(i)).collect();
                    let picks = self.sampler.sample(l, &hist, &active)?;
                    for (i, &tok) in picks.iter().enumerate() {
                        self.push(&mut rows[active[i]], active[i], tok, on_token)?;
                    }
                    picks
                }
                Next::Token(t) => vec![t],
            };
            if t_decode.is_none() {
                self.stats.prefill_secs = t0.elapsed().as_secs_f64();
                t_decode = Some(Instant::now());
            }
            let keep: Vec<usize> = (0..active.len())
                .filter(|&i| rows[active[i]].stop.is_none())
                .collect();
            if keep.is_empty() {
                break;
            }
            let room = self
                .opts
                .max_context
                .map_or(usize::MAX, |c| c.saturating_sub(session.len()));
            if room == 0 {
                for &i in &keep {
                    rows[active[i]].stop = Some(StopReason::ContextFull);
                }
                break;
            }
            session.select_rows(&keep);
            active = keep.iter().map(|&i| active[i]).collect();
            let next: Vec<u32> = keep.iter().map(|&i| next[i]).collect();

            let Some(spec) = &self.opts.speculative else {
                state = Next::Logits(session.decode_step(&next)?);
                continue;
            };
            // Speculative step (one row): draft, then verify the drafts together with `next`.
            let r = active[0];
            let left = self.opts.max_new_tokens - rows[r].tokens.len();
            let max_drafts = left.min(room - 1);
            let drafts: Vec<u32> = match spec {
                _ if max_drafts == 0 => Vec::new(),
                Speculative::Mtp => read_ids(session.mtp_draft_logits(next[0])?.argmax(1))?,
                Speculative::Tokens { tokens, per_step } => tokens
                    .iter()
                    .skip(rows[r].tokens.len())
                    .take((*per_step).min(max_drafts))
                    .copied()
                    .collect(),
            };
            if drafts.is_empty() {
                state = Next::Logits(session.decode_step(&next)?);
                continue;
            }
            let (accepted, bonus) = session.verify_greedy(next[0], &drafts)?;
            spec_stats.steps += 1;
            spec_stats.drafted += drafts.len();
            spec_stats.accepted += accepted;
            for &tok in drafts[..accepted].iter().chain([bonus].iter()) {
                self.push(&mut rows[r], r, tok, on_token)?;
                if rows[r].stop.is_some() {
                    break;
                }
            }
            state = Next::Token(bonus);
        }
        let t_decode = t_decode.unwrap_or_else(Instant::now);
        if self.stats.prefill_secs == 0.0 {
            self.stats.prefill_secs = t0.elapsed().as_secs_f64();
        }
        self.stats.decode_secs = t_decode.elapsed().as_secs_f64();
        self.stats.generated_tokens = rows.iter().map(|r| r.tokens.len()).sum();
        self.stats.rows = rows.len();
        self.stats.cache_bytes = session.cache_bytes();
        self.stats.cache_bytes_per_token = session.cache_bytes_per_token();
        if self.opts.speculative.is_some() {
            self.stats.speculative = Some(spec_stats);
        }
        Ok(rows
            .into_iter()
            .map(|r| Generation {
                tokens: r.tokens,
                text: self.tokenizer.map(|_| r.text),
                stop: r.stop.unwrap_or(StopReason::MaxNewTokens),
                stats: self.stats.clone(),
            })
            .collect())
    }

    /// Records one generated token for a row: text, stop checks, streaming.
    fn push(
        &self,
        row: &mut RowState<'t>,
        index: usize,
        tok: u32,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(), InferError> {
        row.tokens.push(tok);
        let is_eos = self.eos.contains(&tok);
        if let Some(stream) = &mut row.stream {
            if !is_eos {
                let piece = stream.push(tok)?;
                row.text.push_str(&piece);
            }
        }
        if is_eos {
            row.stop = Some(StopReason::Eos(tok));
        } else if let Some((at, s)) = find_stop(&row.text, row.emitted, &self.opts.stop_strings) {
            row.text.truncate(at);
            row.stop = Some(StopReason::StopString(s));
        } else if row.tokens.len() >= self.opts.max_new_tokens {
            row.stop = Some(StopReason::MaxNewTokens);
        }
        if row.stop.is_some() && !matches!(row.stop, Some(StopReason::StopString(_))) {
            if let Some(stream) = &mut row.stream {
                let rest = stream.finish()?;
                row.text.push_str(&rest);
            }
        }
        // Stream what cannot be the start of a stop string any more.
        let safe = if row.stop.is_some() {
            row.text.len()
        } else {
            safe_prefix(&row.text, &self.opts.stop_strings)
        };
        let piece = &row.text[row.emitted.min(safe)..safe];
        on_token(&TokenEvent {
            row: index,
            token: tok,
            text: piece,
        });
        row.emitted = row.emitted.max(safe);
        Ok(())
    }
}

/// What the decode loop feeds next: logits to sample from, or a token that verification
/// already chose (and recorded).
enum Next<B: DsBackend> {
    Logits(burn::tensor::Tensor<B, 2>),
    Token(u32),
}

/// The earliest stop string in `text` that ends after byte `from` (earlier text was checked).
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter_map(|s| {
            let start = floor_char_boundary(text, from.saturating_sub(s.len()));
            text[start..]
                .find(s.as_str())
                .map(|i| (start + i, s.clone()))
        })
        .min_by_key(|(i, _)| *i)
}

/// Length of the longest prefix of `text` that no stop string can still complete.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            let start = text.len() - k;
            if text.is_char_boundary(start) && s.as_bytes().starts_with(&text.as_bytes()[start..]) {
                safe = safe.min(start);
                break;
            }
        }
    }
    safe
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
