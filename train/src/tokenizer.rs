//! The byte-level tokenizer: token id = byte value (0..=255), plus two special tokens.
//!
//! It is written as a Hugging Face `tokenizer.json` (a BPE model over GPT-2's 256 byte-level
//! symbols with no merges, ByteLevel pre-tokenizer and decoder) so that any `tokenizers`-based
//! loader — the inference engine's included — reads it unchanged and gets the same ids. Byte
//! level needs no training, never meets an unknown character, and makes bits per byte a plain
//! unit conversion of the loss.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::TrainError;

/// Beginning-of-document token, prepended to every document (DeepSeek-V3's name for it).
pub const BOS: u32 = 256;
/// End-of-document token: the separator between packed documents.
pub const EOS: u32 = 257;
/// Vocabulary size of the byte-level tokenizer.
pub const VOCAB: usize = 258;
pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";

/// The chat template written into `tokenizer_config.json`: DeepSeek-V3's conversation format
/// (BOS, the system messages, then `<｜User｜>…` and `<｜Assistant｜>…<EOS>` turns; the role
/// markers are plain text here, bytes like any other) without tool calls. A message of any other
/// role stops rendering with an error naming it.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}\
{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}\
{% for m in messages %}\
{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}\
{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}\
{% elif m['role'] != 'system' %}{{ raise_exception('unknown role ' ~ m['role']) }}\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// GPT-2's reversible map from bytes to printable characters (what ByteLevel uses).
pub fn byte_to_char() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("BMP")
        };
    }
    out
}

/// Encoding and decoding with the byte-level vocabulary.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// A document as trained on: `BOS text EOS`.
    pub fn encode_document(&self, text: &str) -> Vec<u32> {
        let mut v = Vec::with_capacity(text.len() + 2);
        v.push(BOS);
        v.extend(text.bytes().map(u32::from));
        v.push(EOS);
        v
    }

    /// Bytes back to text (invalid UTF-8 replaced); special tokens are dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// How many bytes of text a token stands for (specials: none).
    pub fn bytes_of(&self, id: u32) -> usize {
        usize::from(id < 256)
    }

    /// The Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Value {
        let chars = byte_to_char();
        let vocab: serde_json::Map<String, Value> = chars
            .iter()
            .enumerate()
            .map(|(b, c)| (c.to_string(), json!(b)))
            .collect();
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(BOS, BOS_TEXT), special(EOS, EOS_TEXT)],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": []
            }
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (names BOS/EOS, holds
    /// `CHAT_TEMPLATE`) into `dir`.
    ///
    /// # Errors
    /// [`TrainError::Io`] when a file cannot be written (e.g. `dir` does not exist).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let write = |name: &str, v: Value| {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(&v).expect("json");
            std::fs::write(&path, text).map_err(|e| TrainError::io("write", &path, e))
        };
        write("tokenizer.json", self.to_json())?;
        write(
            "tokenizer_config.json",
            json!({
                "add_bos_token": true, "add_eos_token": false,
                "bos_token": BOS_TEXT, "eos_token": EOS_TEXT,
                "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": false, "chat_template": CHAT_TEMPLATE
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_char();
        let set: std::collections::BTreeSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn round_trip() {
        let t = ByteTokenizer;
        let s = "héllo, wörld — λ = 0.3\n\tend";
        assert_eq!(t.decode(&t.encode(s)), s);
        let d = t.encode_document("ab");
        assert_eq!(d, vec![BOS, 97, 98, EOS]);
    }
}
