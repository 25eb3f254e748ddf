//! Training data: documents from text files, directories of them, or JSONL (`text` field);
//! byte-level tokens packed into one stream (`BOS doc EOS BOS doc EOS ...`), cut into windows of
//! `seq_len + 1` tokens (inputs and their next tokens); every `val_every`-th window is held out
//! for validation (a fixed choice, independent of the seed, so runs with different seeds share
//! it); training windows are visited in an order shuffled per epoch from the seed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::corpus;
use crate::error::TrainError;
use crate::tokenizer::ByteTokenizer;
use dsv3_backends::SplitMix64;

/// One document of the corpus.
#[derive(Debug, Clone)]
pub struct Document {
    pub name: String,
    pub text: String,
}

/// The embedded default corpus (`corpus.rs`).
pub fn embedded_documents() -> Vec<Document> {
    corpus::DOCUMENTS
        .iter()
        .map(|(n, t)| Document {
            name: (*n).to_string(),
            text: (*t).to_string(),
        })
        .collect()
}

/// What reading a path found.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    /// Files in a directory skipped because they are not UTF-8 text.
    pub skipped: Vec<PathBuf>,
}

/// Reads a text file, a `.jsonl` file (one JSON object per line with a string `text`), or a
/// directory of them (recursively, in path order, hidden entries skipped).
///
/// # Errors
/// - [`TrainError::MissingData`]: `path` does not exist.
/// - [`TrainError::Io`]: a file or directory cannot be read.
/// - [`TrainError::NotText`]: `path` is a file that is not UTF-8 (inside a directory such
///   files are skipped and listed in [`ReadReport::skipped`]).
/// - [`TrainError::Jsonl`]: a `.jsonl` line is not JSON or has no string `text` field.
/// - [`TrainError::EmptyData`]: no non-empty document was found.
pub fn read_documents(path: &Path) -> Result<(Vec<Document>, ReadReport), TrainError> {
    if !path.exists() {
        return Err(TrainError::MissingData(path.to_path_buf()));
    }
    let mut docs = Vec::new();
    let mut report = ReadReport::default();
    if path.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        for f in files {
            match read_file(&f) {
                Ok(d) => docs.extend(d),
                Err(TrainError::NotText { .. }) => report.skipped.push(f),
                Err(e) => return Err(e),
            }
        }
    } else {
        docs = read_file(path)?;
    }
    docs.retain(|d| !d.text.is_empty());
    if docs.is_empty() {
        return Err(TrainError::EmptyData(path.to_path_buf()));
    }
    Ok((docs, report))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), TrainError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io("read directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io("read directory", dir, e))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<Document>, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io("read", path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| TrainError::NotText {
        path: path.to_path_buf(),
        reason: e.utf8_error().to_string(),
    })?;
    let name = path.display().to_string();
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| TrainError::Jsonl {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
            let t = v
                .get("text")
                .ok_or_else(|| bad("no \"text\" field".into()))?
                .as_str()
                .ok_or_else(|| bad("\"text\" is not a string".into()))?;
            docs.push(Document {
                name: format!("{name}:{}", i + 1),
                text: t.to_string(),
            });
        }
        Ok(docs)
    } else {
        Ok(vec![Document { name, text }])
    }
}

/// Packed token stream and its train/validation windows.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub tokens: Vec<u32>,
    pub seq_len: usize,
    /// Start offsets of training windows (each `seq_len + 1` tokens).
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub documents: usize,
    /// Bytes of text (special tokens excluded).
    pub bytes: usize,
    /// Per token of `tokens`: whether it counts as a target (fine-tuning's assistant mask and
    /// padding, built by `sft.rs`). `None`: every token counts (pre-training).
    pub mask: Option<Vec<bool>>,
}

impl Dataset {
    /// Packs `docs` and splits the windows: window `w` (tokens `w·T ..= w·T + T`) is held out
    /// when `w % val_every == val_every − 1`; at least one window is held out.
    ///
    /// # Errors
    /// - [`TrainError::Invalid`]: `seq_len` or `val_every` is below 2.
    /// - [`TrainError::CorpusTooSmall`]: fewer than `2·seq_len + 1` tokens (one training and
    ///   one validation window).
    pub fn pack(docs: &[Document], seq_len: usize, val_every: usize) -> Result<Self, TrainError> {
        if seq_len < 2 {
            return Err(TrainError::Invalid(format!(
                "seq_len = {seq_len} must be >= 2 (MTP predicts two tokens ahead)"
            )));
        }
        if val_every < 2 {
            return Err(TrainError::Invalid(format!(
                "val_every = {val_every} must be >= 2"
            )));
        }
        let tok = ByteTokenizer;
        let mut tokens = Vec::new();
        for d in docs {
            tokens.extend(tok.encode_document(&d.text));
        }
        let needed = 2 * seq_len + 1;
        if tokens.len() < needed {
            return Err(TrainError::CorpusTooSmall {
                tokens: tokens.len(),
                seq_len,
                needed,
            });
        }
        let windows = (tokens.len() - 1) / seq_len;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for w in 0..windows {
            if w % val_every == val_every - 1 {
                val.push(w * seq_len);
            } else {
                train.push(w * seq_len);
            }
        }
        if val.is_empty() {
            val.push(train.pop().expect("two windows"));
        }
        let bytes = tokens.iter().filter(|&&t| t < 256).count();
        Ok(Self {
            tokens,
            seq_len,
            train,
            val,
            documents: docs.len(),
            bytes,
            mask: None,
        })
    }

