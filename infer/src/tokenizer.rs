//! Text ↔ ids: `tokenizer.json` through the `tokenizers` crate, the chat template (from
//! `chat_template.jinja`, else `tokenizer_config.json`) through `minijinja`, and a streaming
//! detokenizer.
//!
//! Crate choice (measured, see `shared/burn-0.21-notes.md`): `tokenizers` 0.23.2 with the
//! pure-Rust `fancy-regex` engine encodes DeepSeek's pre-tokenizer regex at ~2 MB/s (1.0.0-rc.3
//! does ~250 MB/s) but has the stable `Tokenizer` API and needs no rewrite of the JSON; at
//! ~4 bytes a token that is ~500K tokens/s, far above what the model prefills on a CPU.
//!
//! BOS, as DeepSeek's files expect: `tokenizer.json` never adds it. A plain prompt gets the BOS
//! token when `tokenizer_config.json` says `add_bos_token` (true for V3, false for the
//! V3-0324/R1 revision), as HF's `LlamaTokenizerFast` does, unless the text already starts with
//! it; a chat prompt gets it from the template text (`{{ bos_token }}`), never twice.
//!
//! The chat template: current transformers saves it to `chat_template.jinja` beside the
//! tokenizer and leaves the `chat_template` key out of `tokenizer_config.json`; `AutoTokenizer`
//! reads that file and prefers it to the key. So do we.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::InferError;

/// One chat message (`role`: `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model directory's tokenizer and chat template.
pub struct Tokenizer {
    inner: HfTokenizer,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: bool,
    chat_template: Option<String>,
    /// Where the template came from (`chat_template.jinja` or `tokenizer_config.json`).
    chat_template_source: PathBuf,
}

/// The file current transformers writes the chat template to.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("add_bos_token", &self.add_bos_token)
            .field("chat_template", &self.chat_template.is_some())
            .field("chat_template_source", &self.chat_template_source)
            .finish()
    }
}

