//! `dsv3 generate` and `dsv3 chat` end to end.

use std::path::{Path, PathBuf};

use crate::common::*;

/// A copy of tiny-qlora with the byte-level tokenizer (ids 0..260 fit its 317-token vocab).
pub(crate) fn model_with_tokenizer() -> PathBuf {
    let dir = copy_fixture("tiny-qlora");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer/byte-level").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// `dsv3 generate --tokens .. --json` gives the golden greedy tokens, with and without MTP
/// speculation, and its statistics.
#[test]
fn cli_generate_json_matches_golden() {
    let dir = fixture("tiny-qlora");
    let g = Golden::read(&dir.join("golden.safetensors"));
    let p = g.i("greedy_prompt_len").1[0] as usize;
    let want: Vec<u64> = g.i("greedy_tokens").1.iter().map(|&t| t as u64).collect();
    let ids: Vec<String> = g.ids()[..p].iter().map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    for extra in [&[][..], &["--speculative", "mtp"][..]] {
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &ids,
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        let s = dsv3(&args).unwrap();
        let j: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        let got: Vec<u64> = j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "{extra:?}");
        assert!(j["text"].is_null());
        assert_eq!(j["stats"]["prompt_tokens"], p as u64);
        assert_eq!(j["stats"]["generated_tokens"], 8);
        assert_eq!(j["stats"]["cache_bytes_per_token"], 3 * 28 * 4);
        assert_eq!(j["stats"]["speculative"].is_object(), !extra.is_empty());
    }
    // Streaming without a tokenizer prints ids, then one statistics line.
    let s = dsv3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ])
    .unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 2, "{s}");
    let streamed: Vec<u64> = lines[0]
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(streamed, want);
    assert!(
        lines[1].starts_with(&format!("prompt tokens: {p}, generated: 8, prefill: ")),
        "{s}"
    );
    assert!(
        lines[1].contains("tok/s") && lines[1].contains("cache: "),
        "{s}"
    );
}

/// Text in, text out; chat keeps the conversation in the cache between turns.
#[test]
fn cli_generate_text_and_chat() {
    let dir = model_with_tokenizer();
    let d = dir.to_str().unwrap();
    let s = dsv3(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "12",
        "--json",
    ])
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    assert!(j["text"].is_string());
    // BOS + system + <｜User｜> + "Hello" + <｜Assistant｜>
    assert_eq!(j["stats"]["prompt_tokens"], 1 + 9 + 1 + 5 + 1);

    let args = deepseek_v3::cli::generate::ChatArgs {
        decode: deepseek_v3::cli::generate::DecodeArgs {
            model: dir.clone(),
            max_new_tokens: 6,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: 0,
            speculative: None,
            stop: vec![],
            ignore_eos: true,
            max_context: Some(200),
            prefill_chunk: 16,
            run: deepseek_v3::cli::RunArgs {
                backend: dsv3_backends::BackendKind::Flex,
                dtype: dsv3_backends::FloatDtype::F32,
                weights: dsv3_model::WeightStorage::F32,
            },
        },
        system: None,
    };
    let mut input = std::io::Cursor::new("Hi there\nAnd again?\n\n");
    let mut out = Vec::new();
    deepseek_v3::cli::generate::chat_on::<B>(
        &args,
        dsv3_backends::BackendKind::Flex,
        &mut input,
        &mut out,
        false,
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    let stats: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("[prompt tokens: "))
        .collect();
    assert_eq!(stats.len(), 2, "{out}");
    assert!(stats[0].ends_with("reused 0 cached tokens]"), "{out}");
    // Turn 2 reuses turn 1's prompt and answer (all but the answer's last, unfed token).
    let reused: usize = stats[1]
        .rsplit("reused ")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // At least the whole turn-1 prompt (BOS, <｜User｜>, 8 bytes, <｜Assistant｜>); the answer's
    // tokens too where its text re-encodes to the same ids.
    assert!(reused >= 11, "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Bad CLI input: one line, non-zero exit (an Err from `run`).
#[test]
fn cli_generate_errors() {
    let dir = fixture("tiny-qlora");
    let d = dir.to_str().unwrap();
    let direct = fixture("tiny-direct");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--prompt", "hi"], &["tokenizer", "--tokens"]),
        (
            vec!["--tokens", "1,2", "--temperature", "-1"],
            &["temperature"],
        ),
        (vec!["--tokens", "1,2", "--top-p", "0"], &["top_p"]),
        (vec!["--tokens", "1,2", "--top-k", "0"], &["top_k"]),
        (vec!["--tokens", "1,2", "--min-p", "2"], &["min_p"]),
        (vec!["--tokens", "1,999"], &["999"]),
        (vec!["--tokens", "1,2", "--stop", "x"], &["tokenizer"]),
        (
            vec![
                "--tokens",
                "1,2",
                "--speculative",
                "mtp",
                "--temperature",
                "0.5",
            ],
            &["greedy"],
        ),
        (
            vec!["--tokens", "1,2", "--dtype", "bf16"],
            &["bf16", "flex"],
        ),
        (vec!["--tokens", "1,2", "--dtype", "f8"], &["f8"]),
        (vec!["--tokens", "1,2", "--weights", "int4"], &["int4"]),
        (vec!["--tokens", "1,2", "--backend", "tpu"], &["tpu"]),
    ];
    for (args, needles) in cases {
        let mut full = vec!["generate", "--model", d];
        full.extend(&args);
        let e = dsv3(&full).unwrap_err();
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e}");
        }
        assert!(!e.contains('\n'), "{args:?}: one line: {e}");
    }
    let e = dsv3(&[
        "generate",
        "--model",
        direct.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--speculative",
        "mtp",
    ])
    .unwrap_err();
    assert!(e.contains("MTP"), "{e}");
}

