//! A running context: the latent cache of one or more rows plus the ids it holds.
//!
//! Everything positional lives here. Rows of a batch are left-padded to a common slot count;
//! row `r`'s first `pad[r]` slots are padding that real queries never see, and its real tokens
//! sit at their own absolute positions (`start_position + i`), exactly as when the row runs
//! alone. Prefill runs in chunks of any size at any point (a chat turn continues the cache).
//! With MTP speculation on, the session also keeps the MTP module's own latent cache and the
//! main hidden states it has not consumed yet.

use burn::tensor::{Int, Tensor, TensorData};
use dsv3_backends::DsBackend;
use dsv3_model::padded_causal_mask;
use dsv3_model::{DeepseekV3, ForwardOptions, ForwardOutput, Span};

use crate::cache::LatentCache;
use crate::error::InferError;
use crate::sampling::read_ids;

/// How a session runs its forwards.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Preallocate the cache for this many positions (slots) and refuse to go past it.
    pub max_context: Option<usize>,
    /// Absolute position of each row's first token.
    pub start_position: usize,
    /// Largest number of slots per prefill forward (bounds activation memory).
    pub prefill_chunk: usize,
    pub forward: ForwardOptions,
    /// Keep the MTP module's cache (needed for MTP speculative decoding).
    pub mtp: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            max_context: None,
            start_position: 0,
            prefill_chunk: 512,
            forward: ForwardOptions::default(),
            mtp: false,
        }
    }
}

/// The MTP module's state. Pair `i` = (main hidden at position i, token i+1) is fed at position
/// i. `cache` holds pairs `0..cache.len()`; `pending` holds the main hidden states of positions
/// `cache.len()..main_len` whose pairs have not been fed yet.
#[derive(Debug, Clone)]
struct MtpState<B: DsBackend> {
    cache: LatentCache<B>,
    pending: Option<Tensor<B, 3>>,
}

/// A running context of one or more rows over a borrowed model: its latent cache, the ids it
/// holds and, for MTP speculation, the MTP module's cache (see the module docs).
#[derive(Debug, Clone)]
pub struct Session<'m, B: DsBackend> {
    model: &'m DeepseekV3<B>,
    cache: LatentCache<B>,
    /// Real ids per row (padding excluded); slot count = pad[r] + ids[r].len().
    ids: Vec<Vec<u32>>,
    pad: Vec<usize>,
    opts: SessionOptions,
    mtp: Option<MtpState<B>>,
}

impl<'m, B: DsBackend> Session<'m, B> {
    /// An empty session of `batch` rows.
    ///
    /// # Errors
    /// - [`InferError::InvalidOption`]: `batch`, `prefill_chunk` or `max_context` is 0, or
    ///   `start_position >= 2^31`.
    /// - [`InferError::Speculative`]: `opts.mtp` on a model without an MTP module, or with
    ///   `batch > 1`.
    pub fn new(
        model: &'m DeepseekV3<B>,
        batch: usize,
        opts: &SessionOptions,
    ) -> Result<Self, InferError> {
        if batch == 0 {
            return Err(InferError::invalid(
                "batch",
                0,
                "at least one row is needed",
            ));
        }
        if opts.prefill_chunk == 0 {
            return Err(InferError::invalid("prefill_chunk", 0, "must be >= 1"));
        }
        if opts.max_context == Some(0) {
            return Err(InferError::invalid("max_context", 0, "must be >= 1"));
        }
        if opts.start_position >= dsv3_model::MAX_POSITION / 2 {
            return Err(InferError::invalid(
                "start_position",
                opts.start_position,
                "must be below 2^31 (positions are limited to 2^32)",
            ));
        }
        let cfg = &model.config;
        let device = model.device();
        let cache = LatentCache::new(
            cfg.num_hidden_layers,
            batch,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            opts.max_context,
            &device,
        );
        let mtp = if opts.mtp {
            if model.model.mtp.is_empty() {
                return Err(InferError::Speculative(
                    "a model with an MTP module (num_nextn_predict_layers > 0, weights present)"
                        .into(),
                ));
            }
            if batch != 1 {
                return Err(InferError::Speculative("a batch of one".into()));
            }
            Some(MtpState {
                cache: LatentCache::new(
                    1,
                    1,
                    cfg.kv_lora_rank,
                    cfg.qk_rope_head_dim,
                    opts.max_context,
                    &device,
                ),
                pending: None,
            })
        } else {
            None
        };
        Ok(Self {
            model,
            cache,
            ids: vec![Vec::new(); batch],
            pad: vec![0; batch],
            opts: opts.clone(),
            mtp,
        })
    }