/// `"<tok>"` or `{"content": "<tok>", ...}` (HF's `AddedToken` form).
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// `dir/tokenizer.json` plus, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (which wins over the config's `chat_template` key, as in HF).
    /// Returns `Ok(None)` when the directory has no `tokenizer.json` (ids-only use).
    ///
    /// # Errors
    /// [`InferError::Tokenizer`] naming the file that cannot be read or parsed, or a BOS token
    /// missing from the vocabulary.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, InferError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let mut tok = Self::from_files(&path, Some(&dir.join("tokenizer_config.json")))?;
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| InferError::Tokenizer {
                path: jinja.clone(),
                reason: e.to_string(),
            })?;
            tok.chat_template = Some(text);
            tok.chat_template_source = jinja;
        }
        Ok(Some(tok))
    }

    /// Loads `tokenizer.json` and an optional `tokenizer_config.json` (a missing config file
    /// means: no BOS, no chat template). [`Tokenizer::from_dir`] also reads
    /// `chat_template.jinja`.
    ///
    /// # Errors
    /// [`InferError::Tokenizer`] naming the file that cannot be read or parsed, or a BOS token
    /// missing from the vocabulary.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self, InferError> {
        let err = |path: &Path, reason: String| InferError::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let bytes =
            std::fs::read(tokenizer_json).map_err(|e| err(tokenizer_json, e.to_string()))?;
        let inner = HfTokenizer::from_bytes(bytes).map_err(|e| {
            err(
                tokenizer_json,
                format!("not a tokenizer file the `tokenizers` crate reads: {e}"),
            )
        })?;
        let cfg: Value = match config.filter(|p| p.is_file()) {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| err(p, e.to_string()))?;
                serde_json::from_str(&text).map_err(|e| err(p, e.to_string()))?
            }
            None => Value::Null,
        };
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let add_bos_token = cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(bos_token.is_some());
        if let Some(b) = &bos_token {
            if inner.token_to_id(b).is_none() {
                return Err(err(
                    tokenizer_json,
                    format!("bos_token {b:?} of tokenizer_config.json is not in the vocabulary"),
                ));
            }
        }
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(Self {
            inner,
            path: tokenizer_json.to_path_buf(),
            bos_token,
            eos_token,
            add_bos_token,
            chat_template,
            chat_template_source: config
                .unwrap_or(Path::new("tokenizer_config.json"))
                .to_path_buf(),
        })
    }

    /// The `tokenizers` object, for anything not wrapped here.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.token_to_id(self.bos_token.as_deref()?)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.inner.token_to_id(self.eos_token.as_deref()?)
    }

    pub fn adds_bos(&self) -> bool {
        self.add_bos_token && self.bos_token.is_some()
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    fn fail(&self, e: impl ToString) -> InferError {
        InferError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The ids of `text` exactly as `tokenizer.json` encodes it (special-token strings in the
    /// text become their ids; nothing is added).
    ///
    /// # Errors
    /// [`InferError::Tokenizer`] naming `tokenizer.json` when the `tokenizers` crate fails to
    /// encode `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| self.fail(e))?
            .get_ids()
            .to_vec())
    }

    /// A plain (non-chat) prompt: BOS first when the config asks for it and the text does not
    /// already begin with it (so a prompt pasted from a rendered chat gets one BOS, not two).
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, InferError> {
        let mut ids = Vec::new();
        let body = self.encode(text)?;
        if self.adds_bos() && body.first().copied() != self.bos_id() {
            ids.extend(self.bos_id());
        }
        ids.extend(body);
        Ok(ids)
    }

    /// Where the chat template was read from (`chat_template.jinja` or `tokenizer_config.json`).
    pub fn chat_template_source(&self) -> Option<&Path> {
        self.chat_template
            .as_ref()
            .map(|_| self.chat_template_source.as_path())
    }

    /// Renders the chat template as HF's `apply_chat_template(messages, tokenize=False)`:
    /// Jinja with `trim_blocks`/`lstrip_blocks`, Python string methods, and the special tokens
    /// (`bos_token`, `eos_token`) in the context.
    ///
    /// # Errors
    /// [`InferError::ChatTemplate`] when the directory has no chat template, the template does
    /// not compile, or rendering fails (including the template's own `raise_exception`, e.g.
    /// for roles out of order).
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            InferError::ChatTemplate(format!(
                "{} has no chat template: neither {CHAT_TEMPLATE_FILE} nor a chat_template key in tokenizer_config.json",
                dir.display()
            ))
        })?;
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| InferError::ChatTemplate(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| InferError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| InferError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| InferError::ChatTemplate(e.to_string()))
    }

    /// The ids of the rendered chat (BOS comes from the template text).
    ///
    /// # Errors
    /// As [`Tokenizer::render_chat`], then [`Tokenizer::encode`].
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, InferError> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?)
    }

    /// Text of `ids` (special tokens skipped when asked).
    ///
    /// # Errors
    /// [`InferError::Tokenizer`] naming `tokenizer.json` when the `tokenizers` crate fails to
    /// decode `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, InferError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.fail(e))
    }

    /// A detokenizer for a stream of generated ids.
    pub fn stream(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// `[{"role": .., "content": ..}, ..]` for the template.
fn messages_value(messages: &[Message]) -> minijinja::Value {
    messages
        .iter()
        .map(|m| {
            let map: std::collections::BTreeMap<String, minijinja::Value> = [
                ("role".to_string(), minijinja::Value::from(m.role.clone())),
                (
                    "content".to_string(),
                    minijinja::Value::from(m.content.clone()),
                ),
            ]
            .into_iter()
            .collect();
            minijinja::Value::from(map)
        })
        .collect::<Vec<_>>()
        .into()
}

/// Turns ids into text as they arrive, never emitting half a UTF-8 character: a byte-level
/// token can hold part of a character, and decoding it alone gives U+FFFD. The decoder keeps
/// a window of already-emitted ids as context (so merges across token boundaries such as a
/// leading space decode right) and emits the new text only once it no longer ends in U+FFFD.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text that became complete (possibly empty).
    ///
    /// # Errors
    /// As [`Tokenizer::decode`] (of the context window).
    pub fn push(&mut self, id: u32) -> Result<String, InferError> {
        self.ids.push(id);
        let done = self.decode(self.prefix, self.read)?;
        let all = self.decode(self.prefix, self.ids.len())?;
        if all.len() > done.len() && !all.ends_with('\u{FFFD}') && all.starts_with(&done) {
            let new = all[done.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end decodes as U+FFFD).
    ///
    /// # Errors
    /// As [`Tokenizer::decode`].
    pub fn finish(&mut self) -> Result<String, InferError> {
        let done = self.decode(self.prefix, self.read)?;
        let all = self.decode(self.prefix, self.ids.len())?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(match all.strip_prefix(done.as_str()) {
            Some(rest) => rest.to_string(),
            None => all,
        })
    }

    fn decode(&self, from: usize, to: usize) -> Result<String, InferError> {
        if from >= to {
            return Ok(String::new());
        }
        self.tok
            .decode(&self.ids[from..to], self.skip_special_tokens)
    }
}