/// `dsv3 generate --json` of 12 greedy tokens after a fixed prompt, with the weights held as
/// `weights`.
pub(crate) fn generate_json(dir: &Path, weights: &str) -> serde_json::Value {
    let out = dsv3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17,200,3,99,41,7",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--weights",
        weights,
        "--json",
    ])
    .unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

/// `generate --weights fp8` keeps the FP8 fixture's weights as e4m3 codes (experts packed for
/// the grouped operations) and decodes the same greedy tokens as with the weights dequantized
/// at load: both compute the same products of the same dequantized values. Likewise
/// `--weights bf16` on a BF16 checkpoint (the same values, widened inside the products).
#[test]
fn generate_with_fp8_or_bf16_weights_matches_f32() {
    for (fixture_name, weights) in [("tiny-fp8", "fp8"), ("tiny-direct", "bf16")] {
        let dir = fixture(fixture_name);
        let (f32w, other) = (generate_json(&dir, "f32"), generate_json(&dir, weights));
        assert_eq!(f32w["tokens"].as_array().unwrap().len(), 12);
        assert_eq!(
            f32w["tokens"], other["tokens"],
            "{fixture_name} with {weights}"
        );
    }
}

/// `dsv3 generate --prompts FILE --batch-size B`: prompts of different lengths (left-padded in a
/// batch) as ids, text and chat messages give, line by line and in order, the tokens each gives
/// alone with `--tokens`/`--prompt [--chat]` (greedy); a chat line comes back with its
/// conversation and the reply as `messages` (sft data); a batch's stats count its rows; a
/// malformed line is named by file and line.
#[test]
fn cli_generate_prompts_file_equals_one_by_one() {
    let dir = model_with_tokenizer();
    let m = dir.to_str().unwrap();
    let common = ["--max-new-tokens", "6", "--ignore-eos"];
    let ids = ["5,9,200,17", "40,41", "7,8,9,10,11,12,13", "99"];
    let mut lines: Vec<String> = ids
        .iter()
        .map(|t| format!("{{\"tokens\": [{t}], \"answer\": \"ignored\"}}"))
        .collect();
    lines.push(r#"{"prompt": "Hello"}"#.into());
    lines.push(r#"{"messages": [{"role": "user", "content": "Hi there"}]}"#.into());
    let file = dir.join("prompts.jsonl");
    write(&file, &(lines.join("\n") + "\n\n"));
    let alone = |extra: &[&str]| -> Vec<u64> {
        let mut args = vec!["generate", "--model", m, "--json"];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        let j: serde_json::Value = serde_json::from_str(dsv3(&args).unwrap().trim()).unwrap();
        j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let mut want: Vec<Vec<u64>> = ids.iter().map(|t| alone(&["--tokens", t])).collect();
    want.push(alone(&["--prompt", "Hello"]));
    want.push(alone(&["--prompt", "Hi there", "--chat"]));
    for batch in ["1", "3", "16"] {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompts",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(&common);
        args.extend_from_slice(&["--batch-size", batch]);
        let out = dsv3(&args).unwrap();
        let got: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{out}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g["index"], i as u64);
            let toks: Vec<u64> = g["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(&toks, w, "batch {batch}, prompt {i}");
        }
        let rows = batch.parse::<u64>().unwrap().min(want.len() as u64);
        assert_eq!(
            got[0]["stats"]["generated_tokens"],
            6 * rows,
            "batch {batch}"
        );
        assert!(got[4]["text"].is_string());
        // Plain text has no conversation; a chat line gets it back with the reply appended.
        assert!(got[4]["messages"].is_null());
        let conv = got[5]["messages"].as_array().unwrap();
        assert_eq!(conv.len(), 2);
        assert_eq!(
            conv[0],
            serde_json::json!({"role": "user", "content": "Hi there"})
        );
        assert_eq!(conv[1]["role"], "assistant");
        assert_eq!(conv[1]["content"], got[5]["text"]);
    }
    // Bad lines: named by file and line, one line on stderr, non-zero exit.
    for (bad, what) in [
        ("{\"tokens\": [1]}\n{\"tokens\": [1,}\n", ":2: "),
        ("{\"tokens\": [1], \"prompt\": \"x\"}\n", "exactly one of"),
        ("{\"tokens\": []}\n", "the prompt is empty"),
        (
            "{\"messages\": [{\"role\": \"user\"}]}\n",
            "missing field `content`",
        ),
    ] {
        write(&file, bad);
        let err = dsv3(&[
            "generate",
            "--model",
            m,
            "--prompts",
            file.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(
            err.contains(what) && err.contains("prompts.jsonl:"),
            "{bad}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