    pub fn model(&self) -> &'m DeepseekV3<B> {
        self.model
    }
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.ids.len()
    }
    /// Cached slots per row (padding included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
    /// The real ids cached for `row`.
    pub fn tokens(&self, row: usize) -> &[u32] {
        &self.ids[row]
    }
    /// Bytes held by the latent caches (main + MTP).
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes() + self.mtp.as_ref().map_or(0, |m| m.cache.bytes())
    }
    /// Main-cache bytes per token and row (576 × layers × 4 for the 671B shape in f32).
    pub fn cache_bytes_per_token(&self) -> usize {
        self.cache.bytes_per_token()
    }
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), InferError> {
        let vocab = self.model.config.vocab_size;
        match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(&id) => Err(InferError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// Appends each row's tokens and returns the logits of each row's last position `[B, V]`.
    ///
    /// On an empty session the rows may differ in length (they are left-padded); afterwards
    /// every row must add the same number of tokens. Runs in chunks of `prefill_chunk` slots.
    ///
    /// # Errors
    /// Checked before any forward, so the session is unchanged:
    /// - [`InferError::InvalidOption`]: `rows.len()` is not the batch size, or (on a non-empty
    ///   session) the rows differ in length.
    /// - [`InferError::TokenOutOfRange`]: an id `>= vocab_size`.
    /// - [`InferError::EmptyPrompt`]: every row is empty.
    /// - [`InferError::ContextFull`]: the new slots do not fit in `max_context`.
    pub fn prefill(&mut self, rows: &[Vec<u32>]) -> Result<Tensor<B, 2>, InferError> {
        if rows.len() != self.batch() {
            return Err(InferError::invalid(
                "rows",
                rows.len(),
                "must match the session's batch size",
            ));
        }
        for r in rows {
            self.check_ids(r)?;
        }
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Err(InferError::EmptyPrompt);
        }
        let new_pad: Vec<usize> = if self.is_empty() {
            rows.iter().map(|r| longest - r.len()).collect()
        } else {
            if rows.iter().any(|r| r.len() != longest) {
                return Err(InferError::invalid(
                    "rows",
                    "unequal lengths",
                    "after the first prefill every row must add the same number of tokens",
                ));
            }
            vec![0; rows.len()]
        };
        if let Some(cap) = self.opts.max_context {
            if self.len() + longest > cap {
                return Err(InferError::ContextFull {
                    needed: self.len() + longest,
                    max_context: cap,
                });
            }
        }
        if self.is_empty() {
            self.pad = new_pad.clone();
        }
        // Slot-major view of the new tokens (padding slots hold id 0, never attended to).
        let slots: Vec<Vec<Option<u32>>> = rows
            .iter()
            .zip(&new_pad)
            .map(|(r, &p)| {
                std::iter::repeat_n(None, p)
                    .chain(r.iter().map(|&i| Some(i)))
                    .collect()
            })
            .collect();
        let mut last = None;
        let mut a = 0;
        while a < longest {
            let t = self.opts.prefill_chunk.min(longest - a);
            let chunk: Vec<Vec<Option<u32>>> = slots.iter().map(|s| s[a..a + t].to_vec()).collect();
            let out = self.forward_slots(&chunk, true)?;
            last = Some(out.logits.squeeze_dim::<2>(1));
            a += t;
        }
        Ok(last.expect("at least one chunk"))
    }

    /// One forward over `t` new slots per row (all rows the same `t`), appended to the cache.
    /// Returns the whole forward output (logits `[B, t, V]`, hidden states).
    ///
    /// # Errors
    /// Checked before any forward, so the session is unchanged:
    /// - [`InferError::InvalidOption`]: not one non-empty row per batch row, all of one length.
    /// - [`InferError::TokenOutOfRange`]: an id `>= vocab_size`.
    /// - [`InferError::ContextFull`]: `t` more slots do not fit in `max_context`.
    pub fn forward_chunk(&mut self, rows: &[Vec<u32>]) -> Result<ForwardOutput<B>, InferError> {
        let t = rows.first().map_or(0, Vec::len);
        if rows.len() != self.batch() || t == 0 || rows.iter().any(|r| r.len() != t) {
            return Err(InferError::invalid(
                "rows",
                "shape",
                "one non-empty row per batch row, all of the same length",
            ));
        }
        for r in rows {
            self.check_ids(r)?;
        }
        // (`forward_slots` refuses a chunk that does not fit, before touching any state.)
        let slots: Vec<Vec<Option<u32>>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| Some(i)).collect())
            .collect();
        self.forward_slots(&slots, false)
    }

    /// The core step: slots `None` are left padding (only at the very start of a row). With
    /// `last_only`, logits are computed for the last slot only (`[B, 1, V]`).
    fn forward_slots(
        &mut self,
        slots: &[Vec<Option<u32>>],
        last_only: bool,
    ) -> Result<ForwardOutput<B>, InferError> {
        let b = slots.len();
        let t = slots[0].len();
        self.cache.reserve(t)?;
        let past = self.len();
        let device = self.model.device();
        let mut ids = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        for (r, row) in slots.iter().enumerate() {
            let mut n = self.ids[r].len();
            for s in row {
                ids.push(s.unwrap_or(0) as i64);
                positions.push(self.opts.start_position + n);
                if let Some(id) = s {
                    self.ids[r].push(*id);
                    n += 1;
                }
            }
        }
        let mask = padded_causal_mask(t, past, &self.pad, &device);
        let span = Span::at_positions(&self.model.rope, &positions, b, mask, &device);
        let tokens =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b * t]), &device).reshape([b, t]);
        let opts = ForwardOptions {
            last_logits_only: last_only,
            ..self.opts.forward
        };
        // On the backend's pool: the step's jobs (experts, split products) start from a pool
        // thread instead of waking the pool from this one each time (`DsBackend::on_pool`).
        let (model, cache) = (self.model, &mut self.cache);
        let out = B::on_pool(|| model.forward_store(tokens, &span, cache, &opts));
        self.cache.commit(t);
        if let Some(m) = &mut self.mtp {
            m.pending = Some(match m.pending.take() {
                Some(p) => Tensor::cat(vec![p, out.hidden.clone()], 1),
                None => out.hidden.clone(),
            });
        }
        Ok(out)
    }

    /// Feeds one token per row and returns the next logits `[B, V]`.
    ///
    /// # Errors
    /// As [`Session::forward_chunk`]: [`InferError::InvalidOption`] when `next` does not hold
    /// one id per row, [`InferError::TokenOutOfRange`], [`InferError::ContextFull`].
    pub fn decode_step(&mut self, next: &[u32]) -> Result<Tensor<B, 2>, InferError> {
        let rows: Vec<Vec<u32>> = next.iter().map(|&i| vec![i]).collect();
        let out = self.forward_chunk(&rows)?;
        Ok(out.logits.squeeze_dim::<2>(1))
    }

    /// Keeps only `rows` (indices into the current batch), in that order.
    pub fn select_rows(&mut self, rows: &[usize]) {
        if rows.len() == self.batch() && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        self.cache.select_rows(rows);
        self.ids = rows
            .iter()
            .map(|&r| std::mem::take(&mut self.ids[r]))
            .collect();
        self.pad = rows.iter().map(|&r| self.pad[r]).collect();
    }

    /// Rolls a single-row session back to its first `len` tokens.
    ///
    /// # Errors
    /// [`InferError::InvalidOption`] when the session has more than one row. (With MTP, rolling
    /// back past the MTP cache re-runs the last kept token through [`Session::forward_chunk`],
    /// which cannot fail on a shorter context.)
    pub fn truncate(&mut self, len: usize) -> Result<(), InferError> {
        if self.batch() != 1 {
            return Err(InferError::invalid(
                "truncate",
                self.batch(),
                "only a single-row session can roll back",
            ));
        }
        let len = len.min(self.ids[0].len());
        let main_len = self.ids[0].len();
        if len == main_len {
            return Ok(());
        }
        let slot_len = self.pad[0] + len;
        match &mut self.mtp {
            None => {
                self.cache.truncate(slot_len);
                self.ids[0].truncate(len);
            }
            Some(m) => {
                let fed = m.cache.len();
                if len > fed {
                    // The pending hidden states of positions fed..len are still right.
                    m.pending = m.pending.take().map(|p| p.narrow(1, 0, len - fed));
                    self.cache.truncate(slot_len);
                    self.ids[0].truncate(len);
                } else {
                    // Re-run the last kept token to get its hidden state back.
                    let keep = len.saturating_sub(1);
                    m.cache.truncate(keep);
                    m.pending = None;
                    let last = self.ids[0].get(keep).copied();
                    self.cache.truncate(self.pad[0] + keep);
                    self.ids[0].truncate(keep);
                    if let (Some(tok), true) = (last, len > 0) {
                        self.forward_chunk(&[vec![tok]])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many leading `ids` a [`Session::sync`] to them reuses from the cache (never all of
    /// them: the last one is always run, for its logits).
    pub fn common_prefix(&self, ids: &[u32]) -> usize {
        match self.ids.as_slice() {
            [row] => row
                .iter()
                .zip(ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ids.len().saturating_sub(1)),
            _ => 0,
        }
    }

    /// Makes a single-row session hold exactly `ids` and returns the last position's logits
    /// `[1, V]`: keeps the longest common prefix of what is cached, rolls back the rest and
    /// prefills the remainder (at least the last token, whose logits are needed).
    ///
    /// # Errors
    /// - [`InferError::EmptyPrompt`]: `ids` is empty.
    /// - [`InferError::TokenOutOfRange`]: an id `>= vocab_size`.
    /// - [`InferError::InvalidOption`]: the session has more than one row.
    /// - [`InferError::ContextFull`]: `ids` does not fit in `max_context` (the session is then
    ///   already rolled back to the common prefix).
    pub fn sync(&mut self, ids: &[u32]) -> Result<Tensor<B, 2>, InferError> {
        if ids.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        self.check_ids(ids)?;
        if self.batch() != 1 {
            return Err(InferError::invalid(
                "sync",
                self.batch(),
                "only a single-row session can continue",
            ));
        }
        let common = self.common_prefix(ids);
        self.truncate(common)?;
        self.prefill(&[ids[common..].to_vec()])
    }

    /// MTP draft logits `[1, V]` for the token after `next`: feeds the pending pairs (ending
    /// with the last cached position paired with `next`, the sampled but not yet fed token)
    /// through MTP module 0 with its cache.
    ///
    /// # Errors
    /// - [`InferError::TokenOutOfRange`]: `next >= vocab_size`.
    /// - [`InferError::Speculative`]: the session was opened without `mtp`, or nothing has
    ///   been prefilled since the last draft.
    /// - [`InferError::ContextFull`]: the MTP cache is full (not expected: it never holds more
    ///   positions than the main cache).
    pub fn mtp_draft_logits(&mut self, next: u32) -> Result<Tensor<B, 2>, InferError> {
        self.check_ids(&[next])?;
        let start = self.opts.start_position;
        let chunk = self.opts.prefill_chunk;
        let device = self.model.device();
        let m = self
            .mtp
            .as_mut()
            .ok_or_else(|| InferError::Speculative("a session opened with mtp = true".into()))?;
        let pending = m
            .pending
            .take()
            .ok_or_else(|| InferError::Speculative("a prefilled prompt before drafting".into()))?;
        let fed = m.cache.len();
        let n = pending.dims()[1];
        // Tokens one step ahead of each pending position: ids[fed+1..] then `next`.
        let mut ahead: Vec<u32> = self.ids[0][fed + 1..].to_vec();
        ahead.push(next);
        debug_assert_eq!(ahead.len(), n);
        let mut last = None;
        let mut a = 0;
        while a < n {
            let t = chunk.min(n - a);
            let h = pending.clone().narrow(1, a, t);
            let toks = Tensor::<B, 1, Int>::from_data(
                TensorData::new(ahead[a..a + t].iter().map(|&i| i as i64).collect(), [t]),
                &device,
            )
            .reshape([1, t]);
            let past_len = m.cache.len();
            let span = Span::contiguous(&self.model.rope, start + past_len, t, past_len, &device);
            let past = m.cache.past();
            let opts = ForwardOptions {
                last_logits_only: true,
                ..self.opts.forward
            };
            let model = self.model;
            let past0 = past.as_ref().map(|p| &p[0]);
            let out = B::on_pool(|| model.forward_mtp_span(0, h, toks, &span, past0, &opts))?;
            drop(past);
            m.cache.append(vec![out.kv])?;
            last = Some(out.logits.squeeze_dim::<2>(1));
            a += t;
        }
        Ok(last.expect("pending is never empty"))
    }

    /// Greedy verification of `drafts` following `next`: one forward over `[next, drafts..]`,
    /// accepts the longest prefix of drafts that greedy decoding would have produced, rolls the
    /// cache back past the first rejected one, and returns (accepted drafts, the token greedy
    /// decoding picks after them). `next` and the accepted drafts stay cached.
    ///
    /// # Errors
    /// - As [`Session::forward_chunk`] for the row `[next, drafts..]`:
    ///   [`InferError::InvalidOption`] (more than one row), [`InferError::TokenOutOfRange`],
    ///   [`InferError::ContextFull`].
    /// - [`InferError::Readback`]: the greedy picks cannot be read back from the device.
    pub fn verify_greedy(&mut self, next: u32, drafts: &[u32]) -> Result<(usize, u32), InferError> {
        let before = self.ids[0].len();
        let mut row = vec![next];
        row.extend_from_slice(drafts);
        let out = self.forward_chunk(&[row])?;
        let picks = read_ids(out.logits.argmax(2))?; // [1+k]
        let accepted = drafts
            .iter()
            .zip(&picks)
            .take_while(|(d, p)| d == p)
            .count();
        let keep = before + 1 + accepted;
        if keep < self.ids[0].len() {
            let drop_n = self.ids[0].len() - keep;
            self.cache.truncate(self.cache.len() - drop_n);
            self.ids[0].truncate(keep);
            if let Some(m) = &mut self.mtp {
                let fed = m.cache.len();
                m.pending = m.pending.take().map(|p| p.narrow(1, 0, keep - fed));
            }
        }
        Ok((accepted, picks[accepted]))
    }
}
