//! `dsv3 rl` end to end on tiny-qlora with the byte-level tokenizer and its chat template.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn setup() -> (PathBuf, PathBuf, PathBuf) {
    let dir = super::generate::model_with_tokenizer();
    let (data, held) = (dir.join("prompts.jsonl"), dir.join("held.jsonl"));
    let line = |a: u32, b: u32| {
        serde_json::json!({"prompt": format!("What is {a} + {b}?"), "answer": (a + b).to_string()})
            .to_string()
    };
    std::fs::write(&data, [line(1, 2), line(3, 4), line(5, 1)].join("\n")).unwrap();
    std::fs::write(&held, [line(2, 2), line(6, 1)].join("\n")).unwrap();
    (dir, data, held)
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A short run logs one record per step, evaluates before and after, saves `final/` with the
/// starting model's tokenizer and draws the PNG. Checked on the records: the mean reward is
/// the rule accuracy (no format reward: rewards are 0/1), lengths are within
/// `--max-new-tokens`, and the first step's KL to the reference is exactly 0 (the policy *is*
/// the reference before its first update). The same seed gives the same samples, rewards and
/// losses (a second run into another directory), and a run directory is never overwritten.
#[test]
fn rl_runs_logs_saves_and_is_seeded() {
    let (dir, data, held) = setup();
    let run = |out: &Path| {
        dsv3(&[
            "rl",
            "--model",
            s(&dir),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "3",
            "--max-new-tokens",
            "5",
            "--chat",
            "--eval-data",
            s(&held),
            "--lr",
            "1e-3",
            "--seed",
            "5",
        ])
    };
    let (out1, out2) = (dir.join("rl1"), dir.join("rl2"));
    let report = run(&out1).unwrap();
    assert!(
        report.contains("rl: 3 prompts, 2 per step × 3 completions, 2 steps, reward number"),
        "{report}"
    );
    assert!(
        report.contains("held-out exact match before training: "),
        "{report}"
    );
    assert!(report.contains("held-out exact match: "), "{report}");
    assert!(out1.join("final/model.safetensors").is_file());
    assert!(out1.join("rl.png").is_file());
    assert_eq!(
        std::fs::read(out1.join("final/tokenizer_config.json")).unwrap(),
        std::fs::read(dir.join("tokenizer_config.json")).unwrap()
    );
    let r1 = records(&out1);
    assert_eq!(r1.len(), 2);
    for (i, r) in r1.iter().enumerate() {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(r["step"], i + 1);
        assert_eq!(f("reward"), f("accuracy"));
        assert!((0.0..=1.0).contains(&f("accuracy")));
        assert!(
            f("completion_len") > 0.0 && f("completion_len") <= 5.0,
            "{r}"
        );
        assert!(f("kl") >= 0.0 && f("loss").is_finite() && f("grad_norm").is_finite());
    }
    assert_eq!(r1[0]["kl"].as_f64(), Some(0.0));
    // plot-runs draws training runs: an rl directory's records are refused by name.
    let e = dsv3(&[
        "plot-runs",
        "--run",
        &format!("a={}", s(&out1)),
        "--out",
        s(&dir.join("p.png")),
    ])
    .unwrap_err();
    assert!(e.contains("metrics.jsonl holds no training records"), "{e}");
    assert!(r1[0].get("eval_exact_match").is_none());
    assert!(r1[1]["eval_exact_match"].as_f64().is_some());
    run(&out2).unwrap();
    let r2 = records(&out2);
    for (a, b) in r1.iter().zip(&r2) {
        for k in [
            "reward",
            "completion_len",
            "loss",
            "kl",
            "grad_norm",
            "eval_exact_match",
        ] {
            assert_eq!(a.get(k), b.get(k), "{k}");
        }
    }
    let e = run(&out1).unwrap_err();
    assert!(e.contains("already holds an RL run"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Each bad input gets one line and nothing is written.
#[test]
fn rl_bad_inputs_get_one_line() {
    let (dir, data, _) = setup();
    let out = dir.join("rl");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "rl",
            "--model",
            s(&dir),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        dsv3(&a).unwrap_err()
    };
    let e = run(&["--group-size", "1"]);
    assert!(
        e.contains("--group-size 1") && e.contains("at least 2 completions"),
        "{e}"
    );
    let e = run(&["--reward", "regex"]);
    assert_eq!(e, "the regex reward needs a pattern (--answer-regex)");
    // The regex crate's multi-line message comes out as one line.
    let e = run(&["--reward", "regex", "--answer-regex", "("]);
    assert_eq!(e, "answer pattern \"(\" does not compile: unclosed group");
    let e = run(&["--temperature", "0"]);
    assert!(e.contains("temperature = 0 must be > 0"), "{e}");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"prompt\": \"b\"}\n",
    )
    .unwrap();
    assert_eq!(
        run(&[]),
        format!("{}:2: no \"answer\" field", data.display())
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