    /// Window at `start`: `seq_len + 1` tokens.
    pub fn window(&self, start: usize) -> &[u32] {
        &self.tokens[start..start + self.seq_len + 1]
    }

    /// The mask of the window at `start` (`None` when every token counts).
    pub fn window_mask(&self, start: usize) -> Option<&[bool]> {
        self.mask
            .as_ref()
            .map(|m| &m[start..start + self.seq_len + 1])
    }

    /// FNV-1a of the token stream and the split: a resumed run checks it trains on the same data.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for &t in &self.tokens {
            eat(t as u64);
        }
        eat(self.seq_len as u64);
        eat(self.val.len() as u64);
        if let Some(m) = &self.mask {
            for &b in m {
                eat(b as u64);
            }
        }
        h
    }
}

/// Where the training order stands: enough to continue it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Next position in this epoch's permutation.
    pub cursor: usize,
    /// RNG state at the start of this epoch (the permutation is redrawn from it).
    pub rng: SplitMix64,
}

/// Deterministic epoch-wise shuffled order over `n` training windows.
#[derive(Debug, Clone)]
pub struct Sampler {
    n: usize,
    state: SamplerState,
    perm: Vec<usize>,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        Self::restore(
            n,
            SamplerState {
                epoch: 0,
                cursor: 0,
                rng: SplitMix64::new(seed ^ 0xD5E3_D47A_0000_0000),
            },
        )
    }

    pub fn restore(n: usize, state: SamplerState) -> Self {
        let mut rng = state.rng;
        let mut perm: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut perm);
        Self { n, state, perm }
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The next `count` window indices (crossing into a new, reshuffled epoch as needed).
    pub fn next(&mut self, count: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if self.state.cursor == self.n {
                // Advance the epoch RNG past this epoch's shuffle, then draw the next one.
                let mut rng = self.state.rng;
                let mut scratch: Vec<usize> = (0..self.n).collect();
                rng.shuffle(&mut scratch);
                self.state = SamplerState {
                    epoch: self.state.epoch + 1,
                    cursor: 0,
                    rng,
                };
                *self = Self::restore(self.n, self.state);
            }
            out.push(self.perm[self.state.cursor]);
            self.state.cursor += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(t: &str) -> Document {
        Document {
            name: "d".into(),
            text: t.into(),
        }
    }

    #[test]
    fn packing_and_split() {
        let d = Dataset::pack(&[doc("abcdefgh"), doc("ijklmnop")], 4, 2).unwrap();
        // BOS a..h EOS BOS i..p EOS = 20 tokens, windows of 5 at stride 4: 4 windows.
        assert_eq!(d.tokens.len(), 20);
        assert_eq!(d.train, vec![0, 8]);
        assert_eq!(d.val, vec![4, 12]);
        assert_eq!(d.window(4), &[100, 101, 102, 103, 104]);
        assert_eq!(d.bytes, 16);
    }

    #[test]
    fn too_small() {
        let e = Dataset::pack(&[doc("abc")], 8, 20).unwrap_err().to_string();
        assert!(e.contains("corpus too small") && e.contains("17"), "{e}");
    }

    #[test]
    fn sampler_is_seeded_and_resumable() {
        let mut a = Sampler::new(10, 3);
        let first = a.next(7);
        let st = a.state();
        let rest = a.next(25);
        let mut b = Sampler::restore(10, st);
        assert_eq!(b.next(25), rest);
        let mut c = Sampler::new(10, 4);
        assert_ne!(c.next(7), first);
        // Each epoch is a permutation.
        let mut e = Sampler::new(10, 3).next(20);
        let mut second = e.split_off(10);
        e.sort();
        second.sort();
        assert_eq!(e, (0..10).collect::<Vec<_>>());
        assert_eq!(second, e);
    }
}
