//! `dsv3 make-task`, `dsv3 eval` and `dsv3 sft` end to end.

use std::path::{Path, PathBuf};

use dsv3_model::checkpoint::{write_safetensors, Dtype, TensorSource};
use safetensors::SafeTensors;

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `make-task` writes the seeded split: the files parse, the held-out answers are the sums of
/// their prompts, no held-out problem is trained on, and the same seed gives the same bytes.
#[test]
fn make_task_writes_a_seeded_disjoint_split() {
    let (a, b) = (scratch("task-a"), scratch("task-b"));
    for dir in [&a, &b] {
        let line = dsv3(&[
            "make-task",
            "--out",
            s(dir),
            "--seed",
            "3",
            "--digits",
            "2",
            "--train",
            "40",
            "--test",
            "8",
        ])
        .unwrap();
        assert!(
            line.contains("40 conversations") && line.contains("8 held-out"),
            "{line}"
        );
    }
    for f in [
        "train.jsonl",
        "train_prompts.jsonl",
        "test.jsonl",
        "test_chat.jsonl",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap()
        );
    }
    let train = read_lines(&a.join("train.jsonl"));
    let test = read_lines(&a.join("test.jsonl"));
    let test_chat = read_lines(&a.join("test_chat.jsonl"));
    assert_eq!((train.len(), test.len(), test_chat.len()), (40, 8, 8));
    let operands = |prompt: &str| -> (u64, u64) {
        let body = prompt
            .strip_prefix("What is ")
            .and_then(|p| p.strip_suffix('?'))
            .unwrap();
        let (x, y) = body.split_once(" + ").unwrap();
        (x.parse().unwrap(), y.parse().unwrap())
    };
    let mut held_out = std::collections::BTreeSet::new();
    for (t, c) in test.iter().zip(&test_chat) {
        let (x, y) = operands(t["prompt"].as_str().unwrap());
        assert_eq!(t["answer"].as_str().unwrap(), (x + y).to_string());
        held_out.insert((x.min(y), x.max(y)));
        // The same problem as a conversation with its worked answer.
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m[0]["content"], t["prompt"]);
        let reply = m[1]["content"].as_str().unwrap();
        assert!(reply.ends_with(&format!(". Answer: {}", x + y)), "{reply}");
    }
    for t in &train {
        let m = t["messages"].as_array().unwrap();
        assert_eq!(
            (m[0]["role"].as_str(), m[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
        let (x, y) = operands(m[0]["content"].as_str().unwrap());
        assert!(!held_out.contains(&(x.min(y), x.max(y))));
        let answer = m[1]["content"].as_str().unwrap();
        assert!(
            answer.ends_with(&format!(". Answer: {}", x + y)),
            "{answer}"
        );
    }
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A model whose logits are `z` at every position, whatever the context: tiny-qlora with the
/// byte-level tokenizer and every weight zero except every embedding row = e₀, the final norm = 1
/// and `lm_head[v][0] = z[v] / √hidden`. Each block then adds nothing to the residual, the final
/// RMSNorm maps e₀ to √hidden · e₀ (up to rms_norm_eps = 1e-6: a relative 72·1e-6/2 = 3.6e-5),
/// and the head gives `z`.
fn unigram_model(z: &[f64]) -> PathBuf {
    let dir = super::generate::model_with_tokenizer();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let hidden = 72;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let mut v = vec![0f32; shape.iter().product()];
        match name.as_str() {
            "model.embed_tokens.weight" => (0..shape[0]).for_each(|r| v[r * hidden] = 1.0),
            "model.norm.weight" => v.fill(1.0),
            "lm_head.weight" => {
                (0..shape[0]).for_each(|r| v[r * hidden] = (z[r] / (hidden as f64).sqrt()) as f32)
            }
            _ => {}
        }
        let values: dsv3_model::checkpoint::Values<'static> = Box::new(move || Ok(v));
        tensors.push((
            name,
            TensorSource {
                dtype: Dtype::F32,
                shape,
                values,
            },
        ));
    }
    write_safetensors(&path, tensors, None).unwrap();
    dir
}

/// The unigram model of the tests below: '7' (logit 4), 'x' (3), ' ' (2), every other id 0.
/// Returns its directory and `log p(id)` computed here in f64.
fn known_model() -> (PathBuf, impl Fn(char) -> f64) {
    let tok = dsv3_infer::Tokenizer::from_files(
        &fixtures().join("tokenizer/byte-level/tokenizer.json"),
        None,
    )
    .unwrap();
    let id = move |c: char| tok.encode(&c.to_string()).unwrap()[0] as usize;
    let mut z = vec![0f64; 317];
    z[id('7')] = 4.0;
    z[id('x')] = 3.0;
    z[id(' ')] = 2.0;
    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
    let dir = unigram_model(&z);
    (dir, move |c: char| z[id(c)] - lse)
}

/// Tolerance on a log-likelihood: the logits carry the norm's relative 3.6e-5 (≤ 1.5e-4 on a
/// logit of 4) plus f32 rounding of the log-softmax over 317 ids (~1e-6); a sum over at most
/// 6 tokens stays below 1e-3. A wrong choice split (BOS, the space, one token too many) moves
/// it by 2 or more.
const LL_TOL: f64 = 2e-3;

/// `eval --task mc` on the unigram model: each choice's log-likelihood is the sum of
/// `log p` over " " + choice, known here; acc and acc_norm follow from them by hand.
#[test]
fn eval_mc_on_a_model_with_known_logits() {
    let (dir, lp) = known_model();
    let data = dir.join("mc.jsonl");
    // 1: " y" beats " xxxx" in total (acc picks 0), " xxxx" beats it per character (acc_norm
    //    picks 1, the answer). 2: " 7" wins both ways (answer 0). 3: " x" wins both ways, the
    //    answer is "q" (given as text). So acc = 1/3, acc_norm = 2/3.
    std::fs::write(
        &data,
        "{\"question\": \"Q1?\", \"choices\": [\"y\", \"xxxx\"], \"answer\": 1}\n\
         {\"question\": \"Q2?\", \"choices\": [\"7\", \"ab\"], \"answer\": 0}\n\
         \n\
         {\"question\": \"Q3?\", \"choices\": [\"q\", \"x\"], \"answer\": \"q\"}\n",
    )
    .unwrap();
    let ll = |choice: &str| lp(' ') + choice.chars().map(&lp).sum::<f64>();
    let want = [
        [ll("y"), ll("xxxx")],
        [ll("7"), ll("ab")],
        [ll("q"), ll("x")],
    ];
    let out = dsv3(&[
        "eval",
        "--model",
        s(&dir),
        "--task",
        "mc",
        "--data",
        s(&data),
        "--json",
    ])
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (j["correct"].as_u64(), j["correct_norm"].as_u64()),
        (Some(1), Some(2))
    );
    assert!((j["acc"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert!((j["acc_norm"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    let items = j["items"].as_array().unwrap();
    let preds = [(0, 1), (0, 0), (1, 1)];
    for (i, item) in items.iter().enumerate() {
        for (c, w) in want[i].iter().enumerate() {
            let got = item["loglikelihoods"][c].as_f64().unwrap();
            assert!(
                (got - w).abs() < LL_TOL,
                "item {i} choice {c}: {got} vs {w}"
            );
        }
        assert_eq!(
            (
                item["prediction"].as_u64().unwrap(),
                item["prediction_norm"].as_u64().unwrap()
            ),
            (preds[i].0, preds[i].1),
            "item {i}"
        );
    }
    // The text form: one summary line.
    let line = dsv3(&[
        "eval",
        "--model",
        s(&dir),
        "--task",
        "mc",
        "--data",
        s(&data),
    ])
    .unwrap();
    assert_eq!(
        line.trim(),
        "mc: acc 0.3333 (1/3), acc_norm 0.6667 (2/3) over 3 questions"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `eval --task ppl`: every byte of the text is predicted once (BOS is not), so the NLL is
/// Σ −log p(byte), known here; windows of 2 inputs predict the same tokens.
#[test]
fn eval_ppl_by_hand() {
    let (dir, lp) = known_model();
    let text = "7x 7ab\n";
    let data = dir.join("text.txt");
    std::fs::write(&data, text).unwrap();
    let nll: f64 = -text.chars().map(&lp).sum::<f64>();
    for context in ["64", "2"] {
        let out = dsv3(&[
            "eval",
            "--model",
            s(&dir),
            "--task",
            "ppl",
            "--data",
            s(&data),
            "--context",
            context,
            "--json",
        ])
        .unwrap();
        let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(j["tokens"].as_u64(), Some(7), "{context}");
        assert_eq!(j["bytes"].as_u64(), Some(7));
        let ppl = (nll / 7.0).exp();
        let bpb = nll / std::f64::consts::LN_2 / 7.0;
        // LL_TOL over 7 tokens, relative on the exponential.
        assert!(
            (j["perplexity"].as_f64().unwrap() / ppl - 1.0).abs() < LL_TOL,
            "{j}"
        );
        assert!(
            (j["bits_per_byte"].as_f64().unwrap() - bpb).abs() < LL_TOL,
            "{j}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `eval --task gen`: greedy decoding of the unigram model writes '7' at every step, so
/// "777" is generated for every prompt (batched, rows of different lengths); the answers
/// "777" (text and number) match, "77" does not.
#[test]
fn eval_gen_exact_match() {
    let (dir, _) = known_model();
    let data = dir.join("gen.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"answer\": \"777\"}\n{\"prompt\": \"bbbb\", \"answer\": \"77\"}\n{\"prompt\": \"cc\", \"answer\": 777}\n",
    )
    .unwrap();
    let out = dsv3(&[
        "eval",
        "--model",
        s(&dir),
        "--task",
        "gen",
        "--data",
        s(&data),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--json",
    ])
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["correct"].as_u64(), Some(2), "{j}");
    let items = j["items"].as_array().unwrap();
    let got: Vec<(&str, u64)> = items
        .iter()
        .map(|i| {
            (
                i["text"].as_str().unwrap(),
                i["exact_match"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("777", 1), ("777", 0), ("777", 1)]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Malformed lines get `FILE:LINE: reason` and a failure, before any model is loaded.
#[test]
fn eval_bad_lines_name_file_and_line() {
    let dir = super::generate::model_with_tokenizer();
    let bad = |task: &str, body: &str, want: &str| {
        let data = dir.join(format!("{task}.jsonl"));
        std::fs::write(&data, body).unwrap();
        let e = dsv3(&[
            "eval",
            "--model",
            s(&dir),
            "--task",
            task,
            "--data",
            s(&data),
        ])
        .unwrap_err();
        assert_eq!(e, format!("{}:{want}", data.display()));
    };
    bad(
        "mc",
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{\"question\": \"q\", \"choices\": [\"a\"",
        "2: not JSON: EOF while parsing a list at line 1 column 33",
    );
    bad(
        "mc",
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n",
        "1: \"answer\" must be a choice's index (0..2) or one of the choices",
    );
    bad("gen", "\n\n{\"prompt\": \"p\"}\n", "3: no \"answer\" field");
    std::fs::remove_dir_all(dir).unwrap();
}

/// tiny-qlora with the byte-level tokenizer (DeepSeek's chat template) and `n` short
/// conversations with a system prompt.
fn sft_setup(n: usize) -> (PathBuf, PathBuf) {
    let dir = super::generate::model_with_tokenizer();
    let data = dir.join("chat.jsonl");
    write_sums(&data, 0..n);
    (dir, data)
}

/// One conversation per `i`: system "Add.", user "{i}+1?", assistant "{i + 1}".
fn write_sums(path: &Path, range: std::ops::Range<usize>) {
    let lines: Vec<String> = range
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Add."},
                {"role": "user", "content": format!("{i}+1?")},
                {"role": "assistant", "content": format!("{}", i + 1)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// `sft` runs the training loop on the rendered conversations: checkpoints, metrics, final/
/// with the model's own tokenizer and template; `--resume` continues to the new total.
#[test]
fn sft_trains_saves_and_resumes() {
    let (dir, data) = sft_setup(6);
    let out = dir.join("run");
    let args = |steps: &'static str| {
        vec![
            "sft".to_string(),
            "--model".into(),
            s(&dir).into(),
            "--data".into(),
            s(&data).into(),
            "--out".into(),
            s(&out).into(),
            "--steps".into(),
            steps.into(),
            "--batch-size".into(),
            "2".into(),
            "--checkpoint-every".into(),
            "2".into(),
            "--val-every".into(),
            "3".into(),
            "--log-every".into(),
            "1".into(),
            "--eval-every".into(),
            "1".into(),
        ]
    };
    let a = args("3");
    let report = dsv3(&a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    // 6 conversations, every 3rd held out; "0+1?" → "1" + EOS are 2 targets, ..., 6 in all
    // windows of the longest conversation.
    assert!(
        report.contains("sft: 6 conversations (2 held out)"),
        "{report}"
    );
    assert!(report.contains("12 assistant target tokens"), "{report}");
    assert!(report.contains("fine-tuned steps 0..3"), "{report}");
    for d in ["step-2", "step-3", "final"] {
        assert!(out.join(d).join("model.safetensors").is_file(), "{d}");
    }
    assert_eq!(
        std::fs::read(out.join("final/tokenizer_config.json")).unwrap(),
        std::fs::read(dir.join("tokenizer_config.json")).unwrap()
    );
    let records = read_lines(&out.join("metrics.jsonl"));
    assert_eq!(records.len(), 3);
    assert!(records
        .iter()
        .all(|r| r["val_loss"].as_f64().unwrap().is_finite()));
    // A fresh run into the same directory is refused; --resume continues.
    let e = dsv3(&a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
    assert!(e.contains("already holds a saved run"), "{e}");
    let mut r = args("4");
    r.push("--resume".into());
    let report = dsv3(&r.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(report.contains("fine-tuned steps 3..4"), "{report}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `sft --val-data` validates on that file's conversations and trains on every line of
/// --data: 4 training conversations + 2 held out ("10+1?" → "11" + EOS and "11+1?" → "12" +
/// EOS: 3 targets each, so the validation loss is over 6 tokens).
#[test]
fn sft_validates_on_a_held_out_file() {
    let (dir, data) = sft_setup(4);
    let held = dir.join("held.jsonl");
    write_sums(&held, 10..12);
    let run = |val: &Path, out: &str, extra: &[&str]| {
        let mut a = vec![
            "sft",
            "--model",
            s(&dir),
            "--data",
            s(&data),
            "--val-data",
            s(val),
            "--out",
        ];
        let out = dir.join(out);
        a.push(s(&out));
        a.extend_from_slice(extra);
        dsv3(&a)
    };
    let report = run(
        &held,
        "run",
        &["--steps", "1", "--batch-size", "2", "--grad-accum", "1"],
    )
    .unwrap();
    assert!(
        report.contains("sft: 6 conversations (2 held out)"),
        "{report}"
    );
    // 4 × 2 training targets + 2 × 3 held-out ones.
    assert!(report.contains("14 assistant target tokens"), "{report}");
    assert!(
        report.contains("per assistant token over 6 tokens"),
        "{report}"
    );
    // A held-out file that is not there: one line naming it.
    let e = run(&dir.join("none.jsonl"), "run2", &[]).unwrap_err();
    assert!(e.contains("none.jsonl"), "{e}");
    // --val-every means nothing with a held-out file: refused rather than ignored.
    let e = run(&held, "run3", &["--val-every", "3"]).unwrap_err();
    assert!(e.contains("--val-data") && e.contains("--val-every"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Each bad input gets one line: an unknown role (FILE:LINE), a model without a chat template.
#[test]
fn sft_bad_inputs_get_one_line() {
    let (dir, data) = sft_setup(2);
    let out = dir.join("run");
    let run = || {
        dsv3(&[
            "sft",
            "--model",
            s(&dir),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ])
    };
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}\n",
    )
    .unwrap();
    assert_eq!(
        run().unwrap_err(),
        format!(
            "{}:1: message 1 has the unknown role \"bot\" (sft takes system, user and assistant)",
            data.display()
        )
    );
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"bos_token\": \"<｜begin▁of▁sentence｜>\"}",
    )
    .unwrap();
    assert_eq!(
        run().unwrap_err(),
        format!(
            "sft needs a chat template: {} has neither chat_template.jinja nor a chat_template key in tokenizer_config.json",
            dir.display()
        )
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `distill` from a teacher identical to the student at τ = 1 with no hard-label weight (and
/// the MTP and balance terms off): the first step's loss is the KL of two equal distributions,
/// 0 up to the autodiff forward's rounding against the plain one (both f32 on Flex; 1e-5 is far
/// below the ~5.5 nats of a hard-label loss on 317 ids). A teacher with another tokenizer is
/// refused in one line.
#[test]
fn distill_from_an_identical_teacher_starts_at_zero_loss() {
    let (dir, data) = sft_setup(4);
    let out = dir.join("run");
    let teacher = super::generate::model_with_tokenizer();
    let distill = |teacher: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec!["distill", "--teacher", s(teacher), "--model", s(&dir)];
        a.extend(["--data", s(&data), "--out", s(out)]);
        a.extend_from_slice(extra);
        dsv3(&a)
    };
    let report = distill(
        &teacher,
        &out,
        &[
            "--temperature",
            "1",
            "--alpha",
            "1",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--val-every",
            "2",
            "--mtp-lambda",
            "0",
            "--balance-alpha",
            "0",
            "--log-every",
            "1",
        ],
    )
    .unwrap();
    assert!(report.contains("distilling from"), "{report}");
    let records = read_lines(&out.join("metrics.jsonl"));
    let loss = records[0]["loss"].as_f64().unwrap();
    let ce = records[0]["ce_loss"].as_f64().unwrap();
    assert!(loss.abs() < 1e-5, "loss {loss}");
    assert!(ce > 1.0, "the hard-label term is still reported: {ce}");
    // A resume with another α is refused: the checkpoint records its teacher and settings.
    let resume = [
        "--temperature",
        "1",
        "--alpha",
        "0.5",
        "--steps",
        "2",
        "--batch-size",
        "2",
    ];
    let e = distill(
        &teacher,
        &out,
        &[&resume[..], &["--val-every", "2", "--resume"]].concat(),
    )
    .unwrap_err();
    assert!(
        e.contains("(τ = 1, α = 1), this resume gives teacher") && e.contains("α = 0.5"),
        "{e}"
    );
    // Another tokenizer: the byte-level one `dsv3 train` writes (258 ids, no added markers).
    dsv3_train::ByteTokenizer.save(&teacher).unwrap();
    let e = distill(&teacher, &dir.join("run2"), &[]).unwrap_err();
    assert!(
        e.starts_with("teacher ") && e.contains("do not share a tokenizer"),
        "{e}"
    );
    assert!(!e.contains("  "), "no run of spaces from a line break: {e}");
    let missing = dir.join("no-teacher");
    let e = distill(&missing, &dir.join("run3"), &[]).unwrap_err();
    assert!(
        e.starts_with("--teacher ") && e.ends_with("no-teacher: no such model directory"),
        "{e}"
    );
    for d in [dir, teacher] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
